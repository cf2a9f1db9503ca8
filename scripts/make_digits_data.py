"""Write ``llava_local/data/digits_test.npz``: the test split of scikit-learn's digits.

The built-in ``digits`` evaluation set (``llava_local.apps.datasets``) is the test split of
``sklearn.datasets.load_digits()``, indices 1400-1796 (397 pictures), which the demo model
never sees in training. Shipping the 8x8 values keeps scikit-learn out of the runtime
dependencies. Run once from the repository root (needs scikit-learn)::

    python scripts/make_digits_data.py

The file holds ``images`` (397, 8, 8) uint8 values 0..16, ``labels`` (397,) uint8 and
``indices`` (397,) uint16, the position of each picture in ``load_digits()``. The output
is byte-for-byte reproducible (no compression timestamps: ``np.savez`` writes fixed ones).
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

TEST_INDICES = range(1400, 1797)
OUT = Path(__file__).resolve().parents[1] / "llava_local" / "data" / "digits_test.npz"


def main() -> int:
    """Read the digits from scikit-learn, check them, write the file."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = digits.images[TEST_INDICES.start : TEST_INDICES.stop]
    if not np.array_equal(images, np.round(images)) or images.min() < 0 or images.max() > 16:
        raise SystemExit("load_digits() no longer gives whole values 0..16")
    np.savez_compressed(
        OUT,
        images=images.astype(np.uint8),
        labels=digits.target[TEST_INDICES.start : TEST_INDICES.stop].astype(np.uint8),
        indices=np.arange(TEST_INDICES.start, TEST_INDICES.stop, dtype=np.uint16),
    )
    print(f"wrote {OUT} ({OUT.stat().st_size} bytes, {len(images)} digits)", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
