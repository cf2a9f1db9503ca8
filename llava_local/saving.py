"""A chat described and kept: :attr:`VisionChat.config` and :meth:`~VisionChat.from_config`
(the chat as JSON data, its engine as its plan settled it), and
:meth:`~VisionChat.save`, :meth:`~VisionChat.load` and :meth:`~VisionChat.restore`
(the conversation in a file, :mod:`llava_local.persist`, with the engine's KV state
beside it for engines that keep one).

Both describe the engine from one place, the chat's plan
(:class:`~llava_local.backends.EnginePlan`): the config holds all of its settings, a
saved file the part a load may take from it (:func:`llava_local.persist.recorded`).
"""

from __future__ import annotations

import contextlib
import os
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from . import images as _images
from . import persist
from .backends import registry
from .errors import InvalidRequestError
from .types import Message

if TYPE_CHECKING:
    from .chat import VisionChat

__all__ = ["arguments", "describe", "load", "restore", "save"]

#: The keys of a chat config besides ``backend`` (which it needs).
_KNOWN = frozenset(
    {"backend", "engine", "options", "system", "max_image_side", "on_overflow", "allow_text_only"}
)


def describe(chat: VisionChat) -> dict[str, Any]:
    """``chat.config``: its engine with that engine's settled settings (catalogue models
    and the demo by name), the default options and the chat's own settings."""
    plan = chat.plan
    if plan is None:
        raise InvalidRequestError(
            f"the {chat.backend} engine was built by hand and has no config to describe "
            "it; open it by name (VisionChat(backend, model, ...)) to get one"
        )
    return {
        **plan.describe(),
        "options": chat.options.model_dump(mode="json", exclude_none=True),
        "system": chat.system,
        "max_image_side": chat.max_image_side,
        "on_overflow": chat.on_overflow,
        "allow_text_only": chat.allow_text_only,
    }


def arguments(data: Mapping[str, Any]) -> dict[str, Any]:
    """The :class:`VisionChat` arguments a chat config (``chat.config``) stands for."""
    unknown = sorted(set(data) - _KNOWN)
    if unknown or not isinstance(data.get("backend"), str):
        raise InvalidRequestError(
            "not a chat config: it needs 'backend' and may have "
            + ", ".join(sorted(_KNOWN))
            + (f" (unknown: {', '.join(unknown)})" if unknown else "")
        )
    engine = dict(data.get("engine") or {})
    return {
        "backend": data["backend"],
        "model": engine.pop("model", None),
        "system": data.get("system"),
        "max_image_side": data.get("max_image_side"),
        "on_overflow": data.get("on_overflow", "error"),
        "allow_text_only": bool(data.get("allow_text_only", False)),
        **engine,
        **dict(data.get("options") or {}),
    }


def save(chat: VisionChat, path: str | os.PathLike[str]) -> Path:
    """:meth:`VisionChat.save`: the finished turns (a turn being read is not in them yet),
    then the engine's KV state beside them."""
    with chat._state:
        plan = chat.plan
        engine = {} if plan is None else persist.recorded(plan.config, chat.model)
        history, system = chat.history, chat.system
        target = persist.save(
            Path(path),
            history=history,
            system=system,
            options=chat.options,
            backend=chat.backend if plan is None else plan.engine,
            engine=engine or {"model": chat.model},
        )
    _save_engine_state(chat, target, history, system)
    return target


def _save_engine_state(
    chat: VisionChat, target: Path, history: list[Message], system: str | None
) -> None:
    """The engine's KV state of the conversation, beside the JSON (engines that keep
    one); an old state file there is removed when there is nothing to write."""
    kv_path = persist.state_path(target)
    if not chat.engine.keeps_state:
        with contextlib.suppress(OSError):
            kv_path.unlink()
        return
    messages = [*([Message(role="system", content=system)] if system else []), *history]
    try:
        chat.engine.save_state(messages, kv_path)
    except OSError as exc:
        warnings.warn(
            persist.ColdResumeWarning(
                f"the conversation was saved to {target}, but not its KV state "
                f"({kv_path}: {exc.strerror or exc}); loading it will read the "
                "conversation again"
            ),
            stacklevel=4,
        )


