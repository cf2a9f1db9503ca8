"""``llava-local models`` and ``llava-local pull NAME``: what is here, what exists, fetching."""

from __future__ import annotations

from typing import Any

import click
from rich import box
from rich.console import Console
from rich.markup import escape
from rich.table import Table
from rich.text import Text

from ..apps.models import ModelsReport, PullResult, list_models, pull, this_board
from ..backends.llama_cpp.kv_budget import KVBudget
from ..devices import DEVICES, OS_RESERVE, Budget
from ..memory import human
from ._common import EngineName, json_option, run_safely


def _size(n: int | None) -> str:
    if n is None:
        return "?"
    return f"{n / 1e9:.2f} GB" if n >= 1e9 else f"{n / 1e6:.0f} MB"


def _yes(value: bool | None) -> str:
    return {True: "[green]yes[/]", False: "[red]no[/]", None: "?"}[value]


@click.command()
@click.option("--host", help="Ollama address (default: OLLAMA_HOST or 127.0.0.1:11434).")
@click.option(
    "--timeout", type=float, default=1.0, show_default=True, help="Seconds to wait for Ollama."
)
@json_option("Print the whole report as JSON.")
@click.option(
    "--device",
    type=click.Choice(sorted(DEVICES)),
    help="Each model's memory on a Raspberry Pi 4 or 5 (4 and 8 GB) and its speed there, "
    "estimated from published figures (default: this board, on a Pi).",
)
def models(*, host: str | None, timeout: float, as_json: bool, device: str | None) -> None:
    """List installed models, the catalogue, and what fits in memory."""

    def body() -> None:
        report = list_models(host=host, timeout=timeout, device=device or this_board())
        if as_json:
            click.echo(report.model_dump_json(indent=2))
        else:
            _print_report(report, Console(highlight=False, soft_wrap=False))

    run_safely(body, as_json=as_json)


#: Below this width the tables drop their borders and the columns they can spare, so
#: that names and Ollama tags, what users copy, are never cut.
_WIDE = 100
#: From this width the catalogue also shows where each entry's figures come from.
_WIDEST = 120


def _table(title: str, compact: bool) -> Table:
    """A table with borders, or in a narrow terminal a compact one: a rule under the
    header, two spaces between columns."""
    if not compact:
        return Table(title=title, title_justify="left")
    return Table(
        title=title,
        title_justify="left",
        box=box.SIMPLE_HEAD,
        show_edge=False,
        pad_edge=False,
        collapse_padding=True,
    )


def _print_report(report: ModelsReport, console: Console) -> None:
    status = report.ollama
    if status.reachable:
        console.print(f"Ollama {status.version} at {status.host}", markup=False)
    else:
        console.print(f"Ollama: no daemon at {status.host}", markup=False)
    memory = report.available_memory_bytes
    console.print(
        f"Memory available: {_size(memory)}; Hugging Face cache: {report.hf_cache}", markup=False
    )
    # Names and Ollama tags are never cut: in a narrow terminal the files of the
    # installed models go below their table and the catalogue leaves out where an entry
    # is installed (the first table says it); `--json` has everything.
    compact = console.width < _WIDE
    _print_installed(report, console, compact)
    _print_catalogue(report, console, compact, evidence=console.width >= _WIDEST)
    if report.device is not None:
        _print_device(report, console, compact)


