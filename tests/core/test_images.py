"""Picture loading and preparation, on real files of every awkward kind written in tmp_path."""

from __future__ import annotations

import base64
import contextlib
import http.server
import io
import pathlib
import random
import socket
import struct
import subprocess
import sys
import threading
import zlib
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from PIL import Image

from llava_local import images
from llava_local.errors import ImageError, InvalidRequestError
from llava_local.images import ImageCache, fetch_url, prepare
from llava_local.types import PreparedImage

from ..paths import ROOT

RED = (220, 20, 20)
WHITE = (255, 255, 255)


# --- helpers -------------------------------------------------------------------------------


def upright_picture(width: int = 60, height: int = 40) -> Image.Image:
    """White, with a red block in the top-left corner: every flip or turn shows."""
    img = Image.new("RGB", (width, height), WHITE)
    img.paste(RED, (0, 0, width // 3, height // 2))
    return img


def noisy_picture(width: int, height: int, seed: int = 0) -> Image.Image:
    """A photo-like picture with far more than 256 colours."""
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


def encoded(img: Image.Image, fmt: str, **params: Any) -> bytes:
    buffer = io.BytesIO()
    img.save(buffer, fmt, **params)
    return buffer.getvalue()


def decoded(prepared: PreparedImage) -> Image.Image:
    img = Image.open(io.BytesIO(prepared.data))
    img.load()
    return img


def near(pixel: Any, expected: tuple[int, ...], tolerance: int = 40) -> bool:
    return all(abs(int(a) - b) <= tolerance for a, b in zip(pixel, expected, strict=True))


def assert_upright(prepared: PreparedImage, width: int = 60, height: int = 40) -> None:
    """The red block is back in the top-left corner and the other corners are white."""
    img = decoded(prepared).convert("RGB")
    assert img.size == (width, height)
    assert near(img.getpixel((2, 2)), RED)
    for corner in [(width - 3, 2), (2, height - 3), (width - 3, height - 3)]:
        assert near(img.getpixel(corner), WHITE), corner


def png_chunk(tag: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + tag + body + struct.pack(">I", zlib.crc32(tag + body))


def png_header_only(width: int, height: int) -> bytes:
    """A tiny PNG that declares a huge RGB picture but holds no pixels."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + png_chunk(b"IHDR", ihdr)
        + png_chunk(b"IDAT", zlib.compress(b""))
        + png_chunk(b"IEND", b"")
    )


def reason_of(source: Any, **kwargs: Any) -> str:
    with pytest.raises(ImageError) as caught:
        prepare(source, max_side=kwargs.pop("max_side", 512), cache=None, **kwargs)
    return caught.value.reason


@pytest.fixture(scope="module")
def big_jpeg(tmp_path_factory: pytest.TempPathFactory) -> pathlib.Path:
    """A 12-megapixel 4000x3000 JPEG: a smooth gradient with the red block top-left."""
    ramp = np.linspace(0, 255, 4000, dtype=np.float64)
    pixels = np.empty((3000, 4000, 3), dtype=np.uint8)
    pixels[..., 0] = ramp[None, :].astype(np.uint8)
    pixels[..., 1] = np.linspace(0, 255, 3000).astype(np.uint8)[:, None]
    pixels[..., 2] = 128
    pixels[:1500, :1333] = RED
    path = tmp_path_factory.mktemp("big") / "photo.jpg"
    Image.fromarray(pixels).save(path, "JPEG", quality=85)
    return path


# --- formats -------------------------------------------------------------------------------


def test_jpeg_photo_is_kept_as_jpeg(tmp_path: pathlib.Path) -> None:
    """A photo-like JPEG comes back as an RGB JPEG of the same size."""
    path = tmp_path / "photo.jpg"
    noisy_picture(400, 300).save(path, "JPEG")
    prepared = prepare(path, max_side=1024, cache=None)
    assert prepared.mime == "image/jpeg"
    assert (prepared.width, prepared.height) == (400, 300)
    assert decoded(prepared).mode == "RGB"
    assert prepared.changes == ()


def test_flat_png_is_kept_as_png(tmp_path: pathlib.Path) -> None:
    """A large picture with few colours (a diagram) is encoded losslessly as PNG."""
    path = tmp_path / "diagram.png"
    upright_picture(900, 600).save(path)
    prepared = prepare(path, max_side=1024, cache=None)
    assert prepared.mime == "image/png"
    assert_upright(prepared, 900, 600)


def test_small_noisy_picture_is_png() -> None:
    """A small picture is PNG whatever its content; a large noisy one is JPEG."""
    small = prepare(noisy_picture(200, 200), max_side=1024, cache=None)
    large = prepare(noisy_picture(600, 400), max_side=1024, cache=None)
    assert small.mime == "image/png"
    assert large.mime == "image/jpeg"


def test_cmyk_jpeg_becomes_rgb(tmp_path: pathlib.Path) -> None:
    """A CMYK JPEG (as print workflows produce) is converted to the right RGB colours."""
    path = tmp_path / "print.jpg"
    Image.new("CMYK", (64, 64), (0, 255, 255, 0)).save(path, "JPEG")
    prepared = prepare(path, max_side=512, cache=None)
    assert "converted CMYK to RGB" in prepared.changes
    assert near(decoded(prepared).getpixel((32, 32)), (255, 0, 0))


def test_16bit_png_is_scaled_not_clipped(tmp_path: pathlib.Path) -> None:
    """A 16-bit grey PNG at half intensity becomes mid grey, not clipped to white."""
    values = np.full((32, 32), 0x8000, dtype=np.uint16)
    values[:, :16] = 0x2000
    path = tmp_path / "depth.png"
    Image.fromarray(values).save(path)
    with Image.open(path) as written:
        assert written.mode.startswith("I")
    prepared = prepare(path, max_side=512, cache=None)
    img = decoded(prepared).convert("RGB")
    assert img.getpixel((24, 5)) == (128, 128, 128)
    assert img.getpixel((4, 5)) == (32, 32, 32)
    assert "scaled 16-bit grey to 8-bit" in prepared.changes


def test_float_tiff_in_unit_range_is_scaled(tmp_path: pathlib.Path) -> None:
    """A floating-point TIFF with values in [0, 1] is scaled to 0-255."""
    path = tmp_path / "float.tif"
    Image.fromarray(np.full((16, 16), 0.5, dtype=np.float32)).save(path)
    img = decoded(prepare(path, max_side=512, cache=None))
    assert img.convert("RGB").getpixel((8, 8)) == (128, 128, 128)


def test_grey_png_becomes_rgb(tmp_path: pathlib.Path) -> None:
    """A greyscale PNG becomes RGB with equal channels."""
    path = tmp_path / "grey.png"
    Image.new("L", (50, 50), 77).save(path)
    img = decoded(prepare(path, max_side=512, cache=None))
    assert img.mode == "RGB"
    assert img.getpixel((10, 10)) == (77, 77, 77)


def test_palette_png_with_transparency_goes_onto_white(tmp_path: pathlib.Path) -> None:
    """A palette PNG whose transparent colour is black shows white there, not black."""
    img = Image.new("P", (40, 40), 0)
    img.putpalette([0, 0, 0, 0, 0, 200] + [0] * 762)
    img.paste(1, (10, 10, 30, 30))
    path = tmp_path / "icon.png"
    img.save(path, transparency=0)
    prepared = prepare(path, max_side=512, cache=None)
    out = decoded(prepared).convert("RGB")
    assert out.getpixel((2, 2)) == WHITE
    assert out.getpixel((20, 20)) == (0, 0, 200)
    assert "transparency composited onto white" in prepared.changes


def test_dark_ink_on_transparent_stays_dark_on_white(tmp_path: pathlib.Path) -> None:
    """Black text on a clear background (RGB all zero) becomes dark ink on white."""
    img = Image.new("RGBA", (80, 40), (0, 0, 0, 0))
    img.paste((10, 10, 10, 255), (20, 10, 60, 30))
    img.paste((10, 10, 10, 128), (60, 10, 70, 30))
    path = tmp_path / "signature.png"
    img.save(path)
    prepared = prepare(path, max_side=512, cache=None)
    out = decoded(prepared).convert("RGB")
    assert out.getpixel((2, 2)) == WHITE
    assert out.getpixel((40, 20)) == (10, 10, 10)
    assert near(out.getpixel((65, 20)), (132, 132, 132), tolerance=3)
    assert "transparency composited onto white" in prepared.changes


def test_opaque_rgba_is_not_reported_as_composited() -> None:
    """An RGBA picture whose alpha is all opaque is converted without a change note."""
    prepared = prepare(Image.new("RGBA", (20, 20), (1, 2, 3, 255)), max_side=64, cache=None)
    assert prepared.changes == ()
    assert decoded(prepared).getpixel((5, 5)) == (1, 2, 3)


def test_la_png_goes_onto_white(tmp_path: pathlib.Path) -> None:
    """A grey+alpha PNG keeps its dark ink and gets a white background."""
    img = Image.new("LA", (30, 30), (0, 0))
    img.paste((20, 255), (10, 10, 20, 20))
    path = tmp_path / "la.png"
    img.save(path)
    out = decoded(prepare(path, max_side=512, cache=None)).convert("RGB")
    assert out.getpixel((1, 1)) == WHITE
    assert out.getpixel((15, 15)) == (20, 20, 20)


def animation(colours: list[tuple[int, int, int]]) -> list[Image.Image]:
    return [Image.new("RGB", (32, 32), colour) for colour in colours]


@pytest.mark.parametrize(
    ("fmt", "params"),
    [("GIF", {}), ("WEBP", {"lossless": True}), ("PNG", {})],
    ids=["gif", "webp", "apng"],
)
def test_animation_takes_first_frame(
    tmp_path: pathlib.Path, fmt: str, params: dict[str, Any]
) -> None:
    """An animated GIF, WebP or APNG yields its first frame, and says it had several."""
    frames = animation([(255, 0, 0), (0, 255, 0), (0, 0, 255)])
    path = tmp_path / f"anim.{fmt.lower()}"
    frames[0].save(path, fmt, save_all=True, append_images=frames[1:], duration=100, **params)
    with Image.open(path) as written:
        assert getattr(written, "n_frames", 1) == 3
    prepared = prepare(path, max_side=512, cache=None)
    assert near(decoded(prepared).convert("RGB").getpixel((16, 16)), (255, 0, 0), 10)
    assert "first frame of 3" in prepared.changes


@pytest.mark.parametrize(
    ("fmt", "suffix", "params"),
    [
        ("TIFF", ".tif", {}),
        ("BMP", ".bmp", {}),
        ("WEBP", ".webp", {"quality": 95}),
        ("PNG", ".png", {}),
        ("JPEG", ".jpg", {"quality": 95}),
        ("GIF", ".gif", {}),
    ],
)
def test_common_formats_load_upright(
    tmp_path: pathlib.Path, fmt: str, suffix: str, params: dict[str, Any]
) -> None:
    """TIFF, BMP, WebP, PNG, JPEG and GIF files all load as the same RGB picture."""
    path = tmp_path / f"picture{suffix}"
    upright_picture().save(path, fmt, **params)
    assert_upright(prepare(path, max_side=512, cache=None))


def test_ico_loads_largest_icon(tmp_path: pathlib.Path) -> None:
    """An ICO file loads its largest icon as RGB, transparency onto white."""
    icon = Image.new("RGBA", (64, 64), (0, 0, 0, 0))
    icon.paste((200, 0, 0, 255), (0, 0, 32, 32))
    path = tmp_path / "favicon.ico"
    icon.save(path, sizes=[(16, 16), (64, 64)])
    prepared = prepare(path, max_side=512, cache=None)
    out = decoded(prepared).convert("RGB")
    assert out.size == (64, 64)
    assert out.getpixel((5, 5)) == (200, 0, 0)
    assert out.getpixel((60, 60)) == WHITE


def test_one_pixel_picture(tmp_path: pathlib.Path) -> None:
    """A 1x1 picture is accepted and stays 1x1."""
    path = tmp_path / "dot.png"
    Image.new("RGB", (1, 1), (9, 8, 7)).save(path)
    prepared = prepare(path, max_side=512, cache=None)
    assert (prepared.width, prepared.height) == (1, 1)
    assert decoded(prepared).getpixel((0, 0)) == (9, 8, 7)


def test_long_strip_keeps_at_least_one_pixel(tmp_path: pathlib.Path) -> None:
    """A 10x8000 strip shrinks to fit max_side, its short side rounded but never zero."""
    path = tmp_path / "strip.png"
    Image.new("RGB", (10, 8000), (0, 90, 0)).save(path)
    prepared = prepare(path, max_side=1344, cache=None)
    assert (prepared.width, prepared.height) == (2, 1344)
    thin = prepare(path, max_side=100, cache=None)
    assert (thin.width, thin.height) == (1, 100)
    assert "shrunk 10x8000 -> 1x100" in thin.changes


def test_12_megapixel_jpeg_is_shrunk(big_jpeg: pathlib.Path) -> None:
    """A 12 MP photo is shrunk to max_side and reports its original size."""
    prepared = prepare(big_jpeg, max_side=1344, cache=None)
    assert (prepared.width, prepared.height) == (1344, 1008)
    assert prepared.changes == ("shrunk 4000x3000 -> 1344x1008",)
    img = decoded(prepared)
    assert near(img.getpixel((10, 10)), RED)
    assert near(img.getpixel((1300, 900)), (249, 232, 128), 20)


def peak_memory_kb(script: str, path: pathlib.Path) -> int:
    """Peak resident memory (VmHWM) of a fresh interpreter that imports images and runs script.

    VmHWM belongs to the new process image, unlike ru_maxrss, which a child inherits
    from the (large) pytest process that forked it.
    """
    code = (
        "import re, sys\n"
        "from PIL import Image\n"
        "from llava_local.images import prepare\n"
        f"{script}\n"
        "status = open('/proc/self/status').read()\n"
        "print(re.search(r'VmHWM:\\s+(\\d+) kB', status).group(1))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code, str(path)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    )
    return int(result.stdout.split()[-1])


@pytest.mark.skipif(not pathlib.Path("/proc/self/status").exists(), reason="needs Linux /proc")
def test_12_megapixel_jpeg_is_decoded_at_reduced_scale(big_jpeg: pathlib.Path) -> None:
    """Preparing a 12 MP JPEG never holds the 36 MB full-size decode in memory (draft)."""
    full = peak_memory_kb("Image.open(sys.argv[1]).load()", big_jpeg)
    drafted = peak_memory_kb("prepare(sys.argv[1], max_side=1000, cache=None)", big_jpeg)
    assert full - drafted > 20_000, (full, drafted)


def test_12_megapixel_sideways_jpeg_is_upright_and_shrunk(
    big_jpeg: pathlib.Path, tmp_path: pathlib.Path
) -> None:
    """A large photo stored sideways with EXIF orientation 6 comes back upright at full scale."""
    with Image.open(big_jpeg) as img:
        stored = img.transpose(Image.Transpose.ROTATE_90)
    exif = Image.Exif()
    exif[0x0112] = 6
    path = tmp_path / "sideways.jpg"
    stored.save(path, "JPEG", exif=exif, quality=85)
    prepared = prepare(path, max_side=1344, cache=None)
    assert (prepared.width, prepared.height) == (1344, 1008)
    assert prepared.changes == (
        "rotated upright (EXIF orientation 6)",
        "shrunk 4000x3000 -> 1344x1008",
    )
    assert near(decoded(prepared).getpixel((10, 10)), RED)


# Pillow's exif_transpose applies these to the stored picture; each is its own inverse
# except the quarter turns, so the stored picture is the upright one turned back.
STORED_FROM_UPRIGHT = {
    1: None,
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_90,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_270,
}


@pytest.mark.parametrize("fmt", ["JPEG", "PNG", "WEBP"])
@pytest.mark.parametrize("orientation", range(1, 9))
def test_exif_orientation_is_applied(tmp_path: pathlib.Path, orientation: int, fmt: str) -> None:
    """A picture saved turned or mirrored with an EXIF orientation tag comes back upright."""
    method = STORED_FROM_UPRIGHT[orientation]
    upright = upright_picture()
    stored = upright if method is None else upright.transpose(method)
    exif = Image.Exif()
    exif[0x0112] = orientation
    path = tmp_path / f"phone.{fmt.lower()}"
    stored.save(path, fmt, exif=exif.tobytes(), quality=95)
    prepared = prepare(path, max_side=512, cache=None)
    assert_upright(prepared)
    noted = [change for change in prepared.changes if "EXIF orientation" in change]
    assert noted == ([] if orientation == 1 else [noted[0]])
    assert orientation == 1 or f"(EXIF orientation {orientation})" in noted[0]


def test_output_has_no_metadata(tmp_path: pathlib.Path) -> None:
    """EXIF, ICC profile and comments of the input are not carried into the output."""
    exif = Image.Exif()
    exif[0x0112] = 1
    exif[0x010F] = "PhoneMaker"
    path = tmp_path / "meta.jpg"
    noisy_picture(400, 300).save(path, "JPEG", exif=exif, icc_profile=b"fake", comment=b"hi")
    out = decoded(prepare(path, max_side=512, cache=None))
    assert not {"exif", "icc_profile", "comment"} & set(out.info)


@pytest.mark.parametrize("name", ["IMG_0001.JPG", "scan", "mislabelled.png"])
def test_extension_does_not_matter(tmp_path: pathlib.Path, name: str) -> None:
    """Files are recognised by content, whatever their extension (upper case, none, wrong)."""
    path = tmp_path / name
    upright_picture().save(path, "JPEG", quality=95)
    assert_upright(prepare(str(path), max_side=512, cache=None))


# --- source types --------------------------------------------------------------------------


@pytest.fixture
def png_bytes() -> bytes:
    return encoded(upright_picture(), "PNG")


def test_bytes_bytearray_memoryview(png_bytes: bytes) -> None:
    """bytes, bytearray and memoryview give the same picture, described by size."""
    results = [
        prepare(kind(png_bytes), max_side=512, cache=None)
        for kind in (bytes, bytearray, memoryview)
    ]
    assert len({result.data for result in results}) == 1
    assert results[0].source == f"<bytes, {len(png_bytes)} B>"
    assert_upright(results[0])


def test_binary_file_object(tmp_path: pathlib.Path, png_bytes: bytes) -> None:
    """An open binary file is read and described by its name."""
    path = tmp_path / "pic.png"
    path.write_bytes(png_bytes)
    with path.open("rb") as file:
        prepared = prepare(file, max_side=512, cache=None)
    assert prepared.source == str(path)
    assert_upright(prepared)


def test_bytesio_is_read_from_the_start(png_bytes: bytes) -> None:
    """A BytesIO just written to (positioned at its end) is read from the start, as Pillow does."""
    buffer = io.BytesIO()
    buffer.write(png_bytes)
    assert_upright(prepare(buffer, max_side=512, cache=None))


def test_text_mode_file_is_refused(tmp_path: pathlib.Path, png_bytes: bytes) -> None:
    """A file opened in text mode is refused with advice to open it with 'rb'."""
    path = tmp_path / "pic.png"
    path.write_bytes(png_bytes)
    with path.open("r", encoding="latin-1") as file:
        assert "'rb'" in reason_of(file)


def test_pil_image_input_is_not_modified() -> None:
    """A PIL image is prepared without changing the caller's object."""
    img = Image.new("RGBA", (40, 30), (0, 0, 0, 0))
    before = img.tobytes()
    prepared = prepare(img, max_side=20, cache=None)
    assert prepared.source == "<PIL.Image RGBA 40x30>"
    assert (prepared.width, prepared.height) == (20, 15)
    assert img.mode == "RGBA"
    assert img.size == (40, 30)
    assert img.tobytes() == before


def test_opened_pil_image_with_exif_is_turned_upright(tmp_path: pathlib.Path) -> None:
    """A PIL image opened from a sideways phone photo is still turned upright."""
    exif = Image.Exif()
    exif[0x0112] = 8
    path = tmp_path / "phone.jpg"
    upright_picture().transpose(Image.Transpose.ROTATE_270).save(path, exif=exif, quality=95)
    with Image.open(path) as img:
        assert_upright(prepare(img, max_side=512, cache=None))


@pytest.mark.parametrize(
    ("array", "pixel"),
    [
        (np.full((8, 12), 100, dtype=np.uint8), (100, 100, 100)),
        (np.full((8, 12, 1), 100, dtype=np.uint8), (100, 100, 100)),
        (np.full((8, 12, 3), (1, 2, 3), dtype=np.uint8), (1, 2, 3)),
        (np.full((8, 12, 4), (0, 0, 0, 0), dtype=np.uint8), WHITE),
        (np.ones((8, 12), dtype=bool), WHITE),
        (np.full((8, 12, 3), 0.5, dtype=np.float32), (128, 128, 128)),
    ],
    ids=["grey", "grey1", "rgb", "rgba-clear", "bool", "float"],
)
def test_numpy_arrays(array: np.ndarray[Any, Any], pixel: tuple[int, int, int]) -> None:
    """Grey, RGB and RGBA uint8 arrays, bool masks and [0, 1] floats are accepted."""
    prepared = prepare(array, max_side=512, cache=None)
    assert (prepared.width, prepared.height) == (12, 8)
    assert decoded(prepared).getpixel((3, 3)) == pixel
    assert prepared.source.startswith("<numpy array 8x12")


@pytest.mark.parametrize(
    ("array", "words"),
    [
        (np.zeros((8, 8), dtype=np.int16), "dtype int16"),
        (np.full((8, 8), 2.0), "within [0, 1]"),
        (np.full((8, 8), np.nan), "within [0, 1]"),
        (np.zeros((8, 8, 2), dtype=np.uint8), "shape"),
        (np.zeros((8,), dtype=np.uint8), "shape"),
        (np.zeros((0, 8), dtype=np.uint8), "empty"),
    ],
)
def test_unusable_numpy_arrays(array: np.ndarray[Any, Any], words: str) -> None:
    """Arrays of unsupported dtype, range or shape are refused with the reason."""
    assert words in reason_of(array)


def test_base64_text_and_data_uri(png_bytes: bytes) -> None:
    """Base64 text (plain, wrapped, URL-safe) and data URIs decode to the picture."""
    text = base64.b64encode(png_bytes).decode()
    wrapped = "\n".join(text[i : i + 76] for i in range(0, len(text), 76))
    urlsafe = base64.urlsafe_b64encode(png_bytes).decode().rstrip("=")
    expected = prepare(png_bytes, max_side=512, cache=None).data
    for source, desc in [
        (text, "<base64 text>"),
        (wrapped, "<base64 text>"),
        (urlsafe, "<base64 text>"),
        (f"data:image/png;base64,{text}", "<data URI>"),
    ]:
        prepared = prepare(source, max_side=512, cache=None)
        assert prepared.data == expected
        assert prepared.source == desc


def test_bad_data_uris() -> None:
    """A data URI with broken base64 or no data is refused as a data URI."""
    assert "not valid base64" in reason_of("data:image/png;base64,@@@@")
    assert "no comma" in reason_of("data:image/png;base64")
    assert "no data" in reason_of("data:image/png;base64,")


def test_pathlib_path(tmp_path: pathlib.Path, png_bytes: bytes) -> None:
    """An os.PathLike path is read and described by the path."""
    path = tmp_path / "pic.png"
    path.write_bytes(png_bytes)
    assert prepare(path, max_side=512, cache=None).source == str(path)


def test_unsupported_type_is_named() -> None:
    """An object of an unsupported type is refused with its type named."""
    with pytest.raises(ImageError, match="unsupported type int"):
        prepare(42, max_side=512)  # type: ignore[arg-type]


def test_bad_max_side() -> None:
    """max_side must be a positive integer."""
    for bad in (0, -5, 1.5, True):
        with pytest.raises(InvalidRequestError):
            prepare(b"x", max_side=bad)  # type: ignore[arg-type]


# --- http ----------------------------------------------------------------------------------


class PictureHandler(http.server.BaseHTTPRequestHandler):
    """Answers like a small, sometimes misbehaving web server."""

    picture = encoded(upright_picture(), "PNG")
    release = threading.Event()

    def do_GET(self) -> None:
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):
            self.answer()

    def answer(self) -> None:
        if self.path == "/pic.png":
            self.send(200, self.picture)
        elif self.path == "/page.jpg":
            self.send(200, b"<!DOCTYPE html><html><body>Not found</body></html>", "text/html")
        elif self.path == "/big-declared":
            self.send(200, b"\0" * 300_000)
        elif self.path == "/big-undeclared":
            self.send_response(200)
            self.end_headers()
            for _ in range(30):
                self.wfile.write(b"\0" * 10_000)
        elif self.path == "/stall":
            self.release.wait(10)
        elif self.path == "/trickle":
            self.send_response(200)
            self.end_headers()
            for _ in range(100):
                self.wfile.write(b"\0")
                self.wfile.flush()
                if self.release.wait(0.05):
                    break
        else:
            self.send(404, b"no such thing", "text/plain")

    def send(self, status: int, body: bytes, kind: str = "image/png") -> None:
        self.send_response(status)
        self.send_header("Content-Type", kind)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:
        """Keep test output quiet."""


@pytest.fixture
def server() -> Iterator[str]:
    """A real HTTP server on 127.0.0.1, its base URL."""
    PictureHandler.release.clear()
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), PictureHandler)
    httpd.daemon_threads = True
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    PictureHandler.release.set()
    httpd.shutdown()
    httpd.server_close()
    thread.join()


