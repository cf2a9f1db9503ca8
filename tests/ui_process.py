"""A real ``llava-local ui`` subprocess on a free port of 127.0.0.1, for the tests that
drive the page (tests/apps/test_ui.py in a browser, tests/security/test_ui_*.py over
HTTP): start it with any flags, wait until it serves, call its handlers as Gradio's
HTTP API does, stop it with SIGTERM."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
import pytest

from .ollama_server import free_port

START_TIMEOUT_S = 90  # importing Gradio on a busy 2-core machine


@dataclass
class Served:
    """A running ``llava-local ui`` subprocess and where its output goes."""

    url: str
    process: subprocess.Popen[bytes]
    log: Path

    @property
    def port(self) -> int:
        return int(urlsplit(self.url).port or 0)

    @property
    def uploads(self) -> Path:
        """Gradio's upload folder (``GRADIO_TEMP_DIR``): the page's own, beside its log."""
        return self.log.parent / "gradio"

    def output(self) -> str:
        return self.log.read_text(errors="replace")[-4000:]


@contextlib.contextmanager
def serve_page(tmp: Path, *args: str) -> Iterator[Served]:
    """``llava-local ui`` on a free port, until the block ends (SIGTERM, then kill)."""
    port = free_port()
    log = tmp / f"ui-{port}.log"
    env = {
        **os.environ,
        "PYTHONUNBUFFERED": "1",
        "GRADIO_TEMP_DIR": str(tmp / "gradio"),
        "LLAVA_LOCAL_MODEL": "",  # the tests choose the engine themselves
    }
    command = [sys.executable, "-m", "llava_local.cli", "ui", "--port", str(port), *args]
    with log.open("wb") as out:
        process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env=env)
    served = Served(f"http://127.0.0.1:{port}/", process, log)
    try:
        _wait_until_served(served)
        yield served
    except BaseException:
        _stop(process)
        raise
    _stop(process)
    assert process.returncode == 0, f"the page did not stop cleanly:\n{served.output()}"


def _wait_until_served(served: Served) -> None:
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        if served.process.poll() is not None:
            pytest.fail(
                f"llava-local ui exited with {served.process.returncode}:\n{served.output()}"
            )
        with contextlib.suppress(OSError), urllib.request.urlopen(served.url, timeout=5) as page:
            if page.status == 200:
                return
        time.sleep(0.3)
    pytest.fail(
        f"llava-local ui did not serve {served.url} in {START_TIMEOUT_S} s:\n{served.output()}"
    )


def _stop(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)  # SIGINT is ignored under `cmd &` shells
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=10)


def start_call(
    served: Served,
    handler: str,
    data: list[Any],
    *,
    client: httpx.Client | None = None,
    **headers: str,
) -> httpx.Response:
    """POST a call of one of the page's handlers (``use_engine``, ``respond``, ...) as
    Gradio's HTTP API takes it, what any script (or a page in a browser) can send;
    ``headers`` are sent as given (``Host=...``)."""
    if client is None:
        with httpx.Client() as own:
            return start_call(served, handler, data, client=own, **headers)
    return client.post(
        f"{served.url}gradio_api/call/{handler}", json={"data": data}, headers=headers, timeout=30
    )


def join_queue(
    served: Served, handler: str, data: list[Any], session: str, **headers: str
) -> httpx.Response:
    """POST the same call the way the page's own script does (into Gradio's queue, by the
    handler's index in the page's config, read without ``headers``); ``headers`` are sent
    as given (``Host=...``, ``Origin=...``)."""
    config = httpx.get(f"{served.url}config", timeout=10).json()
    index = next(d["id"] for d in config["dependencies"] if d["api_name"] == handler)
    return httpx.post(
        f"{served.url}gradio_api/queue/join",
        json={"data": data, "fn_index": index, "session_hash": session},
        headers=headers,
        timeout=10,
    )


def call(
    served: Served,
    handler: str,
    data: list[Any],
    *,
    client: httpx.Client | None = None,
    **headers: str,
) -> list[Any]:
    """Call one of the page's handlers through Gradio's HTTP API and return its outputs
    once it has finished."""
    kind, outputs, text = finished(served, handler, data, client, headers)
    assert kind == "complete", text
    assert isinstance(outputs, list)
    return outputs


def call_error(
    served: Served,
    handler: str,
    data: list[Any],
    *,
    client: httpx.Client | None = None,
    **headers: str,
) -> str | None:
    """Call one of the page's handlers as :func:`call` does, expecting Gradio to answer
    with an error: its message (None when Gradio shows none)."""
    kind, outputs, text = finished(served, handler, data, client, headers)
    assert kind == "error", text
    assert isinstance(outputs, dict), text
    error = outputs.get("error")
    return None if error is None else str(error)


def finished(
    served: Served,
    handler: str,
    data: list[Any],
    client: httpx.Client | None = None,
    headers: dict[str, str] | None = None,
) -> tuple[str, Any, str]:
    """Call one of the page's handlers as :func:`call` does: its last event
    (``complete`` or ``error``), that event's data, and the whole answer."""
    headers = headers or {}
    if client is None:
        with httpx.Client() as own:
            return finished(served, handler, data, own, headers)
    started = start_call(served, handler, data, client=client, **headers)
    assert started.status_code == 200, started.text
    event = started.json()["event_id"]
    answer = client.get(
        f"{served.url}gradio_api/call/{handler}/{event}", headers=headers, timeout=120
    )
    assert answer.status_code == 200, answer.text
    kind, outputs = "", None
    for line in answer.text.splitlines():
        if line.startswith("event: "):
            kind = line.removeprefix("event: ")
        elif line.startswith("data: ") and kind in ("complete", "error"):
            outputs = json.loads(line.removeprefix("data: "))
    return kind, outputs, answer.text


def upload(served: Served, *files: bytes, **headers: str) -> httpx.Response:
    """POST ``files`` to the page's upload route as its picture box does (multipart)."""
    parts = [("files", (f"picture-{i}.png", data, "image/png")) for i, data in enumerate(files)]
    return httpx.post(f"{served.url}gradio_api/upload", files=parts, headers=headers, timeout=60)


def stored(served: Served) -> dict[str, int]:
    """Every file in the page's upload folder, with its size."""
    if not served.uploads.exists():
        return {}
    return {str(p): p.stat().st_size for p in served.uploads.rglob("*") if p.is_file()}


def uploaded(path: str, **fields: Any) -> dict[str, Any]:
    """The picture box's value in a handler call, as the page sends it: the path the
    upload route returned (``fields`` add to it or replace it)."""
    return {
        "path": path,
        "meta": {"_type": "gradio.FileData"},
        "orig_name": "picture.png",
        **fields,
    }
