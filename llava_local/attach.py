"""Pictures given before their question (:meth:`VisionChat.attach`).

In a conversation the picture comes before the question, so its work can start as soon
as it is given: preparing it (decoding, turning upright, resizing) and, on an engine
that keeps its KV cache (llama.cpp), encoding it and reading it into the model. An
:class:`Attachment` does both in a thread of its own; the question that takes it waits
only for what is left, then reads its own tokens.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import Future

from . import images as _images
from .types import PreparedImage

#: What reads prepared pictures ahead: the engine's ``prefetch`` for the conversation so
#: far ending with them; the thread doing it, or None for an engine that cannot.
ReadAhead = Callable[[tuple[PreparedImage, ...]], "threading.Thread | None"]


class Attachment:
    """Pictures being prepared and read ahead, for the next question of a chat."""

    def __init__(
        self,
        sources: Sequence[_images.ImageSource],
        *,
        max_side: int,
        read_ahead: ReadAhead,
    ) -> None:
        self.sources = tuple(sources)
        self._prepared: Future[tuple[PreparedImage, ...]] = Future()
        #: Done when the pictures are prepared and read ahead (its result is None); it
        #: raises what preparing them raised.
        self.done: Future[None] = Future()
        threading.Thread(
            target=self._run,
            args=(max_side, read_ahead),
            name="llava-local attach",
            daemon=True,
        ).start()

    def _run(self, max_side: int, read_ahead: ReadAhead) -> None:
        try:
            prepared = tuple(_images.prepare(s, max_side=max_side) for s in self.sources)
        except BaseException as exc:  # the question that takes them raises it
            self._prepared.set_exception(exc)
            self.done.set_exception(exc)
            return
        self._prepared.set_result(prepared)
        # A head start only: whatever fails here, the question meets again and reports.
        with contextlib.suppress(Exception):
            thread = read_ahead(prepared)
            if thread is not None:
                thread.join()
        self.done.set_result(None)

    def images(self) -> tuple[PreparedImage, ...]:
        """The prepared pictures, once ready; raises what preparing them raised."""
        return self._prepared.result()

    def failed(self) -> bool:
        """True when the pictures could not be prepared."""
        return self._prepared.done() and self._prepared.exception() is not None

    def taken_by(self, pictures: set[str]) -> bool:
        """True when a turn holding ``pictures`` (sha256s) took these, or they failed."""
        if not self._prepared.done():
            return False
        return self.failed() or pictures.issuperset(i.sha256 for i in self.images())
