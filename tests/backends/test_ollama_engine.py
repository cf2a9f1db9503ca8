"""The Ollama engine against the stand-in daemon, through the official client, over sockets."""

from __future__ import annotations

import base64
import hashlib
import io
import json
import logging
import re
from collections.abc import Callable, Generator, Iterator
from typing import Any

import httpx
import ollama
import pytest
from PIL import Image

from llava_local.backends import ollama as ollama_engine
from llava_local.backends.base import Finish, Turn
from llava_local.backends.ollama import (
    OllamaBackend,
    find_vision_model,
    pull_model,
    resolve_host,
)
from llava_local.chat import VisionChat
from llava_local.errors import (
    BackendError,
    BackendTimeoutError,
    BackendUnavailableError,
    InvalidRequestError,
    LlavaLocalError,
    ModelNotFoundError,
    NotAVisionModelError,
    ResponseError,
)
from llava_local.types import Message, Options, PreparedImage

from ..ollama_server import (
    NO_VISION_RUNNER,
    PULL_EOF,
    OllamaServer,
    Script,
)

MakeEngine = Callable[..., OllamaBackend]


@pytest.fixture(autouse=True)
def _no_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """Keep the machine's OLLAMA_HOST and proxy settings out."""
    monkeypatch.delenv("OLLAMA_HOST", raising=False)
    for name in ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "NO_PROXY"):
        monkeypatch.delenv(name, raising=False)
        monkeypatch.delenv(name.lower(), raising=False)


@pytest.fixture
def make_engine(ollama_server: OllamaServer) -> Iterator[MakeEngine]:
    """Engines talking to the stand-in daemon, closed after the test."""
    made: list[OllamaBackend] = []

    def make(model: str = "llava", **kwargs: Any) -> OllamaBackend:
        kwargs.setdefault("host", ollama_server.url)
        kwargs.setdefault("timeout", 5.0)
        engine = OllamaBackend(model, **kwargs)
        made.append(engine)
        return engine

    yield make
    for engine in made:
        engine.close()


def picture(color: tuple[int, int, int] = (200, 30, 30)) -> PreparedImage:
    """A tiny real PNG, prepared as the core would."""
    buffer = io.BytesIO()
    Image.new("RGB", (4, 3), color).save(buffer, format="PNG")
    data = buffer.getvalue()
    digest = hashlib.sha256(data).hexdigest()
    return PreparedImage(
        data=data, mime="image/png", width=4, height=3, sha256=digest, source="red.png"
    )


def turn(*messages: Message, options: Options | None = None, **kwargs: Any) -> Turn:
    return Turn(messages=messages, options=options or Options(), **kwargs)


def user(text: str = "What is in this picture?", *images: PreparedImage) -> Message:
    return Message(role="user", content=text, images=images)


def ask(engine: OllamaBackend, request: Turn) -> tuple[str, Finish]:
    """Run one turn to its end: the text and the Finish."""
    items = list(engine.generate(request))
    finish = items.pop()
    assert isinstance(finish, Finish)
    assert all(isinstance(item, str) for item in items)
    return "".join(str(item) for item in items), finish


# --- answers and statistics ----------------------------------------------------------


def test_streamed_answer_and_stats(make_engine: MakeEngine) -> None:
    """A streamed answer arrives piece by piece, then a Finish with stats in seconds."""
    items = list(make_engine().generate(turn(user("Describe it.", picture()))))
    assert items[:-1] == ["A", " cat", " on", " a", " mat", "."]
    finish = items[-1]
    assert isinstance(finish, Finish)
    assert finish.done_reason == "stop"
    stats = finish.stats
    assert (stats.prompt_tokens, stats.completion_tokens) == (26, 6)
    assert stats.load_s == pytest.approx(0.001334875)
    assert stats.prompt_s == pytest.approx(0.342546)
    assert stats.decode_s == pytest.approx(4.535599)
    assert stats.total_s == pytest.approx(4.879480875)
    assert stats.first_token_s is not None
    assert stats.first_token_s >= 0
    assert stats.image_encode_s is None


def test_zero_metrics_are_omitted_and_read_as_zero(
    ollama_server: OllamaServer, make_engine: MakeEngine
) -> None:
    """Metrics the daemon leaves out (zero, Go's omitempty) come through as zero."""
    ollama_server.script(pieces=["ok"], load_duration=0, prompt_eval_count=0)
    _, finish = ask(make_engine(), turn(user()))
    final = replay_final_chunk(ollama_server)
    assert "load_duration" not in final
    assert "prompt_eval_count" not in final
    assert (finish.stats.load_s, finish.stats.prompt_tokens) == (0.0, 0)


