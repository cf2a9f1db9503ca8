"""The Host check both servers make (``serve``'s API and the ``ui`` page): which binds
reach only this machine, which Host headers are answered, and what a refusal says.
The servers' own tests send the attack itself (tests/security/test_serve_browsers.py,
test_serve_bind.py, test_ui_hosts.py, test_ui_login.py)."""

from __future__ import annotations

import socket

from llava_local.host_header import HostNames, is_loopback, refusal


def test_only_loopback_binds_count_as_this_machine_alone() -> None:
    """127.0.0.0/8, ::1 and localhost (any case, bracketed, with a final dot) are
    loopback; every other address or name, the wildcard ones included, is not."""
    for bind in (
        "127.0.0.1",
        "127.8.9.10",
        "::1",
        "[::1]",
        "localhost",
        "LocalHost.",
        "a.localhost",
    ):
        assert is_loopback(bind), bind
    for bind in ("0.0.0.0", "::", "", "192.168.1.20", "10.0.0.1", "myhost", "localhost.example"):
        assert not is_loopback(bind), bind


def test_beyond_loopback_the_name_bound_on_is_answered() -> None:
    """A server bound on a name beyond loopback answers to that name (Gradio's own
    start-up check asks the page by the name it was bound on), to this machine's names
    and to IP addresses, and still refuses other names."""
    names = HostNames("pi.lan")
    assert names.allows("pi.lan:7860")
    assert names.allows("PI.LAN.")
    assert names.allows(f"{socket.gethostname()}:7860")
    assert names.allows("192.0.2.7:7860")
    assert not names.allows("attacker.example:7860")
    assert not names.allows("pi.lan.attacker.example")
    on_loopback = HostNames("127.0.0.1")
    assert not on_loopback.allows("192.0.2.7:7860")
    assert not on_loopback.allows(f"{socket.gethostname()}.attacker.example")


def test_a_refusal_names_the_option_and_repeats_only_printable_text() -> None:
    """The refusal says the name it refused and the --allow-host that admits it, with
    control characters left out and at most 100 characters of the name."""
    said = refusal("evil.example:80", server="this page", command="llava-local ui")
    assert said.startswith("this page does not answer to the name 'evil.example'")
    assert said.endswith("start llava-local ui with --allow-host evil.example")
    long = refusal("a\x1b[31m" + "b" * 300, server="this server", command="the server")
    assert "\x1b" not in long
    assert "a[31m" + "b" * 95 + "'" in long


def test_a_known_name_is_one_given_or_this_machines_never_a_wildcard() -> None:
    """known() (what a page's Origin is held to) takes loopback names and addresses,
    this machine's names and --allow-host's names and suffixes, but not what allows()
    admits unseen: '*', or any IP address beyond loopback; and never an empty name."""
    names = HostNames("0.0.0.0", ["proxy.example", "*.corp.example", "*"])
    for name in (
        "localhost",
        "app.localhost",
        "127.0.0.1",
        "::1",
        "::ffff:127.0.0.1",
        "host.docker.internal",
        socket.gethostname(),
        "0.0.0.0",
        "PROXY.example.",
        "pi.corp.example",
    ):
        assert names.known(name), name
        assert names.allows(name), name
    for name in ("evil.example", "192.0.2.7", "corp.example.evil", ""):
        assert not names.known(name), name
    assert names.allows("evil.example")
    assert names.allows("192.0.2.7")
    bound = HostNames("192.0.2.7")
    assert bound.known("192.0.2.7")
    assert not bound.known("192.0.2.8")
