"""Fixtures shared by the test modules: the stand-in Ollama daemon and tiny GGUF pairs."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from llava_local.backends.llama_cpp import state_key

from .gguf_fixtures import tiny_mtmd, tiny_pair, tiny_pair_q4
from .ollama_server import closed_port, ollama_server

__all__ = ["closed_port", "ollama_server", "state_dir", "tiny_mtmd", "tiny_pair", "tiny_pair_q4"]


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
