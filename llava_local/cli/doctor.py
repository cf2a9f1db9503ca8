"""``llava-local doctor``: check the engines, models and machine; exit 1 on a failure."""

from __future__ import annotations

import click
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from ..apps.doctor import doctor as run_doctor
from ._common import json_option, run_safely

_MARKS = {"ok": "[green]ok[/]", "warn": "[yellow]warn[/]", "fail": "[bold red]FAIL[/]"}


@click.command()
@click.option("--host", help="Ollama address (default: OLLAMA_HOST or 127.0.0.1:11434).")
@click.option(
    "--timeout", type=float, default=1.0, show_default=True, help="Seconds to wait for Ollama."
)
@click.option(
    "--no-probe",
    is_flag=True,
    help="Do not test the llama.cpp build in a subprocess (read its features only).",
)
@json_option("Print the checks as JSON.")
def doctor(*, host: str | None, timeout: float, no_probe: bool, as_json: bool) -> None:
    """Check Ollama, llama.cpp (and the AMX trap), models, threads, memory and disk; on a
    Raspberry Pi also the board, its memory and swap, and whether its CPU is throttled."""
    failed: list[bool] = []

    def body() -> None:
        checks = run_doctor(host=host, probe=not no_probe, timeout=timeout)
        failed.append(any(check.status == "fail" for check in checks))
        if as_json:
            click.echo("[" + ",\n".join(c.model_dump_json(indent=2) for c in checks) + "]")
            return
        table = Table(show_header=True, show_lines=False)
        table.add_column("", no_wrap=True)
        table.add_column("check", no_wrap=True)
        table.add_column("found / what to do", overflow="fold")
        for check in checks:
            text = escape(check.detail)
            if check.fix and check.status != "ok":
                text += f"\n[cyan]→ {escape(check.fix)}[/]"
            table.add_row(_MARKS[check.status], check.name, text)
        Console(highlight=False).print(table)

    run_safely(body, as_json=as_json)
    if failed and failed[0]:
        raise SystemExit(1)


__all__ = ["doctor"]
