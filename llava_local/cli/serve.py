"""``llava-local serve``: the engine behind HTTP, for programs that speak the OpenAI or
Ollama protocol (needs the ``[serve]`` extra)."""

from __future__ import annotations

from typing import Any

import click

from ..apps.engines import shared_pool
from ._common import engine_options, engine_plan, err_console, run_safely


@click.command()
@click.option(
    "--bind",
    default="127.0.0.1",
    show_default=True,
    help="Address to serve on (0.0.0.0: every network, then set --api-key).",
)
@click.option("--port", type=click.IntRange(1, 65535), default=8000, show_default=True)
@engine_options
@click.option("--name", help="Model name clients use (default: the model's own name).")
@click.option(
    "--api-key",
    envvar="LLAVA_LOCAL_API_KEY",
    help="Require 'Authorization: Bearer KEY' on every route but /health "
    "(or set LLAVA_LOCAL_API_KEY).",
)
@click.option(
    "--cors",
    multiple=True,
    metavar="ORIGIN",
    help="Let web pages from ORIGIN call the server (repeatable; '*' for any). Off by default.",
)
@click.option(
    "--allow-host",
    multiple=True,
    metavar="NAME",
    help="Also answer requests that name the server NAME in their Host header "
    "(repeatable; '*.example.com', or '*' for any name), as Ollama's OLLAMA_ORIGINS. "
    "By default: localhost, loopback addresses and host.docker.internal, plus any IP "
    "address and this machine's names when --bind is beyond loopback; other names get "
    "403, so that a web page cannot reach the server by DNS rebinding.",
)
@click.option(
    "--parallel",
    type=click.IntRange(1, 64),
    default=None,
    help="Requests the llama.cpp engine answers at once, decoded together a token each "
    "per step (default: as many as fit the memory, up to 4; 1 answers one at a time). "
    "Each has the whole context (n_ctx), where llama-server's -np divides its -c.",
)
@click.option(
    "--queue",
    type=click.IntRange(0, 10_000),
    default=8,
    show_default=True,
    help="Requests that may wait for the model; more get 503 with Retry-After.",
)
@click.option(
    "--max-body-mb",
    type=click.FloatRange(0.001),
    default=64.0,
    show_default=True,
    help="Largest request body (pictures are inside it).",
)
@click.option(
    "--max-picture-mb",
    type=click.FloatRange(0.001),
    default=20.0,
    show_default=True,
    help="Largest picture, decoded or downloaded.",
)
@click.option(
    "--picture-urls/--no-picture-urls",
    default=False,
    show_default=True,
    help="Download pictures that requests give as http(s) URLs. Risky: anyone who can "
    "reach the server can then make it send GET requests to any public address "
    "(loopback, private and link-local addresses are refused, redirects checked "
    "again). Off: such a picture is a 400 saying to send a data URI.",
)
@click.option(
    "--picture-url-allow",
    multiple=True,
    metavar="HOST[:PORT]",
    help="With --picture-urls, also download from HOST (on PORT only, if given) even "
    "when it is on this machine or its network (repeatable): an internal picture host.",
)
@click.option(
    "--picture-url-timeout",
    type=click.FloatRange(0.1),
    default=15.0,
    show_default=True,
    help="Seconds one picture download may take in all (slow servers are cut off).",
)
def serve(
    *,
    bind: str,
    port: int,
    backend: str,
    name: str | None,
    api_key: str | None,
    cors: tuple[str, ...],
    queue: int,
    max_body_mb: float,
    max_picture_mb: float,
    allow_host: tuple[str, ...],
    picture_urls: bool,
    picture_url_allow: tuple[str, ...],
    picture_url_timeout: float,
    parallel: int | None,
    **engine: Any,
) -> None:
    """Serve the model over HTTP until Ctrl-C: OpenAI-compatible (/v1/chat/completions,
    /v1/models) and Ollama-compatible (/api/chat, /api/tags, /api/show, ...) routes.

    One engine answers every request; with llama.cpp (the default here) several at once
    (--parallel), and a client that resends a conversation with a new question pays only
    for the question. Without -m, the bundled demo model.
    """
    from ..apps import serve as server

    if picture_url_allow and not picture_urls:
        raise click.UsageError("--picture-url-allow takes effect only with --picture-urls")
    for entry in picture_url_allow:
        try:
            server.HostPort.parse(entry)
        except ValueError as exc:
            raise click.BadParameter(str(exc), param_hint="--picture-url-allow") from None
    limits = server.Limits(
        max_body_bytes=int(max_body_mb * server.MB),
        max_picture_bytes=int(max_picture_mb * server.MB),
        queue=queue,
        fetch_timeout=picture_url_timeout,
        picture_urls=picture_urls,
        picture_url_allow=picture_url_allow,
    )

    chosen = "llama_cpp" if backend == "auto" else backend
    if chosen == "llama_cpp":
        engine["parallel"] = parallel or "auto"
    elif parallel is not None:
        raise click.UsageError("--parallel is for the llama.cpp engine (--backend llama_cpp)")
    held = ""

    def ready(url: str) -> None:
        key = "  (API key required)" if api_key else ""
        err_console.print(
            f"llava-local serve: {url}/v1 (OpenAI) and {url} (Ollama){key}{held}; Ctrl-C stops it",
            highlight=False,
        )

    def body() -> None:
        nonlocal held
        server.check_installed()
        pool = shared_pool()  # the process's engines: one per plan
        chat = pool.chat(engine_plan(chosen, **engine))
        held = server.capacity(chat)
        try:
            server.serve(
                chat,
                bind,
                port,
                name=name,
                limits=limits,
                api_key=api_key,
                cors=cors,
                allow_hosts=allow_host,
                on_ready=ready,
            )
        except OSError as exc:
            raise click.ClickException(
                f"cannot serve on {bind}:{port}: the port is taken or the address is not "
                "this computer's; choose another --port or --bind"
            ) from exc
        finally:
            pool.release(chat)

    run_safely(body)