def test_http_url(server: str) -> None:
    """An http URL is downloaded and prepared, described by the URL."""
    prepared = prepare(f"{server}/pic.png", max_side=512, cache=None)
    assert prepared.source == f"{server}/pic.png"
    assert_upright(prepared)


def test_http_404(server: str) -> None:
    """A non-2xx answer is an ImageError carrying the status."""
    assert "HTTP 404" in reason_of(f"{server}/missing.png")


def test_http_html_page(server: str) -> None:
    """An HTML page at a .jpg URL is recognised as HTML."""
    assert "HTML page" in reason_of(f"{server}/page.jpg")


@pytest.mark.parametrize("route", ["/big-declared", "/big-undeclared"])
def test_http_too_big(server: str, route: str) -> None:
    """A body beyond max_bytes is refused, whether or not Content-Length says so."""
    with pytest.raises(ImageError, match="limit of 100000"):
        fetch_url(server + route, max_bytes=100_000)


def test_http_stalled_server_times_out(server: str) -> None:
    """A server that never answers is given up on after the timeout."""
    with pytest.raises(ImageError, match="timed out"):
        fetch_url(f"{server}/stall", timeout=0.3)


def test_http_trickling_server_hits_the_total_deadline(server: str) -> None:
    """A server sending a byte at a time, each within the timeout, still hits the deadline."""
    with pytest.raises(ImageError, match="took longer than"):
        fetch_url(f"{server}/trickle", timeout=0.5)