def replay_final_chunk(server: OllamaServer) -> dict[str, Any]:
    """Send the last chat request again, by hand, and read the final chunk of the stream."""
    body = server.requests_to("/api/chat")[-1].json
    with httpx.Client(base_url=server.url) as client:
        lines = client.post("/api/chat", json=body).text.splitlines()
    final: dict[str, Any] = json.loads(lines[-1])
    return final


@pytest.mark.parametrize(
    ("reason", "expected"), [("stop", "stop"), ("length", "length"), ("unload", "stop")]
)
def test_done_reason(
    ollama_server: OllamaServer, make_engine: MakeEngine, reason: str, expected: str
) -> None:
    """``length`` is kept, ``stop`` is kept, anything else counts as ``stop``."""
    ollama_server.script(pieces=["a"], done_reason=reason)
    _, finish = ask(make_engine(), turn(user()))
    assert finish.done_reason == expected


def test_stand_in_speaks_both_framings(ollama_server: OllamaServer) -> None:
    """The stand-in streams chunked NDJSON and answers whole JSON when stream is false."""
    body = {"model": "llava", "messages": [{"role": "user", "content": "hi"}]}
    with httpx.Client(base_url=ollama_server.url) as client:
        streamed = client.post("/api/chat", json=body)
        whole = client.post("/api/chat", json=body | {"stream": False})
    assert streamed.headers["content-type"] == "application/x-ndjson"
    assert streamed.headers["transfer-encoding"] == "chunked"
    assert len(streamed.text.splitlines()) == 7
    assert whole.headers["content-type"] == "application/json; charset=utf-8"
    assert whole.json()["message"]["content"] == "A cat on a mat."
    with ollama.Client(host=ollama_server.url) as client:
        reply = client.chat("llava", messages=body["messages"], stream=False)
    assert (reply.done, reply.eval_count, reply.done_reason) == (True, 6, "stop")


def test_stand_in_root_listing_and_ps(ollama_server: OllamaServer) -> None:
    """The stand-in answers HEAD / like Go, and lists installed and loaded models."""
    with httpx.Client(base_url=ollama_server.url) as client:
        head = client.head("/")
        missing = client.get("/api/nothing")
    assert head.status_code == 200
    assert head.headers["content-length"] == "17"
    assert head.headers["content-type"] == "text/plain; charset=utf-8"
    assert (missing.status_code, missing.text) == (404, "404 page not found")
    with ollama.Client(host=ollama_server.url) as client:
        assert [m.model for m in client.list().models] == ["llava:latest"]
        assert client.ps().models == []
        client.chat("llava", messages=[{"role": "user", "content": "hi"}])
        assert [m.model for m in client.ps().models] == ["llava:latest"]


def test_stand_in_refuses_data_urls(ollama_server: OllamaServer) -> None:
    """Like the real daemon, the stand-in refuses a picture sent as a data: URL."""
    image = "data:image/png;base64," + picture().b64()
    body = {"model": "llava", "messages": [{"role": "user", "content": "x", "images": [image]}]}
    with httpx.Client(base_url=ollama_server.url) as client:
        response = client.post("/api/chat", json=body)
    assert response.status_code == 400
    assert response.json() == {"error": "illegal base64 data at input byte 4"}


# --- the pre-flight ------------------------------------------------------------------


def test_unknown_model_says_how_to_pull(make_engine: MakeEngine) -> None:
    """A model the daemon lacks raises ModelNotFoundError with the pull command."""
    engine = make_engine("llava:34b")
    with pytest.raises(ModelNotFoundError, match=r"ollama pull llava:34b"):
        engine.check()
    with pytest.raises(ModelNotFoundError):
        next(iter(engine.generate(turn(user()))))


def test_text_model_is_refused(ollama_server: OllamaServer, make_engine: MakeEngine) -> None:
    """A model without the vision capability raises NotAVisionModelError before any chat."""
    ollama_server.add_model("llama3.2", capabilities=["completion", "tools"])
    with pytest.raises(NotAVisionModelError, match=r"llama3\.2"):
        list(make_engine("llama3.2").generate(turn(user("x", picture()))))
    assert ollama_server.requests_to("/api/chat") == []


