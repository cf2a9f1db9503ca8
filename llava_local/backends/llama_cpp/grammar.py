"""JSON schemas as llama.cpp grammars, checked before the sampler gets them.

llama-cpp-python's converter (``json_schema_to_gbnf``) drops integer bounds and
writes some regular-expression escapes (``\\.``, ``\\d``) into grammar text that
llama.cpp's parser refuses; a grammar that does not parse reaches the sampler as a null
pointer and kills the process. So the schema is first rewritten
(:func:`llava_local.structured.grammar_schema`), and the grammar text is parsed once
by llama.cpp here: if it is refused, the grammar is made again without the schema's
patterns (the answer is still checked against them afterwards).
"""

from __future__ import annotations

import json
import logging
from typing import Any

from ...errors import InvalidRequestError
from ...structured import grammar_schema

_CONVERTER_ERRORS = (ValueError, RuntimeError, KeyError, TypeError, AssertionError)


def grammar_text(schema: dict[str, Any]) -> str:
    """The GBNF grammar for a JSON schema (already checked by ``json_schema``), parsed
    once by llama.cpp."""
    from llama_cpp.llama_grammar import json_schema_to_gbnf

    problem = ""
    for patterns in (True, False):
        try:
            text = json_schema_to_gbnf(json.dumps(grammar_schema(schema, patterns=patterns)))
        except _CONVERTER_ERRORS as exc:
            problem = f"{type(exc).__name__}: {exc}"
            continue
        text = _strict_chars(str(text))
        if parses(text):
            return text
        problem = "llama.cpp's grammar parser refused the converted grammar"
    raise InvalidRequestError(
        f"llama.cpp cannot turn this JSON schema into a grammar ({problem}); simplify the "
        "schema, or use the Ollama engine"
    )


#: The converter's string character lets control characters through (a raw newline or
#: NUL inside a JSON string is not JSON); llama.cpp's own converter leaves them out.
_LOOSE_CHAR = 'char ::= [^"\\\\] |'
_STRICT_CHAR = 'char ::= [^"\\\\\\x7F\\x00-\\x1F] |'


def _strict_chars(text: str) -> str:
    """``text`` with JSON's rule for a string's characters: no control characters."""
    return "\n".join(
        _STRICT_CHAR + line[len(_LOOSE_CHAR) :] if line.startswith(_LOOSE_CHAR) else line
        for line in text.split("\n")
    )


def parses(text: str) -> bool:
    """Whether llama.cpp's grammar parser accepts ``text`` (its error log held back)."""
    import llama_cpp

    logger = logging.getLogger("llama-cpp-python")  # its log callback prints by this level
    level = logger.level
    logger.setLevel(logging.CRITICAL)
    try:
        sampler = llama_cpp.llama_sampler_init_grammar(None, text.encode("utf-8"), b"root")
    finally:
        logger.setLevel(level)
    if not sampler:
        return False
    llama_cpp.llama_sampler_free(sampler)
    return True
