"""Pictures that cost far more to decode than they take to send (issue 25, finding 6).

Each picture is a real file, opened in a fresh interpreter whose peak memory is
measured: a limit is only real if the file is refused before its pixels are decoded.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from llava_local import images

from .files_fixtures import deep_tiff, peak_growth

PREPARE = """
picture = prepare(sys.argv[1], max_side=672, cache=None)
result["size"] = [picture.width, picture.height]
result["changes"] = list(picture.changes)
"""


@pytest.mark.parametrize("mode", ["F", "I"], ids=["float", "32-bit"])
def test_an_88_megapixel_deep_tiff_is_refused_before_it_is_decoded(
    tmp_path: Path, mode: str
) -> None:
    """An 88-megapixel TIFF of 32-bit pixels (a few KB; 352 MB decoded, 2.6 GiB and
    half a minute to prepare before) is refused unread, naming the limit and the way
    around it, and opening it costs almost no memory."""
    path = tmp_path / "deep.tif"
    path.write_bytes(deep_tiff(11000, 8000, mode))
    assert path.stat().st_size < 667_000
    measured = peak_growth(PREPARE, str(path))
    error = measured.get("error", "")
    assert "11000x8000 pixels" in error
    assert f"limit of {images.MAX_DECODED_BYTES // 2**20} MiB" in error
    assert "shrink the picture" in error
    assert measured["growth_mib"] < 32


def test_a_deep_picture_under_the_limit_is_converted_in_strips(tmp_path: Path) -> None:
    """A 16-megapixel float TIFF (64 MB of pixels) is prepared at a few times its own
    size, not the thirty times a whole-picture float64 conversion took."""
    path = tmp_path / "float.tif"
    path.write_bytes(deep_tiff(4000, 4000, "F"))
    measured = peak_growth(PREPARE, str(path))
    assert "error" not in measured, measured
    assert measured["size"] == [672, 672]
    assert "scaled floating-point grey to 8-bit" in measured["changes"]
    assert measured["growth_mib"] < 200


_PHOTO = """
import sys
from PIL import Image
gradient = Image.linear_gradient("L").resize((6000, 4000))
Image.merge("RGB", (gradient, gradient.rotate(180), gradient)).save(sys.argv[1], quality=90)
"""


def test_a_24_megapixel_jpeg_photo_is_still_read_cheaply(tmp_path: Path) -> None:
    """A 24 MP photo is decoded at reduced scale (JPEG draft mode): it prepares, shrunk,
    for a few megabytes, far below its 72 MB of full-size pixels."""
    path = tmp_path / "photo.jpg"
    subprocess.run([sys.executable, "-c", _PHOTO, str(path)], check=True, timeout=120)
    with Image.open(path) as photo:
        assert photo.size == (6000, 4000)
    measured = peak_growth(PREPARE, str(path))
    assert "error" not in measured, measured
    assert measured["size"] == [672, 448]
    assert measured["growth_mib"] < 32
