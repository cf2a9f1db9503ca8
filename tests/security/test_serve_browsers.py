"""Web pages in a visitor's browser (issue 25, findings 2 and 7): a cross-origin POST
must be JSON (so the browser asks first, and CORS answers), a page that points its own
name at 127.0.0.1 (DNS rebinding) is refused by the Host check, and a page the
operator allows with --cors can use the API key."""

from __future__ import annotations

import json

import httpx
import pytest

from ..serve_process import Server, ask, wait_for
from .conftest import KEY, PAGE, Exposed, loopback_hosts, post, still_answers

pytestmark = pytest.mark.llama


def test_a_body_that_is_not_json_is_415(plain: Server) -> None:
    """A chat body sent as text/plain (what a page may POST cross-origin without a
    preflight) or as a form is refused with 415 in each protocol's shape, unread."""
    chat = {"model": "demo", "messages": ask(), "temperature": 0}
    answered = plain.log_text().count(" 200 prompt=")
    for kind in ("text/plain", "application/x-www-form-urlencoded", "multipart/form-data"):
        refused = post(plain, "/v1/chat/completions", chat, content_type=kind)
        assert refused.status_code == 415, refused.text
        error = refused.json()["error"]
        assert error["code"] == "unsupported_media_type"
        assert "application/json" in error["message"]
    ollama = {"model": "demo", "messages": [{"role": "user", "content": "hi"}]}
    refused = post(plain, "/api/chat", ollama, content_type="text/plain;charset=UTF-8")
    assert refused.status_code == 415
    assert "application/json" in refused.json()["error"]
    assert plain.log_text().count(" 200 prompt=") == answered  # no turn was started
    still_answers(plain)


def test_a_body_without_a_type_is_read_only_from_programs(plain: Server) -> None:
    """A body with no Content-Type (litellm's ollama/ provider sends one so) is read when
    no Origin header comes with it, and refused with 415 when one does: a browser sends
    Origin with every POST, and a page may POST an untyped body without a preflight."""
    body = json.dumps({"model": "demo", "prompt": "hi", "stream": False}).encode()
    headers = {"Authorization": f"Bearer {KEY}"}
    url = f"{plain.url}/api/generate"
    answered = plain.log_text().count(" 200 prompt=")
    program = httpx.post(url, content=body, headers=headers, timeout=120)
    assert "content-type" not in program.request.headers
    assert program.status_code == 200, program.text
    for origin in ("https://attacker.example", "null"):
        page = httpx.post(url, content=body, headers={**headers, "Origin": origin}, timeout=120)
        assert page.status_code == 415, origin
        assert "application/json" in page.json()["error"]
    wait_for("the answer's log line", lambda: " 415 " in plain.log_text().splitlines()[-1])
    assert plain.log_text().count(" 200 prompt=") == answered + 1  # the program's turn alone
    still_answers(plain)


def test_a_host_name_the_server_does_not_have_is_403(plain: Server) -> None:
    """Served on loopback, the server answers only to loopback names and addresses
    (and host.docker.internal): a request naming another host, as a page whose name
    was pointed at 127.0.0.1 sends, is refused with 403 naming --allow-host, on every
    route."""
    port = plain.port
    for host in (f"attacker.example:{port}", "attacker.example", f"192.168.1.20:{port}"):
        for path in ("/v1/models", "/api/tags", "/health"):
            refused = httpx.get(f"{plain.url}{path}", headers={"Host": host}, timeout=10)
            assert refused.status_code == 403, (host, path)
        chat = {"model": "demo", "messages": ask()}
        refused = post(plain, "/v1/chat/completions", chat, host=host)
        assert refused.status_code == 403
        assert refused.json()["error"]["code"] == "host_not_allowed"
        assert f"--allow-host {host.split(':')[0]}" in refused.json()["error"]["message"]
    ollama = httpx.get(f"{plain.url}/api/tags", headers={"Host": "attacker.example"}, timeout=10)
    assert "--allow-host" in ollama.json()["error"]
    for host in loopback_hosts(port):
        assert httpx.get(f"{plain.url}/v1/models", headers={"Host": host}, timeout=10).is_success


def test_the_browser_preflight_works_with_an_api_key(exposed: Exposed) -> None:
    """With --api-key and --cors, the browser's preflight (OPTIONS, no key) from the
    allowed origin is answered with CORS headers, and so is a 401, so a page can use
    the key and read the errors; another origin gets no CORS headers."""
    url = f"{exposed.server.url}/v1/chat/completions"
    asking = {
        "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "authorization, content-type",
    }
    preflight = httpx.options(url, headers={"Origin": PAGE, **asking}, timeout=10)
    assert preflight.status_code == 200
    assert preflight.headers["access-control-allow-origin"] == PAGE
    assert "authorization" in preflight.headers["access-control-allow-headers"].lower()
    other = httpx.options(url, headers={"Origin": "http://attacker.example", **asking})
    assert "access-control-allow-origin" not in other.headers
    wrong_key = httpx.post(
        url,
        json={"model": "demo", "messages": ask()},
        headers={"Origin": PAGE, "Authorization": "Bearer wrong"},
        timeout=10,
    )
    assert wrong_key.status_code == 401
    assert wrong_key.headers["access-control-allow-origin"] == PAGE
    answered = post(exposed.server, "/v1/models", b"", origin=PAGE)
    assert answered.status_code == 405  # POST on a GET route, answered past the key check
    assert answered.headers["access-control-allow-origin"] == PAGE
    listed = httpx.get(
        f"{exposed.server.url}/v1/models",
        headers={"Origin": PAGE, "Authorization": f"Bearer {KEY}"},
        timeout=10,
    )
    assert listed.is_success
    assert listed.headers["access-control-allow-origin"] == PAGE
