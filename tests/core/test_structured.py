"""schema=: schemas checked before the turn, answers checked after it, and llama.cpp's
grammar carrying the bounds it can (the demo model, the stand-in Ollama daemon)."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Annotated, Any

import pytest
from pydantic import BaseModel, Field

from llava_local import InvalidRequestError, SchemaError, VisionChat, structured

from ..ollama_server import OllamaServer, Script
from ..paths import ROOT

EXAMPLES = ROOT / "examples"
DIGIT = EXAMPLES / "digit.png"  # the demo model reads it as a 7


def digit_schema(**bounds: Any) -> dict[str, Any]:
    return {
        "type": "object",
        "properties": {"digit": {"type": "integer", **bounds}},
        "required": ["digit"],
    }


@pytest.fixture
def chat(demo_chat: VisionChat) -> VisionChat:
    demo_chat.reset()
    return demo_chat


# -- invalid schemas --------------------------------------------------------------------

INVALID = [
    ({"type": "objekt"}, "'type'", "'objekt' is not one of"),
    ({"properties": 5}, "'properties'", "not of type 'object'"),
    ({"type": "object", "properties": {"a": {"type": "strin"}}}, "'properties.a.type'", "strin"),
    ({"type": "integer", "maximum": "9"}, "'maximum'", "not of type 'number'"),
    ({"required": "digit"}, "'required'", "not of type 'array'"),
    ({"$ref": "#/$defs/Missing"}, "'$ref'", "nothing there"),
    ({"$ref": "https://example.com/digit.json"}, "'$ref'", "only references inside"),
    ({"$schema": "https://example.com/my-draft", "type": "object"}, "'$schema'", "no JSON"),
    ({"$schema": "http://json-schema.org/draft-07/schema#", "type": "objekt"}, "'type'", ""),
    ({"type": "string", "default": {1, 2}}, "not JSON", ""),
]


@pytest.mark.parametrize(("schema", "key", "reason"), INVALID)
def test_an_invalid_schema_is_refused_naming_the_key(
    schema: dict[str, Any], key: str, reason: str
) -> None:
    """A dict schema that breaks the JSON Schema rules raises InvalidRequestError that
    names the bad key and says what is wrong with it."""
    with pytest.raises(InvalidRequestError) as info:
        structured.json_schema(schema)
    assert key in str(info.value)
    assert reason in str(info.value)


@pytest.mark.parametrize(("schema", "key", "reason"), INVALID[:2])
def test_an_invalid_schema_fails_before_the_llama_cpp_turn(
    chat: VisionChat, schema: dict[str, Any], key: str, reason: str
) -> None:
    """On llama.cpp a bad schema is refused when the turn is asked for, before the
    engine sees it (not a BackendError from the grammar converter half-way through)."""
    with pytest.raises(InvalidRequestError, match=re.escape(key)):
        chat.stream("What digit is this?", image=DIGIT, schema=schema)  # not even iterated
    assert chat.history == []
    assert chat.ask("What digit is this?", image=DIGIT).text == "This digit is 7."


@pytest.mark.parametrize(("schema", "key", "reason"), INVALID[:2])
def test_an_invalid_schema_is_never_sent_to_ollama(
    ollama_server: OllamaServer, schema: dict[str, Any], key: str, reason: str
) -> None:
    """On Ollama the same check refuses the schema with the same error, and nothing of
    the turn reaches the daemon."""
    with VisionChat.ollama(host=ollama_server.url) as chat:
        sent = len(ollama_server.requests)
        with pytest.raises(InvalidRequestError, match=re.escape(key)) as info:
            chat.ask("What digit is this?", image=DIGIT, schema=schema)
        assert reason in str(info.value)
        assert len(ollama_server.requests) == sent
        assert ollama_server.requests_to("/api/chat") == []
        assert chat.history == []


# -- answers are checked --------------------------------------------------------------


def test_a_dict_schema_answer_is_validated() -> None:
    """An answer outside a dict schema's bounds is a SchemaError naming the field and
    the bound, as it is for a pydantic model; one inside comes back as plain data."""
    schema = digit_schema(minimum=0, maximum=9)
    with pytest.raises(SchemaError, match=r"'digit'.*maximum of 9") as info:
        structured.parse('{"digit": 60707010009}', schema)
    assert info.value.text == '{"digit": 60707010009}'
    with pytest.raises(SchemaError, match="'digit' is a required property"):
        structured.parse("{}", schema)
    assert structured.parse('{"digit": 7}', schema) == {"digit": 7}


def test_ollama_answer_outside_the_schema_is_refused(ollama_server: OllamaServer) -> None:
    """An engine whose answer breaks the dict schema's maximum raises SchemaError and
    the turn is not kept (Ollama's grammar is the daemon's; the check is ours)."""
    ollama_server.script(Script(pieces=['{"digit": ', "60707010009}"]))
    with VisionChat.ollama(host=ollama_server.url) as chat:
        with pytest.raises(SchemaError, match="maximum of 9"):
            chat.ask("What digit is this?", image=DIGIT, schema=digit_schema(maximum=9))
        assert chat.history == []


def test_broken_json_is_described_once() -> None:
    """A cut-off answer's error says where the JSON broke, without doubled words."""
    with pytest.raises(SchemaError) as info:
        structured.parse('{"digit": "7', digit_schema())
    message = str(info.value)
    assert "at at" not in message
    assert "Unterminated string starting at: line 1 column 11 (char 10)" in message


