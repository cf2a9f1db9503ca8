"""The seam between the conversation core and an engine.

A backend turns a prepared conversation into text and nothing more: the core
(:mod:`llava_local.chat`) validates input, prepares pictures, keeps the history
and builds the :class:`~llava_local.types.Reply`. A new engine implements
:meth:`Backend.generate` and, if it holds resources, :meth:`Backend.close`.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Generator, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

from ..control import TurnControl
from ..types import DoneReason, Message, Options, Stats, TokenLogprob, Tool

if TYPE_CHECKING:
    from .registry import EngineConfig


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
