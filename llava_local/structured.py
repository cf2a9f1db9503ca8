"""Structured answers: a pydantic model or JSON schema in, a validated object out.

Three steps, for every engine:

- :func:`json_schema`, before the turn: the schema is checked against the JSON Schema
  metaschema (draft 2020-12 unless its ``$schema`` names another), so a misspelt type
  or a malformed keyword is an :class:`InvalidRequestError` naming the key, not an
  engine failure half-way through a turn. Its cost is bounded first (nesting, size,
  and the repetition counts a grammar spells out one by one: :data:`MAX_REPEAT`), since
  a schema may come from anyone who can reach ``llava-local serve``.
- :func:`grammar_schema`, for llama.cpp: the same schema rewritten so that its grammar
  carries what llama.cpp's converter would drop. An integer range of up to
  :data:`MAX_ENUM_RANGE` values becomes an ``enum`` of those integers; a ``type`` list
  becomes an ``anyOf``, so each type keeps its bounds. Enums, ``const``, string
  ``minLength``/``maxLength``, anchored ``pattern`` and array ``minItems``/``maxItems``
  the converter carries itself.
- :func:`parse`, after the turn: every answer is validated against the original
  schema (pydantic for a model class, ``jsonschema`` for a dict), whatever the grammar
  could carry, so ``reply.parsed`` always fits it or the turn raises
  :class:`SchemaError`.
"""

from __future__ import annotations

import json
import math
import re
from typing import Any

import jsonschema  # type: ignore[import-untyped]  # no type information shipped
from jsonschema.exceptions import best_match  # type: ignore[import-untyped]
from pydantic import BaseModel, ValidationError

from .errors import InvalidRequestError, SchemaError, problems

Schema = type[BaseModel] | dict[str, Any]

#: The widest integer range turned into an ``enum`` for llama.cpp's grammar. A grammar
#: alternative per value; wider ranges are left to the check of the answer.
MAX_ENUM_RANGE = 256

#: How deeply a schema may nest (dicts and lists), how large it may be as JSON text, how
#: large one repetition count may be (``minItems``, ``maxLength``, ``{m,n}`` in a
#: ``pattern``...) and what all its counts may add up to. llama.cpp's grammar writes out
#: every repeated item: ``minItems: 10**7`` cost 4 s and 1 GiB before the first token,
#: and a ``maxLength`` of 20000 crashed the process in llama.cpp's grammar parser.
MAX_SCHEMA_DEPTH = 32
MAX_SCHEMA_BYTES = 128 * 1024
MAX_REPEAT = 4096
MAX_TOTAL_REPEAT = 16384

_COUNTS = frozenset(
    {
        "minItems",
        "maxItems",
        "minLength",
        "maxLength",
        "minProperties",
        "maxProperties",
        "minContains",
        "maxContains",
    }
)
_QUANTIFIER = re.compile(r"\{(\d+)(?:,(\d*))?\}")

# Keywords whose value is one subschema, a list of them, or a name -> subschema map.
_ONE = ("items", "additionalProperties", "not", "contains", "if", "then", "else")
_LIST = ("anyOf", "oneOf", "allOf", "prefixItems")
_MAP = ("properties", "$defs", "definitions", "patternProperties", "dependentSchemas")


def json_schema(schema: Schema) -> dict[str, Any]:
    """The JSON schema the engine must follow (Ollama ``format``, llama.cpp grammar).

    A dict is checked first: an invalid schema raises :class:`InvalidRequestError`
    naming the bad key, before anything is sent to an engine. Either kind is refused,
    with the limit named, when it nests deeper than :data:`MAX_SCHEMA_DEPTH`, is larger
    than :data:`MAX_SCHEMA_BYTES` as JSON, or asks for more repetitions than
    :data:`MAX_REPEAT` in one keyword or :data:`MAX_TOTAL_REPEAT` in all.
    """
    if isinstance(schema, dict):
        _check(schema)
        return schema
    if isinstance(schema, type) and issubclass(schema, BaseModel):
        generated = schema.model_json_schema()
        _check_cost(generated)
        return generated
    raise InvalidRequestError(
        f"schema must be a pydantic model class or a JSON schema dict, not {type(schema).__name__}"
    )


def parse(text: str, schema: Schema) -> Any:
    """The answer as an object: a model instance, or plain JSON data for a dict schema,
    in both cases checked against the schema."""
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        # str(exc) is "<msg>: line L column C (char N)"; exc.msg alone may end in "at".
        raise SchemaError(f"the answer is not valid JSON ({exc})", text) from exc
    if isinstance(schema, dict):
        error = best_match(_validator(schema)(schema).iter_errors(data))
        if error is not None:
            raise SchemaError(
                f"the answer does not fit the schema at {_where(error.absolute_path)}: "
                f"{_message(error)}",
                text,
            )
        return data
    try:
        return schema.model_validate(data)
    except ValidationError as exc:
        raise SchemaError(
            f"the answer does not fit {schema.__name__}: {exc.error_count()} error(s): "
            + problems(exc),
            text,
        ) from exc


