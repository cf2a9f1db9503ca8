"""The official clients of both protocols, pointed at the module's ``server`` (each test
module starts the one it needs) with its API key, if it has one, and no retries."""

from __future__ import annotations

from collections.abc import Iterator

import ollama
import openai
import pytest

from ...serve_process import Server


@pytest.fixture
def client(server: Server) -> Iterator[openai.OpenAI]:
    """The ``openai`` client of the module's server."""
    with openai.OpenAI(
        base_url=f"{server.url}/v1", api_key=server.key or "none", max_retries=0, timeout=120
    ) as opened:
        yield opened


@pytest.fixture
def ollama_client(server: Server) -> Iterator[ollama.Client]:
    """The ``ollama`` client of the module's server."""
    headers = {"Authorization": f"Bearer {server.key}"} if server.key else None
    opened = ollama.Client(host=server.url, headers=headers, timeout=120)
    yield opened
    opened.close()  # type: ignore[no-untyped-call]
