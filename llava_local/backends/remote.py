"""The life cycle of an engine that answers through a server (the Ollama and OpenAI
engines): checked before its first turn, checked again after the server or the model
went missing, its client's errors turned into the library's, closed once.

The check (is a server of the right kind there; does it have the model; can the model
see) costs a request or two, so it is made once, not every turn. A turn that finds the
model gone (removed, unloaded) or the server unreachable (restarted, moved) leaves the
engine unchecked, so the next turn checks again, and pulls again where the engine
pulls, instead of failing the same way forever.
"""

from __future__ import annotations

from abc import abstractmethod
from collections.abc import Generator
from typing import ClassVar

from ..errors import BackendError, BackendUnavailableError, LlavaLocalError, ModelNotFoundError
from .base import Backend, Finish, Turn

__all__ = ["DEFAULT_READ_TIMEOUT", "RemoteEngine"]

#: The read timeout when the caller gives none: long enough for a CPU, never forever.
DEFAULT_READ_TIMEOUT = 600.0


class RemoteEngine(Backend):
    """An engine whose model lives in a server. Subclasses say how to check the server
    (:meth:`_check`), how to answer (:meth:`_answer`), how their client's errors map to
    the library's (:meth:`_translate`, for the types in :attr:`client_errors`), and
    what to free (:meth:`_release`)."""

    #: The server's kind, for messages ("Ollama").
    server: ClassVar[str]
    #: Everything the client library and its transport may raise; see :meth:`_translate`.
    client_errors: tuple[type[BaseException], ...] = ()

    _checked = False
    _closed = False

    def check(self) -> None:
        """Pre-flight: the server answers as it should, has the model, and the model can
        see pictures. Raises the library error that says what to do."""
        self._ensure_open()
        try:
            self._check()
        except LlavaLocalError:
            raise
        except self.client_errors as exc:
            raise self._translate(exc, answering=False) from exc
        self._checked = True

    def generate(self, turn: Turn) -> Generator[str | Finish, None, None]:
        """Stream the answer to ``turn``: text pieces, then one :class:`Finish`."""
        self._ensure_open()
        if not self._checked:
            self.check()
        try:
            yield from self._answer(turn)
        except LlavaLocalError as exc:
            self._after(exc)
            raise
        except self.client_errors as exc:
            error = self._translate(exc, answering=True)
            self._after(error)
            raise error from exc

    def close(self) -> None:
        """Close the connections. Later turns raise :class:`BackendError`."""
        if not self._closed:
            self._closed = True
            self._release()

    def _after(self, error: LlavaLocalError) -> None:
        """After a failed turn: check again next turn if the model or server went away."""
        if isinstance(error, ModelNotFoundError | BackendUnavailableError):
            self._checked = False

    def _ensure_open(self) -> None:
        if self._closed:
            raise BackendError(f"this {self.server} engine is closed; open a new one")

    @abstractmethod
    def _check(self) -> None:
        """The pre-flight's requests; raise a library error, or one of :attr:`client_errors`."""

    @abstractmethod
    def _answer(self, turn: Turn) -> Generator[str | Finish, None, None]:
        """The turn's request and its answer, as :meth:`generate` yields it."""

    @abstractmethod
    def _translate(self, exc: BaseException, *, answering: bool) -> LlavaLocalError:
        """The library error for one of the client's: the single place they are mapped."""

    @abstractmethod
    def _release(self) -> None:
        """Free the client (once, from :meth:`close`)."""