def test_an_answer_cut_by_max_tokens_is_not_a_misfit(chat: VisionChat) -> None:
    """An answer cut by max_tokens before its JSON ends is a reply like any cut answer:
    done_reason "length", parsed None, the JSON as far as it was written; no
    SchemaError (OpenAI answers finish_reason "length" the same way)."""
    reply = chat.ask("What digit is this?", image=DIGIT, schema=digit_schema(), max_tokens=3)
    assert reply.done_reason == "length"
    assert reply.parsed is None
    assert reply.text.startswith("{")
    assert len(chat.history) == 2  # kept, as any finished turn
    chat.reset()
    bounded = digit_schema(minimum=0, maximum=9)
    whole = chat.ask("What digit is this?", image=DIGIT, schema=bounded, max_tokens=40)
    assert (whole.done_reason, whole.parsed) == ("stop", {"digit": 7})


COSTLY = [
    ({"type": "array", "items": {"type": "integer"}, "minItems": 10**7}, "'minItems'"),
    ({"type": "string", "maxLength": 20_000}, "'maxLength'"),
    ({"type": "string", "pattern": "^a{0,99999}$"}, "'pattern'"),
    ({"type": "string", "enum": ["x" * 100] * 2000}, "131072"),
    ({"type": "object", "properties": {f"p{i}": {"maxLength": 4000} for i in range(5)}}, "16384"),
]


@pytest.mark.parametrize(("schema", "named"), COSTLY)
def test_a_schema_too_costly_for_a_grammar_is_refused(
    chat: VisionChat, schema: dict[str, Any], named: str
) -> None:
    """A schema whose grammar would spell out millions of repetitions (minItems 10**7
    took 4 s and 1 GiB; maxLength 20000 crashed the process in llama.cpp's grammar
    parser), or that is too large, is an InvalidRequestError naming the key and the
    limit before the turn; a pydantic model gets the same check."""
    with pytest.raises(InvalidRequestError, match=re.escape(named)):
        chat.stream("What digit is this?", image=DIGIT, schema=schema)
    assert chat.history == []

    class Many(BaseModel):
        items: Annotated[list[int], Field(min_length=10**6)]

    with pytest.raises(InvalidRequestError, match="limit of 4096"):
        structured.json_schema(Many)


# -- llama.cpp's grammar carries what it can -------------------------------------------


def test_the_grammar_bounds_an_integer_range(chat: VisionChat) -> None:
    """With minimum 0 and maximum 9 the demo model can only write one digit (it wrote
    7000000000000000 when the grammar ignored the bounds)."""
    reply = chat.ask("What digit is this?", image=DIGIT, schema=digit_schema(minimum=0, maximum=9))
    assert reply.parsed == {"digit": 7}
    chat.reset()
    nullable = digit_schema(minimum=0, maximum=9)
    nullable["properties"]["digit"]["type"] = ["integer", "null"]
    assert chat.ask("What digit is this?", image=DIGIT, schema=nullable).parsed == {"digit": 7}


def test_a_pydantic_field_range_reaches_the_grammar(chat: VisionChat) -> None:
    """A pydantic int field with ge/le is bounded by the grammar as well."""

    class Digit(BaseModel):
        digit: Annotated[int, Field(ge=0, le=9)]

    assert chat.ask("What digit is this?", image=DIGIT, schema=Digit).parsed == Digit(digit=7)


def test_patterns_with_escapes_reach_the_grammar(chat: VisionChat) -> None:
    """Patterns with regular-expression escapes (\\d, \\.) are written as grammar that
    llama.cpp accepts (a refused grammar used to crash the process)."""
    schema = {
        "type": "object",
        "properties": {"answer": {"type": "string", "pattern": r"^This digit is \d\.$"}},
        "required": ["answer"],
    }
    reply = chat.ask("What digit is this?", image=DIGIT, schema=schema, max_tokens=48)
    assert reply.parsed == {"answer": "This digit is 7."}


def test_a_grammar_string_holds_no_control_character() -> None:
    """Every string the llama.cpp grammar allows is JSON: llama-cpp-python's converter
    let control characters into strings, and sampled free text (run 36's demo, seed 42
    at temperature 1.5) wrote a raw one, an answer that is not JSON."""
    from llava_local.backends.llama_cpp.grammar import grammar_text

    schema = {
        "type": "object",
        "properties": {"text": {"type": "string", "maxLength": 24}, "tags": {"type": "array"}},
        "required": ["text"],
    }
    text = grammar_text(schema)
    rules = dict(line.split(" ::= ", 1) for line in text.splitlines())
    assert rules["char"].startswith('[^"\\\\\\x7F\\x00-\\x1F] | "\\\\" (')
    assert '[^"\\\\] |' not in text


