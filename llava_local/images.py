"""Load pictures from whatever the caller has and prepare them once for a vision model.

Real-world pictures trip local vision models up in ways that are hard to see: a phone
photo arrives sideways because its EXIF orientation is ignored; a transparent PNG of dark
text becomes a black square because the alpha channel is dropped; a 12 MP upload is
decoded at full size on a Raspberry Pi only to be shrunk to a few hundred pixels; CMYK and
16-bit files come out in wrong colours; an HTML page saved as ``.jpg`` fails deep inside the
engine with a message nobody can act on. :func:`prepare` deals with all of these in one
pass and says what it did in ``PreparedImage.changes``:

1. resolve the source: path, http(s) URL, data URI, base64 text, bytes, binary file,
   PIL image or numpy array;
2. open it with Pillow, refusing decompression bombs before any pixel is decoded;
3. take the first frame of an animation;
4. decode a JPEG much larger than needed at a reduced scale (``Image.draft``);
5. turn it upright by its EXIF orientation;
6. make it RGB: transparency composited onto white, CMYK and 16-bit converted properly;
7. shrink it so the longest side is at most ``max_side`` (never enlarge);
8. encode it once, deterministically: PNG for small or flat pictures, JPEG otherwise.

Results are cached by content, so a picture sent again costs nothing and comes back
byte-identical, which lets engines recognise it by ``sha256``. Every failure is an
:class:`~llava_local.errors.ImageError` naming the source and the reason.

Pictures are prepared one at a time (a lock around the Pillow work), which also bounds
peak memory; it takes milliseconds to a second, next to a model's seconds per picture.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import hashlib
import io
import math
import os
import re
import struct
import threading
import time
import urllib.parse
import warnings
import zlib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, BinaryIO, Literal

import httpx
import numpy as np
from PIL import Image, ImageMode, ImageOps, JpegImagePlugin, UnidentifiedImageError

from llava_local.errors import ImageError, InvalidRequestError
from llava_local.lru import ByteLRU
from llava_local.types import PreparedImage

__all__ = [
    "DEFAULT_CACHE",
    "MAX_DECODED_BYTES",
    "MAX_FILE_BYTES",
    "MAX_PIXELS",
    "PICTURE_EXTENSIONS",
    "ImageCache",
    "ImageSource",
    "decode_base64",
    "decode_data_uri",
    "fetch_url",
    "looks_like_picture_path",
    "prepare",
    "read_source",
]

ImageSource = (
    str
    | os.PathLike[str]
    | bytes
    | bytearray
    | memoryview
    | BinaryIO
    | Image.Image
    | np.ndarray[Any, Any]
    | PreparedImage
)
"""Everything :func:`prepare` accepts."""

MAX_PIXELS = 100_000_000
"""Pictures declaring more pixels are refused unread. Pillow's own ``Image.MAX_IMAGE_PIXELS``
(about 89 MP) applies too; the lower of the two wins."""

MAX_DECODED_BYTES = 256 * 2**20
"""Pictures whose pixels would take more than this once decoded are refused unread: pixels
times the bytes a pixel of the file's mode takes (3 for RGB, 4 for 32-bit float grey, 2 for
16-bit grey), after JPEG's reduced-scale decoding. A few hundred KB of compressed float
TIFF can otherwise ask for gigabytes. 256 MiB lets through every 8-bit RGB picture under
Pillow's pixel limit."""

MAX_FILE_BYTES = 256 * 2**20
"""Files and file objects larger than this are refused instead of read into memory."""

PNG_MAX_PIXELS = 256 * 256
"""Pictures up to this many pixels are encoded as lossless PNG whatever their content."""

JPEG_QUALITY = 90

