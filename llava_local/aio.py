"""``AsyncVisionChat``: the same conversations for asyncio programs (web apps, bots).

Not a second implementation: every turn runs through :class:`VisionChat` in a
worker thread of its own, which prepares the turn's pictures (downloads included)
and hands each piece of the answer to the event loop as it is asked for. Engines
block (llama.cpp computes, the Ollama client reads a socket), so the loop stays
free while they work.

Cancelling a turn -- ``asyncio.wait_for`` timing out, ``task.cancel()``, leaving an
``async for`` early or closing the stream -- calls the stream's ``cancel()`` (which
stops even a picture's encoding in C), then waits until the worker thread has let
go of the chat: the turn is not kept, and the next one can start at once.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import os
import weakref
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from pathlib import Path
from types import TracebackType
from typing import Any

from . import structured
from .backends import Backend, EnginePlan
from .chat import Forced, VisionChat
from .control import TurnControl
from .errors import InvalidRequestError
from .fitting import OnOverflow
from .images import ImageSource
from .stream import ReplyStream
from .tools import ToolSpec
from .types import Message, Options, Reply

_DONE = object()


class AsyncVisionChat:
    """A :class:`VisionChat` with coroutine methods and ``async for`` streaming.

    Construction loads the model like the sync class; in a running event loop use
    ``await asyncio.to_thread(AsyncVisionChat.llama_cpp, ...)`` to keep the loop free.
    Settings (``system``, ``options``, ``on_status``, ...) are the sync chat's; an
    ``on_status`` callback is called from the turn's worker thread.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self.sync = (
            args[0] if args and isinstance(args[0], VisionChat) else VisionChat(*args, **kwargs)
        )
        self._streams: weakref.WeakSet[AsyncReplyStream] = weakref.WeakSet()

    @classmethod
    def ollama(cls, model: str = "llava", **kwargs: Any) -> AsyncVisionChat:
        """An async chat through the Ollama daemon; arguments as :meth:`VisionChat.ollama`."""
        return cls(VisionChat.ollama(model, **kwargs))

    @classmethod
    def openai(cls, base_url: str | None = None, **kwargs: Any) -> AsyncVisionChat:
        """An async chat through an OpenAI-compatible server; arguments as
        :meth:`VisionChat.openai`."""
        return cls(VisionChat.openai(base_url, **kwargs))

    @classmethod
    def llama_cpp(
        cls, model: str | os.PathLike[str] | None = None, **kwargs: Any
    ) -> AsyncVisionChat:
        """An async chat with llama.cpp in-process; arguments as :meth:`VisionChat.llama_cpp`."""
        return cls(VisionChat.llama_cpp(model, **kwargs))

    @classmethod
    def load(
        cls,
        path: str | os.PathLike[str],
        backend: str | None = None,
        model: str | None = None,
        **kwargs: Any,
    ) -> AsyncVisionChat:
        """A chat that continues a saved conversation; arguments as :meth:`VisionChat.load`
        (it loads the model: in a running event loop, call it through ``asyncio.to_thread``)."""
        return cls(VisionChat.load(path, backend, model, **kwargs))

    @classmethod
    def from_config(cls, data: Mapping[str, Any]) -> AsyncVisionChat:
        """A chat rebuilt from :attr:`config` data; as :meth:`VisionChat.from_config`
        (it loads the model: in a running event loop, call it through ``asyncio.to_thread``)."""
        return cls(VisionChat.from_config(data))

    @property
    def config(self) -> dict[str, Any]:
        """This chat as JSON data, as :attr:`VisionChat.config`."""
        return self.sync.config

    @property
    def plan(self) -> EnginePlan | None:
        """The engine as planned, as :attr:`VisionChat.plan`."""
        return self.sync.plan

    # -- what the sync chat has ------------------------------------------------------

    @property
    def backend(self) -> str:
        return self.sync.backend

    @property
    def model(self) -> str:
        return self.sync.model

    @property
    def engine(self) -> Backend:
        """The engine object itself, for engine-specific settings."""
        return self.sync.engine

    @property
    def history(self) -> list[Message]:
        """The finished turns, oldest first (a copy)."""
        return self.sync.history

    @property
    def has_pictures(self) -> bool:
        """True when a turn of the conversation so far brought a picture."""
        return self.sync.has_pictures

    @property
    def last_reply(self) -> Reply | None:
        """The reply of the last finished turn, if any."""
        return self.sync.last_reply

    @property
    def system(self) -> str | None:
        """The system prompt."""
        return self.sync.system

    @system.setter
    def system(self, value: str | None) -> None:
        self.sync.system = value

    @property
    def options(self) -> Options:
        """The chat's default generation options."""
        return self.sync.options

    @options.setter
    def options(self, value: Options) -> None:
        self.sync.options = value

    @property
    def on_status(self) -> Callable[[str], None] | None:
        """Called with what a turn is doing before its answer starts (from the turn's
        worker thread: use ``loop.call_soon_threadsafe`` to reach the loop)."""
        return self.sync.on_status

    @on_status.setter
    def on_status(self, value: Callable[[str], None] | None) -> None:
        self.sync.on_status = value

    @property
    def allow_text_only(self) -> bool:
        """Whether questions with no picture in the conversation are fine (no warning)."""
        return self.sync.allow_text_only

    @allow_text_only.setter
    def allow_text_only(self, value: bool) -> None:
        self.sync.allow_text_only = value

    @property
    def on_overflow(self) -> OnOverflow:
        """What a turn that would not fit the context does; see :class:`VisionChat`."""
        return self.sync.on_overflow

    @on_overflow.setter
    def on_overflow(self, value: OnOverflow) -> None:
        self.sync.on_overflow = value

    @property
    def max_image_side(self) -> int:
        """The longest picture side, in pixels, pictures are shrunk to."""
        return self.sync.max_image_side

    @max_image_side.setter
    def max_image_side(self, value: int) -> None:
        self.sync.max_image_side = value

    def reset(self) -> None:
        """Start a new conversation. Never blocks the loop: while a turn is running,
        raises :class:`InvalidRequestError` (await it, or close its stream, first)."""
        self.sync._clear(wait=False)

    def attach(
        self, image: ImageSource | None = None, *, images: Sequence[ImageSource] | None = None
    ) -> asyncio.Future[None]:
        """Like :meth:`VisionChat.attach`: returns at once; await the future to wait for
        the head start (the next question waits for it anyway)."""
        return asyncio.wrap_future(self.sync.attach(image, images=images))

    async def save(self, path: str | os.PathLike[str]) -> Path:
        """Like :meth:`VisionChat.save` (the finished turns), written in a worker thread."""
        return await asyncio.to_thread(self.sync.save, path)

    async def restore(self, path: str | os.PathLike[str]) -> None:
        """Like :meth:`VisionChat.restore`, waiting in a worker thread for a running turn."""
        self._refuse_in_reading_task("restore a conversation")
        await asyncio.to_thread(self.sync.restore, path)

    # -- turns -------------------------------------------------------------------------

    def stream(
        self,
        prompt: str,
        image: ImageSource | None = None,
        *,
        images: Sequence[ImageSource] | None = None,
        schema: structured.Schema | None = None,
        tool: ToolSpec | None = None,
        tools: Sequence[ToolSpec] | None = None,
        **options: Any,
    ) -> AsyncReplyStream:
        """Like :meth:`VisionChat.stream`; iterate it with ``async for``.

        The prompt and options are checked now; the pictures are prepared in the
        stream's worker thread when it is first read, so a download never blocks the
        loop (a bad picture raises there)."""
        forced = self.sync._tool(tool, tools)
        return self._stream(prompt, image, images, schema, options, stacklevel=3, tool=forced)

    def _stream(
        self,
        prompt: str,
        image: ImageSource | None,
        images: Sequence[ImageSource] | None,
        schema: structured.Schema | None,
        options: dict[str, Any],
        *,
        stacklevel: int,
        tool: Forced | None = None,
    ) -> AsyncReplyStream:
        self._refuse_in_reading_task("start another turn")
        request = self.sync._request(
            prompt,
            image=image,
            images=images,
            schema=schema,
            options=options,
            stacklevel=stacklevel + 1,
            tool=tool,
        )
        stream = AsyncReplyStream(partial(self.sync._open, request), control=request.control)
        self._streams.add(stream)
        return stream

    def answer(
        self,
        messages: Sequence[Message],
        *,
        schema: structured.Schema | None = None,
        **options: Any,
    ) -> AsyncReplyStream:
        """Like :meth:`VisionChat.answer` (a whole conversation given at once, not kept);
        its pictures are prepared in the stream's worker thread, off the event loop."""
        self._refuse_in_reading_task("start another turn")
        control = TurnControl(self.sync.on_status)
        start = partial(self.sync.answer, messages, schema=schema, control=control, **options)
        stream = AsyncReplyStream(start, control=control)
        self._streams.add(stream)
        return stream

    async def ask(
        self,
        prompt: str,
        image: ImageSource | None = None,
        *,
        images: Sequence[ImageSource] | None = None,
        schema: structured.Schema | None = None,
        tool: ToolSpec | None = None,
        tools: Sequence[ToolSpec] | None = None,
        **options: Any,
    ) -> Reply:
        """Like :meth:`VisionChat.ask`, awaiting the whole answer."""
        forced = self.sync._tool(tool, tools)
        async with self._stream(
            prompt, image, images, schema, options, stacklevel=3, tool=forced
        ) as s:
            async for _ in s:
                pass
        return s.reply

    def _refuse_in_reading_task(self, action: str) -> None:
        """The asyncio twin of the sync chat's rule: a task reading a turn of this chat
        cannot start another one (it would wait for itself forever)."""
        try:
            task = asyncio.current_task()
        except RuntimeError:  # no running loop
            return
        if task is not None and any(s._read_by(task) for s in list(self._streams)):
            raise InvalidRequestError(
                f"cannot {action}: this task is still reading a turn of this chat; "
                "finish that stream (read it to the end) or close it first, e.g. "
                "with `async with chat.stream(...) as stream:`"
            )

    # -- lifetime ----------------------------------------------------------------------

    async def aclose(self) -> None:
        """Free the engine, in a worker thread (llama.cpp may take a moment). Turns
        still running, or left unfinished, are cancelled first (they are not kept)."""
        for stream in list(self._streams):
            if stream._started:
                await stream.aclose()
        await asyncio.to_thread(self.sync.close)

    async def __aenter__(self) -> AsyncVisionChat:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    def __repr__(self) -> str:
        return f"Async{self.sync!r}"


