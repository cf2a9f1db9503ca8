"""What wraps every route: one log line per request, the Host check, the API key, and
a 500 for any bug.

Plain ASGI middleware rather than Starlette's ``BaseHTTPMiddleware``, so a streamed
answer is timed (and its status logged) to its end. From the outside in: the log line,
:class:`CheckHost`, CORS (when ``--cors`` names origins: outside the key check, so a
browser's preflight is answered and error answers carry CORS headers too),
:class:`RequireKey`, :class:`CatchErrors`, then the routes.
"""

from __future__ import annotations

import hmac
import ipaddress
import logging
import socket
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING

from .errors import ApiError

if TYPE_CHECKING:
    from starlette.types import ASGIApp, Receive, Scope, Send
    from starlette.types import Message as AsgiMessage

log = logging.getLogger("llava_local.serve")

#: Paths answered without the API key: liveness checks from load balancers and Open WebUI.
OPEN_PATHS = frozenset({"/", "/health"})


class LogRequests:
    """One log line per request: method, route, status, tokens, seconds (and a note).

    Routes put ``tokens`` and ``note`` in ``request.state``."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status = 0
        state = scope.setdefault("state", {})

        async def sending(message: AsgiMessage) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = int(message["status"])
            await send(message)

        try:
            await self.app(scope, receive, sending)
        finally:
            seconds = time.perf_counter() - started
            tokens = state.get("tokens", "-")
            note = state.get("note")
            log.info(
                "%s %s %s %s %.3fs%s",
                scope.get("method", "-"),
                scope.get("path", "-"),
                status or "-",
                tokens,
                seconds,
                f" ({note})" if note else "",
            )


class RequireKey:
    """``Authorization: Bearer KEY`` on every route but the open ones."""

    def __init__(self, app: ASGIApp, api_key: str) -> None:
        self.app = app
        self.key = api_key.encode()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope.get("path") in OPEN_PATHS:
            await self.app(scope, receive, send)
            return
        headers = dict(scope.get("headers") or [])
        given = headers.get(b"authorization", b"")
        scheme, _, token = given.partition(b" ")
        if scheme.lower() == b"bearer" and hmac.compare_digest(token.strip(), self.key):
            await self.app(scope, receive, send)
            return
        error = ApiError(
            401,
            "missing or wrong API key: send the header 'Authorization: Bearer <key>' "
            "with the key the server was started with (--api-key)",
            code="invalid_api_key",
            headers={"WWW-Authenticate": "Bearer"},
        )
        await error.response(str(scope.get("path", "")))(scope, receive, send)


#: Names that always mean this machine, whatever the bind: ``*.localhost`` resolves to
#: loopback by RFC 6761, and ``host.docker.internal`` is how a container (Open WebUI in
#: Docker) names its host; ``.internal`` names are never in public DNS, so no web page
#: can point one at this server.
LOCAL_NAMES = frozenset({"localhost", "host.docker.internal"})


def is_loopback(bind: str) -> bool:
    """Whether serving on ``bind`` reaches only this machine."""
    name = bind.strip().strip("[]").lower().rstrip(".")
    if name == "localhost" or name.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False


class HostNames:
    """The names the server answers to in a request's ``Host`` header (DNS rebinding:
    a web page whose name an attacker points at 127.0.0.1 would otherwise reach the
    server from a visitor's browser as its own origin).

    For a loopback bind: ``localhost`` (and ``*.localhost``), loopback addresses and
    ``host.docker.internal``; beyond loopback also any IP address and this machine's
    host names. Plus the ``allowed`` names (``--allow-host``): exact names,
    ``*.example.com`` for any name under it, or ``*`` for any name at all."""

    def __init__(self, bind: str, allowed: Sequence[str] = ()) -> None:
        wanted = [name.strip().lower().rstrip(".") for name in allowed if name.strip()]
        self.anything = "*" in wanted
        self.suffixes = tuple(name[1:] for name in wanted if name.startswith("*."))
        self.names = {_host(name) for name in wanted if not name.startswith("*")}
        self.names |= LOCAL_NAMES
        self.loopback = is_loopback(bind)
        if not self.loopback:
            self.names |= {_host(socket.gethostname()), _host(socket.getfqdn())}

    def allows(self, header: str) -> bool:
        if self.anything or not header:
            return True
        name = _host(header)
        try:
            address = ipaddress.ip_address(name)
        except ValueError:
            return name in self.names or name.endswith(".localhost") or name.endswith(self.suffixes)
        mapped = getattr(address, "ipv4_mapped", None)
        if address.is_loopback or (mapped is not None and mapped.is_loopback):
            return True
        return not self.loopback or str(address) in self.names


def _host(header: str) -> str:
    """The host of a ``Host`` header (or a name), without port, brackets or final dot."""
    text = header.strip().lower()
    if text.startswith("["):
        return text[1:].partition("]")[0]
    try:
        return str(ipaddress.ip_address(text))  # a bare IPv6 address: no port to split
    except ValueError:
        pass
    name = text.rpartition(":")[0] if ":" in text else text
    return name.rstrip(".")


class CheckHost:
    """403 for a request whose ``Host`` header names none of :class:`HostNames`."""

    def __init__(self, app: ASGIApp, names: HostNames) -> None:
        self.app = app
        self.names = names

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = dict(scope.get("headers") or [])
        given = headers.get(b"host", b"").decode("latin-1")
        if self.names.allows(given):
            await self.app(scope, receive, send)
            return
        name = "".join(c for c in _host(given) if c.isprintable())[:100]
        scope.setdefault("state", {})["note"] = f"refused Host {name!r}"
        error = ApiError(
            403,
            f"this server does not answer to the name {name!r} (the request's Host "
            "header), so that a web page cannot reach it by pointing its own name at "
            f"this machine (DNS rebinding); to use that name, start the server with "
            f"--allow-host {name}",
            code="host_not_allowed",
        )
        await error.response(str(scope.get("path", "")))(scope, receive, send)


class CatchErrors:
    """A bug answers 500 naming the route and nothing of its exception; its traceback
    goes to the log once (and never reaches uvicorn, which would log it again)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = False

        async def sending(message: AsgiMessage) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, receive, sending)
        except Exception:
            method, path = scope.get("method", "-"), str(scope.get("path", ""))
            log.exception("unexpected error answering %s %s", method, path)
            if started:  # the status is sent: the answer just ends here
                return
            scope.setdefault("state", {})["note"] = "internal error (traceback above)"
            error = ApiError(
                500,
                f"internal error answering {method} {path}; the server's log has the details",
                kind="server_error",
            )
            await error.response(path)(scope, receive, send)