_ORIENTATION_TAG = 0x0112
_SCHEME = re.compile(r"^([a-zA-Z][a-zA-Z0-9+.\-]*)://")
_HIGH_DEPTH = {"I;16", "I;16L", "I;16B", "I;16N", "I", "F"}
_ALPHA_MODES = {"LA", "La", "PA", "RGBA", "RGBa"}
_SIGNATURES = (
    (b"\xff\xd8\xff", "JPEG"),
    (b"\x89PNG\r\n\x1a\n", "PNG"),
    (b"GIF87a", "GIF"),
    (b"GIF89a", "GIF"),
    (b"II*\x00", "TIFF"),
    (b"MM\x00*", "TIFF"),
    (b"\x00\x00\x01\x00", "ICO"),
    (b"BM", "BMP"),
)
_HEIF_BRANDS = {b"heic", b"heix", b"hevc", b"hevx", b"heim", b"heis", b"mif1", b"msf1"}

# Pillow reports a picture between MAX_IMAGE_PIXELS and twice that with a warning (during
# open, seek or load) and damaged metadata with UserWarnings. Warning filters are
# process-global and ``catch_warnings`` is not thread-safe, so all Pillow work runs under
# this lock inside one filter (see _pillow_guard): one picture is prepared at a time.
_PILLOW_LOCK = threading.Lock()


def _data_size(image: PreparedImage) -> int:
    return len(image.data)


class ImageCache(ByteLRU[str, PreparedImage]):
    """A thread-safe LRU of prepared pictures, bounded by the total size of their data."""

    def __init__(self, max_bytes: int = 64 * 2**20) -> None:
        super().__init__(max_bytes, _data_size)


DEFAULT_CACHE = ImageCache()


def prepare(
    source: ImageSource, *, max_side: int, cache: ImageCache | None = DEFAULT_CACHE
) -> PreparedImage:
    """Load ``source`` and return it upright, RGB, at most ``max_side`` px, encoded once.

    Strings are data URIs, http(s) URLs, paths, or else base64 text of a picture. PIL
    images are used at their current frame; numpy arrays must be HxW, HxWx3 or HxWx4 of
    uint8, bool, or float within [0, 1]. The same content with the same ``max_side``
    comes back from ``cache`` byte-identical (pass ``cache=None`` to skip it).
    """
    if isinstance(max_side, bool) or not isinstance(max_side, int) or max_side < 1:
        raise InvalidRequestError(f"max_side must be a positive integer, not {max_side!r}")
    if isinstance(source, PreparedImage):  # prepared ahead (e.g. by a prefetch thread)
        if max(source.width, source.height) <= max_side:
            return source
        return _cached(
            cache,
            f"{source.sha256}/{max_side}",
            source.source,
            lambda: _prepare_bytes(source.data, source.source, max_side),
        )
    if isinstance(source, Image.Image):
        desc = f"<PIL.Image {source.mode} {source.width}x{source.height}>"
        return _prepare_pil(source, desc, max_side, cache, owned=False)
    if isinstance(source, np.ndarray):
        desc = f"<numpy array {'x'.join(map(str, source.shape))}>"
        return _prepare_pil(_array_to_image(source, desc), desc, max_side, cache, owned=True)
    data, desc = _read_source(source)
    key = f"{hashlib.sha256(data).hexdigest()}/{max_side}"
    return _cached(cache, key, desc, lambda: _prepare_bytes(data, desc, max_side))


#: File name extensions (lower case, no dot) of pictures: what folders and globs are
#: searched for, and what names a picture on the command line.
PICTURE_EXTENSIONS = frozenset(
    {"jpg", "jpeg", "png", "webp", "gif", "bmp", "tif", "tiff", "ico", "heic", "heif", "avif"}
)


def looks_like_picture_path(text: str) -> bool:
    """True for a string that names a picture: an existing file, an http(s) URL, a data
    URI, or a path with a picture suffix. For telling a swapped picture and question
    apart on the command line, not for reading."""
    if text.startswith(("http://", "https://", "data:image/")) or text == "-":
        return True
    if "\n" in text or len(text) > 4096:
        return False
    try:
        if Path(text).expanduser().is_file():
            return True
    except (OSError, ValueError):
        return False
    name = Path(text).name
    return Path(name).suffix[1:].lower() in PICTURE_EXTENSIONS and " " not in name