def _print_installed(report: ModelsReport, console: Console, compact: bool) -> None:
    if not report.installed:
        console.print("Installed: nothing yet (try `llava-local pull smolvlm-500m`)")
        return
    installed = _table("Installed", compact)
    widths = (("name", 4), ("from", 7), ("vision", 6), ("size", 8), ("needs", 8), ("fits", 4))
    for column, width in widths:
        installed.add_column(column, no_wrap=True, min_width=width)
    # llama.cpp's budget for a GGUF pair: conversations at once, and (when there is
    # room) the memory for kept KV states
    installed.add_column("at once", no_wrap=True)
    if not compact:
        installed.add_column("kept", no_wrap=True)
        installed.add_column("where", overflow="fold")
    places = []
    for model in report.installed:
        where = str(model.model_path or "")
        if model.note:
            where = f"{where} ({model.note})" if where else model.note
        vision = {True: "yes", False: "[red]no[/]", None: "?"}[model.vision]
        installed.add_row(
            escape(model.name),
            model.source,
            vision,
            _size(model.size_bytes),
            _size(model.memory_bytes),
            _yes(model.fits),
            _at_once(model.budget),
            *([] if compact else [_kept(model.budget), escape(where)]),
        )
        if where:
            places.append(Text(f"  {model.name}: {where}", overflow="fold"))
    console.print(installed)
    if compact:
        for place in places:
            console.print(place)
    console.print(
        Text(
            "at once: conversations llama.cpp answers together (`serve`, `caption "
            "--parallel`) with the default context"
            + ("" if compact else "; kept: the memory for KV states kept between them")
            + "; `--json` has the whole budget.",
            overflow="fold",
        )
    )


def _at_once(budget: KVBudget | None) -> str:
    if budget is None:
        return ""
    if not budget.fits:
        return "[red]0[/]"
    return f"[yellow]{budget.parallel}[/]" if budget.parallel == 1 else str(budget.parallel)


def _kept(budget: KVBudget | None) -> str:
    if budget is None or not budget.fits:
        return ""
    return human(budget.kept_bytes) if budget.kept_bytes else "[yellow]none[/]"


def _print_catalogue(
    report: ModelsReport, console: Console, compact: bool, *, evidence: bool
) -> None:
    available = _table("Catalogue (llava-local pull NAME)", compact)
    available.add_column("name", no_wrap=True)
    available.add_column("ollama", no_wrap=True)
    for column, width in (("download", 8), ("needs", 8), ("fits", 4)):
        available.add_column(column, no_wrap=True, min_width=width)
    if not compact:
        available.add_column("installed", overflow="fold", min_width=9)
    if evidence:
        available.add_column("evidence", overflow="fold")
    for item in report.available:
        entry = item.entry
        available.add_row(
            entry.name,
            entry.ollama or "",
            _size(entry.download_bytes) if entry.has_gguf else "bundled",
            _size(entry.memory_bytes) if entry.memory_bytes else "?",
            _yes(item.fits),
            *([] if compact else [", ".join(item.installed)]),
            *([escape(entry.evidence)] if evidence else []),
        )
    console.print(available)


def _seconds(value: float | None) -> str:
    if value is None:
        return "?"
    if value >= 90:
        return f"{value / 60:.0f} min"
    if value < 1:
        return "<1 s"
    return f"{value:.0f} s" if value >= 10 else f"{value:.1f} s"


def _fits(budget: Budget, gib: int) -> str:
    """yes, no, or the shorter context the engine would load it with there."""
    context = budget.context[gib]
    if budget.fits[gib] or context is None:
        return _yes(budget.fits[gib])
    return f"[yellow]n_ctx {context}[/]"


def _budget_row(budget: Budget) -> list[str]:
    fits = [_fits(budget, gib) for gib in sorted(budget.fits)]
    speed = "?" if budget.tokens_per_s is None else f"{budget.tokens_per_s:.1f}"
    if budget.tokens_per_s is not None and budget.tokens_per_s > 100:
        speed = ">100"  # a model this small is bound by per-token overheads, not weights
    return [
        budget.model,
        _size(budget.needed_bytes),
        *fits,
        _seconds(budget.first_answer_s),
        speed,
    ]


