"""The web page (``llava-local ui``) against pictures sent inside a call of its handlers
rather than uploaded: Gradio's picture box decodes a ``data:`` URL in full with Pillow
(and saves it again) and downloads an http(s) URL whole, before any handler or limit of
ours sees them, so a PNG of 20 KB declaring 13000x13000 pixels costs the page gigabytes.
The page's own picture box sends only the path of a file it uploaded; the page takes
nothing else, and reads an uploaded picture only through the engine's loader, whose
pixel limits refuse a bomb from its header. One page, started once in front of the
stand-in Ollama daemon; all traffic stays on 127.0.0.1."""

from __future__ import annotations

import base64
import io
import struct
import zlib
from collections.abc import Iterator
from pathlib import Path

import pytest
from PIL import Image

import llava_local.apps
from llava_local.apps.ui_uploads import NO_DATA_URL, NO_PICTURE_URL

from ..ollama_server import OllamaServer
from ..ui_process import (
    Served,
    call,
    call_error,
    finished,
    serve_page,
    stored,
    upload,
    uploaded,
)
from .sites import Site

MB = 2**20


@pytest.fixture(scope="module")
def page(ollama_daemon: OllamaServer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    """The page with the defaults, every tab starting on the stand-in daemon."""
    tmp = tmp_path_factory.mktemp("ui-pictures")
    with serve_page(tmp, "--backend", "ollama", "--host", ollama_daemon.host) as served:
        yield served


def bomb_png(side: int) -> bytes:
    """A black 1-bit PNG of ``side`` x ``side`` pixels, written without ever holding its
    pixels: its rows of zeros compress about a thousand times."""
    row = bytes(1 + (side + 7) // 8)  # the filter byte, then the row's bits
    packer = zlib.compressobj(9)
    pixels = b"".join(packer.compress(row) for _ in range(side)) + packer.flush()
    header = struct.pack(">IIBBBBB", side, side, 1, 0, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + _chunk(b"IHDR", header)
        + _chunk(b"IDAT", pixels)
        + _chunk(b"IEND", b"")
    )


def _chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))


def peak_memory(page: Served) -> int:
    """The most memory the page's process has held so far (VmHWM), in bytes."""
    status = f"/proc/{page.process.pid}/status"
    with open(status) as lines:
        line = next(line for line in lines if line.startswith("VmHWM:"))
    return int(line.split()[1]) * 1024


def small_png() -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (64, 48), (200, 30, 30)).save(buffer, "PNG")
    return buffer.getvalue()


def test_a_picture_inside_a_call_as_a_data_url_is_refused_unread(
    page: Served, ollama_daemon: OllamaServer
) -> None:
    """A 20 KB PNG declaring 13000x13000 pixels sent as a data: URL in a respond call
    is refused with an error saying to upload it: the page's peak memory grows by less
    than the picture's pixels would take, no file appears in its folder and the engine
    is not asked."""
    bomb = bomb_png(13000)
    assert len(bomb) < 32 * 1024
    picture = {
        "url": "data:image/png;base64," + base64.b64encode(bomb).decode(),
        "meta": {"_type": "gradio.FileData"},
    }
    before, peak, asked = stored(page), peak_memory(page), len(ollama_daemon.requests)
    kind, outputs, answer = finished(page, "respond", ["What is in the picture?", picture])
    assert peak_memory(page) - peak < 13000 * 13000 // 2  # a fraction of its pixels
    assert stored(page) == before
    assert len(ollama_daemon.requests) == asked
    assert kind == "error", answer
    assert outputs["error"] == NO_DATA_URL
    assert "upload the file first" in NO_DATA_URL


def test_a_picture_inside_a_call_as_an_address_is_not_fetched(
    page: Served, ollama_daemon: OllamaServer
) -> None:
    """A respond call whose picture is an http(s) URL is refused with an error saying
    to upload the file, before the address is contacted; the engine is not asked."""
    asked = len(ollama_daemon.requests)
    with Site() as site:
        for url in (f"http://127.0.0.1:{site.port}/digit.png", "https://example.com/a.png"):
            picture = {"path": url, "meta": {"_type": "gradio.FileData"}}
            error = call_error(page, "respond", ["What is in the picture?", picture])
            assert error == NO_PICTURE_URL, url
        assert site.requested == []
    assert len(ollama_daemon.requests) == asked


def test_an_uploaded_picture_still_reaches_the_engine(
    page: Served, ollama_daemon: OllamaServer
) -> None:
    """A picture uploaded as the page does, then named in a respond call (and in the
    upload event that starts reading it early), is what the engine is sent."""
    answer = upload(page, small_png())
    assert answer.status_code == 200, answer.text
    (path,) = answer.json()
    call(page, "picture", [uploaded(path)])
    asked = len(ollama_daemon.requests_to("/api/chat"))
    outputs = call(page, "respond", ["What colour is it?", uploaded(path)])
    chats = ollama_daemon.requests_to("/api/chat")[asked:]
    assert chats, outputs
    (sent,) = chats[-1].pictures()[-1]
    with Image.open(io.BytesIO(sent)) as seen:
        assert seen.size == (64, 48)
        assert seen.convert("RGB").getpixel((10, 10)) == (200, 30, 30)


def test_the_page_writes_no_file_beside_its_code(page: Served) -> None:
    """Serving the page leaves llava_local's folder as it was: Gradio writes a type
    stub (.pyi) beside the source of any component class defined with its own
    metaclass, which would go stale and hide the module from type checkers."""
    assert page.process.poll() is None
    stub = Path(llava_local.apps.__file__).parent / "ui_picture.pyi"
    assert not stub.exists()
