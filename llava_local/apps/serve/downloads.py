"""Downloading the pictures a request names by URL, without lending the server's
network to whoever sent the request.

A URL is downloaded only when the server runs with ``--picture-urls``
(:attr:`Limits.picture_urls`), and then:

* http and https only, no proxy from the environment, no cookies, no credentials from
  the URL;
* its host name is resolved once, in a thread pool of the downloads' own (a slow DNS
  answer never holds the server's threads), and every address it gives must be public:
  never loopback, private, link-local, multicast, reserved or unspecified, in IPv4 or
  IPv6 (IPv4-mapped, 6to4 and NAT64 addresses are judged by the IPv4 address inside).
  Odd spellings (``2130706433``, ``127.1``, ``0x7f.1``, ``localhost``) resolve to what
  they mean and are judged by that;
* the connection goes to the address that was checked: the name is not looked up a
  second time, so a DNS answer that changes in between (DNS rebinding) changes nothing;
* ``--picture-url-allow HOST[:PORT]`` entries skip the address check for exactly that
  host (and port), for an internal picture host the operator names;
* redirects are followed up to :data:`MAX_REDIRECTS` times, each hop checked like the
  first (scheme, addresses, allow-list);
* the body is read as a stream and cut at ``max_picture_bytes``; the whole download
  (from the first DNS query to the last byte) ends after ``fetch_timeout`` seconds, so a
  server that trickles a byte now and then is cut off too;
* at most ``Limits.downloads`` run at once, in the event loop (no thread, no queue
  place: a request downloads its pictures before it queues for the model);
* errors say what was refused and never what came back: one message whether a port is
  closed, filtered or slow, and no bytes of the body.

A query string is sent as written: once the address is public (or allowed), what the
URL asks of that host is the client's business, as if the client fetched it itself.
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket
from collections.abc import Awaitable, Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import anyio
import httpcore
import httpx

from ... import __version__
from ...errors import ImageError
from .limits import Limits

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

#: Redirects followed per picture; each hop is checked like the first.
MAX_REDIRECTS = 3

#: How a host name becomes addresses: ``resolve(host, port)`` (tests give their own).
Resolve = Callable[[str, int], Awaitable[list[str]]]

_REDIRECTS = frozenset({301, 302, 303, 307, 308})
_NAT64 = ipaddress.IPv6Network("64:ff9b::/96")
_UNREACHABLE = (
    "it could not be downloaded (no answer, a refused or broken connection, or too slow "
    "for this server's limit of {timeout:g} s)"
)


class DownloadsBusyError(Exception):
    """Every download slot stayed taken for as long as a download may last."""


@dataclass(frozen=True)
class HostPort:
    """An allow-list entry: a host name or IP address, and a port (None: any)."""

    host: str
    port: int | None = None

    @classmethod
    def parse(cls, text: str) -> HostPort:
        """``HOST``, ``HOST:PORT``, ``[IPv6]`` or ``[IPv6]:PORT``; ValueError otherwise."""
        entry = text.strip()
        port = ""
        if entry.startswith("["):
            host, bracket, rest = entry[1:].partition("]")
            if not bracket or (rest and not rest.startswith(":")):
                raise ValueError(f"{text!r} is not HOST[:PORT] ('[::1]:8080' for IPv6)")
            port = rest[1:]
        elif entry.count(":") == 1:
            host, _, port = entry.partition(":")
        else:
            host = entry  # a bare name, or an IPv6 address without a port
        if not host or (port and not (port.isdigit() and 0 < int(port) < 65536)):
            raise ValueError(f"{text!r} is not HOST[:PORT] (a name or address, a port 1-65535)")
        return cls(normal_host(host), int(port) if port else None)

    def matches(self, host: str, port: int) -> bool:
        return self.host == normal_host(host) and self.port in (None, port)


def normal_host(host: str) -> str:
    """A host as compared: lower case, no final dot, an IP address in its usual form."""
    name = host.strip().strip("[]").lower().rstrip(".")
    try:
        return str(ipaddress.ip_address(name))
    except ValueError:
        return name


def refusal(address: IPAddress) -> str | None:
    """Why the server must not connect to ``address`` for a client, or None when it
    is a public address."""
    if isinstance(address, ipaddress.IPv6Address):
        inner = address.ipv4_mapped or address.sixtofour
        if inner is None and address in _NAT64:
            inner = ipaddress.IPv4Address(int(address) & 0xFFFFFFFF)
        if inner is not None and (reason := refusal(inner)) is not None:
            return reason
    checks = (
        ("a loopback address", address.is_loopback),
        ("the unspecified address", address.is_unspecified),
        ("a link-local address", address.is_link_local),
        ("a multicast address", address.is_multicast),
        ("a private address", address.is_private),
        ("a reserved address", address.is_reserved),
        ("not a public address", not address.is_global),
    )
    return next((reason for reason, hit in checks if hit), None)


class _Refused(Exception):
    """A connection the address policy does not allow (raised inside httpcore)."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class _GuardedBackend(httpcore.AsyncNetworkBackend):
    """httpcore's network backend, connecting only where the policy allows: the host
    is resolved here, once, and the connection made to the address checked."""

    def __init__(self, allow: tuple[HostPort, ...], resolve: Resolve) -> None:
        self.allow = allow
        self.resolve = resolve
        self.inner = httpcore.AnyIOBackend()

    async def connect_tcp(
        self,
        host: str,
        port: int,
        timeout: float | None = None,
        local_address: str | None = None,
        socket_options: Iterable[Any] | None = None,
    ) -> httpcore.AsyncNetworkStream:
        addresses = await self._addresses(host, port)
        failure: Exception = httpcore.ConnectError("no address")
        for address in addresses:
            try:
                return await self.inner.connect_tcp(
                    address, port, timeout, local_address, socket_options
                )
            except (httpcore.ConnectError, httpcore.ConnectTimeout) as exc:
                failure = exc
        raise failure

    async def _addresses(self, host: str, port: int) -> list[str]:
        try:
            found = [ipaddress.ip_address(host.strip("[]"))]
        except ValueError:
            try:
                found = [ipaddress.ip_address(a) for a in await self.resolve(host, port)]
            except (OSError, ValueError) as exc:
                raise httpcore.ConnectError("the name does not resolve") from exc
        if not found:
            raise httpcore.ConnectError("the name has no address")
        if not any(entry.matches(host, port) for entry in self.allow):
            for address in found:
                reason = refusal(address)
                if reason is not None:
                    raise _Refused(f"{host} is {reason}")
        return [str(address) for address in found]

    async def connect_unix_socket(
        self, path: str, timeout: float | None = None, socket_options: Any = None
    ) -> httpcore.AsyncNetworkStream:
        raise _Refused("a unix socket")

    async def sleep(self, seconds: float) -> None:
        await self.inner.sleep(seconds)