def test_http_connection_refused() -> None:
    """A URL nobody listens on is an ImageError, not an httpx exception."""
    with socket_bound() as port:
        assert "download failed" in reason_of(f"http://127.0.0.1:{port}/pic.png")


@contextlib.contextmanager
def socket_bound() -> Iterator[int]:
    """A port that is bound but not listening, so connecting to it is refused."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        yield int(sock.getsockname()[1])


@pytest.mark.parametrize(
    "url", ["ftp://example.com/a.png", "file:///etc/passwd", "s3://bucket/key.jpg"]
)
def test_other_url_schemes_are_refused(url: str) -> None:
    """Only http(s) URLs are fetched; other schemes are refused without any I/O."""
    reason = reason_of(url)
    assert "URLs are not supported" in reason
    assert "http(s)" in reason
    with pytest.raises(ImageError, match="only http"):
        fetch_url(url)


# --- broken input --------------------------------------------------------------------------


def test_empty_file(tmp_path: pathlib.Path) -> None:
    """An empty file is refused as empty."""
    path = tmp_path / "empty.jpg"
    path.write_bytes(b"")
    assert reason_of(path) == "empty file"
    assert "0 bytes" in reason_of(b"")


def test_random_bytes(tmp_path: pathlib.Path) -> None:
    """Random bytes are refused as not a picture."""
    path = tmp_path / "noise.jpg"
    path.write_bytes(random.Random(0).randbytes(4096))
    assert reason_of(path).startswith("not a picture")


@pytest.mark.parametrize("fmt", ["JPEG", "PNG"])
def test_truncated_file(tmp_path: pathlib.Path, fmt: str) -> None:
    """A file cut off half way is reported as truncated or corrupt, naming its format."""
    data = encoded(noisy_picture(300, 300), fmt)
    path = tmp_path / "cut"
    path.write_bytes(data[: len(data) // 2])
    reason = reason_of(path)
    assert reason.startswith(f"truncated or corrupt {fmt}")


def test_corrupt_header(tmp_path: pathlib.Path) -> None:
    """A file with a picture signature but a garbled header is called corrupt."""
    path = tmp_path / "bad.png"
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + b"\xff" * 40)
    assert "corrupt PNG" in reason_of(path)


@pytest.mark.parametrize(
    ("content", "words"),
    [
        (b"<!DOCTYPE html>\n<html><head><title>404</title></head></html>", "HTML page"),
        (b'<?xml version="1.0"?>\n<svg xmlns="http://www.w3.org/2000/svg"/>', "SVG"),
        (b"\x00\x00\x00\x18ftypheic\x00\x00\x00\x00mif1heic", "HEIC"),
        (b"%PDF-1.7\n%\xe2\xe3\xcf\xd3\n", "PDF"),
        (b"just some notes\n", "text"),
    ],
    ids=["html", "svg", "heic", "pdf", "text"],
)
def test_not_a_picture_says_what_it_is(tmp_path: pathlib.Path, content: bytes, words: str) -> None:
    """HTML, SVG, HEIC, PDF and text saved as .jpg are refused with what they look like."""
    path = tmp_path / "photo.jpg"
    path.write_bytes(content)
    assert words in reason_of(path)


def test_decompression_bomb_far_over_the_limit(tmp_path: pathlib.Path) -> None:
    """A tiny PNG declaring 60000x60000 pixels is refused without being decoded."""
    path = tmp_path / "bomb.png"
    path.write_bytes(png_header_only(60000, 60000))
    assert path.stat().st_size < 100
    assert reason_of(path).startswith("decompression bomb")


def test_decompression_bomb_just_over_the_limit() -> None:
    """A picture past Pillow's warning threshold is refused (the warning never escapes)."""
    assert reason_of(png_header_only(12000, 10000)).startswith("decompression bomb")


