"""The openai engine: VisionChat against OpenAI-compatible servers over real sockets.

The real server is llama-cpp-python's own ``python -m llama_cpp.server`` on the bundled
demo pair (one per session); the error shapes it cannot produce come from a small
scripted server (tests/openai_server.py).
"""

from __future__ import annotations

import asyncio
import base64
import json
import threading
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner
from pydantic import BaseModel

from llava_local import AsyncVisionChat, VisionChat
from llava_local.apps.datasets import load_set
from llava_local.backends.openai import resolve_base_url
from llava_local.cli import main
from llava_local.errors import (
    BackendError,
    BackendTimeoutError,
    BackendUnavailableError,
    ContextOverflowError,
    InvalidRequestError,
    ModelNotFoundError,
    ResponseError,
    TurnCancelledError,
)

from ..openai_server import (
    DEMO_ALIAS,
    LlamaCppServer,
    Script,
    ScriptedServer,
    start_llama_cpp_server,
)
from ..paths import DIGIT

pytestmark = pytest.mark.llama

QUESTION = "What digit is this?"


# --- against a real llama_cpp.server -------------------------------------------------


def test_the_demo_reads_the_digit_through_llama_cpp_server(
    llama_cpp_server: LlamaCppServer,
) -> None:
    """With no model named, the engine takes the one the server lists and reads the digit."""
    with VisionChat.openai(llama_cpp_server.url) as chat:
        reply = chat.ask(QUESTION, image=DIGIT, temperature=0)
    assert reply.text == "This digit is 7."
    assert (reply.model, reply.backend, reply.done_reason) == (DEMO_ALIAS, "openai", "stop")
    assert reply.stats.total_s > 0


def test_the_answer_streams_piece_by_piece(llama_cpp_server: LlamaCppServer) -> None:
    """stream() yields the answer in several pieces, and the reply is their sum."""
    with VisionChat.openai(llama_cpp_server.url, model=DEMO_ALIAS) as chat:
        stream = chat.stream(QUESTION, image=DIGIT, temperature=0)
        pieces = list(stream)
    assert len(pieces) > 3
    assert "".join(pieces) == stream.reply.text == "This digit is 7."
    assert stream.reply.stats.first_token_s is not None


def test_a_follow_up_is_answered_about_the_earlier_picture(
    llama_cpp_server: LlamaCppServer,
) -> None:
    """A question with no picture of its own is asked about the picture of the first turn
    (the stateless server gets it again with the history)."""
    triangles = [p for p in load_set("shapes", limit=40) if p.labels.get("shape") == "triangle"]
    hits = 0
    with VisionChat.openai(llama_cpp_server.url, temperature=0, max_tokens=24) as chat:
        for picture in triangles[:4]:
            chat.reset()
            first = chat.ask("What shape is this?", image=picture.source)
            second = chat.ask("What colour is it?")
            assert first.text == "It is a triangle."
            assert len(chat.history) == 4
            hits += picture.labels["colour"] in second.text
    assert hits >= 2


class Digit(BaseModel):
    digit: int


def test_schema_answers_are_parsed(llama_cpp_server: LlamaCppServer) -> None:
    """schema= reaches the server as a response_format (in the form it takes) and the
    reply is parsed into the model."""
    with VisionChat.openai(llama_cpp_server.url) as chat:
        reply = chat.ask(QUESTION, image=DIGIT, schema=Digit, temperature=0, max_tokens=40)
    assert isinstance(reply.parsed, Digit)
    assert json.loads(reply.text) == reply.parsed.model_dump()


def test_a_model_the_server_does_not_list_is_refused(llama_cpp_server: LlamaCppServer) -> None:
    """A misspelt model name is a ModelNotFoundError naming what the server has (the
    server itself would answer with its own model whatever the name)."""
    with VisionChat.openai(llama_cpp_server.url, model="llava-dmeo") as chat:
        with pytest.raises(ModelNotFoundError, match=DEMO_ALIAS):
            chat.ask(QUESTION, image=DIGIT)
        assert chat.history == []