class Downloads:
    """The server's picture downloads: the address policy, the connection pool, the
    download slots and the count of downloads running (for ``/health``)."""

    def __init__(self, limits: Limits, *, resolve: Resolve | None = None) -> None:
        self.limits = limits
        self.allow = tuple(HostPort.parse(entry) for entry in limits.picture_url_allow)
        self.active = 0
        self._slots = asyncio.Semaphore(max(1, limits.downloads))
        self._dns: ThreadPoolExecutor | None = None
        self._resolve = resolve or self._getaddrinfo
        self._pool: httpcore.AsyncConnectionPool | None = None

    async def fetch(self, url: str) -> bytes:
        """The body at ``url``, within the limits; :class:`ImageError` saying why not
        (or :class:`DownloadsBusyError`)."""
        desc = url if len(url) <= 200 else url[:197] + "..."
        timeout = self.limits.fetch_timeout
        try:
            with anyio.fail_after(timeout):
                await self._slots.acquire()
        except TimeoutError:
            raise DownloadsBusyError from None
        self.active += 1
        try:
            with anyio.fail_after(timeout):
                return await self._get(url, desc)
        except TimeoutError:
            raise ImageError(desc, _UNREACHABLE.format(timeout=timeout)) from None
        finally:
            self.active -= 1
            self._slots.release()

    async def _get(self, url: str, desc: str) -> bytes:
        try:
            current = httpx.URL(url)
        except (httpx.InvalidURL, TypeError):
            raise ImageError(desc, "not a valid URL") from None
        for _hop in range(MAX_REDIRECTS + 1):
            if current.scheme not in ("http", "https") or not current.host:
                raise ImageError(desc, "only http(s) URLs with a host are downloaded")
            try:
                async with self._connections().stream(
                    "GET",
                    httpcore.URL(
                        scheme=current.raw_scheme,
                        host=current.raw_host,
                        port=current.port,
                        target=current.raw_path,
                    ),
                    headers=[
                        (b"Host", current.netloc),
                        (b"User-Agent", f"llava-local/{__version__}".encode()),
                        (b"Accept", b"image/*"),
                        (b"Accept-Encoding", b"identity"),
                    ],
                    extensions={"timeout": dict.fromkeys(_PHASES, self.limits.fetch_timeout)},
                ) as response:
                    location = _header(response, b"location")
                    if response.status in _REDIRECTS and location:
                        try:
                            current = current.join(location)
                        except httpx.InvalidURL:
                            raise ImageError(desc, "it redirects to an invalid URL") from None
                        continue
                    return await self._body(response, desc)
            except _Refused as exc:
                raise ImageError(
                    desc,
                    f"refused: {exc.reason}, which this server does not download from for "
                    "a client (send the picture as a data URI; the server's operator can "
                    "allow a host with --picture-url-allow)",
                ) from None
            except (httpcore.TimeoutException, httpcore.NetworkError, httpcore.ProtocolError):
                timeout = self.limits.fetch_timeout
                raise ImageError(desc, _UNREACHABLE.format(timeout=timeout)) from None
            except httpcore.UnsupportedProtocol:
                raise ImageError(desc, "only http(s) URLs with a host are downloaded") from None
        raise ImageError(desc, f"it redirects more than {MAX_REDIRECTS} times")

    async def _body(self, response: httpcore.Response, desc: str) -> bytes:
        if not 200 <= response.status < 300:
            raise ImageError(desc, f"the server there answered HTTP {response.status}")
        limit = self.limits.max_picture_bytes
        too_large = ImageError(
            desc, f"it is larger than this server's limit of {limit} bytes (--max-picture-mb)"
        )
        declared = _header(response, b"content-length")
        if declared.isdigit() and int(declared) > limit:
            raise too_large
        body = bytearray()
        async for chunk in response.aiter_stream():
            body += chunk
            if len(body) > limit:
                raise too_large
        if not body:
            raise ImageError(desc, "the server there sent no data (0 bytes)")
        return bytes(body)

    def _connections(self) -> httpcore.AsyncConnectionPool:
        if self._pool is None:
            self._pool = httpcore.AsyncConnectionPool(
                ssl_context=httpx.create_ssl_context(),
                max_connections=max(1, self.limits.downloads),
                max_keepalive_connections=0,  # each download connects (and is checked) anew
                network_backend=_GuardedBackend(self.allow, self._resolve),
            )
        return self._pool

    async def _getaddrinfo(self, host: str, port: int) -> list[str]:
        """The addresses of ``host``, looked up in the downloads' own threads."""
        if self._dns is None:
            self._dns = ThreadPoolExecutor(
                max(1, self.limits.downloads), thread_name_prefix="llava-local-dns"
            )
        loop = asyncio.get_running_loop()
        infos = await loop.run_in_executor(
            self._dns, socket.getaddrinfo, host, port, 0, socket.SOCK_STREAM
        )
        return list(dict.fromkeys(str(info[4][0]) for info in infos))

    async def aclose(self) -> None:
        if self._pool is not None:
            await self._pool.aclose()
        if self._dns is not None:
            self._dns.shutdown(wait=False, cancel_futures=True)


_PHASES = ("connect", "read", "write", "pool")


def _header(response: httpcore.Response, name: bytes) -> str:
    for key, value in response.headers:
        if key.lower() == name:
            return value.decode("latin-1").strip()
    return ""
