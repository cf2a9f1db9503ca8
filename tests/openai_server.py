"""OpenAI-compatible servers for the openai engine's tests, on 127.0.0.1.

- :func:`start_llama_cpp_server`: the real thing, llama-cpp-python's own
  ``python -m llama_cpp.server`` serving the bundled demo pair with
  ``--chat_format llava-1-5`` (model id ``llava-demo``), as a subprocess on a free port.
  The ``llama_cpp_server`` fixture starts one per test session.
- :class:`ScriptedServer` (fixture ``scripted_openai``): a small real HTTP server for the
  answers llama_cpp.server cannot be made to give: a context-length 400, a 5xx, a line
  that is not JSON, a stream dropped mid-answer, ``usage`` with cached tokens and
  llama-server's ``timings``, a server that stalls. It speaks the protocol's shapes
  (server-sent events, ``data: [DONE]``, ``{"error": {...}}`` bodies) and records every
  request, so tests can read what the engine sent.
"""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from llava_local.demo import demo_paths

from .ollama_server import free_port

#: The model id the real server lists (its --model_alias).
DEMO_ALIAS = "llava-demo"
#: How long the real server may take to load the demo and answer GET /v1/models.
START_TIMEOUT_S = 120.0


@dataclass
class LlamaCppServer:
    """A running ``python -m llama_cpp.server``."""

    process: subprocess.Popen[bytes]
    port: int
    log: Path

    @property
    def url(self) -> str:
        """Its API root, as ``VisionChat.openai`` takes it."""
        return f"http://127.0.0.1:{self.port}/v1"

    def stop(self) -> None:
        """End the process (SIGTERM, then SIGKILL), and wait for it."""
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=10)


def start_llama_cpp_server(log: Path) -> LlamaCppServer:
    """llama-cpp-python's server on the demo pair, once it answers GET /v1/models."""
    lm, mmproj = demo_paths()
    port = free_port()
    command = [
        sys.executable, "-m", "llama_cpp.server",
        "--model", str(lm), "--clip_model_path", str(mmproj),
        "--chat_format", "llava-1-5", "--model_alias", DEMO_ALIAS,
        "--n_ctx", "1024", "--n_threads", "1",
        "--host", "127.0.0.1", "--port", str(port),
    ]  # fmt: skip
    with log.open("wb") as out:
        process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT)
    server = LlamaCppServer(process, port, log)
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"llama_cpp.server exited at start:\n{log.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(f"{server.url}/models", timeout=2) as answer:
                if answer.status == 200:
                    return server
        except (urllib.error.URLError, OSError):
            time.sleep(0.2)
    server.stop()
    raise RuntimeError(f"llama_cpp.server did not answer in time:\n{log.read_text()[-3000:]}")


@pytest.fixture(scope="session")
def llama_cpp_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LlamaCppServer]:
    """One real llama_cpp.server on the demo pair for the whole session."""
    server = start_llama_cpp_server(tmp_path_factory.mktemp("llama_cpp_server") / "server.log")
    try:
        yield server
    finally:
        server.stop()


# --- the scripted server ---------------------------------------------------------------


@dataclass
class Recorded:
    """One request as the server received it (headers by lower-cased name)."""

    method: str
    path: str
    headers: dict[str, str]
    json: Any


@dataclass
class Script:
    """How the server answers ``POST /v1/chat/completions``.

    ``fault``: ``None`` (answer ``pieces``), ``status`` (``status`` with the ``error``
    body), ``garbage`` (a ``data:`` line that is not JSON after ``after`` pieces),
    ``drop`` (the connection closed after ``after`` pieces, without a finish), ``stall``
    (headers, then nothing for ``stall_s`` seconds, then the answer).
    """

    pieces: list[str] = field(default_factory=lambda: ["This ", "digit ", "is ", "7."])
    finish_reason: str = "stop"
    usage: dict[str, Any] | None = None
    timings: dict[str, Any] | None = None
    fault: str | None = None
    status: int = 500
    error: dict[str, Any] = field(default_factory=lambda: {"message": "boom"})
    after: int = 1
    stall_s: float = 0.0
    piece_delay_s: float = 0.0


