"""How many passwords the web page's login (``llava-local ui --auth``) lets one address try.

Gradio's login route checks a password as often as it is asked, so a page served on a
network with ``--auth`` could be guessed at thousands of times a minute. Here each
client address may fail :data:`FAILURES` times in :data:`WINDOW` seconds; after that
its logins get 429 with ``Retry-After`` (the right password too, so a guess gains
nothing) until the oldest failure is that old. Attempts still running count as
failures, so a burst of simultaneous guesses is bounded as well. A login that
succeeds clears its address's failures.

An IPv6 client counts by its /64 network (one host usually has a whole one). Behind a
reverse proxy every visitor is the proxy's address: then a guesser locks everyone out
for at most :data:`WINDOW` seconds, the price of not trusting ``X-Forwarded-For``,
which any client can set. At most :data:`CLIENTS` addresses are remembered (the
longest-quiet forgotten first), so the bookkeeping has a bounded cost.
"""

from __future__ import annotations

import ipaddress
import math
import time
from collections import OrderedDict, deque
from collections.abc import Callable
from typing import TYPE_CHECKING

from .ui_access import send_text

if TYPE_CHECKING:
    from starlette.middleware import Middleware
    from starlette.types import ASGIApp, Message, Receive, Scope, Send

__all__ = ["CLIENTS", "FAILURES", "WINDOW", "LoginAttempts", "ThrottleLogins", "login_throttle"]

#: Failed logins one address may have in :data:`WINDOW` seconds.
FAILURES = 5
#: Seconds a failed login counts against its address.
WINDOW = 60.0
#: Addresses remembered at most.
CLIENTS = 10_000

#: Gradio's login route (it takes both).
_LOGIN_PATHS = ("/login", "/login/")


class LoginAttempts:
    """Failed and running logins per client address, over a sliding window."""

    def __init__(
        self,
        failures: int = FAILURES,
        window: float = WINDOW,
        *,
        clients: int = CLIENTS,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.failures = failures
        self.window = window
        self.clients = clients
        self.clock = clock
        self._failed: OrderedDict[str, deque[float]] = OrderedDict()
        self._running: dict[str, int] = {}

    def begin(self, client: str) -> float | None:
        """Start a login from ``client``: ``None`` if it may go on (then :meth:`end` it),
        else the seconds until it may try again."""
        key = _key(client)
        now = self.clock()
        failed = self._failed.get(key, deque())
        while failed and failed[0] <= now - self.window:
            failed.popleft()
        running = self._running.get(key, 0)
        if len(failed) + running >= self.failures:
            return failed[0] + self.window - now if failed else self.window
        self._running[key] = running + 1
        return None

    def end(self, client: str, *, succeeded: bool) -> None:
        """End a login :meth:`begin` let go on."""
        key = _key(client)
        left = self._running.pop(key, 1) - 1
        if left > 0:
            self._running[key] = left
        if succeeded:
            self._failed.pop(key, None)
            return
        failed = self._failed.setdefault(key, deque())
        failed.append(self.clock())
        self._failed.move_to_end(key)
        while len(self._failed) > self.clients:
            self._failed.popitem(last=False)


def _key(client: str) -> str:
    """The address a client's logins count against: its IPv6 /64 network, else itself."""
    try:
        address = ipaddress.ip_address(client)
    except ValueError:
        return client  # not an address: a Unix socket's client
    if isinstance(address, ipaddress.IPv6Address):
        if address.ipv4_mapped is not None:
            return str(address.ipv4_mapped)
        return str(ipaddress.IPv6Network((address, 64), strict=False))
    return str(address)


class ThrottleLogins:
    """429 with ``Retry-After``, before Gradio checks the password, for a login from an
    address that failed too often (:class:`LoginAttempts`); other requests pass."""

    def __init__(self, app: ASGIApp, attempts: LoginAttempts) -> None:
        self.app = app
        self.attempts = attempts

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if (
            scope["type"] != "http"
            or scope["method"] != "POST"
            or scope["path"] not in _LOGIN_PATHS
        ):
            await self.app(scope, receive, send)
            return
        client = (scope.get("client") or ("unknown", 0))[0]
        wait = self.attempts.begin(client)
        if wait is not None:
            seconds = max(1, math.ceil(wait))
            await send_text(
                send,
                429,
                f"too many failed logins from this address: try again in {seconds} s",
                headers=[(b"retry-after", str(seconds).encode())],
            )
            return
        status = 0

        async def sent(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, sent)
        finally:
            self.attempts.end(client, succeeded=200 <= status < 300)


def login_throttle(attempts: LoginAttempts | None = None) -> Middleware:
    """:class:`ThrottleLogins` for Gradio's app (``launch``'s ``app_kwargs``), counting in
    ``attempts`` (default: :data:`FAILURES` per :data:`WINDOW` seconds)."""
    from starlette.middleware import Middleware

    return Middleware(ThrottleLogins, attempts=attempts or LoginAttempts())
