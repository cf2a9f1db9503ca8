"""The web page (``llava-local ui``) served for others: --auth puts every route of the
page and its API behind Gradio's login, --allow-host admits the names given and no
others, and the command refuses to serve beyond loopback without a login unless told
--no-auth. One page, started once with a login and two allowed names in front of the
stand-in Ollama daemon, on 127.0.0.1; the command line's refusals are checked with a
port taken, so nothing is ever served beyond this machine."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from collections.abc import Iterator

import httpx
import pytest
from click.testing import CliRunner

from llava_local import InvalidRequestError
from llava_local.cli import main

from ..ollama_server import OllamaServer
from ..ui_process import Served, call, serve_page, start_call

USER, PASSWORD = "tester", "pass:word-1"  # a password may hold the separator


@pytest.fixture(scope="module")
def guarded(
    ollama_daemon: OllamaServer, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Served]:
    """The page behind a login, answering also to ui.example.com and *.corp.example."""
    tmp = tmp_path_factory.mktemp("ui-login")
    with serve_page(
        tmp,
        *("--backend", "ollama", "--host", ollama_daemon.host),
        *("--auth", f"{USER}:{PASSWORD}"),
        *("--allow-host", "ui.example.com", "--allow-host", "*.corp.example"),
    ) as served:
        yield served


def test_the_page_and_its_api_need_the_login(guarded: Served, ollama_server: OllamaServer) -> None:
    """Without logging in, the page's config and API are 401 and a call to switch the
    engine never contacts the address it names; a wrong password is refused; the right
    one gives a session in which the same call switches the tab's engine."""
    target = ollama_server
    assert httpx.get(f"{guarded.url}config", timeout=10).status_code == 401
    assert httpx.get(f"{guarded.url}gradio_api/info", timeout=10).status_code == 401
    refused = start_call(guarded, "use_engine", ["ollama", "llava", "", target.host])
    assert refused.status_code == 401, refused.text

    login = f"{guarded.url}login"
    wrong = httpx.post(login, data={"username": USER, "password": "pass"}, timeout=10)
    assert wrong.status_code == 400
    assert not wrong.cookies
    with httpx.Client() as session:
        logged_in = session.post(login, data={"username": USER, "password": PASSWORD})
        assert logged_in.status_code == 200, logged_in.text
        assert session.get(f"{guarded.url}config").status_code == 200
        with OllamaServer() as reached:
            reached.add_model("llava")
            switch = ["ollama", "llava", "", reached.host]
            outputs = call(guarded, "use_engine", switch, client=session)
            assert outputs[-1].endswith("· ready"), outputs
            assert reached.requests_to("/api/show")
    assert target.requests == []


def test_allow_host_admits_the_names_given_and_no_others(guarded: Served) -> None:
    """--allow-host NAME and --allow-host '*.SUFFIX' admit those names (the login then
    asks who it is); other names get 403 naming --allow-host, before the login."""
    port = guarded.port
    for host in (f"ui.example.com:{port}", "team.corp.example", f"localhost:{port}"):
        answered = httpx.get(f"{guarded.url}config", headers={"Host": host}, timeout=10)
        assert answered.status_code == 401, host  # past the Host check: the login's turn
    for host in (f"attacker.example:{port}", "corp.example", "ui.example.com.attacker.example"):
        refused = httpx.get(f"{guarded.url}config", headers={"Host": host}, timeout=10)
        assert refused.status_code == 403, host
        assert "--allow-host" in refused.text


def test_password_guessing_is_stopped_after_a_few_tries(guarded: Served) -> None:
    """After five wrong passwords from one address its logins get 429 with Retry-After,
    the right password too (so a guess learns nothing), and set no cookie; another
    address still logs in. (From 127.0.0.3 and 127.0.0.2, so the other tests' logins
    from 127.0.0.1 are not counted.)"""
    login = f"{guarded.url}login"
    wrong = {"username": USER, "password": "guess"}
    right = {"username": USER, "password": PASSWORD}
    with httpx.Client(transport=httpx.HTTPTransport(local_address="127.0.0.3")) as guesser:
        for _ in range(5):
            assert guesser.post(login, data=wrong).status_code == 400
        for form in (wrong, right):
            refused = guesser.post(login, data=form)
            assert refused.status_code == 429, refused.text
            assert 1 <= int(refused.headers["retry-after"]) <= 60
            assert "too many failed logins" in refused.text
            assert not refused.cookies
    with httpx.Client(transport=httpx.HTTPTransport(local_address="127.0.0.2")) as other:
        assert other.post(login, data=right).status_code == 200
        assert other.get(f"{guarded.url}config").status_code == 200


@pytest.fixture
def taken_port() -> Iterator[int]:
    """A port on 127.0.0.1 something else listens on: a page started there cannot
    serve, so a test of what the command accepts never serves beyond loopback."""
    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        held.listen()
        yield held.getsockname()[1]


def test_beyond_loopback_the_command_wants_a_login(taken_port: int) -> None:
    """`ui --bind` beyond loopback (0.0.0.0, ::, a LAN address) without --auth or
    --no-auth is a usage error naming both, before anything is served; --auth with
    --no-auth, and an --auth that is not USER:PASSWORD, are usage errors too."""
    port = ["--port", str(taken_port), "--backend", "ollama"]
    runner = CliRunner(env={"LLAVA_LOCAL_UI_AUTH": None})
    for bind in ("0.0.0.0", "::", "192.168.1.20"):
        result = runner.invoke(main, ["ui", "--bind", bind, *port])
        assert result.exit_code == 2, result.output
        assert "--auth USER:PASSWORD" in result.stderr
        assert "--no-auth" in result.stderr
    both = ["--auth", "a:b", "--no-auth"]
    result = runner.invoke(main, ["ui", "--bind", "0.0.0.0", *both, *port])
    assert result.exit_code == 2
    assert "contradict" in result.stderr
    for wrong in ("nocolon", ":password", "user:"):
        result = runner.invoke(main, ["ui", "--auth", wrong, *port])
        assert result.exit_code == 2
        assert "USER:PASSWORD" in result.stderr


def test_a_login_or_no_auth_lets_the_command_serve_beyond_loopback(taken_port: int) -> None:
    """With --no-auth, or the login in LLAVA_LOCAL_UI_AUTH, `ui --bind 0.0.0.0` goes on
    to serve (here it finds the port taken and says so)."""
    env = {k: v for k, v in os.environ.items() if k != "LLAVA_LOCAL_UI_AUTH"}
    command = [sys.executable, "-m", "llava_local.cli", "ui", "--port", str(taken_port)]
    runs = [
        (["--bind", "0.0.0.0", "--no-auth"], env),
        (["--bind", "0.0.0.0"], {**env, "LLAVA_LOCAL_UI_AUTH": f"{USER}:{PASSWORD}"}),
    ]
    for args, run_env in runs:
        result = subprocess.run(
            [*command, *args], check=False, env=run_env, capture_output=True, text=True, timeout=120
        )
        assert result.returncode == 1, (args, result.stderr)
        assert f"cannot serve on {args[1]}:{taken_port}" in result.stderr


def test_launch_in_python_wants_a_login_beyond_loopback(taken_port: int) -> None:
    """From Python too, `launch()` on 0.0.0.0 without `auth` raises InvalidRequestError
    naming auth= and no_auth=True before it builds or serves the page."""
    from llava_local.apps import ui

    with pytest.raises(InvalidRequestError, match=r"set auth= .* or no_auth=True"):
        ui.launch("0.0.0.0", taken_port, backend="ollama")
