"""Real ``llava-local serve`` subprocesses for the security tests of serve, each started
once per session: ``plain`` with the defaults (what a user gets without a flag), and
``exposed`` set up as for a network (an API key, one CORS origin, picture URLs on with
one picture host allowed). All traffic stays on 127.0.0.1."""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import httpx
import openai
import pytest

from ..serve_process import ANSWER, Server, ask, start, stop
from .sites import Site

KEY = "security-key-123"
#: The one web origin the exposed server lets call it (--cors).
PAGE = "http://page.example"


def loopback_hosts(port: int) -> tuple[str, ...]:
    """Host headers naming this machine that ``serve`` and the page both answer: loopback
    names and addresses, *.localhost and host.docker.internal, with or without the port,
    in any case."""
    return (
        f"127.0.0.1:{port}",
        f"localhost:{port}",
        f"LOCALHOST.:{port}",
        f"[::1]:{port}",
        f"app.localhost:{port}",
        f"host.docker.internal:{port}",
        "127.0.0.2",
    )


@dataclass
class Exposed:
    """The exposed server, the picture host it may download from (``site``), and a
    service on the same machine it must never reach for a client (``internal``)."""

    server: Server
    site: Site
    internal: Site


@pytest.fixture(scope="session")
def plain(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """The demo model served with the defaults (only the context set)."""
    log = tmp_path_factory.mktemp("plain") / "server.log"
    running = start(log, "--n-ctx", "2048")
    yield running
    stop(running)


@pytest.fixture(scope="session")
def exposed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Exposed]:
    """The demo model served as for a network: an API key, one CORS origin, picture
    URLs on with one picture host allowed (each download may take 60 s), a queue of 2."""
    log = tmp_path_factory.mktemp("exposed") / "server.log"
    with Site() as site, Site() as internal:
        running = start(
            log,
            *("--n-ctx", "2048", "--queue", "2", "--api-key", KEY, "--cors", PAGE),
            *("--picture-urls", "--picture-url-allow", f"127.0.0.1:{site.port}"),
            *("--picture-url-timeout", "60", "--max-picture-mb", "0.5"),
        )
        try:
            yield Exposed(running, site, internal)
        finally:
            stop(running)


@pytest.fixture
def client(exposed: Exposed) -> Iterator[openai.OpenAI]:
    """The official client, with the exposed server's key and no retries."""
    with openai.OpenAI(
        base_url=f"{exposed.server.url}/v1", api_key=KEY, max_retries=0, timeout=120
    ) as opened:
        yield opened


def post(server: Server, path: str, body: bytes | dict[str, Any], **headers: str) -> httpx.Response:
    """POST ``body`` as JSON (unless a ``content_type`` says otherwise) with the key."""
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    sent = httpx.Headers({"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"})
    for name, value in headers.items():
        sent[name.replace("_", "-")] = value
    return httpx.post(f"{server.url}{path}", content=content, headers=sent, timeout=120)


def still_answers(server: Server) -> None:
    """The server is up and still reads the digit (a data URI, both protocols' route)."""
    body = {"model": "demo", "messages": ask(), "temperature": 0}
    answered = post(server, "/v1/chat/completions", body)
    assert answered.status_code == 200, answered.text
    assert answered.json()["choices"][0]["message"]["content"] == ANSWER
