"""Interrupted and concurrent turns leave the conversation and the KV cache consistent."""

from __future__ import annotations

import os
import signal
import threading

import pytest

from llava_local import VisionChat
from llava_local.backends import Turn
from llava_local.backends.llama_cpp import LlamaCppBackend
from llava_local.types import Message, Options

from .gguf_fixtures import GgufPair, png_bytes

GREEDY = {"temperature": 0, "max_tokens": 6}


def cold_answer(pair: GgufPair, history: list[Message], question: str) -> str:
    """The greedy answer of a fresh engine to ``history`` + ``question``, no cache."""
    backend = LlamaCppBackend(pair.lm, pair.mmproj)
    try:
        turn = Turn([*history, Message(role="user", content=question)], Options(**GREEDY))
        return "".join(p for p in backend.generate(turn) if isinstance(p, str))
    finally:
        backend.close()


def test_ctrl_c_mid_answer_keeps_history_and_cache(tiny_pair: GgufPair) -> None:
    """SIGINT while the engine is writing leaves the history as it was and the cache sound."""
    chat = VisionChat.llama_cpp(model=tiny_pair.lm, mmproj=tiny_pair.mmproj)
    with chat:
        chat.ask("First?", image=png_bytes(seed=40), **GREEDY)
        before = chat.history
        stream = chat.stream("Tell me everything.", temperature=0, max_tokens=1500)
        with pytest.raises(KeyboardInterrupt):  # noqa: PT012 - the signal lands mid-loop
            for i, _ in enumerate(stream):
                if i == 1:
                    os.kill(os.getpid(), signal.SIGINT)
        stream.close()
        assert chat.history == before
        warm = chat.ask("Next?", **GREEDY)
    assert warm.text == cold_answer(tiny_pair, before, "Next?")


def test_threads_sharing_a_chat_are_serialised(tiny_pair: GgufPair) -> None:
    """Turns from several threads on one VisionChat never interleave or corrupt the cache."""
    chat = VisionChat.llama_cpp(model=tiny_pair.lm, mmproj=tiny_pair.mmproj)
    errors: list[BaseException] = []

    def worker(n: int) -> None:
        try:
            for k in range(3):
                chat.ask(f"thread {n} question {k}", **GREEDY)
        except BaseException as exc:
            errors.append(exc)

    with chat:
        chat.ask("Look.", image=png_bytes(seed=41), **GREEDY)
        threads = [threading.Thread(target=worker, args=(n,)) for n in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=120)
        history = chat.history
        last = chat.ask("Finally?", **GREEDY)
    assert errors == []
    assert len(history) == 2 + 4 * 3 * 2
    assert [m.role for m in history] == ["user", "assistant"] * 13
    questions = [m.content for m in history[2::2]]
    assert sorted(questions) == sorted(
        f"thread {n} question {k}" for n in range(4) for k in range(3)
    )
    assert last.text == cold_answer(tiny_pair, history, "Finally?")
