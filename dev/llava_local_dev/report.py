"""Writing a benchmark's section of BENCHMARKS.md, shared by the scripts in benchmarks/."""

from __future__ import annotations

import re
from pathlib import Path

__all__ = ["update_section"]


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
