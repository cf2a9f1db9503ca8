"""The Parquet output: a folder of part files, each written whole (a temporary name,
fsync, then a rename), read back on start to resume. Lines are kept in memory until a
part is written: every ``ROWS_PER_PART`` lines or ``SECONDS_PER_PART`` seconds, at the
end of a run (Ctrl-C included) and after each Ray batch, so a crash loses at most those.

Columns: the lines' fields, with ``stats``, ``image`` and ``parsed`` as JSON text."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

from ...errors import InvalidRequestError
from .lines import foreign
from .output import Output

#: Lines in memory before a part file is written, and the longest they wait.
ROWS_PER_PART = 256
SECONDS_PER_PART = 30.0

COLUMNS = (
    ("path", "string"),
    ("sha256", "string"),
    ("prompt", "string"),
    ("text", "string"),
    ("parsed", "json"),
    ("error", "string"),
    ("error_type", "string"),
    ("rejected_text", "string"),
    ("retry", "bool"),
    ("copy_of", "string"),
    ("model", "string"),
    ("backend", "string"),
    ("done_reason", "string"),
    ("stats", "json"),
    ("attempts", "int64"),
    ("elapsed_s", "float64"),
    ("image", "json"),
)
_KINDS = dict(COLUMNS)
_UNREADABLE = "not readable as Parquet"


class ParquetOutput(Output):
    """The output as a Parquet dataset: part files in a folder, locked on its ``.lock``."""

    def __init__(self, path: Path) -> None:
        super().__init__(path)
        self._pending: list[dict[str, Any]] = []
        # where each pending line will be read back from: [part name, row], the name
        # filled in when its part is written
        self._pending_where: list[list[Any]] = []
        self._pending_since = 0.0
        self._parts = 0

    def _open(self) -> int:
        """The folder's ``.lock`` file, which the run's lock is taken on."""
        if self.path.exists() and not self.path.is_dir():
            raise InvalidRequestError(
                f"{self.path} is a file; a Parquet output is a folder: choose another name"
            )
        self.path.mkdir(parents=True, exist_ok=True)
        return os.open(self.path / ".lock", os.O_RDWR | os.O_CREAT, 0o644)

    def append(self, record: dict[str, Any]) -> None:
        if not self._pending:
            self._pending_since = time.monotonic()
        where = ["", len(self._pending)]
        self._pending.append(record)
        self._pending_where.append(where)
        self._remember(record, where)
        waited = time.monotonic() - self._pending_since
        if len(self._pending) >= ROWS_PER_PART or waited >= SECONDS_PER_PART:
            self.flush()

    def _read(self, where: Any) -> dict[str, Any]:
        """The line at ``where``: a row of a part file, or one not written yet."""
        import pyarrow.parquet as pq  # type: ignore[import-untyped]

        part, row = where
        if not part:
            return dict(self._pending[row])
        return _record(pq.read_table(self.path / part).slice(row, 1).to_pylist()[0])

    def flush(self) -> None:
        if not self._pending:
            return
        import pyarrow as pa
        import pyarrow.parquet as pq

        columns: dict[str, list[Any]] = {name: [] for name, _ in COLUMNS}
        for record in self._pending:
            for name, kind in COLUMNS:
                value = record.get(name)
                if kind == "json" and value is not None:
                    value = json.dumps(value, ensure_ascii=False)
                columns[name].append(value)
        types = {"string": pa.string(), "json": pa.string(), "bool": pa.bool_()}
        types |= {"int64": pa.int64(), "float64": pa.float64()}
        schema = pa.schema([(name, types[kind]) for name, kind in COLUMNS])
        table = pa.table(columns, schema=schema)
        self._parts += 1
        name = f"part-{time.time_ns():020d}-{os.getpid()}-{self._parts:06d}.parquet"
        temporary = self.path / f".{name}.tmp"
        pq.write_table(table, temporary)
        with open(temporary, "rb") as file:
            os.fsync(file.fileno())
        os.replace(temporary, self.path / name)
        for where in self._pending_where:
            where[0] = name
        self._pending, self._pending_where = [], []

    def _load(self) -> None:
        import pyarrow.parquet as pq

        for part in _parts(self.path):
            try:
                table = pq.read_table(part, columns=["path", "sha256", "prompt", "error", "retry"])
            except Exception:  # pyarrow raises several kinds for a bad file
                raise foreign(part, _UNREADABLE, "choose another output folder") from None
            for row, record in enumerate(table.to_pylist()):
                kept = {k: v for k, v in record.items() if v is not None or k == "sha256"}
                self._remember(kept, [part.name, row])


def _parts(folder: Path) -> list[Path]:
    """The part files, oldest first (their names begin with the time they were written)."""
    return sorted(folder.glob("part-*.parquet"))


def _record(row: dict[str, Any]) -> dict[str, Any]:
    """A row as the line it stands for: JSON columns decoded, empty columns left out."""
    return {
        name: json.loads(value) if _KINDS.get(name) == "json" and value is not None else value
        for name, value in row.items()
        if value is not None or name == "sha256"
    }


def read_lines(path: Path) -> list[dict[str, Any]]:
    """Every line of the Parquet output ``path``, in the order written."""
    import pyarrow.parquet as pq

    records: list[dict[str, Any]] = []
    for part in _parts(path):
        try:
            rows = pq.read_table(part).to_pylist()
        except Exception:  # pyarrow raises several kinds for a bad file
            raise foreign(part, _UNREADABLE, "give a folder written by caption") from None
        records.extend(_record(row) for row in rows)
    return records