def test_max_pixels_is_configurable(monkeypatch: pytest.MonkeyPatch) -> None:
    """Lowering MAX_PIXELS refuses pictures above it, naming size and limit."""
    monkeypatch.setattr(images, "MAX_PIXELS", 1000)
    reason = reason_of(encoded(upright_picture(), "PNG"))
    assert reason == (
        "decompression bomb: 60x40 pixels is more than the limit of 1000; shrink the picture first"
    )


def test_missing_path() -> None:
    """A path that does not exist is refused as 'no such file', naming the path."""
    with pytest.raises(ImageError) as caught:
        prepare("/no/such/dir/photo.jpg", max_side=512)
    assert caught.value.source == "/no/such/dir/photo.jpg"
    assert caught.value.reason == "no such file"
    assert isinstance(caught.value, ValueError)


def test_missing_pathlike(tmp_path: pathlib.Path) -> None:
    """A missing os.PathLike path is refused the same way."""
    assert reason_of(tmp_path / "gone.png") == "no such file"


def test_empty_string() -> None:
    """An empty or blank string is refused as neither a path nor data."""
    assert "empty string" in reason_of("  ")


def test_home_directory_is_expanded(
    tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch, png_bytes: bytes
) -> None:
    """A path starting with ~ is looked up in the home directory and described as given."""
    monkeypatch.setenv("HOME", str(tmp_path))
    (tmp_path / "pic.png").write_bytes(png_bytes)
    assert prepare("~/pic.png", max_side=512, cache=None).source == "~/pic.png"