def test_a_killed_server_is_unavailable_and_the_history_stays(tmp_path: Path) -> None:
    """After the server dies, the next turn raises BackendUnavailableError and the
    conversation is as it was."""
    server = start_llama_cpp_server(tmp_path / "server.log")
    try:
        with VisionChat.openai(server.url, max_retries=0) as chat:
            assert chat.ask(QUESTION, image=DIGIT, temperature=0).text == "This digit is 7."
            before = chat.history
            server.stop()
            with pytest.raises(BackendUnavailableError, match="no OpenAI-compatible server"):
                chat.ask("And now?")
            assert chat.history == before
    finally:
        server.stop()


def test_the_api_key_is_never_in_the_config_or_a_saved_conversation(
    llama_cpp_server: LlamaCppServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The key given as api_key= appears neither in chat.config nor in the saved file; a
    chat rebuilt from the config takes it from OPENAI_API_KEY."""
    secret = "sk-test-do-not-keep-1234"
    with VisionChat.openai(llama_cpp_server.url, api_key=secret) as chat:
        chat.ask(QUESTION, image=DIGIT, temperature=0)
        config = chat.config
        saved = chat.save(tmp_path / "chat.json")
    assert secret not in json.dumps(config)
    assert secret not in saved.read_text()
    assert config["engine"] == {"base_url": llama_cpp_server.url}
    monkeypatch.setenv("OPENAI_API_KEY", secret)
    with VisionChat.from_config(config) as again:
        assert again.ask(QUESTION, image=DIGIT, temperature=0).text == "This digit is 7."


def test_the_command_line_talks_to_the_server(llama_cpp_server: LlamaCppServer) -> None:
    """`ask --backend openai --host URL` answers through the server."""
    args = ["ask", "--backend", "openai", "--host", llama_cpp_server.url, str(DIGIT), QUESTION]
    result = CliRunner().invoke(main, [*args, "--temperature", "0"])
    assert result.exit_code == 0, result.output
    assert result.output.strip() == "This digit is 7."


# --- against the scripted server -----------------------------------------------------


def _chat(server: ScriptedServer, **settings: Any) -> VisionChat:
    return VisionChat.openai(server.url, max_retries=0, **settings)


def test_pictures_go_as_the_same_data_uri_every_turn(scripted_openai: ScriptedServer) -> None:
    """Each request carries the whole conversation, the picture as a data: URI of the
    prepared bytes, identical on the follow-up."""
    with _chat(scripted_openai) as chat:
        chat.ask(QUESTION, image=DIGIT)
        chat.ask("Are you sure?")
        prepared = chat.history[0].images[0]
    first, second = scripted_openai.chats()
    uri = f"data:{prepared.mime};base64,{base64.b64encode(prepared.data).decode()}"
    assert first["messages"][0]["content"][0] == {"type": "image_url", "image_url": {"url": uri}}
    assert second["messages"][0] == first["messages"][0]
    assert [m["role"] for m in second["messages"]] == ["user", "assistant", "user"]
    assert second["messages"][1]["content"] == "This digit is 7."


def test_options_and_schema_are_sent_in_the_protocols_names(
    scripted_openai: ScriptedServer,
) -> None:
    """Generation options map to the request's fields (top_k as an extra field) and
    schema= to a json_schema response_format."""
    scripted_openai.script = Script(pieces=['{"digit": ', "7}"])
    with _chat(scripted_openai, extra_body={"cache_prompt": True}) as chat:
        reply = chat.ask(
            QUESTION, image=DIGIT, schema=Digit, temperature=0, max_tokens=9, stop="\n", top_k=5
        )
    assert reply.parsed == Digit(digit=7)
    body = scripted_openai.chats()[0]
    assert {k: body[k] for k in ("model", "temperature", "max_tokens", "stop", "top_k")} == {
        "model": "scripted-vision",
        "temperature": 0,
        "max_tokens": 9,
        "stop": ["\n"],
        "top_k": 5,
    }
    assert body["cache_prompt"] is True
    assert body["stream"] is True
    assert body["response_format"]["type"] == "json_schema"
    assert body["response_format"]["json_schema"]["schema"]["required"] == ["digit"]


def test_the_async_chat_has_the_same_factory(scripted_openai: ScriptedServer) -> None:
    """AsyncVisionChat.openai opens the same engine and answers with await."""

    async def main() -> str:
        async with AsyncVisionChat.openai(scripted_openai.url, max_retries=0) as chat:
            reply = await chat.ask(QUESTION, image=DIGIT)
            return f"{reply.backend}: {reply.text}"

    assert asyncio.run(main()) == "openai: This digit is 7."


def test_the_key_is_sent_as_a_bearer_token(
    scripted_openai: ScriptedServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """api_key= is sent as the Authorization header, else OPENAI_API_KEY."""
    with _chat(scripted_openai, api_key="sk-given") as chat:
        chat.ask(QUESTION, image=DIGIT)
    monkeypatch.setenv("OPENAI_API_KEY", "sk-from-env")
    with _chat(scripted_openai) as chat:
        chat.ask(QUESTION, image=DIGIT)
    keys = [r.headers.get("authorization") for r in scripted_openai.requests if r.method == "POST"]
    assert keys == ["Bearer sk-given", "Bearer sk-from-env"]


def test_stats_come_from_usage_and_timings(scripted_openai: ScriptedServer) -> None:
    """Reply.stats take token counts from usage (cached tokens apart) and llama-server's
    timings where sent; what nobody reports is None, never 0."""
    usage = {
        "prompt_tokens": 30,
        "completion_tokens": 4,
        "total_tokens": 34,
        "prompt_tokens_details": {"cached_tokens": 20},
    }
    timings = {"prompt_n": 9, "prompt_ms": 50.0, "predicted_n": 4, "predicted_ms": 40.0}
    with _chat(scripted_openai) as chat:
        scripted_openai.script = Script(usage=usage)
        from_usage = chat.ask(QUESTION, image=DIGIT).stats
        scripted_openai.script = Script(usage=usage, timings={**timings, "cache_n": 21})
        from_timings = chat.ask("Again?").stats
        scripted_openai.script = Script()
        unreported = chat.ask("Again?").stats
    assert (from_usage.prompt_tokens, from_usage.cached_tokens) == (10, 20)
    assert (from_usage.completion_tokens, from_usage.prompt_s) == (4, None)
    assert (from_timings.prompt_tokens, from_timings.cached_tokens) == (9, 21)
    assert (from_timings.prompt_s, from_timings.decode_s) == (0.05, 0.04)
    assert (unreported.prompt_tokens, unreported.cached_tokens) == (None, None)
    assert (unreported.completion_tokens, unreported.decode_s) == (None, None)
    assert unreported.decode_tokens_per_s is None


def test_the_model_is_the_only_one_listed_or_must_be_named(
    scripted_openai: ScriptedServer,
) -> None:
    """model=None takes the only model; with several, the error lists them."""
    with _chat(scripted_openai) as chat:
        assert chat.model == "scripted-vision"
    scripted_openai.models = ["llava-7b", "moondream"]
    with pytest.raises(ModelNotFoundError, match="several models: llava-7b, moondream"):
        _chat(scripted_openai)
    with _chat(scripted_openai, model="moondream") as chat:
        assert chat.ask(QUESTION, image=DIGIT).model == "moondream"


def test_a_context_length_rejection_is_a_context_overflow(
    scripted_openai: ScriptedServer,
) -> None:
    """A 400 saying the prompt is too long (OpenAI's words or llama-server's) is a
    ContextOverflowError with the sizes, and the conversation is unchanged."""
    openai_style = {
        "message": "This model's maximum context length is 1024 tokens. However, you "
        "requested 1500 tokens (1400 in the messages, 100 in the completion).",
        "type": "invalid_request_error",
        "code": "context_length_exceeded",
    }
    llama_server_style = {
        "code": 400,
        "message": "the request exceeds the available context size, try increasing it",
        "type": "exceed_context_size_error",
        "n_prompt_tokens": 2100,
        "n_ctx": 2048,
    }
    with _chat(scripted_openai) as chat:
        chat.ask(QUESTION, image=DIGIT)
        before = chat.history
        for error, sizes in ((openai_style, (1500, 1024)), (llama_server_style, (2100, 2048))):
            scripted_openai.script = Script(fault="status", status=400, error=error)
            with pytest.raises(ContextOverflowError) as caught:
                chat.ask("One more?")
            assert (caught.value.needed, caught.value.available) == sizes
            assert chat.history == before


@pytest.mark.parametrize(
    ("script", "words"),
    [
        (Script(fault="status", status=500, error={"message": "out of memory"}), "500"),
        (Script(fault="garbage", after=1), "not JSON"),
        (Script(fault="drop", after=2), "dropped mid-answer|without finishing"),
    ],
    ids=["5xx", "garbage", "dropped"],
)
def test_server_failures_are_backend_errors(
    scripted_openai: ScriptedServer, script: Script, words: str
) -> None:
    """A 5xx, a line that is not JSON and a stream cut mid-answer are BackendErrors,
    and the conversation is unchanged."""
    with _chat(scripted_openai) as chat:
        chat.ask(QUESTION, image=DIGIT)
        before = chat.history
        scripted_openai.script = script
        with pytest.raises(BackendError, match=words) as caught:
            chat.ask("One more?")
        assert chat.history == before
    assert not isinstance(caught.value, ResponseError) or caught.value.status_code == 500


def test_the_timeout_bounds_the_whole_turn(scripted_openai: ScriptedServer) -> None:
    """timeout= bounds the whole answer: a server that trickles pieces, each well within
    the timeout, is stopped when the turn's time is up."""
    scripted_openai.script = Script(pieces=["x"] * 40, piece_delay_s=0.1)
    with _chat(scripted_openai, timeout=0.5) as chat:
        with pytest.raises(BackendTimeoutError, match=r"within 0\.5 s"):
            chat.ask(QUESTION, image=DIGIT)
        assert chat.history == []


def test_cancel_stops_a_turn_waiting_for_the_server(scripted_openai: ScriptedServer) -> None:
    """cancel() from another thread stops a turn whose server has not sent anything yet
    (the server stalls past the test's own timeout: only a prompt stop gets through)."""
    scripted_openai.script = Script(fault="stall", stall_s=400)
    with _chat(scripted_openai) as chat:
        stream = chat.stream(QUESTION, image=DIGIT)
        timer = threading.Timer(0.3, stream.cancel)
        timer.start()
        with pytest.raises(TurnCancelledError):
            list(stream)
        timer.join()
        assert chat.history == []


def test_a_wrong_address_is_unavailable(scripted_openai: ScriptedServer, closed_port: int) -> None:
    """Nothing listening, or something that does not answer as an OpenAI server, is a
    BackendUnavailableError that says to check the address."""
    with pytest.raises(BackendUnavailableError, match="no OpenAI-compatible server answers"):
        VisionChat.openai(f"127.0.0.1:{closed_port}", max_retries=0)
    wrong = f"http://127.0.0.1:{scripted_openai.port}/api"
    with pytest.raises(BackendUnavailableError, match="check base_url="):
        VisionChat.openai(wrong, max_retries=0)


def test_base_url_forms() -> None:
    """host:port gets http:// and an address without a path gets /v1; other schemes are
    refused."""
    assert resolve_base_url("127.0.0.1:8080") == "http://127.0.0.1:8080/v1"
    assert resolve_base_url("http://localhost:1234/") == "http://localhost:1234/v1"
    assert resolve_base_url("https://example.org/api/v1/") == "https://example.org/api/v1"
    with pytest.raises(InvalidRequestError, match="http"):
        resolve_base_url("ftp://example.org")


def test_auto_still_falls_back_with_a_timeout(
    closed_port: int, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """timeout= (which the openai engine shares with Ollama) is dropped, not refused, when
    auto finds no daemon and opens the demo."""
    monkeypatch.delenv("OLLAMA_HOST", raising=False)
    monkeypatch.setattr(
        "llava_local.backends.ollama.DEFAULT_HOST", f"http://127.0.0.1:{closed_port}"
    )
    with VisionChat("auto", timeout=5, connect_timeout=1) as chat:
        assert chat.backend == "llama_cpp"
    assert "using the bundled demo model" in capsys.readouterr().err