def grammar_schema(schema: dict[str, Any], *, patterns: bool = True) -> dict[str, Any]:
    """``schema`` rewritten for llama.cpp's JSON-schema-to-grammar converter, so the
    grammar bounds what the converter alone would leave open (a copy; the answer is
    still checked against the original).

    ``patterns=False`` leaves every ``pattern`` out, for a pattern whose grammar
    llama.cpp refuses; unanchored patterns (JSON Schema searches, the converter
    matches whole strings) are always left out.
    """
    return dict(_for_grammar(schema, patterns))


# -- checking the schema --------------------------------------------------------------


def _check(schema: dict[str, Any]) -> None:
    _check_cost(schema)
    validator = _validator(schema)
    error = best_match(validator(validator.META_SCHEMA).iter_errors(schema))
    if error is not None:
        raise InvalidRequestError(
            f"the schema is not a valid JSON schema: at {_where(error.absolute_path)}, "
            f"{_message(error)}; fix that key (keywords as in JSON Schema "
            f"{_draft(validator)})"
        )
    _check_refs(schema, schema, [])


def _check_cost(schema: dict[str, Any]) -> None:
    """Refuse a schema whose grammar (or validation) would cost too much, before any
    of it is built: nesting first (deep data would overflow the recursion of what
    comes after), then its size as JSON text, then its repetition counts."""
    try:
        text = json.dumps(schema, allow_nan=False)
    except RecursionError:
        raise _too_deep([]) from None
    except (TypeError, ValueError) as exc:
        raise InvalidRequestError(
            f"the schema is not JSON ({exc}); use only dicts, lists, strings, numbers, "
            "booleans and None in it"
        ) from exc
    if len(text) > MAX_SCHEMA_BYTES:
        raise InvalidRequestError(
            f"the schema is {len(text)} bytes as JSON, more than this library's limit of "
            f"{MAX_SCHEMA_BYTES} (structured.MAX_SCHEMA_BYTES); send a smaller schema"
        )
    total = 0.0
    stack: list[tuple[Any, tuple[str | int, ...]]] = [(schema, ())]
    while stack:
        node, path = stack.pop()
        if len(path) >= MAX_SCHEMA_DEPTH:
            raise _too_deep(list(path))
        items = node.items() if isinstance(node, dict) else enumerate(node)
        for key, value in items:
            if isinstance(value, dict | list):
                stack.append((value, (*path, key)))
                continue
            count = _repeats(key, value) if isinstance(node, dict) else 0
            if count > MAX_REPEAT:
                raise InvalidRequestError(
                    f"the schema's {_where([*path, key])} asks for {count:.12g} repetitions, "
                    f"more than this library's limit of {MAX_REPEAT} "
                    "(structured.MAX_REPEAT): llama.cpp's grammar spells out each one; "
                    "ask for fewer, or leave the bound out and check the answer yourself"
                )
            total += count
    if total > MAX_TOTAL_REPEAT:
        raise InvalidRequestError(
            f"the schema's repetition counts (minItems, maxLength, ..., and {{m,n}} in "
            f"patterns) add up to {total:.12g}, more than this library's limit of "
            f"{MAX_TOTAL_REPEAT} (structured.MAX_TOTAL_REPEAT); ask for fewer"
        )


def _repeats(key: Any, value: Any) -> float:
    """How many repetitions ``key: value`` makes a grammar spell out."""
    if key in _COUNTS and isinstance(value, int | float) and not isinstance(value, bool):
        return float(value)
    if key == "pattern" and isinstance(value, str):
        bounds = (int(n) for match in _QUANTIFIER.finditer(value) for n in match.groups() if n)
        return float(max(bounds, default=0))
    return 0.0


def _too_deep(path: list[str | int]) -> InvalidRequestError:
    where = f" (at {_where(path)})" if path else ""
    return InvalidRequestError(
        f"the schema nests deeper than this library's limit of {MAX_SCHEMA_DEPTH} levels"
        f"{where} (structured.MAX_SCHEMA_DEPTH); flatten it, or name repeated parts once "
        "in '$defs' and point at them with '$ref'"
    )


def _validator(schema: dict[str, Any]) -> Any:
    """The validator class for the schema's ``$schema`` (draft 2020-12 without one)."""
    if "$schema" not in schema:
        return jsonschema.Draft202012Validator
    declared = schema["$schema"]
    found = (
        jsonschema.validators.validator_for(schema, default=None)
        if isinstance(declared, str)
        else None
    )
    if found is None:
        raise InvalidRequestError(
            f"the schema's key '$schema' names no JSON Schema draft this library knows "
            f"({declared!r}); leave it out (draft 2020-12) or name a published draft, such "
            "as 'https://json-schema.org/draft/2020-12/schema'"
        )
    return found


def _draft(validator: Any) -> str:
    return str(validator.META_SCHEMA.get("$schema", "draft 2020-12"))