def test_directory(tmp_path: pathlib.Path) -> None:
    """A directory is refused as a directory, as a str or a Path."""
    assert reason_of(str(tmp_path)) == "is a directory"
    assert reason_of(tmp_path) == "is a directory"


def test_errors_are_chained(tmp_path: pathlib.Path) -> None:
    """The underlying Pillow error stays visible as the cause."""
    path = tmp_path / "cut.jpg"
    data = encoded(noisy_picture(100, 100), "JPEG")
    path.write_bytes(data[:600])
    with pytest.raises(ImageError) as caught:
        prepare(path, max_side=64, cache=None)
    assert caught.value.__cause__ is not None


# --- size, determinism, cache --------------------------------------------------------------


def test_max_side_is_respected_and_small_pictures_are_not_enlarged() -> None:
    """Pictures larger than max_side shrink to it; smaller ones keep their size."""
    img = upright_picture(300, 200)
    shrunk = prepare(img, max_side=150, cache=None)
    kept = prepare(img, max_side=1000, cache=None)
    assert (shrunk.width, shrunk.height) == (150, 100)
    assert shrunk.changes == ("shrunk 300x200 -> 150x100",)
    assert (kept.width, kept.height) == (300, 200)
    assert kept.changes == ()


def test_deterministic_output(big_jpeg: pathlib.Path) -> None:
    """The same input prepared twice without a cache gives byte-identical output."""
    first = prepare(big_jpeg, max_side=672, cache=None)
    second = prepare(big_jpeg, max_side=672, cache=None)
    assert first.data == second.data
    assert first == second


