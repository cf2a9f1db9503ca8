"""What one picture download may cost (issue 25, findings 1 and 6): a total time limit
that also cuts off a server trickling a byte now and then, a size limit read as a
stream, and one error text whether a port is closed, silent or slow, so that error
texts cannot scan ports. The server here allows every port of 127.0.0.1 (the picture
hosts of these tests) and gives each download 2 s."""

from __future__ import annotations

import re
from collections.abc import Iterator

import pytest

from ..ollama_server import free_port
from ..serve_process import Server, ask_url, start, stop, wait_for
from .conftest import post, still_answers
from .sites import Site, silent_port

pytestmark = pytest.mark.llama


@pytest.fixture(scope="module")
def strict(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    log = tmp_path_factory.mktemp("strict") / "server.log"
    running = start(
        log,
        *("--n-ctx", "2048", "--max-picture-mb", "0.5"),
        *("--picture-urls", "--picture-url-allow", "127.0.0.1", "--picture-url-timeout", "2"),
    )
    yield running
    stop(running)


def _refusal(server: Server, url: str) -> str:
    refused = post(server, "/v1/chat/completions", {"model": "demo", "messages": ask_url(url)})
    assert refused.status_code == 400, refused.text
    error = refused.json()["error"]
    assert error["code"] == "invalid_image_url"
    message: str = error["message"]
    return message


def test_a_trickling_download_is_cut_at_the_time_limit(strict: Server) -> None:
    """A picture host that sends a byte every 0.2 s (each read is quick, the whole never
    ends) is cut off at the download's time limit: 400 naming it, connection closed."""
    with Site() as site:
        message = _refusal(strict, f"{site.url}/trickle")
        wait_for("the trickling connection to be closed", lambda: site.closed == 1)
    assert "limit of 2 s" in message
    still_answers(strict)


def test_a_picture_larger_than_the_limit_is_cut_while_read(strict: Server) -> None:
    """A download that states no length and never ends is cut as soon as it passes
    --max-picture-mb: 400 naming the limit."""
    with Site() as site:
        message = _refusal(strict, f"{site.url}/endless")
        wait_for("the endless connection to be closed", lambda: site.closed == 1)
    assert "larger than this server's limit of 524288 bytes" in message


def test_closed_silent_and_slow_ports_give_one_message(strict: Server) -> None:
    """A closed port, a port that accepts and never answers, and a host that trickles
    get the same error text (the URL aside): nothing to tell which ports are open."""
    with Site() as site, silent_port() as silent:
        urls = [
            f"http://127.0.0.1:{free_port()}/a.png",
            f"http://127.0.0.1:{silent}/a.png",
            f"{site.url}/trickle",
        ]
        messages = {re.sub(r"http://\S+", "URL", _refusal(strict, url)) for url in urls}
    assert len(messages) == 1, messages
    (message,) = messages
    assert "could not be downloaded" in message
    assert "refused" not in message.split("(")[0]
