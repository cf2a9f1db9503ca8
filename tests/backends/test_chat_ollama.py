"""VisionChat over the Ollama engine, against the stand-in daemon on 127.0.0.1."""

from __future__ import annotations

import base64
import io
import json
from typing import Annotated, Any

import httpx
import numpy as np
import pytest
from PIL import Image
from pydantic import BaseModel, Field

from llava_local import (
    BackendTimeoutError,
    BackendUnavailableError,
    LlavaLocalError,
    ModelNotFoundError,
    NotAVisionModelError,
    ResponseError,
    SchemaError,
    VisionChat,
)
from llava_local.backends import ollama as ollama_engine

from ..ollama_server import OllamaServer, RecordedRequest, Script


def jpeg_photo(size: tuple[int, int] = (2400, 1600)) -> bytes:
    """A photo-like JPEG, larger than the engine's picture limit."""
    w, h = size
    y, x = np.mgrid[0:h, 0:w]
    noise = np.random.default_rng(0).integers(0, 40, (h, w, 3))
    pixels = np.stack([x * 255 // w, y * 255 // h, (x + y) * 127 // (w + h)], axis=-1) + noise
    img = Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8), "RGB")
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=92)
    return buf.getvalue()


def chat_bodies(server: OllamaServer) -> list[dict[str, Any]]:
    return [r.json for r in server.requests_to("/api/chat")]


def test_ask_and_stream_share_one_conversation(ollama_server: OllamaServer) -> None:
    """ask() and stream() answer, and each turn resends the whole history."""
    ollama_server.script(Script(pieces=["A ", "cat."]), Script(pieces=["Grey", "."]))
    with VisionChat.ollama(host=ollama_server.url) as chat:
        reply = chat.ask("What is it?", image=jpeg_photo())
        pieces = list(chat.stream("Colour?"))
    assert reply.text == "A cat."
    assert reply.backend == "ollama"
    assert reply.model == "llava"
    assert pieces == ["Grey", "."]
    assert [m.content for m in chat.history] == ["What is it?", "A cat.", "Colour?", "Grey."]
    first, second = chat_bodies(ollama_server)
    assert second["messages"][:2] == [
        first["messages"][0],
        {"role": "assistant", "content": "A cat."},
    ]


def test_pictures_are_prepared_once_and_resent_identically(ollama_server: OllamaServer) -> None:
    """A big photo is shrunk to the engine limit and sent as the same base64 on every turn."""
    photo = jpeg_photo()
    with VisionChat.ollama(host=ollama_server.url) as chat:
        chat.ask("What is it?", image=photo)
        chat.ask("And again?", image=photo)
    first, second = chat_bodies(ollama_server)
    sent = first["messages"][0]["images"][0]
    assert not sent.startswith("data:")
    assert second["messages"][0]["images"][0] == sent == second["messages"][2]["images"][0]
    decoded = Image.open(io.BytesIO(base64.b64decode(sent)))
    assert decoded.format == "JPEG"
    assert max(decoded.size) == 1344
    assert len(base64.b64decode(sent)) < len(photo)


def test_stats_are_converted_to_seconds(ollama_server: OllamaServer) -> None:
    """The daemon's nanosecond metrics become the common Stats fields in seconds."""
    ollama_server.script(
        pieces=["Hi"],
        prompt_eval_count=600,
        eval_count=7,
        load_duration=2_000_000_000,
        prompt_eval_duration=3_500_000_000,
        eval_duration=1_000_000_000,
        total_duration=7_000_000_000,
    )
    with VisionChat.ollama(host=ollama_server.url) as chat:
        stats = chat.ask("Hi", image=jpeg_photo((64, 64))).stats
    assert (stats.prompt_tokens, stats.completion_tokens) == (600, 7)
    assert (stats.load_s, stats.prompt_s, stats.decode_s, stats.total_s) == (2.0, 3.5, 1.0, 7.0)
    assert stats.decode_tokens_per_s == 7.0
    assert stats.first_token_s is not None


def test_options_and_system_prompt_reach_the_daemon(ollama_server: OllamaServer) -> None:
    """Chat defaults and per-call options map to Ollama's names; the system prompt leads."""
    with VisionChat.ollama(host=ollama_server.url, temperature=0.2, system="Be brief.") as chat:
        chat.ask("Hi", max_tokens=12, seed=3, stop=["\n"], top_k=5, top_p=0.5, repeat_penalty=1.2)
    body = chat_bodies(ollama_server)[0]
    assert body["options"] == {
        "temperature": 0.2,
        "num_predict": 12,
        "seed": 3,
        "stop": ["\n"],
        "top_k": 5,
        "top_p": 0.5,
        "repeat_penalty": 1.2,
    }
    assert body["messages"][0] == {"role": "system", "content": "Be brief."}