@pytest.mark.parametrize(
    ("families", "sees"), [(["llama", "clip"], True), (["llama"], False), (None, True)]
)
def test_old_daemon_without_capabilities(
    ollama_server: OllamaServer,
    make_engine: MakeEngine,
    families: list[str] | None,
    sees: bool,
) -> None:
    """Without ``capabilities`` the families decide; with no families the model is allowed."""
    spec = ollama_server.add_model("old", capabilities=None)
    spec.families = families
    engine = make_engine("old")
    if sees:
        engine.check()
    else:
        with pytest.raises(NotAVisionModelError):
            engine.check()


def test_no_daemon_says_run_ollama_serve(closed_port: int) -> None:
    """Nothing listening raises BackendUnavailableError naming the host and `ollama serve`."""
    engine = OllamaBackend(host=f"127.0.0.1:{closed_port}", timeout=2.0)
    try:
        with pytest.raises(BackendUnavailableError, match="ollama serve") as caught:
            list(engine.generate(turn(user())))
    finally:
        engine.close()
    assert f"127.0.0.1:{closed_port}" in str(caught.value)
    assert not isinstance(caught.value, BackendTimeoutError)


class _StartOnRetry(logging.Handler):
    """Starts the stand-in daemon when httpcore is about to retry a refused connection."""

    def __init__(self, server: OllamaServer) -> None:
        super().__init__(logging.DEBUG)
        self.server = server
        self.retries = 0

    def emit(self, record: logging.LogRecord) -> None:
        if record.getMessage().startswith("retry.started"):
            self.retries += 1
            self.server.start()


@pytest.fixture
def connection_log() -> Iterator[logging.Logger]:
    """httpcore's connection logger at DEBUG level, where it says each retry, restored after."""
    logger = logging.getLogger("httpcore.connection")
    level = logger.level
    logger.setLevel(logging.DEBUG)
    try:
        yield logger
    finally:
        logger.setLevel(level)


def test_refused_connection_is_retried(connection_log: logging.Logger) -> None:
    """A refused connection is tried again by the transport; here the daemon starts meanwhile."""
    with OllamaServer(listen=False) as server:
        server.add_model("llava")
        handler = _StartOnRetry(server)
        connection_log.addHandler(handler)
        engine = OllamaBackend(host=server.url, timeout=5.0)
        try:
            engine.check()
            assert ask(engine, turn(user()))[0] == "A cat on a mat."
        finally:
            engine.close()
            connection_log.removeHandler(handler)
    assert handler.retries == 1
    assert [r.path for r in server.requests] == ["/api/version", "/api/show", "/api/chat"]


def test_pull_shows_progress_then_answers(
    ollama_server: OllamaServer, make_engine: MakeEngine, capsys: pytest.CaptureFixture[str]
) -> None:
    """With pull=True a missing model is pulled, with progress on stderr, then answers."""
    spec = ollama_server.add_model("bakllava", pullable=True)
    text, _ = ask(make_engine("bakllava", pull=True), turn(user("x", picture())))
    assert text == "A cat on a mat."
    assert [r.json["model"] for r in ollama_server.requests_to("/api/pull")] == ["bakllava"]
    err = capsys.readouterr().err
    assert "pulling manifest" in err
    assert f"pulling {spec.layers()[0][0][7:19]}" in err  # a progress bar per blob
    assert "success" in err


def test_pull_of_unknown_model_fails_clearly(make_engine: MakeEngine) -> None:
    """A pull the registry cannot serve raises ModelNotFoundError with the daemon's reason."""
    with pytest.raises(ModelNotFoundError, match="file does not exist"):
        make_engine("no-such-model", pull=True).check()


# --- what is sent --------------------------------------------------------------------


def test_options_are_mapped_to_ollama_names(
    ollama_server: OllamaServer, make_engine: MakeEngine
) -> None:
    """Options, num_ctx, engine options and keep_alive arrive under Ollama's names."""
    engine = make_engine(num_ctx=2048, keep_alive="10m", num_thread=4, temperature=0.8)
    options = Options(
        temperature=0.0,
        top_p=0.9,
        top_k=40,
        max_tokens=128,
        seed=42,
        stop=("USER:",),
        repeat_penalty=1.1,
    )
    ask(engine, turn(user(), options=options))
    body = ollama_server.requests_to("/api/chat")[-1].json
    assert body["options"] == {
        "num_ctx": 2048,
        "num_thread": 4,
        "temperature": 0.0,
        "top_p": 0.9,
        "top_k": 40,
        "num_predict": 128,
        "seed": 42,
        "stop": ["USER:"],
        "repeat_penalty": 1.1,
    }
    assert body["keep_alive"] == "10m"
    assert body["stream"] is True


