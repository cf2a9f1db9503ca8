"""The wire protocols' shapes and translations (llava_local.protocols), both ways.

Each translation is written once and used by the engine on one end and by ``serve`` on
the other, so these tests take values through both directions: what the engine sends
is what the server reads, what the server writes is what the engine reads. The engines
against the server for real are in tests/apps/serve/test_round_trips.py.
"""

from __future__ import annotations

import base64
from typing import Any

import ollama
import pydantic
import pytest

from llava_local.errors import InvalidRequestError
from llava_local.protocols import ollama as ollama_wire
from llava_local.protocols import openai as openai_wire
from llava_local.types import Message, Options, PreparedImage, Stats

#: Every option set, to values no default has.
OPTIONS = Options(
    temperature=0.7,
    top_p=0.8,
    top_k=12,
    max_tokens=34,
    seed=56,
    stop=("\n", "END"),
    repeat_penalty=1.15,
)
#: A turn's figures as the in-process engine reports them.
STATS = Stats(
    prompt_tokens=21,
    completion_tokens=9,
    cached_tokens=200,
    load_s=0.5,
    prompt_s=0.25,
    decode_s=0.125,
    total_s=1.0,
)
PNG = base64.b64decode(
    "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mP8z8DwHwAFBQIAX8jx0gAAAABJRU5ErkJggg=="
)


def picture() -> PreparedImage:
    return PreparedImage(
        data=PNG, mime="image/png", width=1, height=1, sha256="0" * 64, source="dot.png"
    )


# --- Ollama --------------------------------------------------------------------------


def test_ollama_options_cross_both_ways() -> None:
    """Every option survives the engine's Ollama names and the server's reading of
    them (max_tokens as num_predict, stop as a list)."""
    sent = ollama_wire.options_to_wire(OPTIONS)
    assert sent["num_predict"] == 34
    assert sent["stop"] == ["\n", "END"]
    assert Options(**ollama_wire.options_from_wire(sent)) == OPTIONS
    assert ollama_wire.options_to_wire(Options()) == {}


def test_ollama_runner_options_and_no_limit_are_left_to_the_server() -> None:
    """num_ctx, num_thread and a num_predict below 0 (no limit) are not turn options."""
    read = ollama_wire.options_from_wire({"num_ctx": 4096, "num_thread": 2, "num_predict": -1})
    assert read == {}


def test_ollama_figures_cross_both_ways() -> None:
    """The server's counters and nanoseconds read back as the same stats; Ollama has no
    field for the reused tokens, so they come back unknown."""
    wired = ollama_wire.ChatResponse(
        model="demo", done=True, **ollama_wire.Metrics.from_stats(STATS).model_dump()
    ).wire()
    assert wired["prompt_eval_count"] == 21
    assert wired["eval_duration"] == 125_000_000
    read = ollama_wire.ChatResponse.model_validate(wired).stats(first_token_s=0.3)
    assert (read.prompt_tokens, read.completion_tokens, read.cached_tokens) == (21, 9, None)
    assert (read.load_s, read.prompt_s, read.decode_s, read.total_s) == (0.5, 0.25, 0.125, 1.0)
    assert read.first_token_s == 0.3


def test_ollama_chunks_without_figures_and_new_fields_parse() -> None:
    """A piece's chunk carries no figures (they read as 0), and fields this library does
    not know (thinking, a newer daemon's counters) never break parsing."""
    piece = ollama_wire.ChatResponse(model="demo", message=ollama_wire.Message(role="assistant"))
    assert set(piece.wire()) == {"model", "created_at", "message", "done"}
    newer = {
        "model": "demo",
        "message": {"role": "assistant", "content": "hi", "thinking": "..."},
        "done": True,
        "eval_count": "many",
        "prompt_eval_count": True,
        "tool_calls_count": 3,
    }
    read = ollama_wire.ChatResponse.model_validate(newer)
    assert read.message.content == "hi"
    assert (read.stats(None).completion_tokens, read.stats(None).prompt_tokens) == (0, 0)


def test_ollama_client_objects_are_read_with_the_same_shapes() -> None:
    """The official client's own objects (what the engine gets) read as ours do."""
    final = ollama.ChatResponse(
        model="demo",
        message=ollama.Message(role="assistant", content="7"),
        done=True,
        done_reason="length",
        eval_count=4,
        eval_duration=2_000_000_000,
    )
    read = ollama_wire.ChatResponse.model_validate(final, from_attributes=True)
    assert ollama_wire.done_reason(read.done_reason) == "length"
    assert (read.stats(None).completion_tokens, read.stats(None).decode_s) == (4, 2.0)


