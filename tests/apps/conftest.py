"""What the application tests share: a chat over the stand-in Ollama daemon."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from llava_local import VisionChat

from ..ollama_server import OllamaServer


@pytest.fixture
def ollama_chat(ollama_server: OllamaServer) -> Iterator[VisionChat]:
    """``VisionChat.ollama`` on the test's own stand-in daemon (``ollama_server``)."""
    with VisionChat.ollama(host=ollama_server.url) as chat:
        yield chat