def test_unset_options_are_not_sent(ollama_server: OllamaServer, make_engine: MakeEngine) -> None:
    """With nothing set, the request carries no options, no format and no keep_alive."""
    ask(make_engine(), turn(user()))
    body = ollama_server.requests_to("/api/chat")[-1].json
    assert not {"options", "format", "keep_alive"} & set(body)


def test_unknown_engine_option_is_refused() -> None:
    """A misspelt Ollama option raises InvalidRequestError with a suggestion."""
    with pytest.raises(InvalidRequestError, match="num_thread"):
        OllamaBackend(num_threads=4)


def test_pictures_and_history_are_sent_whole_each_turn(
    ollama_server: OllamaServer, make_engine: MakeEngine
) -> None:
    """Pictures go as plain base64, and every turn resends the same history byte for byte."""
    engine = make_engine()
    image = picture()
    system = Message(role="system", content="Be brief.")
    first = user("What is this?", image)
    text, _ = ask(engine, turn(system, first))
    second = user("What colour is it?")
    ask(engine, turn(system, first, Message(role="assistant", content=text), second))
    one, two = (r.json["messages"] for r in ollama_server.requests_to("/api/chat"))
    assert one[1]["images"] == [base64.b64encode(image.data).decode()]
    assert not one[1]["images"][0].startswith("data:")
    assert "images" not in one[0]
    assert [m["role"] for m in two] == ["system", "user", "assistant", "user"]
    assert two[:2] == one
    assert two[2]["content"] == "A cat on a mat."


def test_schema_becomes_format(ollama_server: OllamaServer, make_engine: MakeEngine) -> None:
    """A JSON schema is sent as Ollama's ``format`` object."""
    schema = {"type": "object", "properties": {"animal": {"type": "string"}}}
    ollama_server.script(pieces=['{"animal":', ' "cat"}'])
    text, _ = ask(make_engine(), turn(user(), json_schema=schema))
    assert text == '{"animal": "cat"}'
    assert ollama_server.requests_to("/api/chat")[-1].json["format"] == schema


# --- faults --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("script", "error", "text"),
    [
        (Script(fault="http_error", error="out of memory"), ResponseError, "out of memory"),
        (Script(fault="error_line", after=2, error="runner died"), ResponseError, "runner died"),
        (Script(fault="bad_line", after=2), BackendError, "not JSON"),
        (Script(fault="drop", after=2), BackendUnavailableError, "mid-answer"),
        (Script(fault="model_gone"), ModelNotFoundError, "ollama pull llava"),
        (Script(fault="stall", stall_s=2.0), BackendTimeoutError, "in time"),
    ],
    ids=["http_error", "error_line", "bad_line", "drop", "model_gone", "stall"],
)
def test_faults_become_library_errors(
    ollama_server: OllamaServer,
    make_engine: MakeEngine,
    script: Script,
    error: type[LlavaLocalError],
    text: str,
) -> None:
    """Each way the daemon can fail raises the matching library error, never a raw one."""
    ollama_server.script(script)
    engine = make_engine(timeout=0.5)
    engine.check()
    with pytest.raises(LlavaLocalError) as caught:
        list(engine.generate(turn(user("x", picture()))))
    assert type(caught.value) is error
    assert text in str(caught.value)
    assert len(ollama_server.requests_to("/api/chat")) == 1  # never retried mid-stream


def test_status_codes_are_kept(ollama_server: OllamaServer, make_engine: MakeEngine) -> None:
    """An error status is carried on ResponseError; a mid-stream error has none."""
    ollama_server.script(
        Script(fault="http_error", status=503, error="busy"), Script(fault="error_line")
    )
    engine = make_engine()
    with pytest.raises(ResponseError) as before:
        list(engine.generate(turn(user())))
    with pytest.raises(ResponseError) as during:
        list(engine.generate(turn(user())))
    assert (before.value.status_code, during.value.status_code) == (503, None)


def test_slow_answer_hits_the_turn_timeout(
    ollama_server: OllamaServer, make_engine: MakeEngine
) -> None:
    """An answer that keeps trickling in past ``timeout`` raises BackendTimeoutError."""
    ollama_server.script(pieces=["x"] * 40, piece_delay_s=0.05)
    with pytest.raises(BackendTimeoutError, match="did not finish the answer within"):
        list(make_engine(timeout=0.3).generate(turn(user())))