class Pet(BaseModel):
    kind: str
    legs: int


def test_schema_goes_as_format_and_comes_back_parsed(ollama_server: OllamaServer) -> None:
    """schema= is sent as Ollama's format; the answer is validated into the model."""
    ollama_server.script(Script(pieces=['{"kind": "cat",', ' "legs": 4}']), Script(pieces=["meow"]))
    with VisionChat.ollama(host=ollama_server.url) as chat:
        reply = chat.ask("Describe", image=jpeg_photo((64, 64)), schema=Pet)
        with pytest.raises(SchemaError, match="not valid JSON"):
            chat.ask("Again", schema=Pet)
    assert reply.parsed == Pet(kind="cat", legs=4)
    assert chat_bodies(ollama_server)[0]["format"] == Pet.model_json_schema()
    assert len(chat.history) == 2  # the invalid answer was not kept


@pytest.mark.parametrize(
    ("script", "error"),
    [
        (Script(fault="http_error", status=500), ResponseError),
        (Script(fault="error_line", after=1), ResponseError),
        (Script(fault="bad_line", after=1), LlavaLocalError),
        (Script(fault="drop", after=1), BackendUnavailableError),
        (Script(fault="model_gone"), ModelNotFoundError),
    ],
)
def test_a_failed_turn_leaves_the_conversation_as_it_was(
    ollama_server: OllamaServer, script: Script, error: type[Exception]
) -> None:
    """A daemon failure raises a library error, keeps the history, and the next ask works."""
    ollama_server.script(Script(pieces=["First."]), script, Script(pieces=["Fine."]))
    with VisionChat.ollama(host=ollama_server.url) as chat:
        chat.ask("One", image=jpeg_photo((64, 64)))
        before = chat.history
        with pytest.raises(error):
            chat.ask("Two")
        assert chat.history == before
        if script.fault == "model_gone":
            ollama_server.add_model("llava")
        assert chat.ask("Three").text == "Fine."


def test_timeout_bounds_a_stuck_daemon(ollama_server: OllamaServer) -> None:
    """timeout= ends a turn whose first token never comes, with BackendTimeoutError."""
    ollama_server.script(Script(fault="stall", stall_s=3))
    with VisionChat.ollama(host=ollama_server.url, timeout=0.5) as chat:
        with pytest.raises(BackendTimeoutError):
            chat.ask("Hi")
        assert chat.history == []


def test_no_daemon_says_to_start_it(closed_port: int) -> None:
    """Nothing listening gives BackendUnavailableError naming the host and `ollama serve`."""
    with (
        VisionChat.ollama(host=f"127.0.0.1:{closed_port}") as chat,
        pytest.raises(BackendUnavailableError, match="ollama serve") as info,
    ):
        chat.ask("Hi")
    assert str(closed_port) in str(info.value)


def test_missing_and_blind_models_are_refused(ollama_server: OllamaServer) -> None:
    """A model not pulled says how to pull it; a text-only model never gets the picture."""
    ollama_server.add_model("llama3.2", capabilities=["completion"])
    with (
        VisionChat.ollama("bakllava", host=ollama_server.url) as chat,
        pytest.raises(ModelNotFoundError, match="ollama pull bakllava"),
    ):
        chat.ask("Hi")
    with (
        VisionChat.ollama("llama3.2", host=ollama_server.url) as chat,
        pytest.raises(NotAVisionModelError),
    ):
        chat.ask("Hi", image=jpeg_photo((64, 64)))
    assert chat_bodies(ollama_server) == []


def test_pull_true_fetches_the_model_first(ollama_server: OllamaServer) -> None:
    """pull=True pulls a missing model, then answers."""
    ollama_server.add_model("moondream", pullable=True)
    with VisionChat.ollama("moondream", host=ollama_server.url, pull=True) as chat:
        assert chat.ask("Hi", image=jpeg_photo((64, 64))).text
    assert ollama_server.requests_to("/api/pull")


