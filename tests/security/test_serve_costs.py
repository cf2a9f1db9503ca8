"""Cheap requests that would cost a lot (issue 25, findings 6 and 7): a body nested
10,000 deep and JSON schemas whose grammar would hold millions of repetitions are
refused with 400 naming the limit before any of the cost is paid; an answer cut by
max_tokens inside a schema is a 200 with finish_reason "length", as OpenAI answers."""

from __future__ import annotations

import json
from typing import Any

import httpx
import pytest

from ..serve_process import Server, ask
from .conftest import post, still_answers

pytestmark = pytest.mark.llama

DIGIT_SCHEMA = {
    "type": "object",
    "properties": {"digit": {"type": "integer", "minimum": 0, "maximum": 9}},
    "required": ["digit"],
}


def _openai_schema(schema: dict[str, Any]) -> dict[str, Any]:
    return {"type": "json_schema", "json_schema": {"name": "x", "schema": schema}}


def test_a_body_nested_10000_deep_is_400(plain: Server) -> None:
    """A body nested 10,000 levels deep (or just past the limit of 64) is a 400 naming
    the limit in each protocol, with no traceback in the log."""
    for depth in (10_000, 65):
        deep = b'{"model": "demo", "messages": ' + b"[" * depth + b"]" * depth + b"}"
        for path in ("/v1/chat/completions", "/api/chat"):
            refused = post(plain, path, deep)
            assert refused.status_code == 400, (depth, path, refused.text)
            message = refused.text
            assert "64 levels" in message
    assert "Traceback" not in plain.log_text()
    still_answers(plain)


@pytest.mark.parametrize(
    ("schema", "named"),
    [
        ({"type": "array", "items": {"type": "integer"}, "minItems": 10**7}, "minItems"),
        ({"type": "string", "minLength": 10**9}, "minLength"),
        ({"type": "string", "maxLength": 20_000}, "maxLength"),  # crashed llama.cpp's parser
        ({"type": "string", "pattern": "^a{1000000}$"}, "pattern"),
        ({"type": "object", "minProperties": 10**7}, "minProperties"),
    ],
)
def test_a_schema_too_costly_for_a_grammar_is_400(
    plain: Server, schema: dict[str, Any], named: str
) -> None:
    """A json_schema (OpenAI) or format (Ollama) asking for more repetitions than the
    limit is a 400 naming the keyword and the limit, before any grammar is built."""
    body = {"model": "demo", "messages": ask(), "response_format": _openai_schema(schema)}
    refused = post(plain, "/v1/chat/completions", body)
    assert refused.status_code == 400, refused.text
    message = refused.json()["error"]["message"]
    assert named in message
    assert "limit of 4096" in message
    ollama = {"model": "demo", "messages": [{"role": "user", "content": "hi"}], "format": schema}
    refused = post(plain, "/api/chat", ollama)
    assert refused.status_code == 400
    assert "limit of 4096" in refused.json()["error"]


def test_a_schema_nested_too_deep_or_too_large_is_400(plain: Server) -> None:
    """A schema nested deeper than 32 levels, or larger than 128 KiB, is a 400 naming
    the limit."""
    deep: dict[str, Any] = {"type": "string"}
    for _ in range(40):
        deep = {"type": "array", "items": deep}
    large = {"type": "string", "enum": [f"value {i}" for i in range(20_000)]}
    for schema, limit in ((deep, "32 levels"), (large, "131072")):
        body = {"model": "demo", "messages": ask(), "response_format": _openai_schema(schema)}
        refused = post(plain, "/v1/chat/completions", body)
        assert refused.status_code == 400
        assert limit in refused.json()["error"]["message"]
    still_answers(plain)


def test_an_answer_cut_inside_a_schema_is_200_length(plain: Server) -> None:
    """max_tokens (Ollama: num_predict) that cuts a JSON answer short gives 200 with
    finish_reason (done_reason) "length" and the text as written, whole or streamed,
    never a 500 that clients would retry."""
    body = {
        "model": "demo",
        "messages": ask(),
        "temperature": 0,
        "max_tokens": 3,
        "response_format": _openai_schema(DIGIT_SCHEMA),
    }
    whole = post(plain, "/v1/chat/completions", body)
    assert whole.status_code == 200, whole.text
    choice = whole.json()["choices"][0]
    assert choice["finish_reason"] == "length"
    text = choice["message"]["content"]
    assert text.startswith("{")
    with pytest.raises(json.JSONDecodeError):
        json.loads(text)
    url = f"{plain.url}/v1/chat/completions"
    with httpx.stream("POST", url, json={**body, "stream": True}, timeout=120) as streamed:
        assert streamed.status_code == 200
        events = [line[6:] for line in streamed.iter_lines() if line.startswith("data: {")]
    chunks = [json.loads(event) for event in events]
    assert not any("error" in chunk for chunk in chunks)
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"
    streamed_text = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks)
    assert streamed_text == text
    ollama = {
        "model": "demo",
        "messages": [{"role": "user", "content": "What digit is this?"}],
        "format": DIGIT_SCHEMA,
        "options": {"num_predict": 3, "temperature": 0},
        "stream": False,
    }
    answered = post(plain, "/api/chat", ollama)
    assert answered.status_code == 200, answered.text
    assert answered.json()["done_reason"] == "length"
    assert answered.json()["message"]["content"]