def test_engine_recovers_after_a_fault(
    ollama_server: OllamaServer, make_engine: MakeEngine
) -> None:
    """After a dropped connection the next turn works on the same engine."""
    ollama_server.script(Script(fault="drop"), Script(pieces=["fine"]))
    engine = make_engine()
    with pytest.raises(BackendUnavailableError):
        list(engine.generate(turn(user())))
    assert ask(engine, turn(user()))[0] == "fine"


def test_early_close_closes_the_stream(
    ollama_server: OllamaServer, make_engine: MakeEngine
) -> None:
    """Closing the generator early closes the HTTP stream; the next turn still works."""
    ollama_server.script(Script(pieces=["x"] * 200, piece_delay_s=0.01), Script(pieces=["ok"]))
    engine = make_engine()
    answer = engine.generate(turn(user()))
    assert isinstance(answer, Generator)
    assert next(answer) == "x"
    answer.close()
    assert ollama_server.client_gone.wait(5.0)
    assert ask(engine, turn(user()))[0] == "ok"


def test_closed_engine_refuses_turns(make_engine: MakeEngine) -> None:
    """A closed engine raises BackendError instead of a raw client error."""
    engine = make_engine()
    engine.close()
    with pytest.raises(BackendError, match="closed"):
        list(engine.generate(turn(user())))


# --- where the daemon is -------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "url"),
    [
        ("", "http://127.0.0.1:11434"),
        ("10.0.0.5", "http://10.0.0.5:11434"),
        ("10.0.0.5:5000", "http://10.0.0.5:5000"),
        (":5000", "http://127.0.0.1:5000"),
        ("http://box.local:8080", "http://box.local:8080"),
        ("https://box.local", "https://box.local:443"),
        ("http://box.local/ollama/", "http://box.local:80/ollama"),
        ("[::1]:5000", "http://[::1]:5000"),
    ],
)
def test_ollama_host_forms(monkeypatch: pytest.MonkeyPatch, value: str, url: str) -> None:
    """OLLAMA_HOST is read in every form Ollama accepts."""
    monkeypatch.setenv("OLLAMA_HOST", value)
    assert resolve_host(None) == url


def test_host_argument_beats_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """An explicit host wins over OLLAMA_HOST; a bad scheme is refused."""
    monkeypatch.setenv("OLLAMA_HOST", "10.0.0.5:5000")
    assert resolve_host("127.0.0.1:6000") == "http://127.0.0.1:6000"
    with pytest.raises(InvalidRequestError):
        resolve_host("ftp://box")


@pytest.mark.parametrize("form", ["{host}", ":{port}", "http://{host}"])
def test_engine_follows_ollama_host(
    ollama_server: OllamaServer, monkeypatch: pytest.MonkeyPatch, form: str
) -> None:
    """An engine without a host finds the daemon through OLLAMA_HOST."""
    monkeypatch.setenv("OLLAMA_HOST", form.format(host=ollama_server.host, port=ollama_server.port))
    engine = OllamaBackend(timeout=5.0)
    try:
        assert ask(engine, turn(user()))[0] == "A cat on a mat."
    finally:
        engine.close()


def test_find_vision_model_without_daemon(closed_port: int) -> None:
    """No daemon: None, quickly and quietly."""
    assert find_vision_model(f"127.0.0.1:{closed_port}", timeout=0.5) is None


def test_find_vision_model_with_only_text_models(ollama_server: OllamaServer) -> None:
    """A daemon with only text models offers none."""
    ollama_server.remove_model("llava")
    ollama_server.add_model("llama3.2", capabilities=["completion"])
    assert find_vision_model(ollama_server.url) is None


def test_find_vision_model_picks_llava(ollama_server: OllamaServer) -> None:
    """A daemon with llava and a text model offers "llava", even when the text one is preferred."""
    ollama_server.add_model("llama3.2", capabilities=["completion"])
    assert find_vision_model(ollama_server.url) == "llava"
    assert find_vision_model(ollama_server.url, preferred="llama3.2") == "llava"


def test_find_vision_model_prefers_the_preferred(ollama_server: OllamaServer) -> None:
    """A preferred model that can see wins over other vision models."""
    ollama_server.add_model("moondream:1.8b")
    assert find_vision_model(ollama_server.url, preferred="llava") == "llava"
    assert find_vision_model(ollama_server.url, preferred="moondream:1.8b") == "moondream:1.8b"


