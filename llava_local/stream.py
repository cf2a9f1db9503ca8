"""``ReplyStream``: one turn's answer as it is written, and the turn itself.

The stream owns its turn: from its first piece to its end it holds the chat, drives the
engine and builds the :class:`~llava_local.types.Reply`; the chat
(:mod:`llava_local.chat`) lends itself for the turn and keeps the finished turn.
"""

from __future__ import annotations

import contextlib
import dataclasses
import threading
from collections.abc import Generator, Iterator
from types import TracebackType
from typing import TYPE_CHECKING, Any, Literal

from . import structured
from .backends import Finish
from .control import STATUS_ANSWERING, TurnControl
from .errors import BackendError, InvalidRequestError, LlavaLocalError, SchemaError
from .tools import call_id
from .types import Message, Options, PreparedImage, Reply, Tool, ToolCall

if TYPE_CHECKING:
    from .chat import VisionChat
    from .fitting import OnOverflow

__all__ = ["ReplyStream"]


class ReplyStream(Iterator[str]):
    """The answer as it is written: iterate for text pieces, then read :attr:`reply`.

    The stream owns its turn: from its first piece to its end it holds the chat, drives
    the engine and builds the reply; the chat only keeps the finished turn. Use it as a
    context manager (or iterate to the end) so that an abandoned stream stops the
    engine; a stream closed early does not enter the history.
    """

    def __init__(
        self,
        chat: VisionChat,
        message: Message,
        options: Options,
        schema: structured.Schema | None,
        json_schema: dict[str, Any] | None,
        *,
        control: TurnControl | None = None,
        earlier: tuple[Message, ...] | None = None,
        tool: Tool | None = None,
        on_overflow: OnOverflow | None = None,
    ) -> None:
        self.message = message
        #: The tool the turn must call: the answer is its arguments.
        self.tool = tool
        self._on_overflow = on_overflow
        # A conversation given whole (VisionChat.answer): used instead of the history,
        # and the turn is not kept.
        self._earlier = earlier
        #: The turn's stop flag and status (see :mod:`llava_local.control`).
        self.control = control or TurnControl(chat.on_status)
        self._chat = chat
        self._options = options
        self._schema = schema
        self._json_schema = json_schema
        self._stage: Literal["new", "running", "over"] = "new"
        self._engine: Generator[str | Finish, None, None] | None = None
        self._dropped = 0
        self._pieces: list[str] = []
        self._finish: Finish | None = None
        self._reply: Reply | None = None
        self._busy = threading.Lock()  # held by the thread reading the next piece
        self._reader: threading.Thread | None = None

    @property
    def images(self) -> tuple[PreparedImage, ...]:
        """The pictures of this turn, as prepared and sent."""
        return self.message.images

    @property
    def reply(self) -> Reply:
        """The finished reply; only after the iteration has ended."""
        if self._reply is None:
            raise InvalidRequestError("the reply is ready only after the stream has been read")
        return self._reply

    def __iter__(self) -> ReplyStream:
        return self

    def __next__(self) -> str:
        with self._busy:
            self._reader = threading.current_thread()
            try:
                return self._next_piece()
            finally:
                self._reader = None

    def _next_piece(self) -> str:
        if self._stage == "new":
            self._begin()
        if self._stage != "running":
            raise StopIteration
        assert self._engine is not None
        try:
            for item in self._engine:
                self.control.check()  # cancel() lands here too, with engines that never poll
                if isinstance(item, Finish):
                    self._finish = item
                elif item:
                    # Said here, for every engine: the ones that report no phases too.
                    self.control.report(STATUS_ANSWERING)
                    self._pieces.append(item)
                    return item
            self._keep()
        except BaseException as exc:  # Ctrl-C, cancel, errors: the turn is not kept
            self._end()
            if isinstance(exc, Exception) and not isinstance(exc, LlavaLocalError):
                # an engine bug must still surface as our error
                raise BackendError(f"the {self._chat.backend} engine failed: {exc!r}") from exc
            raise
        raise StopIteration

    def _begin(self) -> None:
        chat = self._chat
        chat._begin_turn(self)
        self._stage = "running"
        try:
            self.control.check()  # cancelled before it started
            turn, self._dropped = chat._fit(
                self.message,
                self._options,
                self._json_schema,
                self.control,
                self._earlier,
                on_overflow=self._on_overflow,
            )
            if self.tool is not None:
                turn = dataclasses.replace(turn, tool=self.tool)
            self._engine = chat._backend.generate(turn)
        except BaseException:
            self._end()
            raise

    def _keep(self) -> None:
        """The engine has finished: build the reply, have the chat keep the turn."""
        chat = self._chat
        if self._finish is None:
            raise BackendError(f"the {chat.backend} engine ended the answer without finishing")
        stats = self._finish.stats
        stats.dropped_turns = self._dropped
        text = "".join(self._pieces)
        parsed = self._parsed(text, self._finish.done_reason)
        calls: tuple[ToolCall, ...] = ()
        if self.tool is not None and parsed is not None:
            calls = (
                ToolCall(id=call_id(), name=self.tool.name, arguments=parsed, arguments_json=text),
            )
        reply = Reply(
            text=text,
            model=chat.model,
            backend=chat.backend,
            done_reason=self._finish.done_reason,
            stats=stats,
            parsed=parsed,
            tool_calls=calls,
            logprobs=self._finish.logprobs,
        )
        if self._earlier is None:
            chat._keep_turn(self.message, reply)
        self._reply = reply
        self._end()

    def _parsed(self, text: str, done_reason: str | None) -> Any:
        """The answer checked against the schema. An answer cut by ``max_tokens``
        (``done_reason == "length"``) is not a schema violation: when its JSON is
        unfinished, ``parsed`` is None and the reply keeps the text as written, as
        OpenAI's API answers ``finish_reason: "length"``."""
        if self._schema is None:
            return None
        try:
            return structured.parse(text, self._schema)
        except SchemaError:
            if done_reason == "length":
                return None
            raise

    def _end(self) -> None:
        """Stop the engine and let go of the chat; the turn is over (once)."""
        if self._stage != "running":
            self._stage = "over"
            return
        self._stage = "over"
        engine, self._engine = self._engine, None
        try:
            if engine is not None:
                engine.close()
        finally:
            self._chat._end_turn()

    @property
    def status(self) -> str:
        """What the turn is doing now: "", "preparing pictures", "encoding picture", ..."""
        return self.control.status

    def cancel(self) -> None:
        """Stop the turn from any thread, even in the middle of a picture's encoding:
        the thread reading the stream gets :class:`TurnCancelledError` within a moment,
        and the turn is not kept. Ctrl-C in the reading thread does the same with
        ``KeyboardInterrupt``."""
        self.control.cancel()

    def close(self) -> None:
        """Stop the answer now; the turn is not kept. From a thread other than the one
        reading it, this cancels the turn and waits until that thread lets go of it."""
        if self._reader is threading.current_thread():  # from inside the turn (on_status)
            self.control.cancel()
            return
        if self._reader is not None:
            self.control.cancel()
        with self._busy:
            self._end()

    def __del__(self) -> None:
        # A stream dropped unfinished (a `break` out of its for loop) lets go of the chat.
        if getattr(self, "_stage", "over") == "running":
            with contextlib.suppress(Exception):
                self._end()

    def __enter__(self) -> ReplyStream:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()
