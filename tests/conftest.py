"""Fixtures shared by every test folder: the stand-in Ollama daemon, OpenAI-compatible
servers and Hugging Face Hub, tiny GGUF pairs, and the demo model's chat.

The folders mirror the package: a module's tests are in the folder of its package,
``llava_local/X.py`` in ``tests/core/``, ``llava_local/backends/`` in ``tests/backends/``
(``tests/backends/llama_cpp/`` for what only the llama.cpp engine does),
``llava_local/apps/serve/`` in ``tests/apps/serve/``, and so on for ``apps/``,
``apps/captioning/``, ``cli/`` and ``protocols/``. ``tests/dev/`` tests the development
package (``dev/llava_local_dev``), ``tests/project/`` the repository as a whole (README,
wheel, install script, benchmark report, the Pi boards, the first hour),
``tests/security/`` what untrusted input must not do, and ``tests/clients/`` other
people's client libraries against ``serve``. This folder holds only what they share:
the stand-in servers (``ollama_server.py``, ``openai_server.py``, ``hub_server.py``),
``serve_process.py`` and ``ui_process.py`` (a real ``serve`` or ``ui``),
``gguf_fixtures.py``, ``paths.py`` (where the repository's files are), ``known.py`` and
``option_args.py``, imported with relative imports (``from
..paths import DIGIT``). A fixture that several folders use is here; one that a
folder's modules share is in that folder's ``conftest.py``.
"""

from __future__ import annotations

import os
import signal
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


def pytest_configure(config: pytest.Config) -> None:
    """Ctrl-C reaches the programs the tests start, whoever started pytest: a shell
    without job control (``cmd &`` in a script, ``nohup``) starts it with SIGINT
    ignored, and an ignored signal stays ignored in every child, so the tests that press
    Ctrl-C in a child would see it run to the end."""
    if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
        signal.signal(signal.SIGINT, signal.default_int_handler)


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