def test_find_vision_model_required_names_the_host(closed_port: int) -> None:
    """A daemon the caller named that does not answer raises the Ollama error naming it."""
    with pytest.raises(
        BackendUnavailableError, match=f"no Ollama daemon answers at .*:{closed_port}"
    ):
        find_vision_model(f"127.0.0.1:{closed_port}", timeout=0.5, required=True)


def test_auto_with_a_named_daemon_without_vision_models(ollama_server: OllamaServer) -> None:
    """backend="auto" with a named daemon that has no vision model says to pull one there,
    instead of answering with the demo model."""
    ollama_server.remove_model("llava")
    ollama_server.add_model("llama3.2", capabilities=["completion"])
    with pytest.raises(
        ModelNotFoundError, match=f"Ollama at {re.escape(ollama_server.url)} has no vision"
    ):
        VisionChat(backend="auto", host=ollama_server.url)


# --- the HTTP layer: injected transport or client, the transport's retries -----------


class RecordingTransport(httpx.BaseTransport):
    """A real HTTP transport that notes each request's path and whether it was closed."""

    def __init__(self, **kwargs: Any) -> None:
        self.inner = httpx.HTTPTransport(**kwargs)
        self.paths: list[str] = []
        self.closed = False

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        self.paths.append(request.url.path)
        return self.inner.handle_request(request)

    def close(self) -> None:
        self.closed = True
        self.inner.close()


def test_injected_transport_carries_every_request(ollama_server: OllamaServer) -> None:
    """transport= carries the check and the turn, and is closed with the engine."""
    transport = RecordingTransport()
    engine = OllamaBackend(host=ollama_server.url, timeout=5.0, transport=transport)
    try:
        assert ask(engine, turn(user("x", picture())))[0] == "A cat on a mat."
    finally:
        engine.close()
    assert transport.paths == ["/api/version", "/api/show", "/api/chat"]
    assert transport.closed


def test_mock_transport_needs_no_socket() -> None:
    """httpx.MockTransport stands in for the daemon with no server at all."""
    seen: list[str] = []

    def daemon(request: httpx.Request) -> httpx.Response:
        seen.append(f"{request.method} {request.url}")
        if request.url.path == "/api/version":
            return httpx.Response(200, json={"version": "0.12.6"})
        if request.url.path == "/api/show":
            return httpx.Response(200, json={"model_info": {}, "capabilities": ["vision"]})
        final = {"model": "llava", "created_at": "2025-01-01T00:00:00Z", "done": True}
        lines = [
            {**final, "message": {"role": "assistant", "content": "Mocked."}, "done": False},
            {**final, "message": {"role": "assistant", "content": ""}, "eval_count": 1},
        ]
        return httpx.Response(200, content=b"".join(json.dumps(x).encode() + b"\n" for x in lines))

    engine = OllamaBackend(host="ollama.invalid", transport=httpx.MockTransport(daemon))
    try:
        text, finish = ask(engine, turn(user("x", picture())))
    finally:
        engine.close()
    assert (text, finish.stats.completion_tokens) == ("Mocked.", 1)
    assert seen == [
        "GET http://ollama.invalid:11434/api/version",
        "POST http://ollama.invalid:11434/api/show",
        "POST http://ollama.invalid:11434/api/chat",
    ]


def test_ready_client_is_used_as_it_is_and_left_open(ollama_server: OllamaServer) -> None:
    """client= sends everything with the client's own address and headers, errors name
    that address, and closing the engine leaves the caller's client open."""
    with ollama.Client(host=ollama_server.url, headers={"X-Team": "vision"}) as client:
        engine = OllamaBackend(client=client, timeout=5.0)
        assert engine.host == ollama_server.url
        assert ask(engine, turn(user("x", picture())))[0] == "A cat on a mat."
        engine.close()
        assert {r.headers.get("x-team") for r in ollama_server.requests} == {"vision"}
        missing = OllamaBackend("bakllava", client=client)
        with pytest.raises(ModelNotFoundError, match=re.escape(ollama_server.url)):
            missing.check()
        assert [m.model for m in client.list().models] == ["llava:latest"]  # still open


HTTP_LAYER_MISTAKES: dict[str, Callable[[], dict[str, Any]]] = {
    "bad-client": lambda: {"client": "not a client"},
    "async-transport": lambda: {"transport": httpx.AsyncHTTPTransport()},
    "client-and-host": lambda: {"client": ollama.Client(), "host": "127.0.0.1:5"},
    "client-and-transport": lambda: {
        "client": ollama.Client(),
        "transport": httpx.HTTPTransport(),
    },
}


