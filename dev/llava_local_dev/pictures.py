"""Test pictures."""

from __future__ import annotations

import io

import numpy as np
from PIL import Image

__all__ = ["png_bytes"]


def png_bytes(
    size: tuple[int, int] = (56, 56), color: tuple[int, int, int] = (200, 30, 30), seed: int = 0
) -> bytes:
    """A PNG of random noise over a solid colour: distinct seeds give distinct pictures."""
    rng = np.random.default_rng(seed)
    base = np.broadcast_to(np.asarray(color, np.int16), (size[1], size[0], 3))
    noisy = np.clip(base + rng.integers(-40, 41, base.shape), 0, 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(noisy, "RGB").save(buf, format="PNG")
    return buf.getvalue()
