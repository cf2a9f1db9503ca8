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

Standard library only: it runs in the fresh virtualenv before anything is installed.
Usage: ``pip wheel -v ... 2>&1 | python scripts/build_progress.py``.
"""

from __future__ import annotations

import os
import re
import select
import sys
import time
from collections.abc import Callable, Iterable, Iterator

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


def elapsed(seconds: float) -> str:
    """``m:ss``."""
    whole = int(seconds)
    return f"{whole // 60}:{whole % 60:02d}"


def progress(
    lines: Iterable[str | None],
    clock: Callable[[], float] = time.monotonic,
    every: int = EVERY,
    quiet_s: float = QUIET_S,
) -> Iterator[str]:
    """The progress lines for ``lines`` of build output; ``None`` in ``lines`` marks a
    moment without output (a tick), when a line is due if ``quiet_s`` passed."""
    start = last = clock()
    doing, percent, shown = "preparing the build", 0, -every
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
                percent = min(100 * int(step["done"]) // max(int(step["total"]), 1), 100)
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


def main() -> int:
    """Filter stdin to stdout until the build's output ends."""
    for line in progress(read_lines(sys.stdin.fileno(), tick_s=5.0)):
        print(line, flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
