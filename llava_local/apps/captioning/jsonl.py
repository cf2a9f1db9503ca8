"""The JSON Lines output: one file, a whole line per answer, written with one ``write``,
flushed and fsynced before the next; a torn last line left by a crash is cut off on
start (a last line that is whole JSON and only lacks its newline is kept)."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from ...errors import InvalidRequestError
from .lines import LINE_START, foreign, parse
from .output import Output


class JsonLinesOutput(Output):
    """The JSON Lines file: locked, checked, repaired, then appended to a line at a time."""

    def __init__(self, path: Path) -> None:
        super().__init__(path)
        self._end = 0  # where the next line starts

    def _open(self) -> int:
        """The descriptor the run's lock is taken on: here the file itself."""
        if self.path.is_dir():
            raise InvalidRequestError(
                f"{self.path} is a folder; a JSON Lines output is a file (a folder is "
                "for the Parquet format): choose another name"
            )
        self.path.parent.mkdir(parents=True, exist_ok=True)
        return os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_APPEND, 0o644)

    def _read(self, where: Any) -> dict[str, Any]:
        """The line at ``where`` (its offset and length)."""
        offset, length = where
        return parse(os.pread(self._fd, length, offset))

    def append(self, record: dict[str, Any]) -> None:
        """Write one whole line and make it durable before the next picture."""
        try:
            data = (json.dumps(record, ensure_ascii=False) + "\n").encode()
        except UnicodeEncodeError:  # a file name that is not UTF-8: escape, stay valid JSON
            data = (json.dumps(record) + "\n").encode()
        view = memoryview(data)
        while view:
            view = view[os.write(self._fd, view) :]
        os.fsync(self._fd)
        self._remember(record, (self._end, len(data)))
        self._end += len(data)

    def _load(self) -> None:
        """Read what earlier runs did, a line at a time (the file may be large)."""
        offset = 0
        with self.path.open("rb") as file:
            for number, line in enumerate(file, 1):
                if not line.endswith(b"\n"):  # only the last line can lack its newline
                    self._last_line(line, offset, number)
                elif line.strip():
                    self._remember(self._record(line, number), (offset, len(line)))
                offset += len(line)
        self._end = os.fstat(self._fd).st_size

    def _last_line(self, line: bytes, offset: int, number: int) -> None:
        """Cut a line torn by a crash, but only in our own files; keep a whole one."""
        if not line.strip():
            return
        if not ours(line):
            raise self._foreign(number)
        try:
            record = self._record(line, number)
        except InvalidRequestError:  # torn in the middle of a write
            os.ftruncate(self._fd, offset)
            self.repaired_bytes = len(line)
            return
        self._remember(record, (offset, len(line)))
        os.write(self._fd, b"\n")  # a whole line that only lost its newline

    def _record(self, line: bytes, number: int) -> dict[str, Any]:
        try:
            return parse(line)
        except ValueError:
            raise self._foreign(number) from None

    def _foreign(self, number: int) -> InvalidRequestError:
        return foreign(self.path, f"line {number} is not a caption record")


def ours(line: bytes) -> bool:
    """Whether ``line`` (perhaps torn) begins as every caption line does."""
    return line.startswith(LINE_START) or LINE_START.startswith(line)


def read_lines(path: Path) -> list[dict[str, Any]]:
    """Every whole line of the JSON Lines output ``path``, in order (a torn last line
    is left out)."""
    records = []
    with path.open("rb") as file:
        for number, line in enumerate(file, 1):
            if not line.strip():
                continue
            try:
                records.append(parse(line))
            except ValueError:
                if line.endswith(b"\n") or not ours(line):
                    advice = "give a file written by caption"
                    raise foreign(path, f"line {number} is not a caption record", advice) from None
                break  # the torn last line
    return records