def fetch_url(url: str, *, max_bytes: int = 20 * 2**20, timeout: float = 15.0) -> bytes:
    """Download an http(s) URL's body, refusing more than ``max_bytes``.

    ``timeout`` bounds each network wait and the whole download: the deadline is checked
    as each chunk arrives, so a server that trickles bytes is cut off too.
    """
    desc = _shorten(url)
    scheme = urllib.parse.urlsplit(url).scheme.lower()
    if scheme not in ("http", "https"):
        raise ImageError(desc, f"only http(s) URLs can be downloaded, not {scheme or 'this'}")
    deadline = time.monotonic() + timeout
    body = bytearray()
    try:
        with (
            httpx.Client(timeout=timeout, follow_redirects=True) as client,
            client.stream("GET", url, headers={"Accept": "image/*"}) as response,
        ):
            if not response.is_success:
                status = f"{response.status_code} {response.reason_phrase}".strip()
                raise ImageError(desc, f"the server answered HTTP {status}")
            declared = response.headers.get("content-length", "")
            if declared.isdigit() and int(declared) > max_bytes:
                raise ImageError(desc, f"{declared} bytes is more than the limit of {max_bytes}")
            for chunk in response.iter_bytes():
                body += chunk
                if len(body) > max_bytes:
                    raise ImageError(desc, f"more than the limit of {max_bytes} bytes")
                if time.monotonic() > deadline:
                    raise ImageError(desc, f"download took longer than {timeout:g} s")
    except httpx.TimeoutException as exc:
        raise ImageError(desc, f"timed out after {timeout:g} s") from exc
    except (httpx.HTTPError, httpx.InvalidURL) as exc:
        raise ImageError(desc, f"download failed: {exc}") from exc
    return bytes(body)


# --- resolving the source into bytes -------------------------------------------------------


def read_source(source: ImageSource) -> tuple[bytes, str]:
    """The bytes of a path, http(s) URL, data URI, base64 text, bytes or binary file, and
    a short description of it for messages: what :func:`prepare` reads before decoding.
    For reading a picture before anything else happens (the command line reads ``ask``'s
    before it chooses and loads an engine); PIL images and arrays are refused."""
    return _read_source(source)


def _read_source(source: object) -> tuple[bytes, str]:
    """The bytes of a non-pixel source and a short description of it."""
    if isinstance(source, (bytes, bytearray, memoryview)):
        data = source.tobytes() if isinstance(source, memoryview) else bytes(source)
        desc = f"<bytes, {len(data)} B>"
        if not data:
            raise ImageError(desc, "no data (0 bytes)")
        return data, desc
    if isinstance(source, str):
        return _read_text(source)
    if isinstance(source, os.PathLike):
        path = os.fsdecode(os.fspath(source))
        return _read_path(path), path
    if hasattr(source, "read"):
        return _read_stream(source)
    kind = type(source).__qualname__
    raise ImageError(
        f"<{kind}>",
        f"unsupported type {kind}; pass a path, an http(s) URL, bytes, a binary file, "
        "a PIL image or a numpy array",
    )


def _read_text(text: str) -> tuple[bytes, str]:
    """Resolve a string: data URI, URL, path, or base64 text of a picture."""
    stripped = text.strip()
    if not stripped:
        raise ImageError(repr(text), "an empty string is neither a path nor picture data")
    if stripped[:5].lower() == "data:":
        return decode_data_uri(stripped), "<data URI>"
    match = _SCHEME.match(stripped)
    if match:
        scheme = match.group(1).lower()
        if scheme in ("http", "https"):
            return fetch_url(stripped), _shorten(stripped)
        raise ImageError(
            _shorten(stripped),
            f"{scheme}:// URLs are not supported; pass an http(s) URL, a path, bytes, "
            "a binary file, a PIL image or a numpy array",
        )
    path = os.path.expanduser(text)
    if os.path.lexists(path):
        return _read_path(path), text
    decoded = decode_base64(stripped) if len(stripped) >= 16 else None
    if decoded is not None and _sniff(decoded) is not None:
        return decoded, "<base64 text>"
    raise ImageError(_shorten(text), "no such file")