class AsyncReplyStream(AsyncIterator[str]):
    """Pieces of an answer, each fetched on demand in the stream's own worker thread.

    Nothing runs ahead of the consumer, exactly as with the sync stream: leaving the
    ``async for`` early means the engine stops there and the turn is not kept. One
    thread per stream, which prepares the pictures and reads every piece of the turn.
    """

    def __init__(
        self,
        stream: ReplyStream | Callable[[], ReplyStream],
        *,
        control: TurnControl | None = None,
    ) -> None:
        if isinstance(stream, ReplyStream):
            self._stream: ReplyStream | None = stream
            self._start: Callable[[], ReplyStream] | None = None
            control = stream.control
        else:
            self._stream, self._start = None, stream
        #: The turn's stop flag and status (see :mod:`llava_local.control`).
        self.control = control or TurnControl()
        self._thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="llava-local-turn")
        self._finished = False
        self._reader: asyncio.Task[Any] | None = None  # the task reading it

    @property
    def reply(self) -> Reply:
        """The finished reply; only after the iteration has ended."""
        if self._stream is None:
            raise InvalidRequestError("the reply is ready only after the stream has been read")
        return self._stream.reply

    @property
    def status(self) -> str:
        """What the turn is doing now: "", "preparing pictures", "encoding picture", ..."""
        return self.control.status

    def cancel(self) -> None:
        """Ask the turn to stop, from any thread or task; the reader gets
        :class:`TurnCancelledError` and the turn is not kept."""
        self.control.cancel()

    def __aiter__(self) -> AsyncReplyStream:
        return self

    async def __anext__(self) -> str:
        if self._finished:
            raise StopAsyncIteration
        self._reader = asyncio.current_task()
        work = self._thread.submit(self._next_piece)
        try:
            piece = await asyncio.wrap_future(work)
        except asyncio.CancelledError:
            with contextlib.suppress(Exception):  # the cancellation is what the caller sees
                await self._stop()  # the turn ends before the cancellation goes on
            raise
        except BaseException:
            self._shut()  # the turn ended itself in the worker, not kept
            raise
        if piece is _DONE:
            self._shut()
            raise StopAsyncIteration
        assert isinstance(piece, str)
        return piece

    def _next_piece(self) -> object:
        """In the worker thread: the turn's pictures first, then each piece."""
        if self._stream is None:
            assert self._start is not None
            self._stream = self._start()
        return next(self._stream, _DONE)

    def _close_in_worker(self) -> None:
        if self._stream is not None:
            self._stream.close()

    @property
    def _started(self) -> bool:
        return self._reader is not None

    def _read_by(self, task: asyncio.Task[Any]) -> bool:
        return not self._finished and self._reader is task

    def _shut(self) -> None:
        self._finished = True
        self._thread.shutdown(wait=False)

    async def _stop(self) -> None:
        """Cancel the turn and wait until its worker thread has let go of the chat."""
        if self._finished:
            return
        self._finished = True
        self.control.cancel()  # a piece being read stops within a moment
        closing = self._thread.submit(self._close_in_worker)  # runs after that piece
        self._thread.shutdown(wait=False)
        await _settle(closing)

    async def aclose(self) -> None:
        """Stop the answer (waiting for the engine to stop); the turn is not kept."""
        await self._stop()

    async def __aenter__(self) -> AsyncReplyStream:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()


async def _settle(work: concurrent.futures.Future[None]) -> None:
    """Wait for ``work`` in a stream's thread to end, also through further cancellation:
    only then is the chat free. A cancellation that arrived meanwhile is raised after."""
    waiter = asyncio.wrap_future(work)
    cancelled = False
    while not waiter.done():
        try:
            await asyncio.wait([waiter])
        except asyncio.CancelledError:
            cancelled = True
    if cancelled:
        raise asyncio.CancelledError
    waiter.result()
