"""AsyncVisionChat: the sync core driven from asyncio, with the same guarantees."""

from __future__ import annotations

import asyncio

import pytest

from llava_local import AsyncVisionChat, BackendUnavailableError, VisionChat

from .gguf_fixtures import GgufPair, png_bytes
from .ollama_server import OllamaServer, Script


def test_ask_and_async_for_over_ollama(ollama_server: OllamaServer) -> None:
    """await ask() and async-for streaming answer and build one conversation."""
    ollama_server.script(Script(pieces=["A ", "dog."]), Script(pieces=["Brown", "."]))

    async def main() -> tuple[str, list[str]]:
        async with AsyncVisionChat.ollama(host=ollama_server.url) as chat:
            reply = await chat.ask("What?", image=png_bytes(seed=1))
            pieces = [p async for p in chat.stream("Colour?")]
            assert len(chat.history) == 4
            return reply.text, pieces

    text, pieces = asyncio.run(main())
    assert text == "A dog."
    assert pieces == ["Brown", "."]


def test_leaving_early_keeps_nothing_and_frees_the_chat(tiny_pair: GgufPair) -> None:
    """Breaking out of an async stream stops the engine; the turn is not kept; the next works."""

    async def main() -> tuple[int, str]:
        chat = AsyncVisionChat.llama_cpp(tiny_pair.lm, mmproj=tiny_pair.mmproj)
        async with chat:
            async with chat.stream("What?", image=png_bytes(seed=2), temperature=0) as s:
                async for _ in s:
                    break
            kept = len(chat.history)
            reply = await chat.ask("What?", image=png_bytes(seed=2), temperature=0, max_tokens=4)
            return kept, reply.text

    kept, text = asyncio.run(main())
    with VisionChat.llama_cpp(tiny_pair.lm, mmproj=tiny_pair.mmproj) as sync:
        expected = sync.ask("What?", image=png_bytes(seed=2), temperature=0, max_tokens=4).text
    assert kept == 0
    assert text == expected


def test_concurrent_coroutines_are_serialised(tiny_pair: GgufPair) -> None:
    """Several coroutines asking one chat at once each get a whole turn, in some order."""

    async def main() -> list[str]:
        async with AsyncVisionChat.llama_cpp(tiny_pair.lm, mmproj=tiny_pair.mmproj) as chat:
            await chat.ask("Look.", image=png_bytes(seed=3), temperature=0, max_tokens=3)
            await asyncio.gather(
                *(chat.ask(f"q{i}", temperature=0, max_tokens=3) for i in range(4))
            )
            return [m.role for m in chat.history]

    assert asyncio.run(main()) == ["user", "assistant"] * 5


def test_errors_arrive_as_library_errors(closed_port: int) -> None:
    """An engine failure inside the worker thread is raised in the coroutine."""

    async def main() -> None:
        async with AsyncVisionChat.ollama(host=f"127.0.0.1:{closed_port}") as chat:
            await chat.ask("Hi")

    with pytest.raises(BackendUnavailableError, match="ollama serve"):
        asyncio.run(main())


def test_the_event_loop_stays_free_while_the_engine_works(ollama_server: OllamaServer) -> None:
    """Other coroutines run while an answer trickles in from the engine."""
    ollama_server.script(Script(pieces=["a", "b", "c", "d"], piece_delay_s=0.05))

    async def main() -> int:
        ticks = 0
        done = asyncio.Event()

        async def ticker() -> None:
            nonlocal ticks
            while not done.is_set():
                ticks += 1
                await asyncio.sleep(0.005)

        async with AsyncVisionChat.ollama(host=ollama_server.url) as chat:
            task = asyncio.create_task(ticker())
            await chat.ask("Hi")
            done.set()
            await task
        return ticks

    assert asyncio.run(main()) > 3