def test_sha256_is_of_the_data(png_bytes: bytes) -> None:
    """PreparedImage.sha256 is the hash of its data."""
    import hashlib

    prepared = prepare(png_bytes, max_side=512, cache=None)
    assert prepared.sha256 == hashlib.sha256(prepared.data).hexdigest()


def test_cache_hit_returns_the_same_object(tmp_path: pathlib.Path, png_bytes: bytes) -> None:
    """Preparing the same picture again returns the identical cached PreparedImage."""
    cache = ImageCache()
    path = tmp_path / "a.png"
    path.write_bytes(png_bytes)
    first = prepare(path, max_side=512, cache=cache)
    assert prepare(path, max_side=512, cache=cache) is first
    assert len(cache) == 1


def test_cache_relabels_the_same_content_from_elsewhere(
    tmp_path: pathlib.Path, png_bytes: bytes
) -> None:
    """The same bytes from another source reuse the prepared data but keep their own label."""
    cache = ImageCache()
    path = tmp_path / "a.png"
    path.write_bytes(png_bytes)
    first = prepare(path, max_side=512, cache=cache)
    again = prepare(png_bytes, max_side=512, cache=cache)
    assert again.data is first.data
    assert again.source == f"<bytes, {len(png_bytes)} B>"


def test_cache_keys_on_max_side(png_bytes: bytes) -> None:
    """A different max_side is a different cache entry."""
    cache = ImageCache()
    assert prepare(png_bytes, max_side=30, cache=cache).width == 30
    assert prepare(png_bytes, max_side=512, cache=cache).width == 60
    assert len(cache) == 2