@pytest.mark.parametrize(
    ("capabilities", "families", "vision"),
    [
        (["completion", "vision"], None, True),
        (["completion"], ["clip"], False),  # capabilities win
        (None, ["llama", "clip"], True),  # an old daemon: judged by the families
        (None, ["llama"], False),
        (None, None, None),  # nothing said
    ],
)
def test_ollama_vision_is_read_from_show(
    capabilities: list[str] | None, families: list[str] | None, vision: bool | None
) -> None:
    """Whether a model sees comes from its capabilities, else its families."""
    show = ollama_wire.Show(
        capabilities=capabilities, details=ollama_wire.ModelDetails(families=families)
    )
    assert ollama_wire.is_vision(show) is vision


def test_ollama_names_match_as_ollama_matches_them() -> None:
    """llava is llava:latest in any case; another tag is another model."""
    assert ollama_wire.same_model("llava", "LLaVA:latest")
    assert ollama_wire.same_model("library/llava", "library/llava:latest")
    assert not ollama_wire.same_model("llava:13b", "llava")
    assert ollama_wire.short_name("demo:latest") == "demo"


def test_ollama_format_is_a_schema() -> None:
    """format "json" asks for any object, a schema for itself, nothing for none."""
    schema = {"type": "object", "properties": {"digit": {"type": "integer"}}}
    assert ollama_wire.schema_of("json") == {"type": "object"}
    assert ollama_wire.schema_of(schema) == schema
    assert ollama_wire.schema_of("") is None


def test_ollama_requests_are_checked() -> None:
    """A request without a model name, or with a format Ollama does not know, is refused."""
    with pytest.raises(pydantic.ValidationError):
        ollama_wire.ChatRequest.model_validate({"model": "", "messages": []})
    with pytest.raises(pydantic.ValidationError):
        ollama_wire.ChatRequest.model_validate({"model": "demo", "format": "yaml"})


# --- OpenAI --------------------------------------------------------------------------


def turn_request(**settings: Any) -> dict[str, Any]:
    """What the engine sends for a two-message turn with a picture, as JSON."""
    messages = [
        Message(role="system", content="Be brief."),
        Message(role="user", content="What digit?", images=(picture(),)),
    ]
    return openai_wire.ChatRequest.for_turn("demo", messages, OPTIONS, **settings).wire()


def test_openai_options_cross_both_ways() -> None:
    """Every option survives the engine's request and the server's reading of it,
    top_k and repeat_penalty as extra fields under their own names."""
    sent = turn_request()
    assert {k: sent[k] for k in ("max_tokens", "top_k", "repeat_penalty")} == {
        "max_tokens": 34,
        "top_k": 12,
        "repeat_penalty": 1.15,
    }
    assert sent["stream"] is True
    assert sent["stream_options"] == {"include_usage": True}
    read = openai_wire.ChatRequest.model_validate(sent)
    assert Options(**read.options()) == OPTIONS
    newer = openai_wire.ChatRequest.model_validate({**sent, "max_completion_tokens": 5})
    assert newer.options()["max_tokens"] == 5


def test_openai_pictures_go_as_data_uris_before_the_text() -> None:
    """A picture crosses as a data: URI of the prepared bytes, ahead of the question."""
    system, user = turn_request()["messages"]
    assert system == {"role": "system", "content": "Be brief."}
    uri = "data:image/png;base64," + base64.b64encode(PNG).decode()
    assert user["content"] == [
        {"type": "image_url", "image_url": {"url": uri}},
        {"type": "text", "text": "What digit?"},
    ]
    parts = openai_wire.ChatMessage.model_validate(user).content
    assert isinstance(parts, list)
    assert [part.url for part in parts] == [uri, None]
    bare = openai_wire.ContentPart.model_validate({"type": "image_url", "image_url": uri})
    assert bare.url == uri  # the shape some clients send


@pytest.mark.parametrize("form", ["json_schema", "json_object"])
def test_openai_schemas_cross_in_both_forms(form: openai_wire.SchemaForm) -> None:
    """schema= is sent as json_schema (or llama-cpp-python's json_object form) and read
    back as the same schema; json_object alone asks for any object."""
    schema = {"type": "object", "properties": {"digit": {"type": "integer"}}}
    sent = turn_request(schema=schema, form=form)
    assert sent["response_format"]["type"] == form
    assert openai_wire.ChatRequest.model_validate(sent).answer_schema() == schema
    plain = openai_wire.ResponseFormat(type="json_object")
    assert plain.answer_schema() == {"type": "object"}


