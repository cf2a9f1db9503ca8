"""A real ``llava-local serve`` subprocess on a free port, for the tests that drive it
(tests/apps/serve/test_serve.py and tests/security/): start it with any flags, wait until
``/health`` answers, read its log, stop it with Ctrl-C."""

from __future__ import annotations

import base64
import contextlib
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

from .ollama_server import free_port
from .paths import DIGIT, ROOT

QUESTION = "What digit is this?"
ANSWER = "This digit is 7."
START_TIMEOUT_S = 120


@dataclass
class Server:
    url: str
    process: subprocess.Popen[bytes]
    log: Path
    #: The --api-key it was started with, if any.
    key: str | None = None

    @property
    def port(self) -> int:
        return int(self.url.rsplit(":", 1)[1])

    def log_text(self) -> str:
        return self.log.read_text(errors="replace")


def start(
    log: Path, *args: str, host: str = "127.0.0.1", env: dict[str, str] | None = None
) -> Server:
    """``llava-local serve --port P ARGS`` with its output in ``log``, once it answers
    ``/health`` on ``host`` (an AssertionError with the log if it exits or never does);
    ``env``: the process's environment (default: this one's)."""
    port = free_port()
    command = [sys.executable, "-m", "llava_local.cli", "serve", "--port", str(port), *args]
    with log.open("wb") as sink:
        process = subprocess.Popen(
            command, stdout=sink, stderr=subprocess.STDOUT, cwd=ROOT, env=env
        )
    url = f"http://{host}:{port}"
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise AssertionError(f"the server exited: {log.read_text(errors='replace')}")
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                key = args[args.index("--api-key") + 1] if "--api-key" in args else None
                return Server(url, process, log, key)
        time.sleep(0.2)
    process.kill()
    process.wait()
    raise AssertionError(f"the server did not start: {log.read_text(errors='replace')}")


def stop(server: Server) -> None:
    """Ctrl-C, then a kill if it does not exit within a minute."""
    if server.process.poll() is None:
        server.process.send_signal(signal.SIGINT)
        try:
            server.process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            server.process.kill()
            server.process.wait()


def data_uri(path: Path) -> str:
    return "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode()


def ask_url(url: str, question: str = QUESTION) -> Any:
    """A user message with a picture at ``url``, in OpenAI's shape (Any: the client's
    types are TypedDicts that a plain dict does not match)."""
    return [
        {
            "role": "user",
            "content": [
                {"type": "text", "text": question},
                {"type": "image_url", "image_url": {"url": url}},
            ],
        }
    ]


def ask(path: Path = DIGIT, question: str = QUESTION) -> Any:
    """A user message with a picture file sent as a data URI, in OpenAI's shape."""
    return ask_url(data_uri(path), question)


def wait_for(what: str, check: Any, timeout_s: float = 60) -> None:
    """Poll ``check()`` until it is true; an AssertionError naming ``what`` after
    ``timeout_s`` (a bound on a hang, not a measurement)."""
    deadline = time.monotonic() + timeout_s
    while not check():
        assert time.monotonic() < deadline, f"{what} never happened"
        time.sleep(0.05)
