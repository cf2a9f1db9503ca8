"""``llava-local ask IMAGE PROMPT``: one question about one picture."""

from __future__ import annotations

import io
import sys
from typing import Any

import click

from ..images import looks_like_picture_path, read_source
from ._common import (
    StatusLine,
    engine_options,
    json_option,
    open_chat,
    quiet_option,
    run_safely,
)


@click.command()
@click.argument("image")
@click.argument("prompt")
@engine_options
@click.option("--system", help="System prompt.")
@click.option("--temperature", type=float, help="Sampling temperature (0 = greedy).")
@click.option("--max-tokens", type=int, help="Stop after this many tokens.")
@click.option("--seed", type=int, help="Random seed, for repeatable sampling.")
@click.option("--no-stream", is_flag=True, help="Print the answer only when it is complete.")
@json_option("Print the reply with its stats as JSON.")
@quiet_option
def ask(
    *,
    image: str,
    prompt: str,
    system: str | None,
    temperature: float | None,
    max_tokens: int | None,
    seed: int | None,
    no_stream: bool,
    as_json: bool,
    quiet: bool,
    **engine: Any,
) -> None:
    """Ask PROMPT about IMAGE (a path, an http(s) URL, or - for standard input)."""
    if looks_like_picture_path(prompt) and not looks_like_picture_path(image):
        raise click.UsageError(
            f"{prompt!r} looks like the picture and {image!r} like the question: "
            "the picture comes first (llava-local ask IMAGE PROMPT)"
        )
    status = StatusLine(not quiet)

    def body() -> None:
        source = _read_picture(image)
        try:
            with open_chat(
                **engine,
                system=system,
                temperature=temperature,
                max_tokens=max_tokens,
                seed=seed,
                on_status=status,
            ) as chat:
                if as_json or no_stream:
                    reply = chat.ask(prompt, image=source)
                    status.stop()
                    click.echo(reply.model_dump_json(indent=2) if as_json else reply.text)
                    return
                for piece in chat.stream(prompt, image=source):
                    click.echo(piece, nl=False)
                click.echo()
        finally:
            status.stop()

    run_safely(body, one_shot=True, as_json=as_json)


class _Picture(io.BytesIO):
    """A picture's bytes in memory under the name they were read by (what errors say)."""

    def __init__(self, data: bytes, name: str) -> None:
        super().__init__(data)
        self.name = name


def _read_picture(image: str) -> _Picture:
    """IMAGE's bytes, read before an engine is chosen and loaded: a picture that is not
    there is then the one thing said, not the second after a notice about the engine."""
    return _Picture(*read_source(sys.stdin.buffer if image == "-" else image))
