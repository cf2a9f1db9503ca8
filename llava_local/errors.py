"""The errors llava-local raises, and nothing else.

Every error derives from :class:`LlavaLocalError` and also from the builtin it
resembles, so ``except ValueError`` keeps working for callers who never heard of
this library::

    LlavaLocalError
    ├── ImageError(ValueError)                 the picture could not be read or prepared
    ├── InvalidRequestError(ValueError)        a misspelt option, an empty prompt, a bad schema
    ├── SchemaError(ValueError)                the answer does not fit the requested schema
    ├── ModelNotFoundError(LookupError)        no such model (not pulled, wrong path)
    ├── NotAVisionModelError(ValueError)       the model would silently ignore pictures
    ├── ModelLoadError(RuntimeError)           the engine could not load the model files
    ├── ContextOverflowError(ValueError)       the turn does not fit the context window
    ├── MissingDependencyError(ImportError)    an optional engine is not installed
    ├── InsufficientMemoryError(MemoryError)   the model would not fit in free memory
    ├── ConversationFileError(ValueError)      a saved conversation is damaged or not ours
    ├── OutputFileError(OSError)               a file could not be written (conversation)
    ├── TurnCancelledError(RuntimeError)       the turn was stopped by ``cancel()``
    ├── BackendUnavailableError(ConnectionError)  the engine cannot be reached
    │   └── BackendTimeoutError(TimeoutError)  it did not answer in time
    └── BackendError(RuntimeError)             the engine failed during a turn
        └── ResponseError                      the daemon answered with an error status

Warnings, issued with :mod:`warnings` and never raised by the library:
:class:`NoPictureWarning(UserWarning)`, a question asked with no picture
anywhere in the conversation; :class:`EnginePluginWarning(UserWarning)`, an installed
package's engine that could not be added.

Low-level exceptions (httpx, ollama, json, llama_cpp) are translated where they
happen, ``raise ... from exc``, so the cause stays visible in tracebacks.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from pydantic import ValidationError


class LlavaLocalError(Exception):
    """Root of every error raised by llava-local."""


class ImageError(LlavaLocalError, ValueError):
    """A picture could not be loaded or prepared; the message names the source."""

    def __init__(self, source: str, reason: str) -> None:
        self.source = source
        self.reason = reason
        super().__init__(f"cannot use picture {source}: {reason}")


class InvalidRequestError(LlavaLocalError, ValueError):
    """The call itself is wrong: unknown option, bad value, empty prompt, bad schema."""


class SchemaError(LlavaLocalError, ValueError):
    """The model's answer is not JSON that fits the requested schema."""

    def __init__(self, message: str, text: str) -> None:
        self.text = text
        super().__init__(message)


class ModelNotFoundError(LlavaLocalError, LookupError):
    """The model is not there: not pulled into Ollama, or no file at that path."""


class NotAVisionModelError(LlavaLocalError, ValueError):
    """The model cannot see pictures; sending it one would be silently ignored."""


class ModelLoadError(LlavaLocalError, RuntimeError):
    """The engine refused the model files (wrong kind of file, mismatched pair)."""


class ContextOverflowError(LlavaLocalError, ValueError):
    """The conversation plus the new turn does not fit the model's context window.

    ``needed``: positions the turn needs, room to answer included (0 when the engine
    did not say); ``available``: the context window's; ``pictures``: how many of them
    the pictures take; ``setting``: the engine setting that sizes the window
    (``"n_ctx"``), or None when it is not ours to set (a server's own context).
    """

    def __init__(
        self,
        message: str,
        *,
        needed: int,
        available: int,
        pictures: int = 0,
        setting: str | None = None,
    ) -> None:
        self.needed = needed
        self.available = available
        self.pictures = pictures
        self.setting = setting
        super().__init__(message)


class MissingDependencyError(LlavaLocalError, ImportError):
    """An optional engine is not installed; the message names the extra to add."""


class InsufficientMemoryError(LlavaLocalError, MemoryError):
    """Loading would need more memory than the machine has free; nothing was loaded."""

    def __init__(self, message: str, *, needed: int, available: int) -> None:
        self.needed = needed
        self.available = available
        super().__init__(message)


class ConversationFileError(LlavaLocalError, ValueError):
    """A saved conversation file is damaged, half-written or of another kind."""


class OutputFileError(LlavaLocalError, OSError):
    """A file could not be written (a saved conversation); the message names the path."""


class TurnCancelledError(LlavaLocalError, RuntimeError):
    """The turn was stopped by ``cancel()`` (another thread, asyncio, a Stop button);
    the conversation is as it was before it."""


class NoPictureWarning(LlavaLocalError, UserWarning):
    """A question was asked with no picture anywhere in the conversation: the model
    answers from the text alone, and vision models then often make a picture up."""


class EnginePluginWarning(LlavaLocalError, UserWarning):
    """An engine another installed package announces (entry point ``llava_local.engines``)
    could not be added: it failed to import, is no engine, or takes a name already
    registered. The other engines work; the message names the package."""


class BackendUnavailableError(LlavaLocalError, ConnectionError):
    """The engine cannot be reached (daemon not running, connection dropped)."""


class BackendTimeoutError(BackendUnavailableError, TimeoutError):
    """The engine did not answer within the timeout."""


class BackendError(LlavaLocalError, RuntimeError):
    """The engine failed while answering."""


class ResponseError(BackendError):
    """The daemon answered with an error; ``status_code`` is None for mid-stream errors."""

    def __init__(self, message: str, status_code: int | None = None) -> None:
        self.status_code = status_code
        super().__init__(message)


def problems(exc: ValidationError) -> str:
    """A pydantic validation failure as one line: ``field: what is wrong; ...``."""
    return "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors())
