"""Who may use the web page (``llava-local ui``): the Host check and the login.

The page does for whoever opens it what the command line does for its user: it asks
the engine, and a tab can switch to any engine and model, load any GGUF file on this
machine by path, and point the Ollama or OpenAI-compatible engine at any address
(which then gets the engine's API key, ``OPENAI_API_KEY`` included). So:

* on any address, the page answers only requests whose ``Host`` header names this
  machine (:class:`~llava_local.host_header.HostNames`, as ``serve``'s API does), so
  that a web page a visitor opens cannot drive it by pointing its own name at
  127.0.0.1 (DNS rebinding); ``allow_hosts`` (``--allow-host``) admits more names;
* it answers no request sent by another web page (:class:`CheckCaller`): a page the
  user visits may POST to the page on loopback without asking first (a form, or a
  multipart upload: "simple" cross-origin requests), and the user's browser sends it,
  login cookie included. A browser names the page a request comes from in ``Origin``;
  Gradio reads it only to leave out the CORS headers that would let a foreign page
  *read* the answer (and only when the page is named ``localhost`` or ``127.0.0.1``:
  named ``[::1]`` or ``127.0.0.2`` it lets any page read it), so the request itself
  still runs. Here a request whose ``Origin`` is not this page gets 403 before its body
  is read; one without ``Origin`` (a script, ``curl``, the page's own GETs) is not a
  browser's cross-site request and is answered;
* beyond loopback it needs a login (Gradio's own, ``auth=``), unless the caller says
  it serves everyone who can reach the machine (``no_auth``, ``--no-auth``).

Both checks are one ASGI middleware given to the FastAPI app Gradio builds (``launch``'s
documented ``app_kwargs``), so they run before any of Gradio's routes, the login
included (Gradio's own CORS middleware, added after, wraps them and still answers a
preflight itself: the request that follows is refused here).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from ..errors import InvalidRequestError
from ..host_header import HostNames, host_of, is_loopback, refusal

if TYPE_CHECKING:
    from starlette.types import ASGIApp, Receive, Scope, Send

__all__ = [
    "CheckCaller",
    "Login",
    "check_exposure",
    "from_this_page",
    "launch_options",
    "send_text",
    "wants_login",
]

#: A user name and its password, for Gradio's login page.
Login = tuple[str, str]


def wants_login(bind: str, auth: Login | None, *, no_auth: bool = False) -> bool:
    """Whether serving on ``bind`` reaches beyond loopback with no login (``auth``) and
    without the caller saying that is meant (``no_auth``)."""
    return auth is None and not no_auth and not is_loopback(bind)


def check_exposure(bind: str, auth: Login | None, *, no_auth: bool = False) -> None:
    """Refuse to serve the page beyond loopback without a login, unless ``no_auth``."""
    if wants_login(bind, auth, no_auth=no_auth):
        raise InvalidRequestError(
            f"serving the page on {bind} without a login would let anyone who can reach "
            "this machine use the model, load any model file on it and make it connect "
            "to any address: set auth= (a user name and password), or no_auth=True to "
            "serve it to everyone on the network anyway"
        )


def launch_options(
    bind: str, allow_hosts: Sequence[str] = (), auth: Login | None = None
) -> dict[str, Any]:
    """Gradio ``launch()`` arguments for the Host and Origin checks (their middleware,
    through ``app_kwargs``) and the login (``auth``)."""
    from starlette.middleware import Middleware

    names = HostNames(bind, allow_hosts)
    checks = [Middleware(CheckCaller, names=names)]
    return {"app_kwargs": {"middleware": checks}, "auth": auth}


class CheckCaller:
    """403 in plain text, before Gradio sees the request, for one whose ``Host`` header
    names none of ``names`` (DNS rebinding), then for one sent by another web page: its
    ``Origin`` header is present and is not this page (:func:`from_this_page`), on every
    method, before its body is read. Each refusal says how to admit what was refused."""

    def __init__(self, app: ASGIApp, names: HostNames) -> None:
        self.app = app
        self.names = names

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] not in ("http", "websocket"):
            await self.app(scope, receive, send)
            return
        headers = dict(scope.get("headers") or [])
        host = headers.get(b"host", b"").decode("latin-1")
        if not self.names.allows(host):
            await _forbid(scope, send, refusal(host, server="this page", command="llava-local ui"))
            return
        origin = headers.get(b"origin")
        if origin is not None:
            given = origin.decode("latin-1").strip()
            if not from_this_page(given, host, str(scope.get("scheme", "http")), self.names):
                await _forbid(scope, send, _origin_refusal(given))
                return
        await self.app(scope, receive, send)


#: The port a URL of each scheme means when it names none.
_DEFAULT_PORTS = {"http": 80, "ws": 80, "https": 443, "wss": 443}


def from_this_page(origin: str, host: str, scheme: str, names: HostNames) -> bool:
    """Whether a request with this ``Origin`` header comes from the page itself, sent to
    the ``Host`` it names over ``scheme`` (the request's, for a ``Host`` without port).

    It does when the origin's ``host[:port]`` is the ``Host`` header's (what a browser
    sends for the page's own requests, behind a reverse proxy too when the proxy passes
    the name it was asked by), or when its name is one the page was given or has
    (:meth:`~llava_local.host_header.HostNames.known`: loopback names, this machine's,
    ``--allow-host``'s, but not ``*``) on the same port as the ``Host`` header's.
    ``null`` (a sandboxed frame, a local file, a redirect from another site) never
    does."""
    try:
        parts = urlsplit(origin.lower())
        given_port = parts.port
    except ValueError:
        return False
    name = (parts.hostname or "").rstrip(".")
    if not name or parts.scheme not in ("http", "https") or parts.path not in ("", "/"):
        return False
    default = _DEFAULT_PORTS[parts.scheme]
    port = given_port if given_port is not None else default
    to_name, to_port = host_of(host), _port_of(host)
    if name == to_name and port == (to_port if to_port is not None else default):
        return True
    sent_to = to_port if to_port is not None else _DEFAULT_PORTS.get(scheme, 80)
    return port == sent_to and names.known(name)


def _port_of(host: str) -> int | None:
    """The port a ``Host`` header names, if any (``[::1]:8080``, ``name:8080``)."""
    text = host.strip()
    tail = text.rpartition("]")[2] if text.startswith("[") else text
    if tail.count(":") != 1:
        return None  # none, or a bare IPv6 address
    digits = tail.rpartition(":")[2]
    return int(digits) if digits.isdigit() and int(digits) < 65536 else None


def _origin_refusal(origin: str) -> str:
    """What a request refused for its ``Origin`` header is told: which page sent it,
    why that is refused, and what admits a page's own address."""
    if origin.lower() == "null":
        return (
            "this page takes no request from a web page without an address (Origin: null: "
            "a sandboxed frame, a local file or a redirect from another site), so that "
            "another page cannot make your browser upload to it or use its model; open "
            "the page at its own address"
        )
    shown = "".join(c for c in origin if c.isprintable())[:100]
    try:
        name = host_of(urlsplit(shown).netloc) or "NAME"
    except ValueError:  # not a URL at all
        name = "NAME"
    return (
        f"this page takes no request from another web page ({shown!r}, the request's "
        "Origin header), so that a page you visit cannot make your browser upload to it "
        "or use its model; to open the page itself at that address, start llava-local ui "
        f"with --allow-host {name} (behind a reverse proxy, have the proxy pass "
        "that name in the Host header)"
    )


async def _forbid(scope: Scope, send: Send, text: str) -> None:
    """403 in plain text (a websocket is closed before it is accepted: a 403 too)."""
    if scope["type"] == "websocket":
        await send({"type": "websocket.close", "code": 1008})
        return
    await send_text(send, 403, text)


async def send_text(
    send: Send, status: int, text: str, headers: Sequence[tuple[bytes, bytes]] = ()
) -> None:
    """An answer of ``status`` in plain text (with ``headers`` too), the page's way of
    refusing a request before Gradio reads it (here, in :mod:`.ui_uploads` and
    :mod:`.ui_logins`)."""
    body = (text + "\n").encode()
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [
                (b"content-type", b"text/plain; charset=utf-8"),
                (b"content-length", str(len(body)).encode()),
                *headers,
            ],
        }
    )
    await send({"type": "http.response.body", "body": body})
