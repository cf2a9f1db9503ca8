"""The download policy of serve (issue 25, finding 1) in-process: which addresses are
refused, how allow-list entries are read, and that a host name is resolved once and
the connection made to the address that was checked (DNS rebinding), against a real
picture host on 127.0.0.1 and a resolver the test controls."""

from __future__ import annotations

import asyncio
import ipaddress

import pytest

from llava_local.apps.serve import Limits
from llava_local.apps.serve.downloads import Downloads, HostPort, refusal
from llava_local.errors import ImageError

from ..paths import DIGIT
from .sites import Site


@pytest.mark.parametrize(
    ("address", "reason"),
    [
        ("127.0.0.1", "loopback"),
        ("127.255.0.9", "loopback"),
        ("::1", "loopback"),
        ("::ffff:127.0.0.1", "loopback"),
        ("0.0.0.0", "unspecified"),
        ("::", "unspecified"),
        ("10.1.2.3", "private"),
        ("172.16.0.1", "private"),
        ("192.168.0.1", "private"),
        ("fd00::1", "private"),
        ("::ffff:10.0.0.1", "private"),
        ("2002:a00:1::", "private"),  # 6to4 of 10.0.0.1
        ("64:ff9b::a00:1", "private"),  # NAT64 of 10.0.0.1
        ("169.254.169.254", "link-local"),
        ("fe80::1", "link-local"),
        ("224.0.0.1", "multicast"),
        ("ff02::1", "multicast"),
        ("240.0.0.1", "reserved"),
        ("100.64.0.1", "public"),  # carrier-grade NAT: shared, not global
    ],
)
def test_addresses_of_this_machine_and_its_network_are_refused(address: str, reason: str) -> None:
    """Loopback, unspecified, private, link-local, multicast, reserved and shared
    addresses are refused, IPv4 inside IPv6 judged by the IPv4 address."""
    found = refusal(ipaddress.ip_address(address))
    assert found is not None
    assert reason in found or (reason == "reserved" and "private" in found)


@pytest.mark.parametrize("address", ["93.184.216.34", "8.8.8.8", "2606:4700::1111"])
def test_public_addresses_are_allowed(address: str) -> None:
    """A public address is not refused."""
    assert refusal(ipaddress.ip_address(address)) is None


def test_allow_list_entries_are_read_as_host_and_port() -> None:
    """HOST, HOST:PORT, [IPv6] and [IPv6]:PORT are read; an entry with no port matches
    every port, one with a port only that port; names compare without case or final
    dot; anything else is a ValueError."""
    assert HostPort.parse("Pictures.Internal.") == HostPort("pictures.internal", None)
    assert HostPort.parse("127.0.0.1:8080") == HostPort("127.0.0.1", 8080)
    assert HostPort.parse("[::1]:80") == HostPort("::1", 80)
    assert HostPort.parse("::1") == HostPort("::1", None)
    assert HostPort.parse("pics:9000").matches("PICS", 9000)
    assert not HostPort.parse("pics:9000").matches("pics", 9001)
    assert HostPort.parse("pics").matches("pics", 9001)
    for bad in ("", ":80", "pics:0", "pics:http", "[::1", "[::1]x"):
        with pytest.raises(ValueError, match="HOST"):
            HostPort.parse(bad)


def test_a_name_is_resolved_once_and_the_checked_address_is_used() -> None:
    """The downloader asks the resolver once per connection and connects to the address
    it got: a resolver that answers 127.0.0.1 first and an unused address after (DNS
    rebinding) cannot make it connect elsewhere. Without an allow-list entry the same
    name is refused for resolving to loopback, before any connection."""
    asked: list[str] = []

    async def resolve(host: str, port: int) -> list[str]:
        asked.append(host)
        return ["127.0.0.1"] if len(asked) == 1 else ["127.0.0.2"]

    async def fetch(allow: tuple[str, ...], url: str) -> bytes:
        limits = Limits(picture_urls=True, picture_url_allow=allow)
        downloads = Downloads(limits, resolve=resolve)
        try:
            return await downloads.fetch(url)
        finally:
            await downloads.aclose()

    with Site() as site:
        url = f"http://pictures.test:{site.port}/digit.png"
        body = asyncio.run(fetch((f"pictures.test:{site.port}",), url))
        assert body == DIGIT.read_bytes()
        assert asked == ["pictures.test"]
        assert site.requested == ["/digit.png"]
        asked.clear()
        with pytest.raises(ImageError, match=r"refused: pictures\.test is a loopback address"):
            asyncio.run(fetch((), url))
        assert asked == ["pictures.test"]
        assert site.requested == ["/digit.png"]
