"""BENCHMARKS.md shows commands a reader can run: no path of the machine they ran on."""

from __future__ import annotations

import re
from pathlib import Path

from llava_local_dev.report import ROOT, command_line

#: A path on one machine: temporary folders, home and work folders.
LOCAL_PATH = re.compile(r"(?<![\w.])(?:/tmp|/root|/home|/work|/Users|/var/folders)/")


def test_a_benchmark_command_shows_outside_paths_as_placeholders(tmp_path: Path) -> None:
    """A folder outside the repository is written as its option's placeholder (also
    after ``=``), a file inside it relative to it, and other arguments as given."""
    argv = ["--preset", "tinyllava-1.1b", "--twins", str(tmp_path / "twins")]
    argv += [f"--logs={tmp_path / 'logs'}", "--json", str(ROOT / "benchmarks" / "r.json")]
    argv += ["--update", "BENCHMARKS.md", "--prompt", "What is it?"]
    assert command_line("benchmarks/serve.py", argv) == (
        "python benchmarks/serve.py --preset tinyllava-1.1b --twins TWINS --logs=LOGS "
        "--json benchmarks/r.json --update BENCHMARKS.md --prompt 'What is it?'"
    )


def test_benchmarks_md_names_no_local_machine_path() -> None:
    """No line of BENCHMARKS.md names a folder of the machine a benchmark ran on."""
    text = (ROOT / "BENCHMARKS.md").read_text(encoding="utf-8")
    found = [line for line in text.splitlines() if LOCAL_PATH.search(line)]
    assert found == []
