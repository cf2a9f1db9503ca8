"""VisionChat.attach: the picture given before the question is read ahead, and the
question that takes it reads only its own words."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from llava_local import VisionChat
from llava_local.backends.llama_cpp import LlamaCppBackend
from llava_local.errors import ImageError

from ..paths import EXAMPLES

DIGIT, SHAPE = EXAMPLES / "digit.png", EXAMPLES / "shape.png"
QUESTION = "What digit is this?"


@pytest.fixture(scope="module")
def engine() -> Iterator[LlamaCppBackend]:
    """The demo model, kept states off: a picture's positions can come only from the slot."""
    engine = LlamaCppBackend("demo", kv_cache_mb=0)
    yield engine
    engine.close()


@pytest.fixture
def chat(engine: LlamaCppBackend) -> Iterator[VisionChat]:
    with VisionChat(engine, close_engine=False, temperature=0) as chat:
        yield chat


def test_a_question_after_attach_reads_only_its_words(chat: VisionChat) -> None:
    """Once attach's head start is done, the question encodes no picture and finds the
    picture's positions already read; the answer and the history are as with image=."""
    chat.attach(SHAPE).result()  # another picture first, so nothing is left from before
    chat.reset()
    assert chat.attach(DIGIT).result(timeout=120) is None
    reply = chat.ask(QUESTION)
    assert reply.text == "This digit is 7."
    assert reply.stats.images_encoded == 0
    assert (reply.stats.cached_tokens or 0) > 100  # the picture's positions, at least
    (asked, _) = chat.history
    assert [i.source for i in asked.images] == [str(DIGIT)]
    # The next question has no attachment left to take.
    assert chat.ask("What digit is this? Answer again.").text.startswith("This digit is")
    assert len([m for m in chat.history if m.images]) == 1


def test_a_question_asked_while_the_picture_is_read_waits_for_it(chat: VisionChat) -> None:
    """Asked at once after attach, the question still gets the picture, once."""
    chat.attach(DIGIT)
    reply = chat.ask(QUESTION)
    assert reply.text == "This digit is 7."
    assert len(chat.history[0].images) == 1


def test_a_failed_turn_leaves_the_attached_picture_for_the_next(chat: VisionChat) -> None:
    """A question whose own picture cannot be read fails and keeps nothing; the
    attached picture is still there for the next question."""
    chat.attach(DIGIT)
    with pytest.raises(ImageError):
        chat.ask(QUESTION, image=EXAMPLES / "no-such-picture.png")
    assert chat.history == []
    assert chat.ask(QUESTION).text == "This digit is 7."


def test_a_picture_that_cannot_be_read_fails_its_future_and_one_question(
    chat: VisionChat, tmp_path: Path
) -> None:
    """attach returns at once even for a broken file; its future and the next question
    raise the library's error, and the question after that no longer carries it."""
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"\x89PNG\r\n\x1a\n not really")
    future = chat.attach(broken)
    with pytest.raises(ImageError):
        future.result(timeout=60)
    with pytest.raises(ImageError):
        chat.ask(QUESTION)
    assert chat.ask(QUESTION, image=DIGIT).text == "This digit is 7."
    assert [len(m.images) for m in chat.history] == [1, 0]


def test_reset_drops_what_was_attached(chat: VisionChat) -> None:
    """A new conversation starts without the pictures attached to the old one."""
    chat.attach(DIGIT).result(timeout=120)
    chat.reset()
    chat.allow_text_only = True
    chat.ask("Say something.", max_tokens=4)
    assert not chat.history[0].images


def test_attach_needs_a_picture(chat: VisionChat) -> None:
    """attach() with nothing to attach is refused at once."""
    with pytest.raises(ValueError, match="needs a picture"):
        chat.attach()