def test_openai_requests_are_checked_with_openai_bounds() -> None:
    """The server refuses what OpenAI refuses (n=2, a temperature over 2, no messages,
    a json_schema without its schema); the engine may send a local server a temperature
    over 2, as our options allow it."""
    good = turn_request()
    refused: list[dict[str, Any]] = [{"n": 2}, {"temperature": 2.5}, {"messages": []}]
    for bad in refused:
        with pytest.raises(pydantic.ValidationError):
            openai_wire.ChatRequest.model_validate({**good, **bad})
    hot = openai_wire.ChatRequest.for_turn("demo", [], Options(temperature=2.5)).wire()
    assert hot["temperature"] == 2.5
    empty = {"type": "json_schema", "json_schema": {"name": "x"}}
    with pytest.raises(InvalidRequestError, match=r"json_schema\.schema"):
        openai_wire.ResponseFormat.model_validate(empty).answer_schema()


def test_openai_figures_cross_both_ways() -> None:
    """usage and timings written from our stats read back as the same counts and
    durations: usage counts the whole prompt, the reused part apart."""
    usage = openai_wire.Usage.from_stats(STATS)
    assert (usage.prompt_tokens, usage.total_tokens) == (221, 230)
    timings = openai_wire.Timings.from_stats(STATS)
    both = openai_wire.stats(usage, timings, first_token_s=0.3, total_s=1.5)
    assert (both.prompt_tokens, both.cached_tokens, both.completion_tokens) == (21, 200, 9)
    assert (both.prompt_s, both.decode_s, both.total_s) == (0.25, 0.125, 1.5)
    alone = openai_wire.stats(usage, None, first_token_s=None, total_s=1.5)
    assert (alone.prompt_tokens, alone.cached_tokens, alone.completion_tokens) == (21, 200, 9)
    assert alone.prompt_s is None  # usage has no durations: not guessed


def test_openai_answers_are_read_leniently() -> None:
    """A chunk with fields this library does not know, and counters of the wrong type,
    parses: the unknown are ignored, the wrong read as unreported."""
    chunk = openai_wire.ChatCompletionChunk.model_validate(
        {
            "id": "c",
            "choices": [
                {"index": 1, "delta": {"content": "other"}},
                {"index": 0, "delta": {"content": "7", "reasoning": "..."}, "x": 1},
            ],
            "usage": {"prompt_tokens": "lots", "completion_tokens": 3, "cost": 0.01},
            "service_tier": "default",
        }
    )
    first = chunk.first_choice()
    assert first is not None
    assert first.delta.content == "7"
    assert chunk.usage is not None
    assert (chunk.usage.prompt_tokens, chunk.usage.completion_tokens) == (None, 3)


def test_openai_answers_are_written_as_openai_writes_them() -> None:
    """A piece's event has no usage or timings keys, its delta only what it carries;
    the whole answer carries both; an error is OpenAI's four fields."""
    piece = openai_wire.ChatCompletionChunk(
        choices=[openai_wire.ChunkChoice(delta=openai_wire.Delta(content="7"))]
    ).model_dump()
    assert "usage" not in piece
    assert "timings" not in piece
    assert piece["choices"] == [
        {"index": 0, "finish_reason": None, "logprobs": None, "delta": {"content": "7"}}
    ]
    whole = openai_wire.ChatCompletion(
        usage=openai_wire.Usage.from_stats(STATS), timings=openai_wire.Timings.from_stats(STATS)
    ).model_dump()
    assert whole["usage"]["prompt_tokens_details"] == {"cached_tokens": 200}
    assert whole["timings"]["cache_n"] == 200
    error = openai_wire.ErrorBody(error=openai_wire.ErrorDetail(message="no")).model_dump()
    assert set(error["error"]) == {"message", "type", "param", "code"}


def test_openai_model_lists_are_read_and_written_alike() -> None:
    """The model list the server writes reads back to its ids; entries without one are
    skipped; a body that is no list is refused."""
    written = openai_wire.ModelList(data=[openai_wire.Model(id="demo", owned_by="me")])
    read = openai_wire.ModelList.model_validate({**written.model_dump(), "extra": 1})
    assert read.ids() == ["demo"]
    assert openai_wire.ModelList.model_validate({"data": [{"object": "model"}]}).ids() == []
    with pytest.raises(pydantic.ValidationError):
        openai_wire.ModelList.model_validate({"models": []})
