"""The web page (``llava-local ui``) against requests sent by other web pages: any page
the user visits can make the browser POST a form or a multipart upload to the page on
127.0.0.1 without asking first (a "simple" cross-origin request), and Gradio runs it
(its CORS only hides the answer, and not even that when the page is named ``[::1]``).
The browser names the sending page in ``Origin``; the page refuses a request whose
Origin is not the page itself before reading its body, and still answers its own
requests, those of a name given with --allow-host (a reverse proxy's) and programs,
which send no Origin. One page, started once with --allow-host public.example in front
of the stand-in Ollama daemon; all traffic stays on 127.0.0.1."""

from __future__ import annotations

from collections.abc import Iterator

import httpx
import pytest

from ..ollama_server import OllamaServer
from ..ui_process import Served, call, join_queue, serve_page, start_call, stored, upload

PROXY = "public.example"  # the page's --allow-host


@pytest.fixture(scope="module")
def page(ollama_daemon: OllamaServer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    """The page answering to public.example too, every tab starting on the stand-in daemon."""
    tmp = tmp_path_factory.mktemp("ui-origins")
    args = ("--backend", "ollama", "--host", ollama_daemon.host, "--allow-host", PROXY)
    with serve_page(tmp, *args) as served:
        yield served


def foreign_origins(page: Served) -> list[str]:
    """Pages that are not this one: another site (on the page's port too), another
    server of this machine, a page without an address, the proxy's name on another
    port than the one the request was sent to."""
    return [
        "http://evil.example",
        f"http://evil.example:{page.port}",
        f"http://127.0.0.1:{page.port + 1}",
        f"http://localhost:{page.port + 1}",
        "null",
        f"https://{PROXY}",
    ]


def test_another_page_cannot_upload_through_the_browser(page: Served) -> None:
    """An upload whose Origin is another page, or null, gets 403 in plain text naming
    the refused page and --allow-host (for null: what it is), and nothing is stored."""
    before = stored(page)
    for origin in foreign_origins(page):
        refused = upload(page, b"\x89PNG\r\n\x1a\n not a real picture", Origin=origin)
        assert refused.status_code == 403, (origin, refused.text)
        assert refused.headers["content-type"].startswith("text/plain")
        if origin == "null":
            assert "Origin: null" in refused.text
        else:
            assert f"{origin!r}" in refused.text
            assert "--allow-host" in refused.text
    form = httpx.post(
        f"{page.url}gradio_api/upload",
        data={"files": "x"},
        headers={"Origin": "http://evil.example"},
        timeout=30,
    )
    assert form.status_code == 403
    assert stored(page) == before


def test_another_page_cannot_drive_the_engine_or_read_the_page(
    page: Served, ollama_server: OllamaServer
) -> None:
    """A call of a handler and a queue join whose Origin is another page get 403, sent
    to the page by 127.0.0.1 or by [::1] (to which Gradio's CORS answers any page's
    preflight, so a browser sends them), and the engine switch they ask for never
    happens; a read through [::1], whose answer Gradio's CORS would let any page read,
    gets 403 too; the same call from the page itself switches the tab's engine."""
    target = ollama_server  # where the other page would send this machine's engine
    switch = ["ollama", "llava", "", target.host]
    for host in (f"127.0.0.1:{page.port}", f"[::1]:{page.port}"):
        for origin in foreign_origins(page):
            refused = start_call(page, "use_engine", switch, Origin=origin, Host=host)
            assert refused.status_code == 403, (origin, refused.text)
            joined = join_queue(page, "use_engine", switch, "other-page", Origin=origin, Host=host)
            assert joined.status_code == 403, origin
    read = httpx.get(
        f"{page.url}config",
        headers={"Origin": "http://evil.example", "Host": f"[::1]:{page.port}"},
        timeout=10,
    )
    assert read.status_code == 403
    assert "dependencies" not in read.text

    with OllamaServer() as reached:  # the same call, from the page itself
        reached.add_model("llava")
        switched = ["ollama", "llava", "", reached.host]
        outputs = call(page, "use_engine", switched, Origin=f"http://127.0.0.1:{page.port}")
        assert outputs[-1].endswith("· ready"), outputs
        assert reached.requests_to("/api/show"), "the page's own call switched no engine"
    # Calls to the engine run one at a time in order: the refused ones would be done.
    assert target.requests == []


def test_the_page_itself_its_proxy_and_programs_are_answered(page: Served) -> None:
    """Uploads from the page at any of its local names, from a page named by
    --allow-host on the port the request was sent to, through a proxy that passes the
    public name in Host, and from a program (no Origin) are stored; a handler call
    through the proxy runs."""
    port = page.port
    allowed: list[dict[str, str]] = [
        {"Origin": f"http://127.0.0.1:{port}"},
        {"Origin": f"http://localhost:{port}", "Host": f"localhost:{port}"},
        {"Origin": f"http://localhost:{port}"},  # a local name, the same port
        {"Origin": f"http://[::1]:{port}", "Host": f"[::1]:{port}"},
        {"Origin": f"http://{PROXY}:{port}"},  # --allow-host's name, the same port
        {"Origin": f"https://{PROXY}", "Host": PROXY},  # a proxy passing its name
        {},
    ]
    for number, headers in enumerate(allowed):
        picture = f"picture {number}".encode()
        answer = upload(page, picture, **headers)
        assert answer.status_code == 200, (headers, answer.text)
        (path,) = answer.json()
        assert path in stored(page)
    outputs = call(page, "new_conversation", [], Origin=f"https://{PROXY}", Host=PROXY)
    assert "new conversation" in outputs[-1]
