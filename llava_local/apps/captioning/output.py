"""What every caption output does, whatever its format: one run at a time (a lock),
what earlier runs wrote (the newest line of each file, picture and prompt), and lines
appended by the run's one writer. :mod:`.jsonl` and :mod:`.parquet` are the formats."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from types import TracebackType
from typing import Any, Literal, NamedTuple

from ...errors import InvalidRequestError
from .lines import Identity, Pair, Status, key, settled, status

try:  # POSIX; elsewhere two runs on one output are not prevented
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None  # type: ignore[assignment]

#: The formats an output may have.
Format = Literal["jsonl", "parquet"]


class Line(NamedTuple):
    """What a run knows of a line without keeping it: its place among the output's lines
    (the newest wins), what it says, and where to read it back (for a copy's line)."""

    number: int
    status: Status
    where: Any


class Output:
    """An output, locked and read on entering; a format says where the lock is taken
    (:meth:`_open`), how earlier lines are read (:meth:`_load`), written
    (:meth:`append`, :meth:`flush`) and read back (:meth:`_read`)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.repaired_bytes = 0
        self._fd = -1
        #: the newest line of each picture and prompt, whichever file it names
        self._newest: dict[tuple[Identity, str | None], Line] = {}
        #: the newest line of each file, picture and prompt
        self._own: dict[tuple[Identity, str | None, str], Line] = {}
        self._lines = 0

    def __enter__(self) -> Output:
        self._fd = self._open()
        try:
            self._lock()
            self._load()
        except BaseException:
            os.close(self._fd)
            raise
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        try:
            self.flush()
        finally:
            os.close(self._fd)  # closing also releases the lock

    # -- what a format provides ------------------------------------------------------

    def _open(self) -> int:
        """The descriptor the run's lock is taken on."""
        raise NotImplementedError

    def _load(self) -> None:
        """Read what earlier runs wrote, calling :meth:`_remember` for each line."""
        raise NotImplementedError

    def _read(self, where: Any) -> dict[str, Any]:
        """The line remembered at ``where``."""
        raise NotImplementedError

    def append(self, record: dict[str, Any]) -> None:
        """Write one line (or queue it for :meth:`flush`)."""
        raise NotImplementedError

    def flush(self) -> None:
        """Make the lines appended so far durable."""

    # -- what a run asks -------------------------------------------------------------

    def earlier(self, identity: Identity, prompt: str) -> Status | None:
        """What the newest line about this picture and prompt says, under any file name,
        or None (no line)."""
        newest = self._newest_line(identity, prompt)
        return None if newest is None else newest.status

    def own(self, identity: Identity, prompt: str, path: str) -> Status | None:
        """What the newest line about this picture and prompt under the file name
        ``path`` says, or None (that file has no line of its own)."""
        lines = [self._own.get((identity, prompt, path)), self._own.get((identity, None, path))]
        newest = max((line for line in lines if line is not None), default=None)
        return None if newest is None else newest.status

    def answer(self, identity: Identity, prompt: str) -> dict[str, Any]:
        """The newest line about this picture and prompt, read back."""
        newest = self._newest_line(identity, prompt)
        assert newest is not None
        return self._read(newest.where)

    def _newest_line(self, identity: Identity, prompt: str) -> Line | None:
        lines = [self._newest.get((identity, prompt)), self._newest.get((identity, None))]
        return max((line for line in lines if line is not None), default=None)

    def settled(self, prompts: Sequence[str], retry_errors: bool) -> frozenset[Pair]:
        """The pictures and prompts that a run will not ask about again."""
        identities = {identity for identity, _ in self._newest}
        return frozenset(
            (identity, prompt)
            for identity in identities
            for prompt in prompts
            if settled(self.earlier(identity, prompt), retry_errors)
        )

    def _lock(self) -> None:
        if fcntl is None:  # pragma: no cover - Windows
            return
        try:
            fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise InvalidRequestError(
                f"another caption run is writing to {self.path}; wait for it or choose another file"
            ) from None

    def _remember(self, record: dict[str, Any], where: Any) -> None:
        """Know ``record``, a line found at ``where`` (what :meth:`_read` reads it with)."""
        self._lines += 1
        identity, prompt = key(record)
        line = Line(self._lines, status(record), where)
        self._newest[identity, prompt] = line
        self._own[identity, prompt, str(record["path"])] = line


def settled_all(pairs: frozenset[Pair], prompts: Sequence[str]) -> frozenset[Identity]:
    """The pictures of ``pairs`` that are settled for every prompt: no need to prepare
    them."""
    return frozenset(
        identity for identity, _ in pairs if all((identity, prompt) in pairs for prompt in prompts)
    )


def open_output(path: str | os.PathLike[str], format: Format = "jsonl") -> Output:
    """The output at ``path`` in ``format``: ``"jsonl"`` (a file) or ``"parquet"`` (a
    folder of part files); enter it to lock and read it."""
    if format == "jsonl":
        from .jsonl import JsonLinesOutput

        return JsonLinesOutput(Path(path))
    if format == "parquet":
        from .parquet import ParquetOutput

        return ParquetOutput(Path(path))
    raise InvalidRequestError(f"format must be 'jsonl' or 'parquet', not {format!r}")


def read_captions(path: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """The lines of a caption output that count: the newest for each file, picture and
    prompt; a JSON Lines file, or a Parquet output's folder.

    Lines are returned as dicts, in the order they were written (a retried picture
    takes the place of its retry). A picture is identified as resuming identifies it:
    by ``sha256``, or by ``path`` where that is null; a line without ``prompt`` (an
    older version's) is replaced by any newer line of its file and picture. A torn last
    line (a run writing, or a crash) is left out; a file that is not a caption output is
    an :class:`InvalidRequestError`.
    """
    path = Path(path)
    rows: dict[tuple[Identity, str | None, str], dict[str, Any]] = {}
    try:
        if path.is_dir():
            from .parquet import read_lines
        else:
            from .jsonl import read_lines
        records = read_lines(path)
    except OSError as exc:
        raise InvalidRequestError(
            f"cannot read the caption file {path}: {exc.strerror or exc}"
        ) from None
    for record in records:
        identity, prompt = key(record)
        name = str(record["path"])
        rows.pop((identity, prompt, name), None)
        rows.pop((identity, None, name), None)
        rows[identity, prompt, name] = record
    return list(rows.values())