def test_grammar_schema_rewrites_only_what_the_converter_drops() -> None:
    """Integer ranges become enums (up to MAX_ENUM_RANGE values, multipleOf kept), type
    lists become anyOf, unanchored patterns are left out, and the input is not changed."""
    schema = {
        "type": "object",
        "properties": {
            "small": {"type": "integer", "exclusiveMinimum": 0, "maximum": 10, "multipleOf": 5},
            "wide": {"type": "integer", "minimum": 0, "maximum": structured.MAX_ENUM_RANGE},
            "either": {"type": ["integer", "null"], "minimum": 1, "maximum": 2},
            "word": {"type": "string", "pattern": "cat"},
            "code": {"type": "string", "pattern": r"^\d[.]\w$", "maxLength": 3},
        },
    }
    before = repr(schema)
    props = structured.grammar_schema(schema)["properties"]
    assert repr(schema) == before
    assert props["small"]["enum"] == [5, 10]
    assert "enum" not in props["wide"]  # 257 values: left to the check of the answer
    assert [alt.get("enum") for alt in props["either"]["anyOf"]] == [[1, 2], None]
    assert "pattern" not in props["word"]
    assert props["code"]["pattern"] == "^[0-9][.][a-zA-Z0-9_]$"
    assert "pattern" not in structured.grammar_schema(schema, patterns=False)["properties"]["code"]


# -- the shipped examples ------------------------------------------------------------------


def test_structured_answer_example_prints_a_digit() -> None:
    """examples/structured_answer.py prints a Digit whose field is one digit, 0-9."""
    result = subprocess.run(
        [sys.executable, str(EXAMPLES / "structured_answer.py"), str(DIGIT)],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    assert re.fullmatch(r"Digit\(digit=[0-9]\)\n", result.stdout)


#: What each example prints when run with no arguments (the demo model, greedy).
EXAMPLE_OUTPUT = {
    "ask_picture.py": r"This digit is 7\.\n",
    "conversation.py": r"This digit is 7\. \(pictures encoded: 1\)\n"
    r"This digit is 7\. \(pictures encoded: 0, tokens reused: \d+\)\n",
    "structured_answer.py": r"Digit\(digit=[0-9]\)\n",
    "tour.py": r"It is a triangle\. \(\d+\.\d\d s\)\nIt is red\.\nThis digit is 7\.\n",
}


def test_every_example_has_its_expected_output() -> None:
    """The table below covers every script in examples/."""
    assert sorted(p.name for p in EXAMPLES.glob("*.py")) == sorted(EXAMPLE_OUTPUT)


@pytest.mark.parametrize("name", sorted(EXAMPLE_OUTPUT))
def test_every_example_runs_without_arguments(
    name: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each examples/*.py run with no arguments answers about the bundled digit found
    beside it, from another folder (the tour, which the README runs from the repository,
    from a copy of it), and exits 0."""
    shutil.copytree(EXAMPLES, tmp_path / "examples")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.delenv("OLLAMA_HOST", raising=False)  # ask_picture: auto finds the demo
    monkeypatch.delenv("LLAVA_LOCAL_MODEL", raising=False)
    result = subprocess.run(
        [sys.executable, str(tmp_path / "examples" / name)],
        cwd=tmp_path if name == "tour.py" else elsewhere,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert re.fullmatch(EXAMPLE_OUTPUT[name], result.stdout)


def test_shape_schema_example_fits_the_demo(chat: VisionChat) -> None:
    """examples/shape.schema.json is a valid schema the demo model fills in correctly
    for the example shape (a red triangle)."""
    schema = json.loads((EXAMPLES / "shape.schema.json").read_text(encoding="utf-8"))
    reply = chat.ask("What shape is this?", image=EXAMPLES / "shape.png", schema=schema)
    assert reply.parsed == {"shape": "triangle"}


def test_the_readme_tour_runs_as_shown(tmp_path: Path) -> None:
    """The README's demo tour is examples/tour.py, and it prints the answers its
    comments promise."""
    code = (EXAMPLES / "tour.py").read_text(encoding="utf-8").split('"""', 2)[2].strip()
    assert code in (ROOT / "README.md").read_text(encoding="utf-8")
    shutil.copytree(EXAMPLES, tmp_path / "examples")
    result = subprocess.run(
        [sys.executable, "examples/tour.py"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    lines = result.stdout.splitlines()
    assert re.fullmatch(r"It is a triangle\. \(\d+\.\d\d s\)", lines[0])
    assert lines[1:] == ["It is red.", "This digit is 7."]
    assert (tmp_path / "talk.json").is_file()
