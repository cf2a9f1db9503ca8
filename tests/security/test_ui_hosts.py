"""The web page (``llava-local ui``) against DNS rebinding: a web page in a visitor's
browser that points its own name at 127.0.0.1 reaches the page as its own origin, so
without a check it could read the page and drive its API (ask the engine, point a
tab's engine at any address). The page answers only Host headers that name this
machine, as ``serve`` does (tests/security/test_serve_browsers.py), before any of
Gradio's routes. One page, started once with the defaults (127.0.0.1, no login) in
front of the stand-in Ollama daemon; all traffic stays on 127.0.0.1."""

from __future__ import annotations

from collections.abc import Iterator

import httpx
import pytest

from ..ollama_server import OllamaServer
from ..ui_process import Served, call, join_queue, serve_page, start_call
from .conftest import loopback_hosts


@pytest.fixture(scope="module")
def page(ollama_daemon: OllamaServer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    """The page with the defaults, every tab starting on the stand-in daemon."""
    tmp = tmp_path_factory.mktemp("ui-hosts")
    with serve_page(tmp, "--backend", "ollama", "--host", ollama_daemon.host) as served:
        yield served


def test_a_rebound_name_can_neither_read_the_page_nor_drive_its_engine(
    page: Served, ollama_server: OllamaServer
) -> None:
    """A request naming another host (as a page whose name was pointed at 127.0.0.1
    sends) gets 403 naming --allow-host on the page, its config and its API, and the
    engine switch it asks for never happens: the Ollama address it names is never
    contacted, while the same call naming localhost switches the tab's engine."""
    target = ollama_server  # where the rebinding page would send this machine's engine
    switch = ["ollama", "llava", "", target.host]
    for host in (f"attacker.example:{page.port}", "attacker.example", "192.168.1.20"):
        name = host.partition(":")[0]
        for path in ("", "config", "gradio_api/info", "gradio_api/queue/data"):
            refused = httpx.get(f"{page.url}{path}", headers={"Host": host}, timeout=10)
            assert refused.status_code == 403, (host, path)
            assert f"--allow-host {name}" in refused.text
        refused = start_call(page, "use_engine", switch, Host=host)
        assert refused.status_code == 403, refused.text
        assert "DNS rebinding" in refused.text
        assert f"--allow-host {name}" in refused.text
        joined = join_queue(page, "use_engine", switch, "rebound", Host=host)
        assert joined.status_code == 403

    with OllamaServer() as reached:  # the same call, from the page's own name
        reached.add_model("llava")
        switched = ["ollama", "llava", "", reached.host]
        outputs = call(page, "use_engine", switched, Host=f"localhost:{page.port}")
        assert outputs[-1].endswith("· ready"), outputs
        assert reached.requests_to("/api/show"), "the allowed call switched no engine"
    # Calls to the engine run one at a time in order: the refused ones would be done.
    assert target.requests == []


def test_the_names_of_this_machine_are_answered(page: Served) -> None:
    """Served on loopback, the page answers to localhost (and *.localhost), loopback
    addresses and host.docker.internal, with or without the port, in any case."""
    port = page.port
    for host in loopback_hosts(port):
        answered = httpx.get(f"{page.url}config", headers={"Host": host}, timeout=10)
        assert answered.status_code == 200, host
        assert answered.json()["mode"] == "blocks"
    outputs = call(page, "new_conversation", [], Host=f"localhost:{port}")
    assert "new conversation" in outputs[-1]