@pytest.mark.parametrize("mistake", list(HTTP_LAYER_MISTAKES))
def test_http_layer_arguments_are_checked(mistake: str) -> None:
    """A client or transport of the wrong kind, or a client with a host or transport, is refused."""
    with pytest.raises(InvalidRequestError, match=r"client=|transport="):
        OllamaBackend(**HTTP_LAYER_MISTAKES[mistake]())


def test_the_callers_transport_decides_the_retries(
    closed_port: int, connection_log: logging.Logger
) -> None:
    """The retries are the transport's: the default one retries a refused connection
    twice, one the caller built without retries tries once."""
    events: dict[str, list[str]] = {"default": [], "own": []}
    for name, transport in (("default", None), ("own", httpx.HTTPTransport(retries=0))):
        handler = logging.Handler(logging.DEBUG)
        handler.emit = lambda record, seen=events[name]: seen.append(record.getMessage().split()[0])  # type: ignore[method-assign,misc]
        connection_log.addHandler(handler)
        engine = OllamaBackend(host=f"127.0.0.1:{closed_port}", transport=transport)
        try:
            with pytest.raises(BackendUnavailableError, match="ollama serve"):
                engine.check()
        finally:
            engine.close()
            connection_log.removeHandler(handler)
    assert events["default"].count("retry.started") == ollama_engine.CONNECT_RETRIES == 2
    assert events["default"].count("connect_tcp.started") == 3
    assert events["own"].count("retry.started") == 0
    assert events["own"].count("connect_tcp.started") == 1