class ScriptedServer:
    """A small OpenAI-compatible server whose answers a test scripts."""

    def __init__(self) -> None:
        self.models: list[str] = ["scripted-vision"]
        self.script = Script()
        self.requests: list[Recorded] = []
        self.stopping = threading.Event()
        self._http = ThreadingHTTPServer(("127.0.0.1", 0), _handler(self))
        self._http.daemon_threads = True
        self._thread = threading.Thread(
            target=self._http.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        )
        self._thread.start()

    @property
    def port(self) -> int:
        return int(self._http.server_address[1])

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def chats(self) -> list[dict[str, Any]]:
        """The bodies of the chat requests, oldest first."""
        return [r.json for r in self.requests if r.path == "/v1/chat/completions"]

    def stop(self) -> None:
        self.stopping.set()
        self._http.shutdown()
        self._http.server_close()
        self._thread.join(timeout=5)


def _handler(server: ScriptedServer) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, format: str, *args: Any) -> None:  # quiet
            pass

        def do_GET(self) -> None:
            server.requests.append(Recorded("GET", self.path, _lower(self.headers), None))
            if self.path == "/v1/models":
                data = [{"id": m, "object": "model", "owned_by": "me"} for m in server.models]
                self._json(200, {"object": "list", "data": data})
            else:
                self._json(404, {"detail": "Not Found"})

        def do_POST(self) -> None:
            body = json.loads(self.rfile.read(int(self.headers.get("content-length", 0))))
            server.requests.append(Recorded("POST", self.path, _lower(self.headers), body))
            if self.path != "/v1/chat/completions":
                self._json(404, {"detail": "Not Found"})
                return
            script = server.script
            if script.fault == "status":
                self._json(script.status, {"error": script.error})
                return
            self.send_response(200)
            self.send_header("content-type", "text/event-stream")
            self.send_header("transfer-encoding", "chunked")
            self.end_headers()
            if script.fault == "stall":
                server.stopping.wait(script.stall_s)
            for number, piece in enumerate(script.pieces):
                if script.fault in ("garbage", "drop") and number == script.after:
                    if script.fault == "garbage":
                        self._chunk(b"data: this is not JSON\n\n")
                    self.close_connection = True
                    return  # no terminating chunk: the stream ends mid-answer
                self._event({"choices": [{"index": 0, "delta": {"content": piece}}]})
                if script.piece_delay_s and server.stopping.wait(script.piece_delay_s):
                    return
            final: dict[str, Any] = {
                "choices": [{"index": 0, "delta": {}, "finish_reason": script.finish_reason}]
            }
            if script.timings is not None:
                final["timings"] = script.timings
            self._event(final)
            if script.usage is not None:  # as stream_options.include_usage asks
                self._event({"choices": [], "usage": script.usage})
            self._chunk(b"data: [DONE]\n\n")
            self._chunk(b"")

        def _event(self, data: dict[str, Any]) -> None:
            chunk = {"id": "c1", "object": "chat.completion.chunk", "created": 0, **data}
            chunk.setdefault("model", server.models[0] if server.models else "m")
            self._chunk(f"data: {json.dumps(chunk)}\n\n".encode())

        def _chunk(self, data: bytes) -> None:
            self.wfile.write(f"{len(data):x}\r\n".encode() + data + b"\r\n")
            self.wfile.flush()

        def _json(self, status: int, data: Any) -> None:
            payload = json.dumps(data).encode()
            self.send_response(status)
            self.send_header("content-type", "application/json")
            self.send_header("content-length", str(len(payload)))
            self.end_headers()
            self.wfile.write(payload)

    return Handler


@pytest.fixture
def scripted_openai() -> Iterator[ScriptedServer]:
    """A running scripted server listing one model, ``scripted-vision``."""
    server = ScriptedServer()
    try:
        yield server
    finally:
        server.stop()


def _lower(headers: Any) -> dict[str, str]:
    """Request headers by lower-cased name."""
    return {str(name).lower(): str(value) for name, value in headers.items()}