def test_cache_keys_pil_images_by_pixels() -> None:
    """Equal PIL images hit the cache; a changed pixel or palette does not."""
    cache = ImageCache()
    first = prepare(upright_picture(), max_side=512, cache=cache)
    assert prepare(upright_picture(), max_side=512, cache=cache) is first
    changed = upright_picture()
    changed.putpixel((50, 30), (0, 0, 0))
    assert prepare(changed, max_side=512, cache=cache) is not first
    one = Image.new("P", (4, 4), 0)
    one.putpalette([255, 0, 0] * 256)
    other = Image.new("P", (4, 4), 0)
    other.putpalette([0, 0, 255] * 256)
    assert (
        prepare(one, max_side=8, cache=cache).data != prepare(other, max_side=8, cache=cache).data
    )


def test_cache_evicts_least_recently_used() -> None:
    """The cache stays within max_bytes, dropping the least recently used entry first."""
    pictures = [prepare(noisy_picture(50, 50, seed), max_side=64, cache=None) for seed in range(3)]
    size = len(pictures[0].data)
    cache = ImageCache(max_bytes=2 * size + size // 2)
    cache.put("a", pictures[0])
    cache.put("b", pictures[1])
    assert cache.get("a") is pictures[0]
    cache.put("c", pictures[2])
    assert cache.get("b") is None
    assert cache.get("a") is pictures[0]
    assert cache.get("c") is pictures[2]
    assert cache.nbytes <= cache.max_bytes
    cache.clear()
    assert len(cache) == 0
    assert cache.nbytes == 0


def test_cache_skips_entries_larger_than_itself() -> None:
    """A picture bigger than the whole cache is not stored."""
    cache = ImageCache(max_bytes=10)
    cache.put("x", prepare(upright_picture(), max_side=64, cache=None))
    assert len(cache) == 0


def test_concurrent_prepares_agree(big_jpeg: pathlib.Path) -> None:
    """Threads preparing the same pictures at once all get the same bytes."""
    cache = ImageCache()
    results: list[bytes] = []
    errors: list[BaseException] = []

    def work() -> None:
        try:
            for max_side in (256, 512):
                results.append(prepare(big_jpeg, max_side=max_side, cache=cache).data)
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=work) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors
    assert len(set(results)) == 2
    assert len(cache) == 2


