"""``serve`` answering several requests at once with the llama.cpp engine's slots.

The app runs under uvicorn in this process, on a real socket, so the test can hold the
engine between two steps while its clients send their requests: they then start
together for certain.
"""

from __future__ import annotations

import base64
import threading
import time
from collections.abc import Iterator
from typing import Any

import httpx
import openai
import pytest
import uvicorn

from llava_local import VisionChat
from llava_local.apps.serve import capacity, create_app
from llava_local.backends.llama_cpp import LlamaCppBackend
from llava_local.memory import human

from ...ollama_server import free_port
from ...paths import DIGIT, SHAPE
from ...serve_process import ANSWER, QUESTION

pytestmark = pytest.mark.llama


@pytest.fixture(scope="module")
def served() -> Iterator[tuple[str, LlamaCppBackend]]:
    chat = VisionChat("llama_cpp", "demo", parallel=3)
    engine = chat.engine
    assert isinstance(engine, LlamaCppBackend)
    port = free_port()
    config = uvicorn.Config(create_app(chat), port=port, log_level="warning")
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and not server.started:
        time.sleep(0.05)
    yield url, engine
    server.should_exit = True
    thread.join(timeout=30)


def data_uri(path: Any) -> str:
    return "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode()


def ask(url: str, picture: Any, question: str = QUESTION) -> str:
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="-", max_retries=0)
    reply = client.chat.completions.create(
        model="demo",
        temperature=0,
        messages=[
            {
                "role": "user",
                "content": [
                    {"type": "image_url", "image_url": {"url": data_uri(picture)}},
                    {"type": "text", "text": question},
                ],
            }
        ],
    )
    return reply.choices[0].message.content or ""


def test_requests_at_once_are_answered_together(served: tuple[str, LlamaCppBackend]) -> None:
    """Three clients' requests, started while the engine is held, are answered in shared
    decoding steps, each as it is alone; /health says three are answered at once."""
    url, engine = served
    alone = [ask(url, DIGIT), ask(url, SHAPE, "What shape is this?")]
    pictures = [(DIGIT, QUESTION), (SHAPE, "What shape is this?"), (DIGIT, QUESTION)]
    answers: list[str] = [""] * len(pictures)

    def client(i: int) -> None:
        answers[i] = ask(url, *pictures[i])

    threads = [threading.Thread(target=client, args=(i,)) for i in range(len(pictures))]
    shared = engine.steps_shared
    with engine.hold():
        for thread in threads:
            thread.start()
        deadline = time.monotonic() + 60
        while engine.turns_waiting < len(pictures) and time.monotonic() < deadline:
            time.sleep(0.02)
        health = httpx.get(f"{url}/health").json()
        assert engine.turns_waiting == len(pictures)
    for thread in threads:
        thread.join(timeout=120)
    assert answers == [alone[0], alone[1], alone[0]]
    assert alone[0] == ANSWER
    assert engine.steps_shared > shared
    assert health["parallel"] == 3
    assert health["running"] == 3


def test_the_ready_line_says_what_the_engine_holds() -> None:
    """The line serve prints when ready names the conversations at once, their positions,
    the memory of their KV cache and the kept states' share."""
    with VisionChat("llama_cpp", "demo", parallel=2) as chat:
        said = capacity(chat)
        engine = chat.engine
        assert isinstance(engine, LlamaCppBackend)
        assert said.startswith("; 2 conversations at once, ")
        assert f"{engine.n_ctx} positions each" in said
        assert "KV cache" in said
        assert f"kept states up to {human(engine.memory_budget.kept_bytes)}" in said