def load_engine_state(chat: VisionChat, path: Path, saved_backend: str, turns: int) -> None:
    """Restore the KV state saved beside the conversation at ``path``, if the engine
    keeps one and it was made with this model, projector and settings, by this user;
    else say that the next turn reads the conversation again."""
    kv_path = persist.state_path(path)
    if not chat.engine.keeps_state:
        return  # an engine that keeps nothing (Ollama, a server): nothing to miss
    if not kv_path.is_file():
        if turns and _engine_name(saved_backend) == chat.backend:  # save wrote one
            warnings.warn(
                persist.ColdResumeWarning(
                    f"there is no KV state beside {path} ({kv_path.name} is missing: "
                    "copied without it, or saved when the engine held none); the "
                    "first follow-up reads the conversation's pictures and turns "
                    "again, which on a CPU takes as long as their first reading"
                ),
                stacklevel=4,
            )
        return
    if not chat.engine.load_state(kv_path):
        warnings.warn(
            persist.ColdResumeWarning(
                f"the KV state saved with {path} ({kv_path.name}) was made with another "
                "model, projector or engine settings, is damaged, or was not written "
                "with this user's key (a copy from another user or machine); the "
                "conversation is read again on the next turn"
            ),
            stacklevel=4,
        )


def restore(chat: VisionChat, path: str | os.PathLike[str]) -> None:
    """:meth:`VisionChat.restore`: the file read and checked whole first."""
    saved = persist.load(Path(path))
    with chat._exclusive("restore a conversation"):
        with chat._state:
            chat._history = fitted(saved.history(), chat.max_image_side)
            chat.system = saved.system
            chat.last_reply = None
            chat._attached = []  # attached to the conversation it replaces
        load_engine_state(chat, Path(path).expanduser(), saved.backend, len(saved.messages))


def load(
    cls: type[VisionChat],
    path: str | os.PathLike[str],
    backend: str | None,
    model: str | None,
    *,
    use_saved_address: bool,
    kwargs: dict[str, Any],
) -> VisionChat:
    """:meth:`VisionChat.load`: the file read and checked before any model is loaded;
    of its engine settings only :func:`persist.engine_settings`'s are used."""
    source = Path(path).expanduser()
    saved = persist.load(source)
    options = {**saved.options.model_dump(exclude_none=True), **kwargs}
    options.setdefault("system", saved.system)
    if backend is None or _engine_name(backend) == _engine_name(saved.backend):
        given = {k: v for k, v in {**kwargs, "model": model}.items() if v is not None}
        settings = persist.engine_settings(
            saved, source, given, use_saved_address=use_saved_address
        )
        model = settings.pop("model", model)
        options.update(settings)
    chat = cls(backend or saved.backend, model or saved.model, **options)
    chat._history = fitted(saved.history(), chat.max_image_side)
    try:
        load_engine_state(chat, source, saved.backend, len(saved.messages))
    except BaseException:
        chat.close()
        raise
    return chat


def _engine_name(name: str) -> str | None:
    """The registered engine a name or alias means (None: no such engine)."""
    try:
        return registry.get(name).name
    except InvalidRequestError:
        return None


def fitted(history: list[Message], max_side: int) -> list[Message]:
    """A loaded conversation's pictures as this chat would have prepared them: one larger
    than its engine takes is shrunk, as any picture is, before an engine decodes it at
    full size. A conversation saved by a chat like this one comes back unchanged."""
    result = []
    for message in history:
        if any(max(image.width, image.height) > max_side for image in message.images):
            images = tuple(_images.prepare(image, max_side=max_side) for image in message.images)
            result.append(message.model_copy(update={"images": images}))
        else:
            result.append(message)
    return result