def _check_refs(node: Any, root: dict[str, Any], path: list[str | int]) -> None:
    """Every ``$ref`` points inside the schema, at something that is there."""
    if isinstance(node, list):
        for i, item in enumerate(node):
            _check_refs(item, root, [*path, i])
        return
    if not isinstance(node, dict):
        return
    ref = node.get("$ref")
    if isinstance(ref, str):
        where = _where([*path, "$ref"])
        if not ref.startswith("#"):
            raise InvalidRequestError(
                f"the schema's {where} is {ref!r}: only references inside the schema "
                "('#/$defs/Name') are supported; copy the referenced schema into '$defs'"
            )
        target: Any = root
        for part in ref[1:].split("/")[1:] if ref != "#" else []:
            key = part.replace("~1", "/").replace("~0", "~")
            if isinstance(target, dict) and key in target:
                target = target[key]
            elif isinstance(target, list) and key.isdigit() and int(key) < len(target):
                target = target[int(key)]
            else:
                raise InvalidRequestError(
                    f"the schema's {where} is {ref!r}, but the schema has nothing there; "
                    "add it (under '$defs') or fix the reference"
                )
    for key, value in node.items():
        if key not in ("enum", "const", "default", "examples"):  # data, not schemas
            _check_refs(value, root, [*path, key])


def _where(path: Any) -> str:
    parts = [str(p) for p in path]
    return f"key '{'.'.join(parts)}'" if parts else "its top level"


def _message(error: Any) -> str:
    """The most telling message: for an ``anyOf`` failure (a bad ``type``) the
    alternative that lists the allowed values."""
    for sub in error.context or ():
        if sub.validator == "enum" and not sub.path:
            return str(sub.message)
    return str(error.message)


# -- rewriting for llama.cpp's grammar ------------------------------------------------


def _for_grammar(node: Any, patterns: bool) -> Any:
    if isinstance(node, list):
        return [_for_grammar(item, patterns) for item in node]
    if not isinstance(node, dict):
        return node
    out: dict[str, Any] = {}
    for key, value in node.items():
        if key in _ONE:
            out[key] = _for_grammar(value, patterns)
        elif key in _LIST and isinstance(value, list):
            out[key] = [_for_grammar(item, patterns) for item in value]
        elif key in _MAP and isinstance(value, dict):
            out[key] = {name: _for_grammar(sub, patterns) for name, sub in value.items()}
        elif key == "pattern" and isinstance(value, str):
            anchored = value.startswith("^") and value.endswith("$") and len(value) > 1
            if patterns and anchored:
                out[key] = _grammar_pattern(value)
        else:
            out[key] = value
    types = out.get("type")
    if isinstance(types, list) and not {"$ref", "anyOf", "oneOf"} & out.keys():
        # The converter makes a bare {"type": t} of each entry, dropping the bounds.
        rest = {k: v for k, v in out.items() if k != "type"}
        return {"anyOf": [_for_grammar({**rest, "type": t}, patterns) for t in types]}
    if out.get("type") == "integer" and "enum" not in out and "const" not in out:
        values = _integer_range(out)
        if values is not None:
            out["enum"] = values
    return out


def _integer_range(schema: dict[str, Any]) -> list[int] | None:
    """The integers a bounded integer schema allows, when there are few enough."""
    low, high = -math.inf, math.inf
    for key, value in schema.items():
        if isinstance(value, bool) or not isinstance(value, int | float):
            continue
        if key == "minimum":
            low = max(low, math.ceil(value))
        elif key == "exclusiveMinimum":
            low = max(low, math.floor(value) + 1)
        elif key == "maximum":
            high = min(high, math.floor(value))
        elif key == "exclusiveMaximum":
            high = min(high, math.ceil(value) - 1)
    if math.isinf(low) or math.isinf(high) or not 0 < high - low + 1 <= MAX_ENUM_RANGE:
        return None
    step = schema.get("multipleOf")
    values = range(int(low), int(high) + 1)
    if isinstance(step, int | float) and not isinstance(step, bool) and step > 0:
        return [v for v in values if (v / step).is_integer()] or None
    return list(values)


# Regular-expression escapes the converter copies into the grammar as they are, where
# llama.cpp's parser refuses them: written as character classes it accepts instead.
_CLASSES = {"d": "0-9", "w": "a-zA-Z0-9_", "s": " \\t\\n\\r"}
_PLAIN = frozenset("./$#&~!%,:;<=>@`'")


def _grammar_pattern(pattern: str) -> str:
    out, in_class, i = [], False, 0
    while i < len(pattern):
        c, escaped = pattern[i], pattern[i + 1 : i + 2] if pattern[i] == "\\" else ""
        if escaped in _CLASSES:
            out.append(_CLASSES[escaped] if in_class else f"[{_CLASSES[escaped]}]")
        elif escaped in _PLAIN and escaped:
            out.append(escaped if in_class else f"[{escaped}]")
        elif escaped:
            out.append(c + escaped)
        else:
            in_class = c == "[" if not in_class else c != "]"
            out.append(c)
        i += 1 + len(escaped)
    return "".join(out)
