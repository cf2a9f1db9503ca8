"""Engines shared by conversations: one open engine per plan, for as long as a
conversation uses it.

The web page gives each tab its own :class:`~llava_local.VisionChat`, ``serve`` opens
its engine here, and a Ray worker builds its chat here from the config the driver
planned; each asks an :class:`EnginePool` for a conversation on the engine its settings
choose. The pool keys engines by the plan (:attr:`~llava_local.backends.EnginePlan.key`),
not by the settings as given, so choices that mean the same engine on the same files
share it: ``auto`` and ``llama_cpp``, ``None`` and ``"demo"``, a catalogue name and its
files' paths, two spellings of one server's address. The model loads once, and
conversations taking turns on it find each other's KV states in its prefix cache.
"""

from __future__ import annotations

import inspect
import threading
from collections.abc import Hashable, Mapping
from typing import Any

from ..backends import Backend, EnginePlan, announce, plan
from ..backends import open as open_plan
from ..chat import VisionChat
from ..types import Options

__all__ = ["CHAT_SETTINGS", "EnginePool", "shared_pool", "split_settings"]

#: VisionChat arguments that belong to one conversation, not to its engine (system
#: prompt, options, ...): choices that differ only in these share an engine.
CHAT_SETTINGS = frozenset(
    {
        name
        for name, param in inspect.signature(VisionChat).parameters.items()
        if param.kind is param.KEYWORD_ONLY
    }
    | set(Options.model_fields)
)


def split_settings(settings: Mapping[str, Any]) -> tuple[EnginePlan, dict[str, Any]]:
    """VisionChat arguments (``backend``, ``model``, the engine's settings, the
    conversation's) as ``(the engine's plan, the conversation's settings)``;
    ``close_engine`` is the pool's to decide, so it is dropped."""
    engine = {k: v for k, v in settings.items() if k not in CHAT_SETTINGS}
    chat = {k: v for k, v in settings.items() if k in CHAT_SETTINGS and k != "close_engine"}
    backend = str(engine.pop("backend", None) or "auto")
    model = engine.pop("model", None)
    given = {k: v for k, v in engine.items() if v is not None}
    return plan(backend, model, **given), chat


class _Shared:
    """One open (or opening) engine and how many conversations use it."""

    def __init__(self, plan: EnginePlan) -> None:
        self.plan = plan
        self.engine: Backend | None = None
        self.users = 0
        self.opening = threading.Lock()  # held while the model loads

    def close(self) -> None:
        """Close the engine (after a load under way ends); safe to call twice."""
        with self.opening:
            engine, self.engine = self.engine, None
        if engine is not None:
            engine.close()


class EnginePool:
    """Engines by plan, each shared by the conversations that chose it.

    :meth:`chat` gives a conversation of its own over the shared engine (a
    :class:`~llava_local.VisionChat` with ``close_engine=False``), opening the engine
    first (and printing its plan's notice) if no conversation uses it yet;
    :meth:`release` ends that conversation and closes the engine when it was the last.
    An engine serves its chats' turns itself (llama.cpp in slots, one at a time or
    several at once), so chats sharing it need nothing more.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()  # the tables below; never held while a model loads
        self._by_key: dict[Hashable, _Shared] = {}
        self._of_chat: dict[VisionChat, Hashable] = {}

    def chat(self, engine: EnginePlan, **settings: Any) -> VisionChat:
        """A new conversation with ``settings`` (system prompt, options, ...) on the
        engine ``engine`` plans, opened now if no conversation uses it yet."""
        key = engine.key
        with self._lock:
            shared = self._by_key.setdefault(key, _Shared(engine))
            shared.users += 1
        try:
            with shared.opening:  # a second conversation waits for the first one's load
                if shared.engine is None:
                    announce(shared.plan)
                    shared.engine = open_plan(shared.plan)
                chat = VisionChat(shared.engine, close_engine=False, **settings)
                chat.plan = shared.plan
        except BaseException:
            self._let_go(key)
            raise
        with self._lock:
            self._of_chat[chat] = key
        return chat

    def chat_for(self, settings: Mapping[str, Any]) -> VisionChat:
        """:meth:`chat` for VisionChat arguments (see :func:`split_settings`)."""
        engine, chat = split_settings(settings)
        return self.chat(engine, **chat)

    def release(self, chat: VisionChat) -> None:
        """End ``chat`` (waiting for its turn); its engine closes if no other uses it."""
        chat.close()
        with self._lock:
            key = self._of_chat.pop(chat, None)
        if key is not None:
            self._let_go(key)

    def _let_go(self, key: Hashable) -> None:
        with self._lock:
            shared = self._by_key.get(key)
            if shared is None:
                return
            shared.users -= 1
            if shared.users > 0:
                return
            del self._by_key[key]
        shared.close()

    def open_engines(self) -> list[Backend]:
        """The engines open now, each once."""
        with self._lock:
            return [s.engine for s in self._by_key.values() if s.engine is not None]

    def close_all(self) -> None:
        """Close every engine (its users are stopping; their chats are closed first)."""
        with self._lock:
            shared, self._by_key, self._of_chat = list(self._by_key.values()), {}, {}
        for entry in shared:
            entry.close()


_SHARED = EnginePool()


def shared_pool() -> EnginePool:
    """This process's pool: ``serve`` and Ray workers open their engines in it, so a
    program that serves and also builds chats on the same plan loads the model once."""
    return _SHARED
