"""A caption line as resuming knows it: which picture and prompt it is about, and what it
says (answered, failed, or a failure of the run)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Literal

from ...errors import (
    BackendError,
    ContextOverflowError,
    ImageError,
    InvalidRequestError,
    SchemaError,
)

#: How every JSON line begins; a torn line is recognised by it.
LINE_START = b'{"path": '

#: Failures that belong to one picture; any other library error stops the run.
PER_PICTURE = (ImageError, SchemaError, ContextOverflowError, BackendError)

#: A picture as resuming knows it: ``("sha256", hex digest)``, or ``("path", path)`` for
#: a file whose bytes could not be read.
Identity = tuple[Literal["sha256", "path"], str]
#: One line's subject: a picture and a prompt.
Pair = tuple[Identity, str]
#: What the newest line of a picture and prompt says: answered; failed (kept unless
#: retry_errors); or the run failed on it (asked about again).
Status = Literal["done", "failed", "retry"]


def identity(sha256: object, path: object) -> Identity:
    return ("sha256", sha256) if isinstance(sha256, str) else ("path", str(path))


def key(record: dict[str, Any]) -> tuple[Identity, str | None]:
    """The picture and prompt a line is about (None: an older version's line, without
    a prompt, which stands for any)."""
    prompt = record.get("prompt")
    return identity(record["sha256"], record["path"]), prompt if isinstance(prompt, str) else None


def status(record: dict[str, Any]) -> Status:
    return "done" if "error" not in record else "retry" if record.get("retry") else "failed"


def settled(status: Status | None, retry_errors: bool) -> bool:
    """Whether a picture whose newest line says ``status`` is left alone."""
    return status == "done" or (status == "failed" and not retry_errors)


def parse(line: bytes) -> dict[str, Any]:
    """One caption line, or ValueError when it is not one (torn, or another file's)."""
    record = json.loads(line)
    if not isinstance(record, dict) or "sha256" not in record or "path" not in record:
        raise ValueError("not a caption record")
    return record


def foreign(
    path: Path, where: str, advice: str = "choose another output file"
) -> InvalidRequestError:
    """The error for a file that is not a caption output (``where``: what in it is not)."""
    return InvalidRequestError(f"{path} is not a caption file ({where}); {advice}")
