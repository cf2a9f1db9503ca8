"""The web page's tabs share one engine per engine choice (issue 18).

The sessions are driven directly (no browser needed): each tab keeps its own
conversation, the tabs' chats run on one loaded demo model, taking turns restores a
conversation's KV state instead of reading its picture again, and the engine closes
with the last tab that uses it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from llava_local import InvalidRequestError, VisionChat
from llava_local.apps.ui import _Session, _Sessions
from llava_local.backends import Backend
from llava_local.backends.llama_cpp import LlamaCppBackend
from llava_local.demo import demo_paths
from llava_local.types import Reply

from ..known import known
from ..paths import DIGIT, SHAPE

DEMO: dict[str, Any] = {"backend": "llama_cpp", "model": None, "temperature": 0, "max_tokens": 24}


def ask(session: _Session, prompt: str, image: Path | None = None) -> Reply:
    """One turn of a tab, as the page runs it; the finished reply."""
    for _ in session.turn(prompt, None if image is None else str(image)):
        pass
    reply = session.last_reply
    assert reply is not None
    return reply


def engine_of(session: _Session) -> Backend:
    assert session.chat is not None
    return session.chat.engine


def is_closed(engine: Backend) -> bool:
    """Whether the in-process engine has freed its model."""
    assert isinstance(engine, LlamaCppBackend)
    return engine.closed


def test_two_tabs_share_one_engine_and_keep_their_own_conversations() -> None:
    """Two tabs on the same engine choice load the model once, each answers its own
    picture, and a tab's follow-up after the other tab's turn restores its own state
    (picture and earlier turn) instead of encoding the picture again."""
    sessions = _Sessions(DEMO)
    try:
        a, b = sessions.get("tab-a"), sessions.get("tab-b")
        first = ask(a, "What digit is this?", DIGIT)
        shape = ask(b, "What shape is this?", SHAPE)
        assert engine_of(a) is engine_of(b)
        assert sessions.engines.open_engines() == [engine_of(a)]
        assert (first.text, shape.text) == ("This digit is 7.", "It is a triangle.")

        follow_up = ask(a, "What digit is it?")
        assert follow_up.text == "This digit is 7."
        assert follow_up.stats.images_encoded == 0
        assert follow_up.stats.cached_tokens is not None
        assert follow_up.stats.cached_tokens > known(first.stats.prompt_tokens)  # picture + turn
        assert a.chat is not None
        assert b.chat is not None
        assert len(a.chat.history) == 4
        assert len(b.chat.history) == 2
        assert b.chat.history[0].content == "What shape is this?"
    finally:
        sessions.close_all()


def test_a_tab_does_not_encode_a_picture_another_tab_has_read() -> None:
    """A second tab asking about the picture a first tab read starts from that tab's KV
    state: no picture encoded, the answer the same."""
    sessions = _Sessions(DEMO)
    try:
        a, b = sessions.get("tab-a"), sessions.get("tab-b")
        first = ask(a, "What digit is this?", DIGIT)
        assert first.stats.images_encoded == 1
        second = ask(b, "What digit is it?", DIGIT)
        assert second.text == "This digit is 7."
        assert second.stats.images_encoded == 0
        assert second.stats.cached_tokens is not None
        assert second.stats.cached_tokens > 0
    finally:
        sessions.close_all()


def test_closing_a_tab_leaves_the_other_and_the_last_closes_the_engine() -> None:
    """When one tab goes away the other goes on answering on the same engine; when the
    last goes, the engine is closed and no engine is left open."""
    sessions = _Sessions(DEMO)
    a, b = sessions.get("tab-a"), sessions.get("tab-b")
    ask(a, "What digit is this?", DIGIT)
    ask(b, "What digit is this?", DIGIT)
    shared = engine_of(a)

    sessions.end("tab-a")
    assert a.closed
    assert not is_closed(shared)
    assert ask(b, "What digit is it?").text == "This digit is 7."
    assert engine_of(b) is shared

    sessions.end("tab-b")
    assert is_closed(shared)
    assert sessions.engines.open_engines() == []
    sessions.close_all()


def test_switching_engine_gives_back_the_tabs_share() -> None:
    """A tab choosing other engine settings gets another engine and the old one stays
    for the tab still on it; when that tab follows, the old engine is closed; choosing
    the same engine again keeps it loaded and starts a new conversation on it."""
    sessions = _Sessions(DEMO)
    try:
        a, b = sessions.get("tab-a"), sessions.get("tab-b")
        ask(a, "What digit is this?", DIGIT)
        ask(b, "What digit is this?", DIGIT)
        first = engine_of(a)
        other = {**DEMO, "n_threads": 1}

        a.switch(other)
        second = engine_of(a)
        assert second is not first
        assert not is_closed(first)
        assert ask(b, "What digit is it?").text == "This digit is 7."
        assert ask(a, "What digit is this?", DIGIT).text == "This digit is 7."

        b.switch(other)
        assert is_closed(first)
        assert engine_of(b) is second
        assert sessions.engines.open_engines() == [second]

        a.switch({**other, "max_tokens": 12})  # only the conversation's options differ
        assert engine_of(a) is second
        assert not is_closed(second)
        assert a.chat is not None
        assert a.chat.history == []
    finally:
        sessions.close_all()
    assert is_closed(second)


def test_page_shutdown_closes_every_engine() -> None:
    """Stopping the page closes the engines of all its tabs, whichever they chose."""
    sessions = _Sessions(DEMO)
    a, b = sessions.get("tab-a"), sessions.get("tab-b")
    b.engine = {**DEMO, "n_threads": 1}
    ask(a, "What digit is this?", DIGIT)
    ask(b, "What digit is this?", DIGIT)
    engines = [engine_of(a), engine_of(b)]
    assert engines[0] is not engines[1]
    sessions.close_all()
    assert all(is_closed(e) for e in engines)
    assert sessions.engines.open_engines() == []


def test_auto_then_llama_cpp_for_the_same_files_loads_the_model_once(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The page's choices auto (no daemon, no model named), llama_cpp with "demo" and
    llama_cpp with the demo's file paths mean the same files: a tab on auto that then
    chooses llama_cpp keeps its engine, and a tab naming the files shares it too; the
    model is loaded once and closed with the last tab."""
    monkeypatch.delenv("OLLAMA_HOST", raising=False)
    monkeypatch.delenv("LLAVA_LOCAL_MODEL", raising=False)
    lm, mmproj = demo_paths()
    auto = {**DEMO, "backend": "auto"}
    sessions = _Sessions(auto)
    try:
        a, b = sessions.get("tab-a"), sessions.get("tab-b")
        assert ask(a, "What digit is this?", DIGIT).text == "This digit is 7."
        loaded = engine_of(a)
        a.switch({**DEMO, "backend": "llama_cpp", "model": "demo"})
        assert engine_of(a) is loaded
        b.switch({**DEMO, "backend": "llama_cpp", "model": str(lm), "mmproj": str(mmproj)})
        assert engine_of(b) is loaded
        assert ask(b, "What digit is it?", DIGIT).text == "This digit is 7."
        assert sessions.engines.open_engines() == [loaded]
        assert not is_closed(loaded)
    finally:
        sessions.close_all()
    assert is_closed(loaded)


