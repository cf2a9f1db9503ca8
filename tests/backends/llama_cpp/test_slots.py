"""Several conversations at once on one llama.cpp engine (``parallel`` slots).

Each test starts its turns while the engine is held between two steps, so they run
side by side for certain, then checks that they answered as each would alone.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, Literal

import pytest
from pydantic import BaseModel

from llava_local import TurnCancelledError, VisionChat
from llava_local.backends.llama_cpp import LlamaCppBackend
from llava_local.images import prepare
from llava_local.types import Message, Reply

from ...gguf_fixtures import GgufPair, png_bytes
from ...known import known
from ...option_args import OptionArgs

pytestmark = pytest.mark.llama

LONG: OptionArgs = {"temperature": 0, "max_tokens": 40}


def engine_for(pair: GgufPair, **kwargs: Any) -> LlamaCppBackend:
    return LlamaCppBackend(pair.lm, pair.mmproj, **kwargs)


@pytest.fixture(scope="module")
def engine(tiny_pair: GgufPair) -> Iterator[LlamaCppBackend]:
    engine = engine_for(tiny_pair, parallel=3, kv_cache_mb=0)
    yield engine
    engine.close()


def alone(pair: GgufPair, question: str, picture: bytes, max_tokens: int = 40) -> str:
    with VisionChat.llama_cpp(model=str(pair.lm), mmproj=str(pair.mmproj)) as chat:
        return chat.ask(question, image=picture, temperature=0, max_tokens=max_tokens).text


def asking(chat: VisionChat, question: str, picture: bytes) -> Callable[[], str]:
    """A turn for :func:`side_by_side`: ``chat`` asks ``question`` about ``picture``."""
    return lambda: chat.ask(question, image=picture, **LONG).text


def ask_reply(chat: VisionChat, question: str, picture: bytes) -> Callable[[], Reply]:
    return lambda: chat.ask(question, image=picture, **LONG)


def side_by_side(engine: LlamaCppBackend, turns: list[Callable[[], Any]]) -> list[Any]:
    """Run ``turns`` in threads, all started while the engine is held."""
    results: list[Any] = [None] * len(turns)

    def run(i: int) -> None:
        try:
            results[i] = turns[i]()
        except BaseException as exc:  # returned, then asserted on
            results[i] = exc

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(turns))]
    with engine.hold():
        for thread in threads:
            thread.start()
        deadline = time.monotonic() + 30
        while engine.turns_waiting < len(turns) and time.monotonic() < deadline:
            time.sleep(0.01)
        assert engine.turns_waiting == len(turns)
    for thread in threads:
        thread.join(timeout=120)
    return results


def test_conversations_side_by_side_answer_as_alone(
    engine: LlamaCppBackend, tiny_pair: GgufPair
) -> None:
    """Three conversations answered at once, one batch a step, give the greedy answers
    each gives alone, and their steps were shared."""
    pictures = [png_bytes(seed=s) for s in (41, 42, 43)]
    questions = ["What is it?", "Describe the colours.", "Is it round?"]
    expected = [alone(tiny_pair, q, p) for q, p in zip(questions, pictures, strict=True)]
    chats = [VisionChat(engine, close_engine=False) for _ in pictures]
    shared_before = engine.steps_shared
    got = side_by_side(
        engine,
        [asking(c, q, p) for c, q, p in zip(chats, questions, pictures, strict=True)],
    )
    assert got == expected
    assert engine.steps_shared > shared_before


def test_more_conversations_than_slots_wait_their_turn(tiny_pair: GgufPair) -> None:
    """With two slots, a third conversation waits for one and is answered as alone."""
    pictures = [png_bytes(seed=s) for s in (51, 52, 53)]
    expected = [alone(tiny_pair, "What is it?", p) for p in pictures]
    engine = engine_for(tiny_pair, parallel=2, kv_cache_mb=0)
    try:
        chats = [VisionChat(engine, close_engine=False) for _ in pictures]
        got = side_by_side(
            engine,
            [asking(c, "What is it?", p) for c, p in zip(chats, pictures, strict=True)],
        )
    finally:
        engine.close()
    assert got == expected


def test_cancelling_one_leaves_the_other_going(
    engine: LlamaCppBackend, tiny_pair: GgufPair
) -> None:
    """One conversation stopped mid-answer ends with TurnCancelledError and keeps its
    history; the other, in the same batches, finishes with its alone answer."""
    first, second = png_bytes(seed=61), png_bytes(seed=62)
    expected = alone(tiny_pair, "Tell me about it.", second, max_tokens=60)
    stopped, going = VisionChat(engine, close_engine=False), VisionChat(engine, close_engine=False)

    def stop_after_a_piece() -> int:
        stream = stopped.stream("Tell me about it.", image=first, **LONG)
        pieces = 0
        for _ in stream:
            pieces += 1
            if pieces == 2:
                stream.cancel()
        return pieces

    results = side_by_side(
        engine,
        [
            stop_after_a_piece,
            lambda: going.ask("Tell me about it.", image=second, temperature=0, max_tokens=60),
        ],
    )
    assert isinstance(results[0], TurnCancelledError)
    assert stopped.history == []
    assert results[1].text == expected
    assert len(going.history) == 2


def test_a_picture_in_another_slot_is_copied_not_read(
    engine: LlamaCppBackend, tiny_pair: GgufPair
) -> None:
    """A second conversation about the same picture takes the picture's positions from
    the slot that read it (no CLIP, no reading), and answers as a fresh engine does."""
    picture = png_bytes(seed=71)
    one, two = VisionChat(engine, close_engine=False), VisionChat(engine, close_engine=False)
    one.ask("What is it?", image=picture, **LONG)
    reply = two.ask("Is it big?", image=picture, **LONG)
    assert reply.stats.images_encoded == 0
    assert known(reply.stats.cached_tokens) >= tiny_pair.vision.n_image_tokens
    assert reply.text == alone(tiny_pair, "Is it big?", picture)
    assert engine.turns_running == 0


class Shape(BaseModel):
    shape: Literal["circle", "square", "triangle"]
    filled: bool


def test_a_grammar_binds_only_its_own_conversation(
    engine: LlamaCppBackend, tiny_pair: GgufPair
) -> None:
    """A turn with a schema and a free turn in the same batches: the first answer fits
    the schema, the second is what it is alone."""
    free_picture = png_bytes(seed=82)
    expected = alone(tiny_pair, "What is it?", free_picture)
    structured = VisionChat(engine, close_engine=False)
    free = VisionChat(engine, close_engine=False)
    results = side_by_side(
        engine,
        [
            lambda: structured.ask(
                "Which shape?",
                image=png_bytes(seed=81),
                schema=Shape,
                temperature=0,
                max_tokens=200,
            ),
            lambda: free.ask("What is it?", image=free_picture, **LONG).text,
        ],
    )
    assert isinstance(results[0].parsed, Shape)
    assert results[1] == expected


def test_a_saved_state_loads_into_a_slot_and_answers_as_before(
    tiny_pair: GgufPair, tmp_path: Path
) -> None:
    """A conversation saved from one engine with two slots, loaded into another with two
    slots while the first slot holds something else, resumes warm with the same answer."""
    picture = png_bytes(seed=91)
    first = engine_for(tiny_pair, parallel=2, kv_cache_mb=0)
    try:
        chat = VisionChat(first, close_engine=False)
        chat.ask("What is it?", image=picture, **LONG)
        chat.save(tmp_path / "talk.json")
        expected = chat.ask("And the colour?", **LONG).text
    finally:
        first.close()
    second = engine_for(tiny_pair, parallel=2, kv_cache_mb=0)
    try:
        VisionChat(second, close_engine=False).ask(
            "Something else?", image=png_bytes(seed=92), **LONG
        )
        resumed = VisionChat(second, close_engine=False)
        resumed.restore(tmp_path / "talk.json")
        reply = resumed.ask("And the colour?", **LONG)
    finally:
        second.close()
    assert reply.text == expected
    assert reply.stats.images_encoded == 0
    assert known(reply.stats.cached_tokens) > tiny_pair.vision.n_image_tokens


@pytest.mark.parametrize("parallel", [1, 2])
def test_a_picture_read_ahead_is_not_read_again(tiny_pair: GgufPair, parallel: int) -> None:
    """A picture given before its question is read in the background; the question then
    reads only its own tokens (no CLIP, the picture's positions cached), even when it
    comes while the reading is still going, and answers as without reading ahead."""
    picture = png_bytes(seed=101)
    expected = alone(tiny_pair, "What is it?", picture)
    engine = engine_for(tiny_pair, parallel=parallel, kv_cache_mb=0)
    try:
        chat = VisionChat(engine, close_engine=False)
        prepared = prepare(picture, max_side=engine.max_image_side)
        with engine.hold():  # the question arrives while the picture waits to be read
            reading = engine.prefetch([Message(role="user", content="", images=(prepared,))])
            deadline = time.monotonic() + 30
            while engine.turns_waiting < 1 and time.monotonic() < deadline:
                time.sleep(0.01)
            asking = threading.Thread(
                target=lambda: results.append(chat.ask("What is it?", image=picture, **LONG))
            )
            results: list[Any] = []
            asking.start()
            while engine.turns_waiting < 2 and time.monotonic() < deadline:
                time.sleep(0.01)
        asking.join(timeout=60)
        reading.join(timeout=60)
    finally:
        engine.close()
    reply = results[0]
    assert reply.text == expected
    assert reply.stats.images_encoded == 0
    assert known(reply.stats.cached_tokens) >= tiny_pair.vision.n_image_tokens


def test_questions_about_one_picture_at_once_read_it_once(tiny_pair: GgufPair) -> None:
    """Three questions about one picture, asked at once on three slots: one turn reads
    the picture, the other two wait for it and copy its positions, and each answer is
    the one it gets alone."""
    picture = png_bytes(seed=111)
    questions = ["What is it?", "Is it round?", "Which colour?"]
    expected = [alone(tiny_pair, q, picture) for q in questions]
    engine = engine_for(tiny_pair, parallel=3, kv_cache_mb=0)
    try:
        chats = [VisionChat(engine, close_engine=False) for _ in questions]
        replies = side_by_side(
            engine,
            [ask_reply(c, q, picture) for c, q in zip(chats, questions, strict=True)],
        )
    finally:
        engine.close()
    assert [r.text for r in replies] == expected
    cached = sorted(known(r.stats.cached_tokens) for r in replies)
    assert cached[0] == 0
    assert cached[1] >= tiny_pair.vision.n_image_tokens
    assert sum(known(r.stats.images_encoded) for r in replies) == 1


def test_a_picture_is_encoded_between_decode_steps_never_during_one(
    tiny_pair: GgufPair, monkeypatch: pytest.MonkeyPatch
) -> None:
    """While one conversation is answered, another's picture is encoded between two of
    its decode steps, never during one: both use every core, and at once they only slow
    each other down (before, a decode step ran beside the encoding)."""
    import llama_cpp
    from llama_cpp import mtmd_cpp

    encoding = threading.Event()
    overlaps: list[str] = []
    decode, encode = llama_cpp.llama_decode, mtmd_cpp.mtmd_encode_chunk

    def decode_watched(ctx: Any, batch: Any) -> int:
        if encoding.is_set():
            overlaps.append("a decode step while a picture was encoded")
        return int(decode(ctx, batch))

    def encode_slowly(mctx: Any, chunk: Any) -> int:
        encoding.set()
        try:
            time.sleep(0.3)  # long enough for the other turn to want several steps
            return int(encode(mctx, chunk))
        finally:
            encoding.clear()

    monkeypatch.setattr(llama_cpp, "llama_decode", decode_watched)
    monkeypatch.setattr(mtmd_cpp, "mtmd_encode_chunk", encode_slowly)
    engine = engine_for(tiny_pair, parallel=2, kv_cache_mb=0, embedding_cache_mb=0)
    try:
        first, second = (VisionChat(engine, close_engine=False) for _ in range(2))
        answering = threading.Thread(
            target=lambda: first.ask("Tell me about it.", image=png_bytes(seed=121), **LONG)
        )
        answering.start()
        deadline = time.monotonic() + 60
        while engine.turns_running < 1 and time.monotonic() < deadline:
            time.sleep(0.01)
        for seed in (122, 123):  # two pictures while the first answer is written
            second.reset()
            second.ask("What is it?", image=png_bytes(seed=seed), **LONG)
        answering.join(timeout=60)
    finally:
        engine.close()
    assert not overlaps