def test_auto_prefers_a_running_daemon(
    ollama_server: OllamaServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """backend="auto" takes Ollama when a daemon with a vision model answers."""
    monkeypatch.setenv("OLLAMA_HOST", ollama_server.url)
    with VisionChat() as chat:
        assert (chat.backend, chat.model) == ("ollama", "llava")
        assert chat.ask("Hi", image=jpeg_photo((64, 64))).text


def test_auto_falls_back_to_the_gguf_pair_in_the_environment(
    closed_port: int, tiny_pair: object, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With no daemon, backend="auto" loads LLAVA_LOCAL_MODEL / LLAVA_LOCAL_MMPROJ."""
    # No daemon at the default address (a named one, OLLAMA_HOST, would be required).
    monkeypatch.delenv("OLLAMA_HOST", raising=False)
    monkeypatch.setattr(ollama_engine, "DEFAULT_HOST", f"http://127.0.0.1:{closed_port}")
    monkeypatch.setenv("LLAVA_LOCAL_MODEL", str(tiny_pair.lm))  # type: ignore[attr-defined]
    monkeypatch.setenv("LLAVA_LOCAL_MMPROJ", str(tiny_pair.mmproj))  # type: ignore[attr-defined]
    with VisionChat(backend="auto") as chat:
        assert chat.backend == "llama_cpp"


def test_auto_does_not_swap_a_named_model(
    ollama_server: OllamaServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A model the caller named is used or reported missing, never replaced by another."""
    monkeypatch.setenv("OLLAMA_HOST", ollama_server.url)
    with pytest.raises(ModelNotFoundError, match="bakllava"):
        VisionChat(model="bakllava")


def test_reply_serialises_to_json(ollama_server: OllamaServer) -> None:
    """A Reply dumps to JSON with its stats, for logs and the CLI's --json."""
    with VisionChat.ollama(host=ollama_server.url) as chat:
        data = json.loads(chat.ask("Hi").model_dump_json())
    assert data["backend"] == "ollama"
    assert "prompt_tokens" in data["stats"]


COLOURS = {
    "red": (220, 20, 20),
    "green": (20, 200, 20),
    "blue": (20, 20, 220),
    "yellow": (240, 220, 0),
}


def flat(colour: str) -> bytes:
    """A small flat PNG of one of COLOURS."""
    buf = io.BytesIO()
    Image.new("RGB", (32, 24), COLOURS[colour]).save(buf, format="PNG")
    return buf.getvalue()


def name_the_pictures(request: RecordedRequest) -> Script:
    """The stand-in's answer: the colours of the last message's pictures, in order."""
    names = []
    for data in request.pictures()[-1]:
        r, g, b = Image.open(io.BytesIO(data)).convert("RGB").getpixel((0, 0))  # type: ignore[misc]
        names.append(
            min(
                COLOURS,
                key=lambda c: sum(abs(x - y) for x, y in zip(COLOURS[c], (r, g, b), strict=True)),
            )
        )
    return Script(pieces=[" ".join(names) or "none"])


def test_several_pictures_in_one_turn_arrive_in_order(ollama_server: OllamaServer) -> None:
    """images=[...] reaches the daemon in that order in that turn's message; a follow-up
    brings its own picture while the earlier ones stay in their message."""
    ollama_server.script(name_the_pictures)
    with VisionChat.ollama(host=ollama_server.url) as chat:
        first = chat.ask("Which colours?", images=[flat("blue"), flat("red"), flat("green")])
        second = chat.ask("And now?", image=flat("yellow"))
        third = chat.ask("Anything new?")
    assert (first.text, second.text, third.text) == ("blue red green", "yellow", "none")
    last = ollama_server.requests_to("/api/chat")[-1].pictures()
    assert [len(pictures) for pictures in last] == [3, 0, 1, 0, 0]


def test_auto_takes_a_vision_model_without_a_clip_family(
    ollama_server: OllamaServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """backend="auto" takes a daemon whose only vision model is a gemma3 (no clip family)."""
    monkeypatch.setenv("OLLAMA_HOST", ollama_server.url)
    ollama_server.remove_model("llava")
    ollama_server.add_model("gemma3", family="gemma3")
    with VisionChat() as chat:
        assert (chat.backend, chat.model) == ("ollama", "gemma3")
        assert chat.ask("Hi", image=flat("red")).text == "A cat on a mat."


class Tagged(BaseModel):
    tag: Annotated[str, Field(pattern="[a-z]+")]


def test_a_schema_ollama_cannot_use_fails_the_turn(ollama_server: OllamaServer) -> None:
    """A schema whose pattern Ollama's grammar converter refuses gets the daemon's 500 as
    ResponseError, and the conversation stays as it was."""
    with VisionChat.ollama(host=ollama_server.url) as chat:
        with pytest.raises(ResponseError, match="invalid JSON schema in format") as caught:
            chat.ask("Tag it", image=flat("red"), schema=Tagged)
        assert chat.history == []
    assert caught.value.status_code == 500


def test_a_transport_given_to_the_chat_carries_its_turns(ollama_server: OllamaServer) -> None:
    """VisionChat.ollama(transport=...) sends every request through that transport."""
    paths: list[str] = []

    class Noting(httpx.HTTPTransport):
        def handle_request(self, request: httpx.Request) -> httpx.Response:
            paths.append(request.url.path)
            return super().handle_request(request)

    with VisionChat.ollama(host=ollama_server.url, transport=Noting()) as chat:
        assert chat.ask("Hi", image=flat("red")).text == "A cat on a mat."
    assert paths == ["/api/version", "/api/show", "/api/chat"]
