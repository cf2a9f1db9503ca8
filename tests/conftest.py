"""Fixtures shared by the test modules: the stand-in Ollama daemon, OpenAI-compatible
servers and Hugging Face Hub, tiny GGUF pairs, and the demo model's chat."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from llava_local import VisionChat
from llava_local.backends.llama_cpp import state_key

from .gguf_fixtures import tiny_mtmd, tiny_pair, tiny_pair_q4
from .hub_server import hub_server
from .ollama_server import closed_port, ollama_daemon, ollama_server
from .openai_server import llama_cpp_server, scripted_openai

__all__ = [
    "closed_port",
    "demo_chat",
    "hub_server",
    "llama_cpp_server",
    "ollama_daemon",
    "ollama_server",
    "scripted_openai",
    "state_dir",
    "tiny_mtmd",
    "tiny_pair",
    "tiny_pair_q4",
]


@pytest.fixture(scope="session", autouse=True)
def state_dir(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """The KV-state key the tests make (and the child processes they start use) lives
    in a folder of the test session, never in the user's own state folder."""
    folder = tmp_path_factory.mktemp("state")
    before = os.environ.get(state_key.ENV)
    os.environ[state_key.ENV] = str(folder)
    yield folder
    if before is None:
        del os.environ[state_key.ENV]
    else:
        os.environ[state_key.ENV] = before


@pytest.fixture(scope="module")
def demo_chat() -> Iterator[VisionChat]:
    """The bundled demo model's chat, greedy (temperature 0), loaded once per module that
    asks for it; a test that needs a fresh conversation calls ``reset()``."""
    with VisionChat.llama_cpp(temperature=0) as chat:
        yield chat
