"""``AsyncVisionChat``: the same conversations for asyncio programs (web apps, bots).

Not a second implementation: every turn runs through :class:`VisionChat` in a
worker thread, which hands each piece of the answer to the event loop as it is
asked for. Engines block (llama.cpp computes, the Ollama client reads a socket), so
the loop stays free while they work. Leaving an ``async for`` early, or
cancelling the task, stops the engine and the turn is not kept, as in the sync API.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from types import TracebackType
from typing import Any

from . import structured
from .chat import ReplyStream, VisionChat
from .images import ImageSource
from .types import Message, Reply

_DONE = object()


class AsyncVisionChat:
    """A :class:`VisionChat` with coroutine methods and ``async for`` streaming.

    Construction loads the model like the sync class; in a running event loop use
    ``await asyncio.to_thread(AsyncVisionChat.llama_cpp, ...)`` to keep the loop free.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self.sync = (
            args[0] if args and isinstance(args[0], VisionChat) else VisionChat(*args, **kwargs)
        )

    @classmethod
    def ollama(cls, model: str = "llava", **kwargs: Any) -> AsyncVisionChat:
        """An async chat through the Ollama daemon; arguments as :meth:`VisionChat.ollama`."""
        return cls(VisionChat.ollama(model, **kwargs))

    @classmethod
    def llama_cpp(
        cls, model: str | os.PathLike[str] | None = None, **kwargs: Any
    ) -> AsyncVisionChat:
        """An async chat with llama.cpp in-process; arguments as :meth:`VisionChat.llama_cpp`."""
        return cls(VisionChat.llama_cpp(model, **kwargs))

    @property
    def backend(self) -> str:
        return self.sync.backend

    @property
    def model(self) -> str:
        return self.sync.model

    @property
    def history(self) -> list[Message]:
        return self.sync.history

    def reset(self) -> None:
        """Start a new conversation (instant: nothing to wait for)."""
        self.sync.reset()

    def stream(
        self,
        prompt: str,
        image: ImageSource | None = None,
        *,
        images: Sequence[ImageSource] | None = None,
        schema: structured.Schema | None = None,
        **options: Any,
    ) -> AsyncReplyStream:
        """Like :meth:`VisionChat.stream`; iterate it with ``async for``."""
        return AsyncReplyStream(
            self.sync.stream(prompt, image, images=images, schema=schema, **options)
        )

    async def ask(
        self,
        prompt: str,
        image: ImageSource | None = None,
        *,
        images: Sequence[ImageSource] | None = None,
        schema: structured.Schema | None = None,
        **options: Any,
    ) -> Reply:
        """Like :meth:`VisionChat.ask`, awaiting the whole answer."""
        async with self.stream(prompt, image, images=images, schema=schema, **options) as s:
            async for _ in s:
                pass
        return s.reply

    async def aclose(self) -> None:
        """Free the engine, in a worker thread (llama.cpp may take a moment)."""
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


class AsyncReplyStream(AsyncIterator[str]):
    """Pieces of an answer, each fetched on demand in the stream's own worker thread.

    Nothing runs ahead of the consumer, exactly as with the sync stream: leaving the
    ``async for`` early means the engine stops there and the turn is not kept. One
    thread per stream, because the conversation's lock belongs to the thread that
    started the turn.
    """

    def __init__(self, stream: ReplyStream) -> None:
        self._stream = stream
        self._thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="llava-local-turn")
        self._finished = False

    @property
    def reply(self) -> Reply:
        """The finished reply; only after the iteration has ended."""
        return self._stream.reply

    def __aiter__(self) -> AsyncReplyStream:
        return self

    async def __anext__(self) -> str:
        if self._finished:
            raise StopAsyncIteration
        loop = asyncio.get_running_loop()
        try:
            piece = await loop.run_in_executor(self._thread, next, self._stream, _DONE)
        except BaseException:
            self._finish()
            raise
        if piece is _DONE:
            self._finish()
            raise StopAsyncIteration
        assert isinstance(piece, str)
        return piece

    def _finish(self) -> None:
        self._finished = True
        self._thread.shutdown(wait=False)

    async def aclose(self) -> None:
        """Stop the answer (waiting for the engine to stop); the turn is not kept."""
        if not self._finished:
            loop = asyncio.get_running_loop()
            await asyncio.shield(loop.run_in_executor(self._thread, self._stream.close))
            self._finish()

    async def __aenter__(self) -> AsyncReplyStream:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()
