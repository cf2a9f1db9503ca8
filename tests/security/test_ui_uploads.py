"""The web page (``llava-local ui``) against uploads that would fill its disk or memory:
Gradio writes an upload to its folder before any handler sees it, so the limit
(--max-picture-mb) must act on Gradio's own upload route, on each file and on the whole
request, and what is refused must leave nothing behind. Everything goes through the
route the page's picture box uses (``/gradio_api/upload``), over real HTTP. One page,
started once with pictures of up to 1 MB in front of the stand-in Ollama daemon, on
127.0.0.1; the test of what happens when the page stops starts a page of its own."""

from __future__ import annotations

import io
import os
import socket
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from PIL import Image

from llava_local import InvalidRequestError
from llava_local.apps.ui_uploads import upload_limits

from ..ollama_server import OllamaServer
from ..ui_process import Served, call, serve_page, stored, upload, uploaded

LIMIT = 2**20  # --max-picture-mb 1


@pytest.fixture(scope="module")
def page(ollama_daemon: OllamaServer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    """The page taking pictures of up to 1 MB, every tab starting on the stand-in daemon."""
    tmp = tmp_path_factory.mktemp("ui-uploads")
    args = ("--backend", "ollama", "--host", ollama_daemon.host, "--max-picture-mb", "1")
    with serve_page(tmp, *args) as served:
        yield served


def noise_png(side: int) -> bytes:
    """A picture that does not compress: a PNG of about 3 * side**2 bytes."""
    buffer = io.BytesIO()
    Image.frombytes("RGB", (side, side), os.urandom(side * side * 3)).save(buffer, "PNG")
    return buffer.getvalue()


def test_a_picture_over_the_limit_is_refused_and_nothing_of_it_is_kept(page: Served) -> None:
    """A file one byte over --max-picture-mb, and one three times over, each get 413
    and leave no file behind, the bigger one refused with a message naming
    --max-picture-mb."""
    before = stored(page)
    just_over = upload(page, os.urandom(LIMIT + 1))
    assert just_over.status_code == 413, just_over.text
    far_over = upload(page, os.urandom(3 * LIMIT))
    assert far_over.status_code == 413, far_over.text
    assert "--max-picture-mb" in far_over.text
    assert "up to 1 MB" in far_over.text
    assert stored(page) == before


def test_a_request_announcing_a_huge_body_is_refused_before_it_is_sent(page: Served) -> None:
    """A request that announces 10 GB is answered 413 before a byte of its body is
    sent: the page pays nothing for it (without the check, it waits for the body)."""
    head = (
        f"POST /gradio_api/upload HTTP/1.1\r\nHost: 127.0.0.1:{page.port}\r\n"
        "Content-Type: multipart/form-data; boundary=x\r\n"
        f"Content-Length: {10 * 2**30}\r\n\r\n"
    )
    with socket.create_connection(("127.0.0.1", page.port), timeout=20) as connection:
        connection.sendall(head.encode())
        answer = b""
        while b"\r\n\r\n" not in answer:
            chunk = connection.recv(4096)
            assert chunk, f"the page closed the connection without answering: {answer!r}"
            answer += chunk
    assert answer.startswith(b"HTTP/1.1 413 "), answer


def test_many_pictures_in_one_request_cost_no_more_than_one(page: Served) -> None:
    """Gradio's route takes up to 1000 files in one request: three files each under the
    limit, together over it, get 413 and nothing is kept; a body of unannounced length
    (chunked), which could not be measured before it is read, gets 411."""
    before = stored(page)
    piece = os.urandom(LIMIT * 9 // 10)
    several = upload(page, piece, piece[::-1], piece[1:])
    assert several.status_code == 413, several.text
    assert "--max-picture-mb" in several.text

    body = httpx.Request(
        "POST", page.url, files=[("files", ("picture.png", os.urandom(1000), "image/png"))]
    )
    chunks = iter([body.read()])  # an iterator: httpx sends it chunked
    chunked = httpx.post(
        f"{page.url}gradio_api/upload",
        content=chunks,
        headers={"Content-Type": body.headers["Content-Type"]},
        timeout=60,
    )
    assert chunked.status_code == 411, chunked.text
    assert "Content-Length" in chunked.text
    assert stored(page) == before


def test_a_picture_within_the_limit_is_stored_and_asked_about(
    page: Served, ollama_daemon: OllamaServer
) -> None:
    """A file of exactly the limit is stored whole; a picture under it, uploaded the
    same way, is what the next question sends the engine."""
    exactly = os.urandom(LIMIT)
    answer = upload(page, exactly)
    assert answer.status_code == 200, answer.text
    (path,) = answer.json()
    assert Path(path).resolve().parent.parent == page.uploads.resolve()
    assert Path(path).read_bytes() == exactly

    picture = noise_png(300)
    assert len(picture) < LIMIT
    answer = upload(page, picture)
    assert answer.status_code == 200, answer.text
    (path,) = answer.json()
    given = uploaded(path)
    asked = len(ollama_daemon.requests_to("/api/chat"))
    outputs = call(page, "respond", ["What is in the picture?", given])
    chats = ollama_daemon.requests_to("/api/chat")[asked:]
    assert chats, outputs
    assert [len(pictures) for pictures in chats[-1].pictures()] == [1], outputs


def test_what_the_page_stored_is_deleted_when_it_stops(tmp_path: Path) -> None:
    """A page stopped (SIGTERM, as systemd does) deletes the pictures uploaded to it:
    without that, each one stays in the temporary folder, often a RAM disk, for good."""
    with serve_page(tmp_path) as served:
        answer = upload(served, noise_png(100))
        assert answer.status_code == 200, answer.text
        (path,) = answer.json()
        assert Path(path).is_file()
    assert not Path(path).exists()
    assert stored(served) == {}


def test_a_limit_of_nothing_is_refused() -> None:
    """A picture limit of 0 or less (launch()'s max_picture_mb; the command line's range
    check stops it first) is an error saying so, not a page refusing every picture."""
    for nothing in (0.0, -1.0):
        with pytest.raises(InvalidRequestError, match="more than 0 MB"):
            upload_limits(nothing)