def test_a_chat_that_does_not_own_its_engine_leaves_it_open() -> None:
    """VisionChat(engine, close_engine=False).close() ends the conversation but leaves
    the shared engine to the other chats; a chat opening its engine by name refuses it."""
    model, mmproj = demo_paths()
    shared = LlamaCppBackend(model, mmproj)
    with VisionChat(shared, close_engine=False) as borrowed:
        borrowed.ask("What digit is this?", image=DIGIT, temperature=0)
    assert not is_closed(shared)
    with VisionChat(shared) as owner:  # today's default: the chat closes its engine
        assert owner.ask("What digit is this?", image=DIGIT, temperature=0).text == (
            "This digit is 7."
        )
    assert is_closed(shared)
    with pytest.raises(InvalidRequestError, match="close_engine=False"):
        VisionChat("llama_cpp", close_engine=False)


def test_an_uploaded_picture_is_read_before_the_question() -> None:
    """A picture uploaded to a tab is read while the question is typed: the question
    encodes no picture and answers as before; a picture replaced before the question
    is not sent with it, and a removed one not at all."""
    sessions = _Sessions(DEMO)
    try:
        tab = sessions.get("tab-a")
        tab.attach(str(DIGIT))
        assert tab.reading is not None
        tab.reading.result(timeout=120)
        reply = ask(tab, "What digit is this?", DIGIT)
        assert (reply.text, reply.stats.images_encoded) == ("This digit is 7.", 0)
        assert tab.chat is not None
        assert [len(m.images) for m in tab.chat.history] == [1, 0]

        tab.reset()
        tab.attach(str(DIGIT))
        replaced = ask(tab, "What shape is this?", SHAPE)  # the picture changed meanwhile
        assert replaced.text == "It is a triangle."
        assert [i.source for i in tab.chat.history[0].images] == [str(SHAPE)]

        tab.reset()
        tab.attach(str(DIGIT))
        tab.chat.allow_text_only = True
        ask(tab, "Say something.")  # the picture was removed from the page
        assert not tab.chat.history[0].images
    finally:
        sessions.close_all()
