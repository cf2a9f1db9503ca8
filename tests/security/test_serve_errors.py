"""500 answers (issue 25, finding 7): they name the failure and carry nothing of the
exception (paths, library internals, what another server said); the traceback goes
to the server's log, once.

The server here answers through the Ollama engine, from the stand-in daemon of
tests/ollama_server.py, so that a test can make the engine fail the way a real
daemon does (an error status, a broken stream), over real sockets."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from ..ollama_server import OllamaServer, Script
from ..serve_process import Server, start, stop
from .conftest import post

#: What the daemon's error says: nothing of it may reach a client of llava-local serve.
INSIDE = "runner crashed at /home/alice/.ollama/models/blobs/sha256-4a5b token=hunter2"


@pytest.fixture(scope="module")
def proxy(
    ollama_daemon: OllamaServer, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Server]:
    """``llava-local serve`` in front of the stand-in daemon (Ollama engine)."""
    log = tmp_path_factory.mktemp("proxy") / "server.log"
    running = start(log, "--backend", "ollama", "--host", ollama_daemon.url, "-m", "llava")
    yield running
    stop(running)


def test_an_engine_failure_is_500_without_its_text(
    ollama_daemon: OllamaServer, proxy: Server
) -> None:
    """When the engine fails (the daemon answers 500 with its own error, or breaks its
    stream), both protocols answer 500 saying the engine failed and to read the log,
    with none of the daemon's words; the log has the cause, with one traceback per
    failure."""
    openai_body = {"model": "llava", "messages": [{"role": "user", "content": "hi"}]}
    ollama_body = {**openai_body, "stream": False}
    failures = 0
    for fault in ("http_error", "error_line", "bad_line"):
        ollama_daemon.script(Script(fault=fault, error=INSIDE, bad_line=f"{INSIDE}\n".encode()))
        for path, body in (("/v1/chat/completions", openai_body), ("/api/chat", ollama_body)):
            failed = post(proxy, path, body)
            failures += 1
            assert failed.status_code == 500, (fault, path, failed.text)
            text = failed.text
            assert "engine failed" in text
            assert "log" in text
            for leak in ("alice", "hunter2", "sha256", "runner", "Traceback", "Error("):
                assert leak not in text, (fault, leak, text)
        assert failed.json()["error"].startswith("the engine failed")
    ollama_daemon.script(pieces=["Fine", "."])
    answered = post(proxy, "/v1/chat/completions", openai_body)
    assert answered.json()["choices"][0]["message"]["content"] == "Fine."
    log = proxy.log_text()
    assert "hunter2" in log  # the operator can see why
    assert log.count(" the engine failed\nTraceback") == failures  # one record each
    assert log.count("the engine failed") == 2 * failures  # that, and its request's line
