"""``llava-local ui``: serve the chat page on this computer (needs the ``[ui]`` extra)."""

from __future__ import annotations

from typing import Any

import click

from ._common import engine_options, err_console, run_safely


@click.command()
@click.option(
    "--bind",
    default="127.0.0.1",
    show_default=True,
    help="Address the page is served on (0.0.0.0: every network; --host is Ollama's).",
)
@click.option("--port", type=click.IntRange(1, 65535), default=7860, show_default=True)
@engine_options
@click.option("--system", help="System prompt.")
@click.option("--temperature", type=float, help="Sampling temperature (0 = greedy).")
@click.option("--max-tokens", type=int, help="Stop each answer after this many tokens.")
def ui(
    *,
    bind: str,
    port: int,
    backend: str,
    model: str | None,
    **settings: Any,
) -> None:
    """A web page to chat about pictures, like the LLaVA demo, served until Ctrl-C.

    The engine options set where every new tab starts; the page can change engine
    and model per tab. Tabs on the same engine share one loaded model. Nothing is
    sent anywhere but the engine.
    """
    from ..apps import ui as page

    engine = {k: v for k, v in settings.items() if v is not None}

    def ready(url: str) -> None:
        err_console.print(f"llava-local ui: open {url}  (Ctrl-C stops it)", highlight=False)

    def body() -> None:
        try:
            page.launch(bind, port, on_ready=ready, backend=backend, model=model, **engine)
        except OSError as exc:  # Gradio's message names its own knobs, not ours
            raise click.ClickException(
                f"cannot serve on {bind}:{port}: the port is taken or the address is not "
                "this computer's; choose another --port or --bind"
            ) from exc

    run_safely(body)