def _read_path(path: str) -> bytes:
    """The contents of a file, with errors that say what is wrong with the path."""
    if os.path.isdir(path):
        raise ImageError(path, "is a directory")
    try:
        with open(path, "rb") as file:
            data = file.read(MAX_FILE_BYTES + 1)
    except FileNotFoundError as exc:
        raise ImageError(path, "no such file") from exc
    except PermissionError as exc:
        raise ImageError(path, "permission denied") from exc
    except OSError as exc:
        raise ImageError(path, f"cannot read it: {exc.strerror or exc}") from exc
    if not data:
        raise ImageError(path, "empty file")
    if len(data) > MAX_FILE_BYTES:
        raise ImageError(path, f"larger than the limit of {MAX_FILE_BYTES} bytes")
    return data


def _read_stream(stream: Any) -> tuple[bytes, str]:
    """Read a binary file object from its start, as Pillow would."""
    name = getattr(stream, "name", None)
    desc = name if isinstance(name, str) else f"<{type(stream).__name__}>"
    if isinstance(stream, io.TextIOBase):
        raise ImageError(desc, "the file is open in text mode; open it with 'rb'")
    try:
        if getattr(stream, "seekable", lambda: False)():
            stream.seek(0)
        data: object = stream.read(MAX_FILE_BYTES + 1)
    except (OSError, ValueError) as exc:
        raise ImageError(desc, f"cannot read it: {exc}") from exc
    if isinstance(data, str):
        raise ImageError(desc, "the file is open in text mode; open it with 'rb'")
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise ImageError(desc, f"read() returned {type(data).__name__}, not bytes")
    if not data:
        raise ImageError(desc, "empty file")
    if len(data) > MAX_FILE_BYTES:
        raise ImageError(desc, f"larger than the limit of {MAX_FILE_BYTES} bytes")
    return bytes(data), desc


def decode_data_uri(uri: str) -> bytes:
    """The payload of a ``data:`` URI (base64 or percent-encoded)."""
    header, comma, payload = uri.partition(",")
    if not comma:
        raise ImageError("<data URI>", "no comma between the header and the data")
    if header.lower().endswith(";base64"):
        data = decode_base64(payload)
        if data is None:
            raise ImageError("<data URI>", "the payload is not valid base64")
    else:
        data = urllib.parse.unquote_to_bytes(payload)
    if not data:
        raise ImageError("<data URI>", "no data (0 bytes)")
    return data


def decode_base64(text: str) -> bytes | None:
    """Decode standard or URL-safe base64, tolerating whitespace and missing padding."""
    compact = "".join(text.split()).replace("-", "+").replace("_", "/")
    compact += "=" * (-len(compact) % 4)
    try:
        return base64.b64decode(compact, validate=True)
    except (binascii.Error, ValueError):
        return None


def _shorten(text: str, limit: int = 200) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."


# --- recognising what the bytes are --------------------------------------------------------


def _sniff(data: bytes) -> str | None:
    """The picture format the first bytes announce, if any."""
    for magic, name in _SIGNATURES:
        if data.startswith(magic):
            return name
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "WebP"
    if data[4:8] == b"ftyp":
        return "HEIF" if data[8:12] in _HEIF_BRANDS else "ISO media"
    return None


def _not_a_picture(data: bytes) -> str:
    """Why Pillow could not identify ``data``, as specifically as the bytes allow."""
    head = data[:1024].lstrip().lower()
    fmt = _sniff(data)
    if fmt == "HEIF":
        return "HEIC/HEIF photos cannot be read (Pillow lacks the codec); convert it to JPEG"
    if fmt == "ISO media":
        return "not a picture (looks like an MP4/MOV video or AVIF, which cannot be read)"
    if fmt is not None:
        return f"corrupt {fmt}: the header cannot be read"
    if head.startswith((b"<!doctype html", b"<html")) or b"<html" in head:
        return "not a picture (looks like an HTML page)"
    if b"<svg" in data[:4096].lower():
        return "SVG is a vector drawing, not a picture; convert it to PNG first"
    if head.startswith(b"<?xml"):
        return "not a picture (looks like XML)"
    if head.startswith(b"%pdf"):
        return "not a picture (a PDF document)"
    if head.startswith((b"{", b"[")):
        return "not a picture (looks like JSON)"
    if all(32 <= byte < 127 or byte in b"\t\r\n" for byte in data[:1024]):
        return "not a picture (looks like text)"
    return f"not a picture in a format Pillow can read (starts with {data[:8].hex(' ')})"


