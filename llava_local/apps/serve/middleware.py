"""What wraps every route: one log line per request, and the API key.

Plain ASGI middleware rather than Starlette's ``BaseHTTPMiddleware``, so a streamed
answer is timed (and its status logged) to its end.
"""

from __future__ import annotations

import hmac
import logging
import time
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