def test_default_transport_follows_http_proxy(
    ollama_server: OllamaServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Like httpx's own default, the engine's transport sends through HTTP_PROXY."""
    monkeypatch.setenv("HTTP_PROXY", ollama_server.url)  # the stand-in routes proxy requests
    engine = OllamaBackend(host="http://ollama.invalid:11434", timeout=5.0)
    try:
        assert ask(engine, turn(user("x", picture())))[0] == "A cat on a mat."
    finally:
        engine.close()
    assert [r.path for r in ollama_server.requests] == ["/api/version", "/api/show", "/api/chat"]
    assert {r.headers["host"] for r in ollama_server.requests} == {"ollama.invalid:11434"}


# --- the look-alike stays true to the daemon -----------------------------------------


def post_chat(server: OllamaServer, model: str, **body: Any) -> httpx.Response:
    """One raw /api/chat with a picture, as the real daemon would receive it."""
    message = {"role": "user", "content": "What is it?", "images": [picture().b64()]}
    with httpx.Client(base_url=server.url) as client:
        return client.post("/api/chat", json={"model": model, "messages": [message], **body})


def test_gemma3_sees_without_a_clip_family(ollama_server: OllamaServer) -> None:
    """A vision model of Ollama's own engine reports "vision" with no clip family, and the
    engine (which reads capabilities first) and backend="auto" both take it."""
    ollama_server.remove_model("llava")
    ollama_server.add_model("gemma3:4b", family="gemma3")
    with ollama.Client(host=ollama_server.url) as client:
        show = client.show("gemma3:4b")
    assert show.details is not None
    assert show.details.families == ["gemma3"]
    assert show.capabilities is not None
    assert "vision" in show.capabilities
    engine = OllamaBackend("gemma3:4b", host=ollama_server.url, timeout=5.0)
    try:
        assert ask(engine, turn(user("x", picture())))[0] == "A cat on a mat."
    finally:
        engine.close()
    assert find_vision_model(ollama_server.url) == "gemma3:4b"


def test_pictures_sent_to_text_models(ollama_server: OllamaServer) -> None:
    """A text model of a vision architecture makes the runner refuse a picture with 500;
    a plain text model ignores it; the engine refuses both before any chat."""
    ollama_server.add_model("gemma3:1b", capabilities=["completion"], family="gemma3")
    ollama_server.add_model("llama3.2", capabilities=["completion"])
    refused = post_chat(ollama_server, "gemma3:1b")
    assert refused.status_code == 500
    assert refused.headers["content-type"] == "application/json"
    assert refused.json() == {"error": NO_VISION_RUNNER}
    assert post_chat(ollama_server, "llama3.2").status_code == 200
    for name in ("gemma3:1b", "llama3.2"):
        engine = OllamaBackend(name, host=ollama_server.url, timeout=5.0)
        try:
            with pytest.raises(NotAVisionModelError):
                engine.check()
        finally:
            engine.close()
    assert len(ollama_server.requests_to("/api/chat")) == 2  # only the two raw ones


def test_invalid_format_gets_the_daemons_500(ollama_server: OllamaServer) -> None:
    """A format that is neither "json" nor an object gets the runner's 500 and text, after
    the model was looked up; a whole answer carries it with the charset."""
    bad = post_chat(ollama_server, "llava", format="xml")
    assert bad.status_code == 500
    assert bad.headers["content-type"] == "application/json"
    assert bad.json() == {
        "error": 'invalid format: "\\"xml\\""; expected "json" or a valid JSON Schema object'
    }
    assert post_chat(ollama_server, "nothing", format="xml").status_code == 404
    whole = post_chat(ollama_server, "llava", format=[1], stream=False)
    assert (whole.status_code, whole.headers["content-type"]) == (
        500,
        "application/json; charset=utf-8",
    )
    assert whole.json()["error"].startswith('invalid format: "[1]"')
    assert post_chat(ollama_server, "llava", format="json").status_code == 200


def test_schema_the_grammar_converter_refuses(
    ollama_server: OllamaServer, make_engine: MakeEngine
) -> None:
    """A schema with an unanchored pattern gets Ollama's 500, raised as ResponseError with
    the daemon's text and what to change."""
    schema = {"type": "object", "properties": {"name": {"type": "string", "pattern": "[a-z]+"}}}
    with pytest.raises(ResponseError) as caught:
        list(make_engine().generate(turn(user("x", picture()), json_schema=schema)))
    assert caught.value.status_code == 500
    assert "invalid JSON schema in format" in str(caught.value)
    assert "^" in str(caught.value)
    anchored = {"type": "string", "pattern": "^[a-z]+$"}
    assert ask(make_engine(), turn(user("x", picture()), json_schema=anchored))[0]


def test_pull_failing_part_way(
    ollama_server: OllamaServer, make_engine: MakeEngine, capsys: pytest.CaptureFixture[str]
) -> None:
    """A pull that fails after its download started is a BackendError that says to pull
    again (not a missing model), and the model is not installed."""
    spec = ollama_server.add_model("qwen2.5vl", pullable=True, pull_error=PULL_EOF)
    with pytest.raises(BackendError) as caught:
        make_engine("qwen2.5vl", pull=True).check()
    assert type(caught.value) is BackendError
    assert PULL_EOF in str(caught.value)
    assert "run the pull again" in str(caught.value)
    assert f"pulling {spec.layers()[0][0][7:19]}" in capsys.readouterr().err
    assert ollama_server.find_model("qwen2.5vl") is None
    with pytest.raises(BackendError, match="run the pull again"):
        pull_model("qwen2.5vl", host=ollama_server.url)


def test_final_chunk_that_carries_content(
    ollama_server: OllamaServer, make_engine: MakeEngine
) -> None:
    """Text in the final chunk is part of the answer, and counts as its first token when
    nothing came before."""
    ollama_server.script(
        Script(pieces=["A", " cat"], final_content=" on a mat."),
        Script(pieces=(), final_content="Only this."),
    )
    engine = make_engine()
    text, _ = ask(engine, turn(user("x", picture())))
    assert text == "A cat on a mat."
    assert replay_final_chunk(ollama_server)["message"]["content"] == "Only this."
    text, finish = ask(engine, turn(user("x", picture())))
    assert text == "Only this."
    assert finish.stats.first_token_s is not None


def test_several_pictures_arrive_in_order_in_their_message(
    ollama_server: OllamaServer, make_engine: MakeEngine
) -> None:
    """Several pictures of one turn go in that message, in order; earlier turns keep theirs."""
    red, green, blue = picture((255, 0, 0)), picture((0, 255, 0)), picture((0, 0, 255))
    first = user("Compare these.", red, green)
    history = (first, Message(role="assistant", content="A cat on a mat."))
    ask(make_engine(), turn(*history, user("And this?", blue, red)))
    sent = ollama_server.requests_to("/api/chat")[-1].pictures()
    assert sent == [[red.data, green.data], [], [blue.data, red.data]]


def test_mllama_takes_one_picture_per_message(
    ollama_server: OllamaServer, make_engine: MakeEngine
) -> None:
    """Two pictures in one message to an mllama model get the daemon's 500 and text."""
    ollama_server.add_model("llama3.2-vision", family="mllama")
    with pytest.raises(ResponseError, match="only supports one image") as caught:
        list(make_engine("llama3.2-vision").generate(turn(user("x", picture(), picture()))))
    assert caught.value.status_code == 500
