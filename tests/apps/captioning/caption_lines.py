"""Caption runs in tests: the digit pictures they read, and reading their output (its
lines, and how often each picture and prompt appears)."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import Any

from PIL import Image

from llava_local.apps.datasets import load_set


def save_digits(folder: Path, count: int) -> dict[str, str]:
    """The first ``count`` test digits as PNG files in ``folder`` (``d0.png`` on, numbered
    with as many places as the last needs, so names sort as the digits do); the digit
    each shows, by file name."""
    folder.mkdir(parents=True, exist_ok=True)
    places = len(str(count - 1))
    labels = {}
    for index, picture in enumerate(load_set("digits", limit=count)):
        assert isinstance(picture.source, Image.Image)
        name = f"d{index:0{places}d}.png"
        picture.source.save(folder / name)
        labels[name] = picture.label
    return labels


def lines(path: Path) -> list[dict[str, Any]]:
    """Every line of ``path`` parsed, failing on any line that is not whole JSON."""
    data = path.read_bytes()
    assert not data or data.endswith(b"\n")
    return [json.loads(line) for line in data.splitlines()]


def pairs(records: list[dict[str, Any]]) -> Counter[tuple[str, str]]:
    """How many lines each (file name, prompt) has."""
    return Counter((Path(r["path"]).name, r["prompt"]) for r in records)