# --- preparation ---------------------------------------------------------------------------


def _cached(
    cache: ImageCache | None, key: str, desc: str, make: Callable[[], PreparedImage]
) -> PreparedImage:
    """Return the cached result for ``key`` (relabelled with ``desc``), or make and store it."""
    if cache is not None:
        hit = cache.get(key)
        if hit is not None:
            return hit if hit.source == desc else hit.model_copy(update={"source": desc})
    prepared = make()
    if cache is not None:
        cache.put(key, prepared)
    return prepared


@contextlib.contextmanager
def _pillow_guard() -> Iterator[None]:
    """Serialise Pillow work; bomb warnings become errors, metadata grumbles are dropped."""
    with _PILLOW_LOCK, warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=UserWarning, module="PIL")
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        yield


def _prepare_bytes(data: bytes, desc: str, max_side: int) -> PreparedImage:
    changes: list[str] = []
    with _pillow_guard():
        img, full_size = _decode(data, desc, max_side, changes)
        with _translated(desc, img.format):
            img = _to_rgb(img, changes)
            img = _shrink(img, full_size, max_side, changes)
            return _encode(img, desc, changes)


def _prepare_pil(
    image: Image.Image,
    desc: str,
    max_side: int,
    cache: ImageCache | None,
    *,
    owned: bool,
) -> PreparedImage:
    """Prepare an in-memory image; never modifies it unless ``owned``."""
    with _pillow_guard(), _translated(desc, image.format):
        key = f"{_pixels_key(image)}/{max_side}"

    def make() -> PreparedImage:
        changes: list[str] = []
        with _pillow_guard(), _translated(desc, image.format):
            img = _upright(image, changes)
            img = _to_rgb(img, changes)
            img = _shrink(img, img.size, max_side, changes)
            if img is image and not owned:
                img = image.copy()
            return _encode(img, desc, changes)

    return _cached(cache, key, desc, make)


def _pixels_key(img: Image.Image) -> str:
    """A content hash for an in-memory image: everything preparation looks at."""
    digest = hashlib.sha256()
    transparency = img.info.get("transparency")
    header = f"{img.mode} {img.size} {_orientation(img)} {transparency!r}"
    digest.update(header.encode())
    if img.mode in ("P", "PA"):
        digest.update(bytes(img.getpalette() or []))
    digest.update(img.tobytes())
    return digest.hexdigest()


def _array_to_image(array: np.ndarray[Any, Any], desc: str) -> Image.Image:
    """Wrap an HxW / HxWx1 / HxWx3 / HxWx4 array; bool and [0, 1] floats are scaled."""
    if array.ndim == 3 and array.shape[2] == 1:
        array = array[:, :, 0]
    if not (array.ndim == 2 or (array.ndim == 3 and array.shape[2] in (3, 4))):
        raise ImageError(desc, "the shape must be HxW, HxWx3 (RGB) or HxWx4 (RGBA)")
    if array.shape[0] == 0 or array.shape[1] == 0:
        raise ImageError(desc, "the array is empty")
    if array.dtype == np.bool_:
        array = array.astype(np.uint8) * 255
    elif array.dtype.kind == "f":
        if not np.isfinite(array).all() or array.min() < 0 or array.max() > 1:
            raise ImageError(desc, "float arrays must hold values within [0, 1]")
        array = np.rint(array * 255).astype(np.uint8)
    elif array.dtype != np.uint8:
        raise ImageError(
            desc,
            f"dtype {array.dtype} is not supported; use uint8 (0-255), bool or float in [0, 1]",
        )
    return Image.fromarray(np.ascontiguousarray(array))


