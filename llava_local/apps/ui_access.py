"""Who may use the web page (``llava-local ui``): the Host check and the login.

The page does for whoever opens it what the command line does for its user: it asks
the engine, and a tab can switch to any engine and model, load any GGUF file on this
machine by path, and point the Ollama or OpenAI-compatible engine at any address
(which then gets the engine's API key, ``OPENAI_API_KEY`` included). So:

* on any address, the page answers only requests whose ``Host`` header names this
  machine (:class:`~llava_local.host_header.HostNames`, as ``serve``'s API does), so
  that a web page a visitor opens cannot drive it by pointing its own name at
  127.0.0.1 (DNS rebinding); ``allow_hosts`` (``--allow-host``) admits more names;
* beyond loopback it needs a login (Gradio's own, ``auth=``), unless the caller says
  it serves everyone who can reach the machine (``no_auth``, ``--no-auth``).

The Host check is ASGI middleware given to the FastAPI app Gradio builds (``launch``'s
documented ``app_kwargs``), so it runs before any of Gradio's routes, the login
included.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from ..errors import InvalidRequestError
from ..host_header import HostNames, is_loopback, refusal

if TYPE_CHECKING:
    from starlette.types import ASGIApp, Receive, Scope, Send

__all__ = ["CheckHost", "Login", "check_exposure", "launch_options", "wants_login"]

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
    """Gradio ``launch()`` arguments for the Host check (its middleware, through
    ``app_kwargs``) and the login (``auth``)."""
    from starlette.middleware import Middleware

    names = HostNames(bind, allow_hosts)
    return {"app_kwargs": {"middleware": [Middleware(CheckHost, names=names)]}, "auth": auth}


class CheckHost:
    """403 in plain text for a request whose ``Host`` header names none of ``names``,
    before Gradio sees it; it says which option admits the name."""

    def __init__(self, app: ASGIApp, names: HostNames) -> None:
        self.app = app
        self.names = names

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] not in ("http", "websocket"):
            await self.app(scope, receive, send)
            return
        headers = dict(scope.get("headers") or [])
        given = headers.get(b"host", b"").decode("latin-1")
        if self.names.allows(given):
            await self.app(scope, receive, send)
            return
        if scope["type"] == "websocket":  # closed before it is accepted: a 403
            await send({"type": "websocket.close", "code": 1008})
            return
        text = refusal(given, server="this page", command="llava-local ui") + "\n"
        body = text.encode()
        await send(
            {
                "type": "http.response.start",
                "status": 403,
                "headers": [
                    (b"content-type", b"text/plain; charset=utf-8"),
                    (b"content-length", str(len(body)).encode()),
                ],
            }
        )
        await send({"type": "http.response.body", "body": body})
