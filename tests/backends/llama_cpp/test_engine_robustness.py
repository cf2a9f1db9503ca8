"""Interrupted and concurrent turns leave the conversation and the KV cache consistent."""

from __future__ import annotations

import os
import signal
import threading

import pytest

from llava_local import InvalidRequestError, TurnCancelledError, VisionChat
from llava_local.backends import Turn
from llava_local.backends.llama_cpp import LlamaCppBackend
from llava_local.types import Message, Options

from ...gguf_fixtures import GgufPair, png_bytes
from ...option_args import OptionArgs

GREEDY: OptionArgs = {"temperature": 0, "max_tokens": 6}


def cold_answer(pair: GgufPair, history: list[Message], question: str) -> str:
    """The greedy answer of a fresh engine to ``history`` + ``question``, no cache."""
    engine = LlamaCppBackend(pair.lm, pair.mmproj)
    try:
        turn = Turn([*history, Message(role="user", content=question)], Options(**GREEDY))
        return "".join(p for p in engine.generate(turn) if isinstance(p, str))
    finally:
        engine.close()


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


def test_the_thread_reading_a_turn_cannot_start_another(tiny_pair: GgufPair) -> None:
    """A second turn started while this thread reads one raises InvalidRequestError (no two
    turns interleave on one KV cache); the first turn ends normally and is kept, and a
    stream created earlier can be read once the first one is finished."""
    chat = VisionChat.llama_cpp(model=tiny_pair.lm, mmproj=tiny_pair.mmproj)
    with chat:
        chat.ask("First?", image=png_bytes(seed=42), **GREEDY)
        before = chat.history
        later = chat.stream("Later?", **GREEDY)
        with chat.stream("Next?", **GREEDY) as stream:
            pieces = [next(stream)]
            with pytest.raises(InvalidRequestError, match="finish that stream"):
                chat.ask("Interleaved?", **GREEDY)
            with pytest.raises(InvalidRequestError, match="finish that stream"):
                next(later)
            with pytest.raises(InvalidRequestError, match="finish that stream"):
                chat.reset()
            pieces += list(stream)
        after_next = chat.history
        later_text = "".join(later)
        history = chat.history
    assert "".join(pieces) == stream.reply.text == cold_answer(tiny_pair, before, "Next?")
    assert [m.content for m in after_next[2:]] == ["Next?", stream.reply.text]
    assert later_text == cold_answer(tiny_pair, after_next, "Later?")
    assert len(history) == 6


def test_a_turn_waiting_for_another_threads_turn_can_be_cancelled(tiny_pair: GgufPair) -> None:
    """cancel() of a turn queued behind another thread's turn ends it at once with
    TurnCancelledError, while the other turn still holds the chat."""
    chat = VisionChat.llama_cpp(model=tiny_pair.lm, mmproj=tiny_pair.mmproj)
    outcome: list[BaseException | str] = []
    with chat:
        chat.ask("Look.", image=png_bytes(seed=43), **GREEDY)
        waiting = chat.stream("Me too?", **GREEDY)  # for another thread to read
        with chat.stream("Tell me everything.", temperature=0, max_tokens=50) as holding:
            next(holding)  # this thread now holds the chat

            def read() -> None:
                try:
                    outcome.append("".join(waiting))
                except BaseException as exc:
                    outcome.append(exc)

            reader = threading.Thread(target=read)
            reader.start()
            waiting.cancel()
            reader.join(timeout=30)
            ended_while_held = not reader.is_alive()
        reader.join()
        history = chat.history
    assert ended_while_held
    assert len(outcome) == 1
    assert isinstance(outcome[0], TurnCancelledError)
    assert len(history) == 2  # neither the closed nor the cancelled turn is kept
