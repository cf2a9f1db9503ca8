"""Picture URLs (issue 25, findings 1 and 6): off by default; when on, the server never
downloads from this machine or its network for a client, however the address is
spelt or redirected, never echoes what a URL sent back, and downloads before a
request queues, so URLs that never answer hold neither the queue nor the model."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
from typing import Any

import httpx
import openai
import pytest

from ..paths import ROOT
from ..serve_process import ANSWER, QUESTION, Server, ask_url, wait_for
from .conftest import KEY, Exposed, post, still_answers
from .sites import SECRET, Site

pytestmark = pytest.mark.llama


def _refused(client: openai.OpenAI, url: str) -> openai.BadRequestError:
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(model="demo", messages=ask_url(url))
    return caught.value


def test_picture_urls_are_off_by_default(plain: Server) -> None:
    """Without --picture-urls an http(s) image_url is a 400 that names the flag and
    says to send a data URI, and the server never fetches it."""
    with Site() as site:
        body = {"model": "demo", "messages": ask_url(f"{site.url}/digit.png")}
        refused = post(plain, "/v1/chat/completions", body)
    assert refused.status_code == 400
    error = refused.json()["error"]
    assert error["code"] == "invalid_image_url"
    assert "--picture-urls" in error["message"]
    assert "data URI" in error["message"]
    assert site.requested == []
    still_answers(plain)


def test_the_allow_list_is_checked_before_anything_starts() -> None:
    """--picture-url-allow without --picture-urls, or an entry that is not HOST[:PORT],
    is a usage error (exit 2) naming the flag, before a model is loaded."""
    for args in (
        ["--picture-url-allow", "127.0.0.1:8080"],
        ["--picture-urls", "--picture-url-allow", "pictures:http"],
    ):
        command = [sys.executable, "-m", "llava_local.cli", "serve", *args]
        done = subprocess.run(
            command, check=False, capture_output=True, text=True, cwd=ROOT, timeout=60
        )
        assert done.returncode == 2, done.stderr
        assert "--picture-url" in done.stderr


def test_an_allowed_picture_host_is_downloaded(exposed: Exposed, client: openai.OpenAI) -> None:
    """A picture on the host named with --picture-url-allow is downloaded and read,
    also through a redirect that stays on that host."""
    site = exposed.site
    for path in ("/digit.png", "/redirect?to=/digit.png"):
        answer = client.chat.completions.create(
            model="demo", messages=ask_url(f"{site.url}{path}"), temperature=0
        )
        assert answer.choices[0].message.content == ANSWER
    assert site.requested[-2:] == ["/redirect?to=/digit.png", "/digit.png"]


def test_this_machine_and_its_network_are_refused_in_any_spelling(
    exposed: Exposed, client: openai.OpenAI
) -> None:
    """A URL whose host is this machine (loopback in every spelling: localhost, decimal,
    short and hex forms, IPv6 and IPv4-mapped IPv6, the unspecified address) or its
    network (private, link-local, cloud metadata, multicast) is refused with a 400
    saying so, before any connection: the internal service sees nothing."""
    port = exposed.internal.port
    urls = [
        f"http://127.0.0.1:{port}/secret.png",
        f"http://localhost:{port}/secret.png",
        f"http://2130706433:{port}/secret.png",
        f"http://127.1:{port}/secret.png",
        f"http://0x7f.1:{port}/secret.png",
        f"http://[::1]:{port}/secret.png",
        f"http://[::ffff:127.0.0.1]:{port}/secret.png",
        f"http://0.0.0.0:{port}/secret.png",
        "http://10.0.0.1/secret.png",
        "http://192.168.1.1/secret.png",
        "http://169.254.169.254/latest/meta-data/",
        "http://[fe80::1]/secret.png",
        "http://224.0.0.1/secret.png",
    ]
    for url in urls:
        error = _refused(client, url)
        assert error.code == "invalid_image_url", url
        assert error.param == "messages[0].content[1].image_url"
        assert "refused" in error.message, (url, error.message)
        assert "--picture-url-allow" in error.message
    assert exposed.internal.requested == []


def test_a_redirect_to_this_machine_is_refused(exposed: Exposed, client: openai.OpenAI) -> None:
    """An allowed host that redirects to a service on this machine that is not allowed
    (a GET with a query string that would act on it) gets a 400: the redirect's address
    is checked again, and the service never sees the request."""
    internal = f"http://127.0.0.1:{exposed.internal.port}/admin/delete?all=1"
    for target in (internal, f"http://localhost:{exposed.internal.port}/admin/delete?all=1"):
        error = _refused(client, f"{exposed.site.url}/redirect?to={target}")
        assert error.code == "invalid_image_url"
        assert "refused" in error.message
    assert exposed.internal.requested == []


def test_what_a_url_sent_back_is_never_echoed(exposed: Exposed, client: openai.OpenAI) -> None:
    """Bytes that are no picture are a 400 that says so without any of them: no text,
    no hex dump."""
    error = _refused(client, f"{exposed.site.url}/not-a-picture")
    assert error.code == "invalid_image"
    assert "not a picture" in error.message
    for leak in ("SECRET", "4242", "00 01", SECRET[:8].hex(" "), "text"):
        assert leak not in error.message, error.message


def _hanging_request(server: Server, site: Site) -> socket.socket:
    """A chat request whose picture URL never answers, sent on a raw socket that stays
    open until the test closes it (the client hanging up)."""
    body = json.dumps({"model": "demo", "messages": ask_url(f"{site.url}/hang")}).encode()
    head = (
        f"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1:{server.port}\r\n"
        f"Authorization: Bearer {KEY}\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\n\r\n"
    )
    connection = socket.create_connection(("127.0.0.1", server.port))
    connection.sendall(head.encode() + body)
    return connection


def _health(server: Server) -> dict[str, Any]:
    health: dict[str, Any] = httpx.get(f"{server.url}/health", timeout=10).json()
    return health


def test_hanging_downloads_hold_no_queue_place_and_hang_ups_free_them(
    exposed: Exposed, client: openai.OpenAI
) -> None:
    """Six requests whose picture URL never answers (more than the queue of 2 holds)
    take no place in the queue: meanwhile a text question and a picture sent as a data
    URI are answered, never 503. Hanging up cancels the downloads at once (the picture
    host sees its connections closed, long before the 60 s download limit)."""
    server, site = exposed.server, exposed.site
    served_before = _health(server)["served"]
    hanging = [_hanging_request(server, site) for _ in range(6)]
    try:
        wait_for("four downloads at once", lambda: site.open == 4)
        assert _health(server)["downloading"] == 4  # the other two wait for a slot
        text = client.chat.completions.create(
            model="demo", messages=[{"role": "user", "content": QUESTION}], max_tokens=8
        )
        assert text.choices[0].finish_reason in ("stop", "length")
        still_answers(server)
        health = _health(server)
        assert (health["downloading"], health["waiting"]) == (4, 0)
        assert health["served"] == served_before + 2
    finally:
        for connection in hanging:
            connection.close()
    wait_for("the downloads to stop", lambda: _health(server)["downloading"] == 0)
    wait_for("the picture host to see its connections closed", lambda: site.closed >= 4)
    assert site.open == 0
    wait_for(
        "six log lines of clients gone",
        lambda: server.log_text().count("client gone while its pictures downloaded") >= 6,
    )
