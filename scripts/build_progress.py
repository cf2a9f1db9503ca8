"""Turn the output of ``pip wheel -v llama-cpp-python`` into a few lines of progress.

``scripts/install-llama-cpp.sh`` pipes the build's whole output here (and into a log
file). Compiling llama.cpp takes 3 to 10 minutes, during which pip alone prints either
nothing (without ``-v``) or thousands of compiler command lines (with it). This keeps:

- the download of the source archive (``Downloading llama_cpp_python-....tar.gz (77 MB)``);
- scikit-build-core's phases (``*** Configuring CMake...``, ``*** Building project
  with Ninja...``, ``*** Created ...whl``), in words;
- the compile steps, ``[ 42%] Building C object ...`` (make) or ``[57/143] ...``
  (ninja), as ``compiling llama.cpp:  40% (1:52)`` each time another tenth is done;
- and, when a minute passes without such a line (one large file can take that long),
  ``still compiling: 40% (2:52)``, so the build never looks stuck.

A build the script resumes (its CMake build folder kept from a killed run) makes ninja
count only the steps left: ``[1/97]`` where the whole build has 193. ``--steps FILE``
keeps the whole build's count, written by the run that starts from nothing and read by
the later ones, which say ``resuming the build: 96 of 193 steps already compiled`` and
show the percentages of the whole. ``--record FILE`` writes this run's seconds so far into
FILE while the build goes (every second at most), so a run killed by a power cut still
counts in the build's total time.

Standard library only: it runs in the fresh virtualenv before anything is installed.
Usage: ``pip wheel -v ... 2>&1 | python scripts/build_progress.py [--steps F] [--record F]``.
"""

from __future__ import annotations

import argparse
import os
import re
import select
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

#: A compile step: make's ``[ 42%]`` or ninja's ``[57/143]``, after pip's indentation.
STEP = re.compile(r"^\s*\[(?:\s*(?P<percent>\d{1,3})%|(?P<done>\d+)/(?P<total>\d+))\]\s")
DOWNLOAD = re.compile(r"^\s*Downloading (?P<what>\S+\.tar\.gz)(?: \((?P<size>[^)]+)\))?")
#: scikit-build-core's own progress lines (``*** ...``): what the build is doing now.
PHASES = (
    ("*** Configuring CMake", "configuring the build (cmake)"),
    ("*** Building project", "compiling llama.cpp"),
    ("*** Installing project", "packing the wheel"),
    ("*** Created ", "packing the wheel"),
)
COMPILING = "compiling llama.cpp"
#: A line every tenth of the compile steps.
EVERY = 10
#: With no new line for this long, say the build is still going.
QUIET_S = 60.0
#: The time record of a run is rewritten at most this often.
RECORD_EVERY_S = 1.0


def elapsed(seconds: float) -> str:
    """``m:ss``."""
    whole = int(seconds)
    return f"{whole // 60}:{whole % 60:02d}"


def progress(
    lines: Iterable[str | None],
    clock: Callable[[], float] = time.monotonic,
    every: int = EVERY,
    quiet_s: float = QUIET_S,
    *,
    steps: int | None = None,
    on_steps: Callable[[int], None] | None = None,
) -> Iterator[str]:
    """The progress lines for ``lines`` of build output; ``None`` in ``lines`` marks a
    moment without output (a tick), when a line is due if ``quiet_s`` passed.

    ``steps`` is the whole build's ninja step count, known from an earlier run of the
    same build: when ninja has fewer left, the steps before them were compiled then.
    ``on_steps`` is told the count when this run starts the build from nothing."""
    start = last = clock()
    doing, percent, shown = "preparing the build", 0, -every
    before: int | None = None  # steps compiled by earlier runs, known at the first step
    for line in lines:
        now = clock()
        if line is None:
            if now - last >= quiet_s:
                last = now
                done = f": {percent:3d}%" if doing == COMPILING else ""
                yield f"  still {doing}{done} ({elapsed(now - start)})"
            continue
        step = STEP.match(line)
        if step is not None:
            doing = COMPILING
            if step["percent"] is not None:
                percent = min(int(step["percent"]), 100)
            else:
                left = max(int(step["total"]), 1)
                if before is None:
                    if steps is None or left >= steps:
                        steps, before = left, 0
                        if on_steps is not None:
                            on_steps(left)
                    else:
                        before = steps - left
                        yield f"  resuming the build: {before} of {steps} steps already compiled"
                whole = max(steps or left, 1)
                percent = min(100 * (before + int(step["done"])) // whole, 100)
            if percent // every > shown // every or now - last >= quiet_s:
                shown, last = percent, now
                yield f"  {COMPILING}: {percent:3d}% ({elapsed(now - start)})"
            continue
        download = DOWNLOAD.match(line)
        if download is not None:
            size = f" ({download['size']})" if download["size"] else ""
            doing, last = "downloading the source", now
            yield f"  downloading {download['what']}{size}"
            continue
        text = line.strip()
        for marker, words in PHASES:
            if text.startswith(marker) and words != doing:
                doing, last = words, now
                yield f"  {words} ({elapsed(now - start)})"
                break


def write_atomically(path: Path, text: str) -> None:
    """``text`` into ``path``, never half written (a kill leaves the old or the new)."""
    fresh = path.with_name(path.name + ".new")
    fresh.write_text(text)
    os.replace(fresh, path)


def recorded(
    lines: Iterable[str | None],
    path: Path,
    clock: Callable[[], float] = time.monotonic,
    every_s: float = RECORD_EVERY_S,
) -> Iterator[str | None]:
    """``lines`` unchanged, writing the seconds since the first into ``path`` as they
    pass (at most every ``every_s``) and once more at the end."""
    start = clock()
    written = start - every_s
    for line in lines:
        now = clock()
        if now - written >= every_s:
            write_atomically(path, f"{now - start:.1f}\n")
            written = now
        yield line
    write_atomically(path, f"{clock() - start:.1f}\n")


def read_lines(fd: int, tick_s: float) -> Iterator[str | None]:
    """Lines read from ``fd`` as they come; ``None`` after each ``tick_s`` without one."""
    pending = b""
    while True:
        ready, _, _ = select.select([fd], [], [], tick_s)
        if not ready:
            yield None
            continue
        chunk = os.read(fd, 65536)
        if not chunk:
            if pending:
                yield pending.decode(errors="replace")
            return
        *complete, pending = (pending + chunk).split(b"\n")
        for raw in complete:
            yield raw.decode(errors="replace")


def read_steps(path: Path | None) -> int | None:
    """The step count an earlier run wrote, if any."""
    try:
        return int(path.read_text()) if path is not None else None
    except (OSError, ValueError):
        return None


def main(argv: list[str] | None = None) -> int:
    """Filter stdin to stdout until the build's output ends."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=Path, help="the whole build's step count (kept)")
    parser.add_argument("--record", type=Path, help="this run's seconds, written as it goes")
    args = parser.parse_args(argv)
    steps_file: Path | None = args.steps

    def keep_steps(count: int) -> None:
        if steps_file is not None:
            write_atomically(steps_file, f"{count}\n")

    lines = read_lines(sys.stdin.fileno(), tick_s=5.0)
    if args.record is not None:
        lines = recorded(lines, args.record)
    for line in progress(lines, steps=read_steps(steps_file), on_steps=keep_steps):
        print(line, flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
