"""``llava-local bench [IMAGE]``: the standard benchmark on the user's own model.

Why a command: "how fast is it on my machine, and do follow-up questions really skip
the picture?" should take one line to answer, with numbers comparable to BENCHMARKS.md.
"""

from __future__ import annotations

import sys
from typing import Any

import click
from rich.console import Console

from ..apps import bench as _bench
from ._common import engine_options, err_console, json_option, open_chat, run_safely


@click.command()
@click.argument("image", required=False)
@engine_options
@click.option(
    "--turns",
    type=click.IntRange(1, 20),
    default=3,
    show_default=True,
    help="Questions to ask: the first with the picture, the rest about it.",
)
@click.option(
    "--max-tokens",
    type=click.IntRange(min=1),
    default=32,
    show_default=True,
    help="New tokens per answer (greedy decoding).",
)
@json_option("Print the result as JSON.")
def bench(*, image: str | None, turns: int, max_tokens: int, as_json: bool, **engine: Any) -> None:
    """Time a short conversation about IMAGE (a path, a URL, or - for standard input).

    Without IMAGE a generated photo-like picture is used. Prints, per turn, the time to
    the first token, the total time, the picture-encoding time, the prompt tokens
    evaluated and reused, and the decoding speed; then the peak memory.
    """
    source: Any = sys.stdin.buffer.read() if image == "-" else image

    def progress(turn: _bench.TurnResult) -> None:
        if not as_json:
            err_console.print(f"turn {turn.turn}/{turns} done in {turn.total_s:.2f} s")

    def body() -> None:
        with open_chat(**engine) as chat:
            result = _bench.run(chat, source, turns=turns, max_tokens=max_tokens, on_turn=progress)
        if as_json:
            click.echo(result.model_dump_json(indent=2))
        else:
            _bench.render(result, Console(file=sys.stdout, markup=False))

    run_safely(body, as_json=as_json)