def _decode(
    data: bytes, desc: str, max_side: int, changes: list[str]
) -> tuple[Image.Image, tuple[int, int]]:
    """Open, check the size, take frame 0, draft-decode and turn upright.

    Returns the decoded image and its upright size before any draft reduction.
    """
    img = _open_checked(data, desc)
    with _translated(desc, img.format):
        frames = int(getattr(img, "n_frames", 1))
        if frames > 1:
            img.seek(0)
            changes.append(f"first frame of {frames}")
        declared = img.size
        if isinstance(img, JpegImagePlugin.JpegImageFile):
            _draft(img, max_side)
        drafted = img.size != declared
        _check_decoded_bytes(img, desc)  # what load() will allocate, after the draft
        img.load()
        upright = _upright(img, changes)
        if not drafted:
            return upright, upright.size
        width, height = declared
        if _orientation(img) in (5, 6, 7, 8):
            width, height = height, width
        return upright, (width, height)


def _open_checked(data: bytes, desc: str) -> Image.Image:
    """Open ``data`` (its header only) and refuse it if its pixels are too many."""
    with _translated(desc, _sniff(data)):
        try:
            img = Image.open(io.BytesIO(data))
        except UnidentifiedImageError as exc:
            raise ImageError(desc, _not_a_picture(data)) from exc
    with _translated(desc, img.format):
        _check_pixels(img, desc)
    return img


def check_encoded(data: bytes, desc: str, *, mime: str, width: int, height: int) -> None:
    """Check picture bytes that were prepared elsewhere (a saved conversation) as any
    picture is checked, before an engine decodes them: a PNG or JPEG as ``mime`` says,
    of the stated size, within the pixel and decoded-size limits, that decodes whole,
    and (PNG) whose compressed data does not inflate beyond its pixels: engines decode
    these bytes with their own decoders, which trust the file more than Pillow does."""
    with _pillow_guard():
        img = _open_checked(data, desc)
        with _translated(desc, img.format):
            found = {"PNG": "image/png", "JPEG": "image/jpeg"}.get(str(img.format))
            if found != mime:
                raise ImageError(desc, f"it is {img.format or 'not a picture'}, not {mime}")
            if img.size != (width, height):
                raise ImageError(
                    desc, f"it is {img.width}x{img.height} pixels, not the {width}x{height} stated"
                )
            _check_decoded_bytes(img, desc)
            if found == "image/png":
                _check_png_stream(data, desc)
            img.load()


def _decoded_bytes(img: Image.Image) -> int:
    """What the picture's pixels take in memory once decoded, in its own mode."""
    try:
        mode = ImageMode.getmode(img.mode)
        per_pixel = len(mode.bands) * np.dtype(mode.typestr).itemsize
    except (KeyError, TypeError):
        per_pixel = 4  # a mode Pillow does not describe: count it as the widest common one
    return img.width * img.height * per_pixel


_MODE_WORDS = {
    "1": "1-bit",
    "L": "8-bit grey",
    "I;16": "16-bit grey",
    "I": "32-bit grey",
    "F": "32-bit floating-point grey",
    "RGB": "RGB",
    "RGBA": "RGBA",
    "CMYK": "CMYK",
}


def _check_decoded_bytes(img: Image.Image, desc: str) -> None:
    size = _decoded_bytes(img)
    if size <= MAX_DECODED_BYTES:
        return
    words = _MODE_WORDS.get("I;16" if img.mode.startswith("I;16") else img.mode, img.mode)
    side = math.floor(max(img.size) * math.sqrt(MAX_DECODED_BYTES / size))
    raise ImageError(
        desc,
        f"decompression bomb: {img.width}x{img.height} pixels of {words} would take "
        f"{size / 2**20:.0f} MiB once decoded, more than the limit of "
        f"{MAX_DECODED_BYTES / 2**20:.0f} MiB; shrink the picture (to at most {side} "
        "pixels on its longest side) or save it as 8-bit RGB first",
    )


#: Samples per pixel of each PNG colour type (grey, RGB, palette, grey+alpha, RGBA).
_PNG_SAMPLES = {0: 1, 2: 3, 3: 1, 4: 2, 6: 4}


