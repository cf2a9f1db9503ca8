"""Several turns at once on one engine: a chat per thread, each asking about the picture
and prompt it is handed (:class:`Pool`).

With the llama.cpp engine the chats' turns hold a slot each and are decoded together,
a token each per step; turns about one picture asked at once read it once (one CLIP, one
read, the others copy its positions). An Ollama or OpenAI-compatible server gets that
many requests at once. The caller hands work in only while a thread is free, takes the
answers out in the order they finish and alone writes them; leaving the ``with`` block
(Ctrl-C, a stop, the end) cancels the turns still running, waits for the threads and
drops their answers, so the next run asks about those pictures again.
"""

from __future__ import annotations

import contextlib
import queue
import threading
from collections import Counter
from collections.abc import Iterator
from types import TracebackType
from typing import Any

from ...chat import ReplyStream, VisionChat
from ...errors import InvalidRequestError, TurnCancelledError
from ...structured import Schema
from .asking import Answer, Asker
from .lines import Identity
from .prefetch import Crash, Item

#: How often a caller waiting for an answer wakes (Ctrl-C is seen at once regardless).
_WAKE_S = 0.5

Done = tuple[Item, str, Answer]


def pool_size(chat: VisionChat, parallel: int | None) -> int:
    """The turns to run at once: ``parallel``, or the engine's slots when it has several
    (else 1). An engine with slots answers no more at once than it has."""
    slots = getattr(chat.engine, "parallel", None)
    slots = slots if isinstance(slots, int) and not isinstance(slots, bool) else None
    if parallel is None:
        return slots if slots is not None and slots > 1 else 1
    if slots is not None and parallel > slots:
        raise InvalidRequestError(
            f"parallel={parallel} asks for more turns at once than the {chat.backend} engine "
            f"holds ({slots}); open the engine with parallel={parallel}, or ask for fewer"
        )
    return parallel


def sibling(chat: VisionChat) -> VisionChat:
    """Another conversation on ``chat``'s engine, with its settings (closing it leaves
    the engine open)."""
    return VisionChat(
        chat.engine,
        close_engine=False,
        system=chat.system,
        max_image_side=chat.max_image_side,
        on_overflow=chat.on_overflow,
        allow_text_only=chat.allow_text_only,
        **chat.options.model_dump(exclude_none=True),
    )


class Pool:
    """``size`` chats on ``chat``'s engine (``chat`` itself the first), each in a thread."""

    def __init__(
        self, chat: VisionChat, size: int, *, schema: Schema | None, options: dict[str, Any]
    ) -> None:
        self.size = size
        self._chats = [chat] + [sibling(chat) for _ in range(size - 1)]
        self._askers = [
            Asker(one, schema=schema, options=options, watch=self._watch) for one in self._chats
        ]
        self._tasks: queue.SimpleQueue[tuple[Item, str] | None] = queue.SimpleQueue()
        self._done: queue.SimpleQueue[Done | Crash] = queue.SimpleQueue()
        self._running: Counter[Identity] = Counter()  # pictures asked about now
        self._lock = threading.Lock()
        self._streams: set[ReplyStream] = set()
        self._stopped = False
        self._threads = [
            threading.Thread(
                target=self._work, args=(asker,), name=f"llava-local-caption-ask-{i}", daemon=True
            )
            for i, asker in enumerate(self._askers)
        ]

    def __enter__(self) -> Pool:
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()
        for _ in self._threads:
            self._tasks.put(None)
        for thread in self._threads:
            thread.join()
        for chat in self._chats[1:]:
            chat.close()

    @property
    def in_flight(self) -> int:
        """Pictures and prompts handed in and not yet taken out."""
        return sum(self._running.values())

    @property
    def free(self) -> bool:
        """Whether a thread would start on a question handed in now."""
        return self.in_flight < self.size

    def asking(self, identity: Identity) -> bool:
        """Whether a prompt about this picture is being asked now."""
        return self._running[identity] > 0

    def submit(self, item: Item, prompt: str) -> None:
        """Hand in ``prompt`` about ``item`` (only while :attr:`free`)."""
        assert self.free
        self._running[item.identity] += 1
        self._tasks.put((item, prompt))

    def take(self) -> Done:
        """The next answer to finish (waits for it; something must be in flight)."""
        assert self.in_flight
        while True:
            try:
                done = self._done.get(timeout=_WAKE_S)
            except queue.Empty:
                continue
            break
        if isinstance(done, Crash):
            raise done.exc
        self._running[done[0].identity] -= 1
        return done

    def drain(self) -> Iterator[Done]:
        """Every answer still in flight, as each finishes."""
        while self.in_flight:
            yield self.take()

    def stop(self) -> None:
        """Cancel the turns running now and refuse new ones (from any thread)."""
        with self._lock:
            self._stopped = True
            streams = list(self._streams)
        for stream in streams:
            stream.cancel()

    @contextlib.contextmanager
    def _watch(self, stream: ReplyStream) -> Iterator[None]:
        with self._lock:
            if self._stopped:
                raise TurnCancelledError("the caption run was stopped")
            self._streams.add(stream)
        try:
            yield
        finally:
            with self._lock:
                self._streams.discard(stream)

    def _work(self, asker: Asker) -> None:
        while (task := self._tasks.get()) is not None:
            item, prompt = task
            try:
                self._done.put((item, prompt, asker.answer(item, prompt)))
            except BaseException as exc:  # a bug: surfaced in the caller, not lost here
                self._done.put(Crash(exc))
