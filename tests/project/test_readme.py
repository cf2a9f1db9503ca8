"""The README's layout and tables say what the repository holds, in its users' terms."""

from __future__ import annotations

import re
from pathlib import Path

from ..paths import ROOT

README = (ROOT / "README.md").read_text(encoding="utf-8")


def layout() -> str:
    """The README's layout block: the fenced tree under "## Layout"."""
    section = README.split("\n## Layout\n", 1)[1]
    return section.split("```", 2)[1]


def test_the_layout_names_every_module() -> None:
    """Every module of the library (a package's __init__.py aside) is named, by its file
    name, in the README's layout."""
    tree = layout()
    modules = sorted(
        path.relative_to(ROOT).as_posix()
        for path in (ROOT / "llava_local").rglob("*.py")
        if path.name != "__init__.py"
    )
    assert modules, "no modules found"
    missing = [m for m in modules if not re.search(rf"(?<![\w.]){re.escape(Path(m).name)}", tree)]
    assert missing == []


def test_no_table_names_an_internal_issue() -> None:
    """No row of a README table refers to the project's own issue numbers, which a
    reader of the front page cannot look up."""
    rows = [line for line in README.splitlines() if line.startswith("|")]
    assert rows, "no tables found"
    assert [row for row in rows if re.search(r"\bissue \d+", row)] == []
