"""Serving beyond loopback (issue 25, findings 2 and 7): without --api-key the server
says at start what that exposes, and the Host check admits IP addresses, this
machine's names and the --allow-host names, nothing else. The server binds 0.0.0.0,
and the tests talk to it on 127.0.0.1 only."""

from __future__ import annotations

import socket
from collections.abc import Iterator

import httpx
import pytest

from ..serve_process import Server, start, stop

pytestmark = pytest.mark.llama


@pytest.fixture(scope="module")
def everywhere(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """The demo model served on every network, without a key, with two names allowed."""
    log = tmp_path_factory.mktemp("everywhere") / "server.log"
    running = start(
        log,
        *("--bind", "0.0.0.0", "--n-ctx", "2048"),
        *("--allow-host", "pictures.example.com", "--allow-host", "*.corp.example"),
    )
    yield running
    stop(running)


def test_serving_beyond_loopback_without_a_key_warns(everywhere: Server) -> None:
    """Started on 0.0.0.0 without --api-key, the server warns that anyone who can reach
    the machine can use the model, and names --api-key."""
    log = everywhere.log_text()
    assert "without --api-key" in log
    assert "anyone who can reach this machine" in log
    assert f"port {everywhere.port}" in log


def test_beyond_loopback_the_host_check_admits_addresses_and_named_hosts(
    everywhere: Server,
) -> None:
    """Beyond loopback, a Host naming an IP address, this machine's name, localhost or an
    --allow-host name (exactly, or under a '*.' suffix) is answered; any other name is
    403 naming --allow-host."""
    port = everywhere.port
    admitted = [
        f"127.0.0.1:{port}",
        f"192.0.2.7:{port}",
        f"[2001:db8::7]:{port}",
        f"{socket.gethostname()}:{port}",
        f"localhost:{port}",
        f"pictures.example.com:{port}",
        "team.corp.example",
    ]
    for host in admitted:
        answered = httpx.get(f"{everywhere.url}/v1/models", headers={"Host": host}, timeout=10)
        assert answered.status_code == 200, host
    for host in (f"attacker.example:{port}", "corp.example.attacker.example", "corp.example"):
        refused = httpx.get(f"{everywhere.url}/v1/models", headers={"Host": host}, timeout=10)
        assert refused.status_code == 403, host
        assert "--allow-host" in refused.json()["error"]["message"]


def test_a_loopback_server_does_not_warn(plain: Server) -> None:
    """On 127.0.0.1 (the default) no warning is printed: nothing beyond this machine
    can reach the server."""
    assert "without --api-key" not in plain.log_text()
