"""``llava-local ui``: serve the chat page on this computer (needs the ``[ui]`` extra)."""

from __future__ import annotations

from typing import Any

import click

from ..apps.ui_access import wants_login
from ..apps.ui_uploads import MAX_PICTURE_MB
from ._common import engine_options, err_console, run_safely


def _login(ctx: click.Context, param: click.Parameter, value: str | None) -> tuple[str, str] | None:
    """``USER:PASSWORD`` as Gradio's login takes it (the password may hold colons)."""
    if value is None:
        return None
    user, colon, password = value.partition(":")
    if not colon or not user.strip() or not password:
        raise click.BadParameter("give a user name and a password: USER:PASSWORD")
    return user.strip(), password


@click.command()
@click.option(
    "--bind",
    default="127.0.0.1",
    show_default=True,
    help="Address the page is served on (0.0.0.0: every network, then set --auth; "
    "--host is Ollama's).",
)
@click.option("--port", type=click.IntRange(1, 65535), default=7860, show_default=True)
@click.option(
    "--auth",
    envvar="LLAVA_LOCAL_UI_AUTH",
    metavar="USER:PASSWORD",
    callback=_login,
    help="Show a login page first and let in only this user (or set LLAVA_LOCAL_UI_AUTH, "
    "which ps does not show). Required when --bind is beyond loopback. An address "
    "that gives five wrong passwords in a minute must wait (429).",
)
@click.option(
    "--no-auth",
    is_flag=True,
    help="Serve a --bind beyond loopback without a login. Risky: anyone who can reach "
    "this machine can then use the model, make it load any model file here by its "
    "path, and point a tab's engine at any address (an Ollama or OpenAI-compatible "
    "server of theirs, which is sent OPENAI_API_KEY).",
)
@click.option(
    "--allow-host",
    multiple=True,
    metavar="NAME",
    help="Also answer requests that name the page NAME in their Host header "
    "(repeatable; '*.example.com', or '*' for any name), e.g. a reverse proxy's name. "
    "By default: localhost, loopback addresses and host.docker.internal, plus any IP "
    "address and this machine's names when --bind is beyond loopback; other names get "
    "403, so that a web page cannot reach the page by DNS rebinding. A request sent by "
    "another web page (its Origin header) gets 403 too: behind a reverse proxy, have "
    "the proxy pass its public name in Host (nginx: proxy_set_header Host $http_host) "
    "and give that name here.",
)
@click.option(
    "--max-picture-mb",
    type=click.FloatRange(0.001),
    default=MAX_PICTURE_MB,
    show_default=True,
    help="Largest picture a tab may upload; a bigger upload is refused before it is stored.",
)
@engine_options
@click.option("--system", help="System prompt.")
@click.option("--temperature", type=float, help="Sampling temperature (0 = greedy).")
@click.option("--max-tokens", type=int, help="Stop each answer after this many tokens.")
def ui(
    *,
    bind: str,
    port: int,
    auth: tuple[str, str] | None,
    no_auth: bool,
    allow_host: tuple[str, ...],
    max_picture_mb: float,
    backend: str,
    model: str | None,
    **settings: Any,
) -> None:
    """A web page to chat about pictures, like the LLaVA demo, served until Ctrl-C.

    The engine options set where every new tab starts; the page can change engine
    and model per tab. Tabs on the same engine share one loaded model. Nothing is
    sent anywhere but the engine. Served beyond this computer (--bind), the page
    needs a login (--auth).
    """
    if auth is not None and no_auth:
        raise click.UsageError("--auth and --no-auth contradict each other: give one")
    if wants_login(bind, auth, no_auth=no_auth):
        raise click.UsageError(
            f"--bind {bind} serves the page beyond this computer: set --auth USER:PASSWORD "
            "(or LLAVA_LOCAL_UI_AUTH) so that only you can use it, or pass --no-auth to "
            "let anyone who can reach this machine use the model"
        )
    from ..apps import ui as page

    engine = {k: v for k, v in settings.items() if v is not None}

    def ready(url: str) -> None:
        login = "  (login required)" if auth else ""
        err_console.print(f"llava-local ui: open {url}{login}  (Ctrl-C stops it)", highlight=False)

    def body() -> None:
        try:
            page.launch(
                bind,
                port,
                on_ready=ready,
                auth=auth,
                allow_hosts=allow_host,
                no_auth=no_auth,
                max_picture_mb=max_picture_mb,
                backend=backend,
                model=model,
                **engine,
            )
        except OSError as exc:  # Gradio's message names its own knobs, not ours
            raise click.ClickException(
                f"cannot serve on {bind}:{port}: the port is taken or the address is not "
                "this computer's; choose another --port or --bind"
            ) from exc

    run_safely(body)
