"""The life cycle the two HTTP engines share (llava_local/backends/remote.py): checked
once before the first turn, checked again after a turn that found the model or the
server gone, closed once. Each engine against its stand-in server over real sockets:
the Ollama daemon (tests/ollama_server.py) and the scripted OpenAI-compatible server
(tests/openai_server.py)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from llava_local.backends.base import Finish, Turn
from llava_local.backends.ollama import OllamaBackend
from llava_local.backends.openai import OpenAIBackend
from llava_local.backends.remote import RemoteEngine
from llava_local.errors import BackendError, BackendUnavailableError, ModelNotFoundError
from llava_local.types import Message, Options

from ..ollama_server import OllamaServer, Script
from ..openai_server import Script as OpenAIScript
from ..openai_server import ScriptedServer


def turn() -> Turn:
    return Turn(messages=[Message(role="user", content="What is it?")], options=Options())


def answer(engine: RemoteEngine) -> str:
    items = list(engine.generate(turn()))
    assert isinstance(items.pop(), Finish)
    return "".join(str(item) for item in items)


@pytest.fixture
def ollama_engine(ollama_server: OllamaServer) -> Iterator[OllamaBackend]:
    engine = OllamaBackend("llava", host=ollama_server.url, timeout=5.0)
    yield engine
    engine.close()


@pytest.fixture
def openai_engine(scripted_openai: ScriptedServer) -> Iterator[OpenAIBackend]:
    engine = OpenAIBackend(scripted_openai.url, "scripted-vision", max_retries=0, timeout=5.0)
    yield engine
    engine.close()


def test_the_ollama_check_is_made_once(
    ollama_server: OllamaServer, ollama_engine: OllamaBackend
) -> None:
    """Two turns in a row ask the daemon about the model once, before the first."""
    answer(ollama_engine)
    answer(ollama_engine)
    assert len(ollama_server.requests_to("/api/show")) == 1
    assert len(ollama_server.requests_to("/api/chat")) == 2


def test_a_dropped_daemon_is_checked_again_before_the_next_turn(
    ollama_server: OllamaServer, ollama_engine: OllamaBackend
) -> None:
    """A turn whose connection dropped leaves the engine unchecked: the next turn asks
    the daemon (which may have restarted without the model) again, then answers."""
    ollama_server.script(Script(fault="drop"), Script(pieces=["fine"]))
    with pytest.raises(BackendUnavailableError):
        answer(ollama_engine)
    assert len(ollama_server.requests_to("/api/show")) == 1
    assert answer(ollama_engine) == "fine"
    assert len(ollama_server.requests_to("/api/show")) == 2


def test_a_model_the_server_lost_is_checked_again(
    scripted_openai: ScriptedServer, openai_engine: OpenAIBackend
) -> None:
    """An OpenAI-compatible server that answers 404 for the model mid-conversation makes
    the next turn list its models again, and say which it has now."""
    answer(openai_engine)
    assert len([r for r in scripted_openai.requests if r.path == "/v1/models"]) == 1
    scripted_openai.script = OpenAIScript(
        fault="status", status=404, error={"message": "model 'scripted-vision' not found"}
    )
    with pytest.raises(ModelNotFoundError):
        answer(openai_engine)
    scripted_openai.models = ["another-model"]
    with pytest.raises(ModelNotFoundError, match="it lists: another-model"):
        answer(openai_engine)
    assert len([r for r in scripted_openai.requests if r.path == "/v1/models"]) == 2


@pytest.mark.parametrize("name", ["ollama_engine", "openai_engine"])
def test_a_closed_engine_refuses_turns_and_closes_once(
    name: str, request: pytest.FixtureRequest
) -> None:
    """After close() (twice is harmless) a turn raises the library's BackendError."""
    engine: RemoteEngine = request.getfixturevalue(name)
    engine.close()
    engine.close()
    with pytest.raises(BackendError, match="engine is closed"):
        answer(engine)
    with pytest.raises(BackendError, match="engine is closed"):
        engine.check()
