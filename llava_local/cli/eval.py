"""``llava-local eval digits|shapes|PATH``: accuracy of a model on a labelled picture set.

A thin layer over :func:`llava_local.apps.eval.evaluate`, which documents how answers are
read and scored; the sets are described in :mod:`llava_local.apps.datasets`.
"""

from __future__ import annotations

from typing import Any

import click
from rich.console import Console

from ..apps.datasets import BUILT_IN, RESAMPLING, default_prompts, load_set
from ..apps.eval import evaluate
from ._common import engine_options, json_option, open_chat, run_safely


@click.command("eval")
@click.argument("dataset", metavar="digits|shapes|PATH")
@click.option(
    "--prompt",
    "-p",
    "prompts",
    multiple=True,
    help="A question to ask about every picture (repeatable). Built-in sets have defaults.",
)
@click.option(
    "--label",
    "kind",
    help="Score every prompt against this kind of label (e.g. colour); default: the kind "
    "each prompt names.",
)
@click.option("--limit", type=click.IntRange(min=1), help="Use only the first N pictures.")
@click.option(
    "--task",
    type=click.Choice(["auto", "digit", "classes"]),
    default="auto",
    show_default=True,
    help="Read answers as the first digit, or as a class name; auto: digit for digit labels.",
)
@click.option("--size", type=click.IntRange(8, 512), help="digits: picture size in pixels (64).")
@click.option(
    "--resample", type=click.Choice(list(RESAMPLING)), help="digits: resampling (nearest)."
)
@click.option("--vary", is_flag=True, help="digits: a random size and filter per picture.")
@engine_options
@click.option("--system", help="System prompt.")
@click.option("--temperature", type=float, help="Sampling temperature (default 0: greedy).")
@click.option("--max-tokens", type=int, help="Stop each answer after this many tokens (64).")
@click.option("--no-progress", is_flag=True, help="Do not draw the progress bar.")
@json_option("Print the whole report as JSON.")
def eval_command(
    *,
    dataset: str,
    prompts: tuple[str, ...],
    kind: str | None,
    limit: int | None,
    task: str,
    size: int | None,
    resample: str | None,
    vary: bool,
    system: str | None,
    temperature: float | None,
    max_tokens: int | None,
    no_progress: bool,
    as_json: bool,
    **engine: Any,
) -> None:
    """Ask every picture of a labelled set each prompt and print the accuracy per prompt,
    the confusion matrices and the time per picture.

    The set is digits (397 handwritten test digits), shapes (300 drawn shapes, asked
    their shape and colour), a folder with one sub-folder per class, or a CSV / JSONL
    file of path and label.
    """
    given = {"temperature": temperature, "max_tokens": max_tokens}
    options: dict[str, Any] = {k: v for k, v in given.items() if v is not None}

    asked = list(prompts) or (list(default_prompts(dataset)) if dataset in BUILT_IN else [])
    if not asked:
        raise click.UsageError(f"give the question to ask about {dataset} with --prompt")

    def body() -> None:
        pictures = load_set(dataset, size=size, resample=resample, vary=vary)
        with open_chat(**engine, system=system) as chat:
            report = evaluate(
                chat,
                pictures,
                asked if kind is None else dict.fromkeys(asked, kind),
                task=task,  # type: ignore[arg-type]  # checked by click.Choice
                limit=limit,
                progress=not no_progress,
                name=dataset,
                **options,
            )
        if as_json:
            click.echo(report.model_dump_json(indent=2))
        else:
            Console(highlight=False).print(report.render())

    run_safely(body, as_json=as_json)
