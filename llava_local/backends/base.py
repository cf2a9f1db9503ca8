"""The seam between the conversation core and an engine.

A backend turns a prepared conversation into text and nothing more: the core
(:mod:`llava_local.chat`) validates input, prepares pictures, keeps the history
and builds the :class:`~llava_local.types.Reply`. A new engine implements
:meth:`Backend.generate` and, if it holds resources, :meth:`Backend.close`.

What only some engines can do (check their server first, describe their model's files,
keep and restore KV states, read a conversation ahead of its question) are methods
here with default implementations that say "nothing to do" (and, for states, the
class flag :attr:`Backend.keeps_state`), not ``typing.Protocol`` classes probed with
``isinstance``: the core calls them the same way for every engine, an engine opts in
by overriding, and mypy checks each override's signature against the seam (a
``runtime_checkable`` Protocol only checks that a name exists, and only where it is
probed).
"""

from __future__ import annotations

import os
import threading
from abc import ABC, abstractmethod
from collections.abc import Generator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from ..control import TurnControl
from ..types import DoneReason, Message, Options, Stats, TokenLogprob, Tool

if TYPE_CHECKING:
    from .spec import EngineConfig


@dataclass(frozen=True)
class Turn:
    """What the core asks of an engine: the whole conversation, ending with the new
    user message, plus options, an optional JSON schema the answer must fit (and the
    forced tool it comes from, if any), and the turn's control (its stop flag, polled
    by engines whose work is in C, and the status they report)."""

    messages: Sequence[Message]
    options: Options
    json_schema: dict[str, Any] | None = None
    control: TurnControl = field(default_factory=TurnControl, compare=False)
    #: A function the answer must call (its ``json_schema`` is the function's
    #: parameters): engines whose server takes tools send it as the one tool, forced;
    #: the others write the arguments to ``json_schema`` as for any schema.
    tool: Tool | None = None


@dataclass(frozen=True)
class Finish:
    """The last item of :meth:`Backend.generate`: why it stopped and what it cost, and,
    when the turn's ``options.logprobs`` asked and the engine can tell, every answer
    token's log-probability (they come with the finish, not with each text piece: a
    piece may hold part of a token, or several, once stop strings are held back)."""

    done_reason: DoneReason
    stats: Stats
    logprobs: tuple[TokenLogprob, ...] | None = None


@dataclass(frozen=True)
class ModelDescription:
    """What an engine says about its model (:meth:`Backend.describe`), for listings and
    for ``serve``'s clients: its files (the language model first), the context window
    of one conversation, the conversations it answers at once, their KV cache, and the
    memory it keeps earlier KV states in."""

    files: tuple[Path, ...] = ()
    n_ctx: int | None = None
    parallel: int = 1
    kv_bytes: int | None = None
    kept_bytes: int | None = None


class Backend(ABC):
    """One engine. ``generate`` yields text pieces, then exactly one :class:`Finish`."""

    name: ClassVar[str]
    #: The longest picture side the core prepares for this engine, unless told otherwise.
    default_max_image_side: ClassVar[int] = 1344

    model: str
    #: The engine's settings as a JSON-serialisable config (see :mod:`.registry`), from
    #: which the same engine can be opened again (catalogue models and the demo by name,
    #: as install and cache paths differ between machines); None for engines built by hand.
    config: EngineConfig | None = None
    #: Whether :meth:`save_state` and :meth:`load_state` keep the engine's KV state of a
    #: conversation (so a saved conversation resumes without reading it again).
    keeps_state: ClassVar[bool] = False

    @property
    def max_image_side(self) -> int:
        """The longest side, in pixels, pictures are shrunk to before they are sent."""
        return self.default_max_image_side

    @abstractmethod
    def generate(self, turn: Turn) -> Generator[str | Finish, None, None]:
        """Answer the last message of ``turn``.

        Raise only :class:`~llava_local.errors.LlavaLocalError` subclasses. If the
        caller stops iterating early (``close()`` on the generator), stop work and
        leave the engine ready for the next turn.
        """

    def context_needed(self, turn: Turn) -> tuple[int, int] | None:
        """``(tokens the turn needs, tokens the context holds)``, or None if unknown.

        The core uses it to drop old turns before a turn that would not fit.
        """
        return None

    def close(self) -> None:  # noqa: B027 - engines without resources need nothing here
        """Free the model or the connection. Called once, by :meth:`VisionChat.close`."""

    # -- what only some engines do: defaults that do nothing ------------------------

    def check(self) -> None:  # noqa: B027 - an engine with nothing to check
        """Pre-flight before the first turn (a server answers, has the model, the model
        sees pictures); raises the library error that says what to do. Engines that
        load their model as they open have checked it then."""

    def describe(self) -> ModelDescription:
        """What this engine says about its model: nothing, unless it overrides this."""
        return ModelDescription()

    def prefetch(self, messages: Sequence[Message]) -> threading.Thread | None:
        """Start reading ``messages`` (a conversation ending with a user message whose
        question is not asked yet) so that the question, once asked, reads only the
        rest. Returns the thread doing it, or None for an engine that cannot."""
        return None

    def save_state(self, messages: Sequence[Message], path: str | os.PathLike[str]) -> int:
        """Write the KV state holding most of ``messages`` to ``path``; the positions it
        holds (0: none, nothing written). Engines that keep no state write nothing."""
        return 0

    def load_state(self, path: str | os.PathLike[str]) -> int:
        """Restore a state :meth:`save_state` wrote; the positions restored (0: none)."""
        return 0