def _check_png_stream(data: bytes, desc: str) -> None:
    """Refuse a PNG whose compressed pixel data inflates to more than its header's size
    needs: Pillow stops there, but other decoders (stb_image, in llama.cpp) inflate all
    of it first."""
    width, height, depth, colour, _, _, interlaced = struct.unpack(">IIBBBBB", data[16:29])
    row = 1 + math.ceil(width * _PNG_SAMPLES.get(colour, 4) * depth / 8)
    limit = height * row + (16 * height + 64 if interlaced else 0)
    inflater = zlib.decompressobj()
    out, pos = 0, 8
    while pos + 8 <= len(data):
        length, kind = struct.unpack(">I4s", data[pos : pos + 8])
        if kind == b"IDAT":
            try:
                out += len(inflater.decompress(data[pos + 8 : pos + 8 + length], limit + 1 - out))
            except zlib.error as exc:
                raise ImageError(desc, f"truncated or corrupt PNG: {exc}") from exc
            if out > limit or inflater.unconsumed_tail:
                raise ImageError(
                    desc,
                    f"decompression bomb: its compressed data inflates beyond its "
                    f"{width}x{height} pixels",
                )
        elif kind == b"IEND":
            break
        pos += 12 + length


@contextlib.contextmanager
def _translated(desc: str, fmt: str | None) -> Iterator[None]:
    """Turn whatever Pillow raises into ImageError (its exception types are many)."""
    try:
        yield
    except ImageError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        text = str(exc).split(", could be")[0]
        raise ImageError(
            desc, f"decompression bomb: {text[:1].lower()}{text[1:]}; shrink the picture first"
        ) from exc
    except MemoryError as exc:
        raise ImageError(desc, "not enough memory to decode it") from exc
    except Exception as exc:
        raise ImageError(desc, f"truncated or corrupt {fmt or 'picture'}: {exc}") from exc


def _check_pixels(img: Image.Image, desc: str) -> None:
    limit = min(MAX_PIXELS, Image.MAX_IMAGE_PIXELS or MAX_PIXELS)
    if img.width * img.height > limit:
        raise ImageError(
            desc,
            f"decompression bomb: {img.width}x{img.height} pixels is more than "
            f"the limit of {limit}; shrink the picture first",
        )


def _draft(img: Image.Image, max_side: int) -> None:
    """Let libjpeg decode at 1/2, 1/4 or 1/8 scale, never below the final size.

    The requested box is the final size in stored orientation; since the scale factor
    depends only on the longest side, a 90-degree EXIF rotation does not change it.
    """
    width, height = img.size
    if max(width, height) < 2 * max_side:
        return
    scale = max_side / max(width, height)
    img.draft("RGB", (math.ceil(width * scale), math.ceil(height * scale)))


def _orientation(img: Image.Image) -> int:
    """The EXIF orientation, 1 when absent or malformed."""
    try:
        value = int(img.getexif().get(_ORIENTATION_TAG, 1))
    except (TypeError, ValueError, SyntaxError, OSError):
        return 1
    return value if 1 <= value <= 8 else 1


def _upright(img: Image.Image, changes: list[str]) -> Image.Image:
    """Apply the EXIF orientation (a new image), or return ``img`` if it is already upright."""
    orientation = _orientation(img)
    if orientation == 1:
        return img
    verb = "rotated" if orientation in (3, 6, 8) else "flipped"
    changes.append(f"{verb} upright (EXIF orientation {orientation})")
    return ImageOps.exif_transpose(img)


def _to_rgb(img: Image.Image, changes: list[str]) -> Image.Image:
    """Convert any mode to RGB: alpha onto white, CMYK and deep greys scaled properly."""
    if img.mode in _HIGH_DEPTH:
        img = _to_8bit(img, changes)
    if img.mode == "CMYK":
        changes.append("converted CMYK to RGB")
        return img.convert("RGB")
    if "transparency" in img.info and img.mode in ("1", "L", "P", "RGB"):
        img = img.convert("RGBA")
    if img.mode in _ALPHA_MODES:
        return _onto_white(img, changes)
    return img if img.mode == "RGB" else img.convert("RGB")


