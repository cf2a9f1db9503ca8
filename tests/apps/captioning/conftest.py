"""Fixtures of the caption tests: digit pictures, and the demo model loaded with slots."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from llava_local.backends.llama_cpp import LlamaCppBackend
from llava_local.demo import demo_paths

from .caption_lines import save_digits


@pytest.fixture
def digits(tmp_path: Path) -> Path:
    """Eight test digits as PNG files, d0.png to d7.png."""
    folder = tmp_path / "digits"
    save_digits(folder, 8)
    return folder


@pytest.fixture(scope="module")
def slots4() -> Iterator[LlamaCppBackend]:
    """The demo model with four slots: four conversations decoded together."""
    engine = LlamaCppBackend(*demo_paths(), parallel=4)
    yield engine
    engine.close()
