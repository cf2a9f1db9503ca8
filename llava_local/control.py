"""Stopping a turn and watching it: Ctrl-C, ``cancel()`` from another thread, progress.

Why this exists: most of a turn on a CPU is C code (CLIP encoding the picture,
llama.cpp reading the prompt). Python runs its Ctrl-C handler only between
bytecodes, and during those calls the only Python that runs is in ctypes
callbacks (libmtmd's log, ggml's callbacks), where a ``KeyboardInterrupt`` is
printed as "Exception ignored" and lost. So while C code runs, an engine holds a
:meth:`TurnControl.c_calls` section: SIGINT only raises a flag there, the C code
polls the flag through its abort callbacks and stops, and the interrupt is raised
in Python when the section ends. ``cancel()`` from another thread (a server, the
web page's Stop button, asyncio) raises the same flag.
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from types import FrameType
from typing import Any

from .errors import TurnCancelledError

#: What a turn is doing, reported through ``on_status`` before its answer starts.
STATUS_PREPARING = "preparing pictures"
STATUS_ENCODING = "encoding picture"
STATUS_READING_PICTURE = "reading picture"
STATUS_READING_PROMPT = "reading prompt"
STATUS_ANSWERING = "answering"


class TurnControl:
    """One turn's stop flag and status, shared by the caller and the engine."""

    def __init__(self, on_status: Callable[[str], None] | None = None) -> None:
        self._cancelled = threading.Event()
        self._interrupted = False  # the flag came from SIGINT, not from cancel()
        self._previous: Any = None  # the SIGINT handler to hand the interrupt to
        self.on_status = on_status
        #: What the turn is doing now (one of the ``STATUS_*`` strings), or "" before.
        self.status = ""

    def cancel(self) -> None:
        """Stop the turn as soon as possible; safe from any thread."""
        self._cancelled.set()

    @property
    def cancelled(self) -> bool:
        """True once the turn was asked to stop (``cancel()`` or Ctrl-C)."""
        return self._cancelled.is_set()

    def report(self, status: str) -> None:
        """Record what the turn is doing and tell ``on_status``."""
        if status != self.status:
            self.status = status
            if self.on_status is not None:
                self.on_status(status)

    def check(self) -> None:
        """Raise if the turn was stopped: ``KeyboardInterrupt`` for Ctrl-C (through the
        handler that was in place), :class:`TurnCancelledError` for ``cancel()``."""
        if not self._cancelled.is_set():
            return
        if self._interrupted:
            self._interrupted = False
            self._cancelled.clear()  # handled: the caller may catch it and go on
            previous, self._previous = self._previous, None
            if not callable(previous) or previous is signal.default_int_handler:
                raise KeyboardInterrupt
            previous(signal.SIGINT, None)  # the program's own handler decides
            raise TurnCancelledError("the turn was interrupted (SIGINT)")
        raise TurnCancelledError("the turn was cancelled; the conversation is as it was before it")

    @contextmanager
    def c_calls(self) -> Iterator[None]:
        """A stretch of C work: Ctrl-C raises the flag instead of an exception, and is
        raised as ``KeyboardInterrupt`` when the stretch ends (or the C code aborts)."""
        installed = False
        if threading.current_thread() is threading.main_thread():
            previous = signal.getsignal(signal.SIGINT)
            if previous not in (signal.SIG_IGN, None):
                signal.signal(signal.SIGINT, self._on_sigint)
                self._previous, installed = previous, True
        try:
            yield
        except Exception:
            if not self.cancelled:
                raise
            # The C code failed or stopped because it was asked to: say that instead.
        finally:
            if installed:
                signal.signal(signal.SIGINT, self._previous)
        self.check()

    def _on_sigint(self, signum: int, frame: FrameType | None) -> None:
        if self._previous is signal.SIG_DFL:  # no Python handler: die as the default does
            signal.signal(signal.SIGINT, signal.SIG_DFL)
            signal.raise_signal(signal.SIGINT)
        self._interrupted = True
        self._cancelled.set()
