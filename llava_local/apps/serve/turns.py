"""The one shared engine, answering up to ``parallel`` turns at once.

Every request is answered by :meth:`VisionChat.answer` on one of the :class:`Engine`'s
chats, all on ONE engine, so its prefix match reuses what earlier requests left in the
KV cache (the llama.cpp engine gives each turn the slot that shares most of it, and
decodes the running turns together, a token each per step). Before a request queues,
its schema is checked and its picture URLs (if the server downloads any) are
downloaded in the event loop, so a slow picture host holds neither a queue place nor a
thread. A semaphore lets ``parallel`` turns at a time
hold the model (first come, first served); beyond ``Limits.queue`` waiting requests the
answer is 503 with ``Retry-After`` at once. A turn runs in a worker thread of its own
(:class:`~llava_local.AsyncReplyStream`) and its pieces are pulled one at a time, so a
client that goes away (noticed while it waits, while the turn reads, or while it
streams) cancels its turn, which stops even a picture's encoding, and the next request
gets the model.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from ... import structured
from ...aio import AsyncReplyStream
from ...chat import VisionChat
from ...errors import LlavaLocalError, TurnCancelledError
from ...fitting import OnOverflow
from ...protocols.ollama import same_model
from ...types import Message, Reply
from .downloads import Downloads
from .errors import ApiError, ClientGone, library_error
from .limits import Limits
from .pictures import Wanted, download_all, prepare_all, urls

if TYPE_CHECKING:
    from starlette.requests import Request


@dataclass
class Engine:
    """The shared engine's chats (one per turn it answers at once), its queue, and what
    it has done."""

    chat: VisionChat
    name: str
    limits: Limits
    #: Turns answered at once: the engine's own number (its slots), 1 for engines that
    #: answer one at a time.
    parallel: int = 1
    admitted: int = 0  # requests running or waiting for the model
    running: int = 0
    stopping: bool = False  # the server is shutting down: no new turns
    served: int = 0
    cancelled: int = 0
    started: float = field(default_factory=time.time)
    streams: set[AsyncReplyStream] = field(default_factory=set)
    downloads: Downloads = field(init=False)

    def __post_init__(self) -> None:
        self.downloads = Downloads(self.limits)
        self.slots = asyncio.Semaphore(self.parallel)
        chat = self.chat
        #: The chats not answering now; each turn borrows one (they share the engine).
        self.idle = [chat] + [
            VisionChat(
                chat.engine,
                close_engine=False,
                allow_text_only=chat.allow_text_only,
                max_image_side=chat.max_image_side,
                system=chat.system,
                **chat.options.model_dump(exclude_none=True),
            )
            for _ in range(self.parallel - 1)
        ]

    @property
    def busy(self) -> bool:
        return self.running > 0

    def admit(self) -> None:
        self.refuse_if_stopping()
        if self.admitted >= self.parallel + self.limits.queue:
            answers = "one answer is" if self.parallel == 1 else f"{self.parallel} answers are"
            raise ApiError(
                503,
                f"the server is busy: {answers} being written and {self.limits.queue} "
                "requests wait for the model; try again shortly",
                kind="server_error",
                code="server_busy",
                headers={"Retry-After": str(self.limits.retry_after_s)},
            )
        self.admitted += 1

    def refuse_if_stopping(self) -> None:
        if self.stopping:
            raise ApiError(
                503, "the server is shutting down", kind="server_error", code="shutting_down"
            )

    def stop(self) -> None:
        """No new turns, and the running ones stop now (safe from a signal handler)."""
        self.stopping = True
        for stream in list(self.streams):
            stream.cancel()

    def check_model(self, requested: str) -> None:
        """404 unless ``requested`` names the served model (as Ollama names match)."""
        if not same_model(requested, self.name):
            raise ApiError(
                404,
                f"model '{requested}' not found: this server serves '{self.name}' "
                "(GET /v1/models or /api/tags lists it)",
                code="model_not_found",
                param="model",
            )


class Turn:
    """One request's answer: admitted to the queue, then holding the model until closed.

    Pieces are pulled one at a time from the turn's worker thread; while this side waits
    (for the model or for a piece), a client that hangs up cancels the turn."""

    def __init__(self, engine: Engine, request: Request) -> None:
        self.engine = engine
        self.request = request
        self.stream: AsyncReplyStream | None = None
        self.chat: VisionChat | None = None  # borrowed from the engine while it holds a slot
        self.finished = False
        self.error: ApiError | None = None  # one that came after the status was sent
        self._locked = False
        self._admitted = False
        self._closed = False

    async def begin(
        self,
        wanted: list[Wanted],
        schema: dict[str, Any] | None,
        options: dict[str, Any],
        on_overflow: OnOverflow | None = None,
    ) -> str | None:
        """Take a place in the queue (or be refused, 503, at once), read the pictures,
        wait for the model, and read the answer's first piece before any status is sent:
        an error that comes before it (a prompt too long for the context) gets its own
        status. The turn is closed if any of it fails."""
        engine = self.engine
        try:
            engine.admit()  # before any picture is read
            self._admitted = True
            side = engine.chat.max_image_side
            messages = await asyncio.to_thread(prepare_all, wanted, engine.limits, side)
            await self._start(messages, schema, options, on_overflow)
            return await self.next()
        except BaseException:
            await self.close()
            raise

    async def _start(
        self,
        messages: list[Message],
        schema: dict[str, Any] | None,
        options: dict[str, Any],
        on_overflow: OnOverflow | None,
    ) -> None:
        """Wait for the model, then open the turn (its first piece is not read yet)."""
        engine = self.engine
        acquiring = asyncio.ensure_future(engine.slots.acquire())
        try:
            await self._watched(acquiring)
        finally:
            self._locked = acquiring.done() and not acquiring.cancelled()
            if self._locked:
                self.chat = engine.idle.pop()
                engine.running += 1
        engine.refuse_if_stopping()
        assert self.chat is not None
        try:
            stream = self.chat.answer(messages, schema=schema, on_overflow=on_overflow, **options)
        except LlavaLocalError as exc:
            raise library_error(exc) from exc
        self.stream = AsyncReplyStream(stream)
        engine.streams.add(self.stream)

    async def next(self, *, watch: bool = True) -> str | None:
        """The next piece, or None at the end (then :attr:`reply` is ready)."""
        assert self.stream is not None
        try:
            reading = asyncio.ensure_future(_anext(self.stream))
            piece = await (self._watched(reading) if watch else reading)
        except TurnCancelledError:
            raise ClientGone from None
        except LlavaLocalError as exc:
            raise library_error(exc) from exc
        if piece is None:
            self.finished = True
        return piece

    @property
    def reply(self) -> Reply:
        assert self.stream is not None
        return self.stream.reply

    async def _watched(self, task: asyncio.Future[Any]) -> Any:
        """``task``'s result, unless the client hangs up first: then it is cancelled
        (with the turn: AsyncReplyStream waits until the worker let go of the chat)."""

        def stop() -> None:
            if self.stream is not None:
                self.stream.cancel()  # a piece being read stops at once

        return await watched(self.request, task, stop)

    async def close(self) -> None:
        """Let go of the model, stopping the turn first if it is still running."""
        if self._closed:
            return
        self._closed = True
        engine = self.engine
        try:
            if self.stream is not None:
                engine.streams.discard(self.stream)
                await self.stream.aclose()
        finally:
            if self.finished:
                engine.served += 1
            elif self.stream is not None:
                engine.cancelled += 1
            if self._locked:
                assert self.chat is not None
                engine.idle.append(self.chat)
                self.chat = None
                engine.running -= 1
                engine.slots.release()
            if self._admitted:
                engine.admitted -= 1


#: A streamed answer's body, from the open turn and its first piece (None: no pieces).
Streamed = Callable[[Turn, "str | None"], AsyncIterator[str]]


async def respond(
    engine: Engine,
    request: Request,
    wanted: list[Wanted],
    schema: dict[str, Any] | None,
    options: dict[str, Any],
    *,
    whole: Callable[[Reply], dict[str, Any]],
    streamed: Streamed | None = None,
    media_type: str = "",
    headers: dict[str, str] | None = None,
    on_overflow: OnOverflow | None = None,
) -> Any:
    """Answer a chat request: ``streamed(turn, first)`` as the body of a streamed
    answer, or ``whole(reply)`` once the answer is complete. ``on_overflow`` is what a
    conversation too long for the context gets (the chat's own, ``"error"``: a 400)."""
    from starlette.responses import StreamingResponse

    if not wanted or wanted[-1].role != "user":
        raise ApiError(400, "the last message must be the user's", param="messages")
    if schema is not None:
        try:  # before any cost: a schema too costly is refused here, not after the queue
            structured.json_schema(schema)
        except LlavaLocalError as exc:
            raise library_error(exc, "response_format") from exc
    gone = "client gone while its pictures downloaded"
    try:
        if urls(wanted):
            engine.refuse_if_stopping()
            downloading = asyncio.ensure_future(download_all(wanted, engine.downloads))
            await watched(request, downloading)
        gone = "client gone"
        turn = Turn(engine, request)
        first = await turn.begin(wanted, schema, options, on_overflow)
        if streamed is not None:
            body = streamed(turn, first)
            return StreamingResponse(body, media_type=media_type, headers=headers)
        reply = await _rest(turn, first)
    except ClientGone:
        request.state.note = gone
        return _gone()
    note_tokens(request, reply)
    return whole(reply)


async def _rest(turn: Turn, first: str | None) -> Reply:
    """The whole answer (not streamed); the turn is closed after it."""
    try:
        while first is not None and await turn.next() is not None:
            pass
        return turn.reply
    finally:
        await turn.close()


@contextlib.asynccontextmanager
async def streaming(turn: Turn) -> AsyncIterator[None]:
    """A streamed answer's body: an error after the status was sent is kept in
    ``turn.error`` (sent as the protocol's last line), a client that goes away is
    noted, and the model is let go of in every case."""
    try:
        yield
    except ApiError as exc:
        turn.error = exc
        turn.request.state.note = f"error mid-stream: {exc.message[:120]}"
    except ClientGone:
        stopping = turn.engine.stopping
        turn.request.state.note = "stopped: shutting down" if stopping else "client gone mid-stream"
    except BaseException:  # the connection closed under us (Starlette cancels the body)
        turn.request.state.note = "client gone mid-stream"
        raise
    finally:
        await turn.close()


def note_tokens(request: Request, reply: Reply) -> None:
    """The answer's token counts, for the request's log line."""
    stats = reply.stats
    request.state.tokens = (
        f"prompt={stats.prompt_tokens} cached={stats.cached_tokens or 0} "
        f"completion={stats.completion_tokens}"
    )


def _gone() -> Any:
    """What is 'sent' to a client that has hung up (nobody reads it; the log does)."""
    from starlette.responses import Response

    return Response(status_code=499)


async def _anext(stream: AsyncReplyStream) -> str | None:
    try:
        return await stream.__anext__()
    except StopAsyncIteration:
        return None


async def watched(
    request: Request, task: asyncio.Future[Any], stop: Callable[[], None] | None = None
) -> Any:
    """``task``'s result, unless the client hangs up first: then ``stop()`` is called,
    the task cancelled and awaited, and :class:`ClientGone` raised."""
    watcher = asyncio.ensure_future(_disconnected(request))
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        gone = watcher.done() and not watcher.cancelled()
        watcher.cancel()
        if not task.done():
            if stop is not None:
                stop()
            task.cancel()
            with contextlib.suppress(BaseException):
                await task
    if gone:
        raise ClientGone
    return task.result()


async def _disconnected(request: Request) -> None:
    """Returns when the client has closed the connection (the body is read already)."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return
