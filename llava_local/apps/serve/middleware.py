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
import logging
import time
from typing import TYPE_CHECKING

from ...host_header import HostNames, refusal, shown
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


class CheckHost:
    """403 for a request whose ``Host`` header names none of its
    :class:`~llava_local.host_header.HostNames` (DNS rebinding)."""

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
        scope.setdefault("state", {})["note"] = f"refused Host {shown(given)!r}"
        error = ApiError(
            403,
            refusal(given, server="this server", command="the server"),
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
