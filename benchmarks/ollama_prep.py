"""A 12-megapixel phone photo sent to Ollama: our preparation against the file as it is.

    python benchmarks/ollama_prep.py [--photo IMG.jpg] [--repeat 7] [--update BENCHMARKS.md]

The official ``ollama`` client base64-encodes whatever it is given: for a path, the
file's bytes. Every turn resends the history, pictures included. llava-local prepares
the picture once (upright by EXIF, RGB, longest side at most 1344 px for the Ollama
engine, re-encoded) and sends those bytes on every turn, byte-identical, so the daemon's
prefix cache can hit. This script times, on this machine, what each costs the client:

- ``as is``: ``ollama._types.Image(value=path)`` serialised, what ``client.chat(...,
  images=[path])`` does per turn;
- ``llava-local, first turn``: ``images.prepare(path, max_side=1344, cache=None)``,
  then the same client serialisation of the prepared bytes;
- ``llava-local, later turns``: the serialisation only (the prepared picture is reused).

The daemon's side (decoding 12 MP instead of about 1.4 MP, resizing for the model) is not
measured: no daemon or model runs here. Bytes sent are counted as base64 characters.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import cast

from llava_local import images
from llava_local.apps import bench
from llava_local.backends.ollama import OllamaBackend

SIDE = OllamaBackend.default_max_image_side
EXIF = {
    0x0112: 6,  # orientation: rotate 90 degrees clockwise to view, as phones write it
    0x010F: "Phone maker",
    0x0110: "Phone 12",
    0x0132: "2024:05:01 12:00:00",
}


def _serialise(data: bytes | Path) -> str:
    """What the ollama client does with an image: ``Image(value=...)`` to base64 text."""
    from ollama._types import Image

    return cast(str, Image(value=data).model_dump())  # a model_serializer returns the text


def _median_s(action: Callable[[], object], repeat: int) -> float:
    action()  # warm: imports, first-call allocations
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        action()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def measure(photo: Path, repeat: int) -> list[tuple[str, float, int, str]]:
    """(way, median seconds, base64 characters sent, what is sent) for each way."""
    raw = _serialise(photo)
    prepared = images.prepare(photo, max_side=SIDE, cache=None)
    sent = _serialise(prepared.data)
    as_is = _median_s(lambda: _serialise(photo), repeat)
    first = _median_s(
        lambda: _serialise(images.prepare(photo, max_side=SIDE, cache=None).data), repeat
    )
    later = _median_s(lambda: _serialise(prepared.data), repeat)
    from PIL import Image

    with Image.open(photo) as img:
        size = f"{img.width}x{img.height} JPEG, {photo.stat().st_size / 1e6:.2f} MB"
    what = f"{prepared.width}x{prepared.height} {prepared.mime}; {'; '.join(prepared.changes)}"
    return [
        ("as is (official client), every turn", as_is, len(raw), size + ", as stored"),
        ("llava-local, first turn (prepare + base64)", first, len(sent), what),
        ("llava-local, later turns (base64 only)", later, len(sent), "the same bytes"),
    ]


def markdown(rows: list[tuple[str, float, int, str]], command: str, repeat: int) -> str:
    """The BENCHMARKS.md section."""
    when = time.strftime("%Y-%m-%d %H:%M %Z")
    lines = [
        f"Command: `{command}`  ",
        f"Run: {when}; median of {repeat} after one warm-up, client side only.",
        "",
        "| way | time ms | base64 sent per turn | picture sent |",
        "|---|---:|---:|---|",
    ]
    for way, seconds, sent, what in rows:
        lines.append(f"| {way} | {seconds * 1e3:.1f} | {sent / 1e6:.2f} MB | {what} |")
    three_as_is = 3 * rows[0][2]
    three_ours = rows[1][2] + 2 * rows[2][2]
    lines += [
        "",
        f"Three turns resend the picture three times: {three_as_is / 1e6:.1f} MB as is against "
        f"{three_ours / 1e6:.1f} MB prepared ({three_as_is / three_ours:.1f}x less). The "
        "daemon's own decoding and resizing of the picture is not measured here (no daemon "
        "or model on this machine); it decodes a 12 MP JPEG per turn in the first case.",
    ]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    """Generate (or take) the photo, time both ways, print, optionally update the file."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--photo", type=Path, help="a JPEG (default: a generated 12 MP one)")
    parser.add_argument("--repeat", type=int, default=7)
    parser.add_argument("--update", type=Path, help="BENCHMARKS.md to update")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        photo = args.photo
        if photo is None:
            photo = Path(tmp) / "phone-12mp.jpg"
            photo.write_bytes(bench.synthetic_photo(4000, 3000, seed=1, exif=EXIF))
        rows = measure(photo, args.repeat)
    from rich.console import Console
    from rich.table import Table

    grid = Table(title=f"picture preparation for Ollama (max side {SIDE} px)")
    for name in ("way", "time ms", "base64 sent per turn MB", "picture sent"):
        grid.add_column(name, justify="right" if name != "way" else "left")
    for way, seconds, sent, what in rows:
        grid.add_row(way, f"{seconds * 1e3:.1f}", f"{sent / 1e6:.2f}", what)
    Console(width=150).print(grid)
    if args.update:
        from llava_local_dev.report import command_line, update_section

        command = command_line("benchmarks/ollama_prep.py", argv or sys.argv[1:])
        update_section(
            args.update,
            "ollama-prep",
            "Pictures for Ollama: a 12 MP photo",
            markdown(rows, command.strip(), args.repeat),
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