def _print_device(report: ModelsReport, console: Console, compact: bool) -> None:
    device = report.device
    assert device is not None
    table = _table(f"{device.title}: memory, and ESTIMATED speeds", compact)
    table.add_column("model", no_wrap=True)
    table.add_column("needs", no_wrap=True)
    for gib in device.ram_gib:
        table.add_column(f"{gib} GB", no_wrap=True)
    table.add_column("first answer", no_wrap=True)
    table.add_column("tokens/s", no_wrap=True)
    for budget in report.budgets:
        table.add_row(*_budget_row(budget))
    console.print(table)
    console.print(
        Text(
            "needs: both files, the KV cache of one picture and 2048 text tokens, work "
            "buffers and the 256 MiB picture cache; a model fits when that and a safety "
            f"margin fit in the RAM less {OS_RESERVE / 2**30:.1f} GiB for the system; "
            "n_ctx N: it loads with that shorter context. "
            "first answer: encoding the picture and reading the prompt, after loading. "
            f"These speeds are estimates from published figures ({device.figures}); "
            "see llava_local/devices.py.",
            overflow="fold",
        )
    )
    if report.pairs_on_device:
        _print_pairs_on_device(report, console, compact)


def _on_board(budget: KVBudget | None) -> str:
    """One RAM size's cell: conversations at once x positions, kept states."""
    if budget is None:
        return "?"
    if not budget.fits:
        return _yes(False)
    kept = f", kept {human(budget.kept_bytes)}" if budget.kept_bytes else ", none kept"
    return f"{budget.parallel} x {budget.n_ctx}{kept}"


def _print_pairs_on_device(report: ModelsReport, console: Console, compact: bool) -> None:
    device = report.device
    assert device is not None
    board = device.title.split(" (")[0]
    table = _table(f"GGUF pairs here, on a {board}", compact)
    table.add_column("model", no_wrap=True)
    for gib in device.ram_gib:
        table.add_column(f"{gib} GB", no_wrap=True)
    for pair in report.pairs_on_device:
        table.add_row(
            escape(pair.name), *[_on_board(pair.budgets.get(gib)) for gib in device.ram_gib]
        )
    console.print(table)
    console.print(
        Text(
            "N x P: llama.cpp answers N conversations at once (`serve`), each of P positions; "
            "kept: the memory for KV states kept between them.",
            overflow="fold",
        )
    )


@click.command(name="pull")
@click.argument("name")
@click.option(
    "--backend",
    type=EngineName(pulls_models=True),
    default="auto",
    show_default=True,
    help="ollama: pull through the daemon; llama_cpp: download the GGUF pair; auto: by name.",
)
@click.option("--host", help="Ollama address (default: OLLAMA_HOST or 127.0.0.1:11434).")
@click.option("--revision", help="Hugging Face revision (branch, tag or commit) of the GGUF pair.")
@click.option("--quiet", "-q", is_flag=True, help="No progress bars.")
@json_option("Print what was fetched as JSON.")
def pull_command(**options: Any) -> None:
    """Fetch NAME: a catalogue model's GGUF pair, or an Ollama tag through the daemon.

    See `llava-local models` for the names. Downloads go to the Hugging Face cache
    (HF_HUB_CACHE); HF_ENDPOINT picks a mirror, HF_HUB_OFFLINE=1 uses the cache only.
    """
    as_json = options.pop("as_json")
    quiet = options.pop("quiet")

    def body() -> None:
        result = pull(
            options["name"],
            host=options["host"],
            backend=options["backend"],
            revision=options["revision"],
            progress=not quiet,
        )
        if as_json:
            click.echo(result.model_dump_json(indent=2))
        else:
            _print_pulled(result)

    run_safely(body, as_json=as_json)


def _print_pulled(result: PullResult) -> None:
    if result.backend == "ollama":
        click.echo(f"{result.name}: pulled into Ollama as {result.ollama_tag}")
        click.echo(
            f"use it: llava-local ask PICTURE QUESTION --backend ollama -m {result.ollama_tag}"
        )
        return
    click.echo(f"{result.name}:")
    click.echo(f"  model:  {result.model_path}")
    click.echo(f"  mmproj: {result.mmproj_path}")
    click.echo(f"use it: llava-local ask PICTURE QUESTION --backend llama_cpp -m {result.name}")


__all__ = ["models", "pull_command"]
