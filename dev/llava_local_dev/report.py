"""Writing a benchmark's section of BENCHMARKS.md, shared by the scripts in benchmarks/."""

from __future__ import annotations

import os
import re
import shlex
from collections.abc import Sequence
from pathlib import Path

__all__ = ["command_line", "update_section"]

#: The repository (this package lives in its dev/ folder, installed editable).
ROOT = Path(__file__).resolve().parents[2]


def update_section(path: Path, name: str, title: str, body: str) -> None:
    """Replace (or append) the part of ``path`` between this section's markers, so a
    script run again rewrites its own section and leaves the others as they are."""
    begin, end = f"<!-- begin {name} -->", f"<!-- end {name} -->"
    block = f"{begin}\n### {title}\n\n{body}{end}"
    text = path.read_text() if path.exists() else "# Benchmarks\n"
    pattern = re.compile(re.escape(begin) + r".*?" + re.escape(end), re.DOTALL)
    if pattern.search(text):
        text = pattern.sub(lambda _: block, text)
    else:
        text = text.rstrip("\n") + "\n\n" + block + "\n"
    path.write_text(text)


def command_line(script: str, argv: Sequence[str]) -> str:
    """The command that ran a benchmark, as BENCHMARKS.md shows it: ``python`` and the
    script's path in the repository, then its arguments, with a path inside the
    repository written relative to it and one outside it (a folder of twins, of logs)
    as its option's placeholder (``--twins TWINS``): the machine it ran on is not the
    reader's."""
    words = ["python", script]
    for index, arg in enumerate(argv):
        option, equals, value = arg.partition("=") if arg.startswith("--") else ("", "", arg)
        if not _is_path(value):
            words.append(arg)
            continue
        before = argv[index - 1] if index else ""
        name = option or (before if before.startswith("--") else "--path")
        shown = _shown(value, name)
        words.append(f"{option}={shown}" if equals else shown)
    return " ".join(shlex.quote(word) for word in words)


def _is_path(value: str) -> bool:
    return os.path.isabs(value) or value.startswith("~")


def _shown(value: str, option: str) -> str:
    """A path as the command shows it: relative inside the repository, else the option's
    name as a placeholder."""
    path = Path(value).expanduser().resolve()
    if path.is_relative_to(ROOT):
        return path.relative_to(ROOT).as_posix() or "."
    return option.lstrip("-").replace("-", "_").upper()
