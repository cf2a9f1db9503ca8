"""Reading a caption run's output in tests: its lines, and how often each picture and
prompt appears."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import Any


def lines(path: Path) -> list[dict[str, Any]]:
    """Every line of ``path`` parsed, failing on any line that is not whole JSON."""
    data = path.read_bytes()
    assert not data or data.endswith(b"\n")
    return [json.loads(line) for line in data.splitlines()]


def pairs(records: list[dict[str, Any]]) -> Counter[tuple[str, str]]:
    """How many lines each (file name, prompt) has."""
    return Counter((Path(r["path"]).name, r["prompt"]) for r in records)