#: Rows of a deep grey picture converted at a time: the conversion works in float64,
#: so a whole 60 MP float picture at once would take gigabytes; strips keep that small.
_STRIP_PIXELS = 1 << 20


def _strips(img: Image.Image) -> Iterator[tuple[int, np.ndarray[Any, Any]]]:
    """The picture's pixels as arrays of whole rows, about a million pixels each."""
    rows = max(1, _STRIP_PIXELS // max(1, img.width))
    for top in range(0, img.height, rows):
        box = (0, top, img.width, min(img.height, top + rows))
        yield top, np.asarray(img.crop(box))


def _to_8bit(img: Image.Image, changes: list[str]) -> Image.Image:
    """Scale 16-bit, 32-bit and float greys to 8 bits (``convert("L")`` would clip them),
    a strip of rows at a time: beside the picture only its 8-bit copy is held whole."""
    out = np.empty((img.height, img.width), dtype=np.uint8)
    if img.mode.startswith("I;16"):
        changes.append("scaled 16-bit grey to 8-bit")
        for top, strip in _strips(img):
            out[top : top + strip.shape[0]] = strip >> 8
        return Image.fromarray(out)
    low, high = math.inf, -math.inf
    for _, strip in _strips(img):
        with np.errstate(all="ignore"):  # NaNs (even signalling ones) are replaced below
            values = strip.astype(np.float64)
        finite = values[np.isfinite(values)]
        if finite.size:
            low, high = min(low, float(finite.min())), max(high, float(finite.max()))
    if low > high:  # no finite value at all
        low = high = 0.0
    for top, strip in _strips(img):
        with np.errstate(all="ignore"):
            values = strip.astype(np.float64)
        values = np.nan_to_num(values, nan=low, posinf=high, neginf=low)
        if img.mode == "F" and low >= 0 and high <= 1:
            values = values * 255
        elif img.mode == "I" and low >= 0 and 255 < high <= 65535:
            values = values / 257  # 16-bit data, as some decoders deliver it
        elif low < 0 or high > 255:
            values = (values - low) * (255 / ((high - low) or 1.0))
        out[top : top + strip.shape[0]] = np.rint(values).clip(0, 255).astype(np.uint8)
    kind = "floating-point" if img.mode == "F" else "32-bit"
    changes.append(f"scaled {kind} grey to 8-bit")
    return Image.fromarray(out)


def _onto_white(img: Image.Image, changes: list[str]) -> Image.Image:
    """Composite a picture with alpha onto white, so dark ink on clear stays dark on white."""
    rgba = img.convert("RGBA")
    if rgba.getchannel("A").getextrema()[0] == 255:
        return rgba.convert("RGB")
    background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
    background.alpha_composite(rgba)
    changes.append("transparency composited onto white")
    return background.convert("RGB")


def _shrink(
    img: Image.Image, full_size: tuple[int, int], max_side: int, changes: list[str]
) -> Image.Image:
    """Resize so the longest side is ``max_side`` (LANCZOS); smaller pictures are kept."""
    width, height = full_size
    if max(width, height) <= max_side:
        return img
    scale = max_side / max(width, height)
    target = (max(1, round(width * scale)), max(1, round(height * scale)))
    changes.append(f"shrunk {width}x{height} -> {target[0]}x{target[1]}")
    return img.resize(target, Image.Resampling.LANCZOS, reducing_gap=3.0)


def _encode(img: Image.Image, desc: str, changes: list[str]) -> PreparedImage:
    """Encode without metadata: PNG when small or flat (few colours), else JPEG."""
    img.info = {}
    buffer = io.BytesIO()
    mime: Literal["image/png", "image/jpeg"]
    if img.width * img.height <= PNG_MAX_PIXELS or img.getcolors(256) is not None:
        img.save(buffer, "PNG")
        mime = "image/png"
    else:
        img.save(buffer, "JPEG", quality=JPEG_QUALITY)
        mime = "image/jpeg"
    data = buffer.getvalue()
    return PreparedImage(
        data=data,
        mime=mime,
        width=img.width,
        height=img.height,
        sha256=hashlib.sha256(data).hexdigest(),
        source=desc,
        changes=tuple(changes),
    )
