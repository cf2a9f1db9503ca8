"""What the command tests share: a picture file to ask about."""

from __future__ import annotations

from pathlib import Path

import pytest

from ..gguf_fixtures import png_bytes


@pytest.fixture
def picture(tmp_path: Path) -> Path:
    """A small PNG in the test's folder (``pic.png``)."""
    path = tmp_path / "pic.png"
    path.write_bytes(png_bytes(seed=21))
    return path