# --- properties ----------------------------------------------------------------------------

arrays = st.one_of(
    hnp.arrays(np.uint8, hnp.array_shapes(min_dims=2, max_dims=2, min_side=1, max_side=40)),
    hnp.arrays(
        np.uint8,
        st.tuples(st.integers(1, 40), st.integers(1, 40), st.sampled_from([1, 3, 4])),
    ),
)


@settings(max_examples=60, deadline=None)
@given(array=arrays, max_side=st.integers(1, 64))
def test_any_array_becomes_bounded_rgb(array: np.ndarray[Any, Any], max_side: int) -> None:
    """Any small uint8 array comes out RGB, within max_side and never enlarged."""
    prepared = prepare(array, max_side=max_side, cache=None)
    img = decoded(prepared)
    height, width = array.shape[:2]
    assert img.mode == "RGB"
    assert img.size == (prepared.width, prepared.height)
    assert max(img.size) <= max_side
    assert max(img.size) == min(max_side, max(width, height))
    assert min(img.size) >= 1


MODES = ["1", "L", "P", "RGB", "RGBA", "LA", "PA", "CMYK", "I;16", "I", "F", "YCbCr", "HSV"]


@settings(max_examples=80, deadline=None)
@given(
    mode=st.sampled_from(MODES),
    width=st.integers(1, 30),
    height=st.integers(1, 30),
    seed=st.integers(0, 2**32 - 1),
    max_side=st.integers(1, 40),
)
def test_any_mode_becomes_bounded_rgb(
    mode: str, width: int, height: int, seed: int, max_side: int
) -> None:
    """A picture in any Pillow mode, with random pixels, comes out RGB within max_side."""
    noise = random.Random(seed).randbytes(width * height * 8)
    size = len(Image.new(mode, (width, height)).tobytes())
    img = Image.frombytes(mode, (width, height), noise[:size])
    prepared = prepare(img, max_side=max_side, cache=None)
    out = decoded(prepared)
    assert out.mode == "RGB"
    assert max(out.size) <= max_side


@pytest.mark.parametrize("fmt", ["PNG", "JPEG", "GIF", "WEBP", "TIFF", "BMP"])
@settings(
    max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(cut=st.integers(0, 2000), noise=st.binary(min_size=0, max_size=64), at=st.integers(0, 2000))
def test_damaged_files_only_raise_image_error(fmt: str, cut: int, noise: bytes, at: int) -> None:
    """Real files cut short and overwritten with junk either prepare or raise ImageError."""
    data = bytearray(encoded(upright_picture(), fmt))
    data[at : at + len(noise)] = noise
    damaged = bytes(data[: max(1, len(data) - cut)])
    try:
        prepared = prepare(damaged, max_side=64, cache=None)
    except ImageError:
        return
    assert decoded(prepared).mode == "RGB"


@settings(max_examples=100, deadline=None)
@given(data=st.binary(min_size=1, max_size=512))
def test_random_bytes_only_raise_image_error(data: bytes) -> None:
    """Arbitrary bytes either prepare or raise ImageError, never another exception."""
    with contextlib.suppress(ImageError):
        prepare(data, max_side=64, cache=None)


def test_prepared_image_passes_through_or_is_shrunk() -> None:
    """A PreparedImage is used as it is when small enough, else prepared again smaller."""
    arr = np.zeros((40, 80, 3), dtype=np.uint8)
    arr[:, :40] = 255
    first = prepare(arr, max_side=80, cache=None)
    assert prepare(first, max_side=100, cache=None) is first
    smaller = prepare(first, max_side=20, cache=None)
    assert (smaller.width, smaller.height) == (20, 10)
