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
from ..apps.wrappers import HELD_OUT, load_wrappers
from ._common import _ParamType, engine_options, json_option, open_chat, run_safely


class _Temperature(_ParamType):  # type: ignore[misc]
    """A temperature (0: greedy), or ``default``: the engine's own sampling."""

    name = "FLOAT|default"

    def convert(self, value: Any, param: Any, ctx: Any) -> float | str:
        if isinstance(value, float) or value == "default":
            return value  # type: ignore[no-any-return]
        try:
            number = float(value)
        except ValueError:
            self.fail(f"{value!r} is neither a number nor 'default'", param, ctx)
        if number < 0:
            self.fail(f"{value} is below 0", param, ctx)
        return number


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
@click.option(
    "--structured",
    is_flag=True,
    help="Ask for JSON with each task's schema, the grammar on, and score the exact value.",
)
@click.option(
    "--wrapped",
    "wrapped",
    is_flag=False,
    flag_value="held-out",
    metavar="[held-out|PATH]",
    help="Ask through client software's system prompts and text around the question: the "
    "held-out set the demo never saw, or a JSON file of wrappers.",
)
@click.option(
    "--temperature",
    type=_Temperature(),
    help="Sampling temperature (default 0: greedy); 'default': the engine's own sampling, "
    "as a client that sends none gets.",
)
@click.option(
    "--samples",
    type=click.IntRange(min=1),
    default=1,
    show_default=True,
    help="Answers per picture and question (needs a temperature above 0 or 'default').",
)
@click.option("--seed", type=int, help="Sampling seed; sample i uses SEED+i.")
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
    structured: bool,
    wrapped: str | None,
    temperature: float | str | None,
    samples: int,
    seed: int | None,
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

    --structured asks for JSON as structured-output clients do; --wrapped asks through
    other software's prompts; --temperature with --samples measures sampled answers
    (e.g. --temperature default --samples 5 --seed 0).
    """
    given = {"temperature": temperature, "max_tokens": max_tokens, "seed": seed}
    options: dict[str, Any] = {k: v for k, v in given.items() if v is not None}
    if temperature == "default":
        options["temperature"] = None  # the engine's default sampling

    asked = list(prompts)
    if not asked and dataset in BUILT_IN:
        asked = list(default_prompts(dataset, wrapped=wrapped is not None))
    if not asked:
        raise click.UsageError(f"give the question to ask about {dataset} with --prompt")

    def body() -> None:
        wrappers = None
        if wrapped is not None:
            wrappers = list(HELD_OUT) if wrapped == "held-out" else load_wrappers(wrapped)
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
                structured=structured,
                samples=samples,
                wrappers=wrappers,
                **options,
            )
        if as_json:
            click.echo(report.model_dump_json(indent=2))
        else:
            Console(highlight=False).print(report.render())

    run_safely(body, as_json=as_json)
