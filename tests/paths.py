"""Where the project's files are, for the tests of every folder (no ``parents[N]``)."""

from __future__ import annotations

from pathlib import Path

#: The repository: the folder holding ``tests/``.
ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "llava_local"
EXAMPLES = ROOT / "examples"
DIGIT = EXAMPLES / "digit.png"
SHAPE = EXAMPLES / "shape.png"
