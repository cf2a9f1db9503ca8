"""Files an attacker hands over, built for real, and a child process that measures what
opening one costs.

- :func:`deep_tiff`: a float or 32-bit TIFF of any size in a few KB (every deflate strip
  is the same compressed block, so 88 MP of float grey fits in 667 KB or less);
- :func:`grey_png`: a black grey PNG of any size, its rows deflated as they are made
  (20000x20000 is 388 KB, 400 MB decoded);
- :func:`peak_growth`: runs Python code in a fresh interpreter and reports how far its
  peak resident memory (``ru_maxrss``) grew past what the imports took, so a test can
  bound what a file costs without measuring time.
"""

from __future__ import annotations

import json
import struct
import subprocess
import sys
import zlib
from pathlib import Path
from typing import Any

_SAMPLE_FORMAT = {"F": (3, b"\x00\x00\x00\x3f"), "I": (2, b"\x00\x00\x01\x00")}


def deep_tiff(width: int, height: int, mode: str = "F", rows_per_strip: int = 16) -> bytes:
    """A deflate-compressed TIFF of ``width`` x ``height`` 32-bit pixels (``F``: float
    0.5, ``I``: the integer 65536): every strip points at one compressed block."""
    sample_format, pixel = _SAMPLE_FORMAT[mode]
    block = zlib.compress(pixel * (width * rows_per_strip), 9)
    strips = -(-height // rows_per_strip)
    ifd_size = 2 + 12 * 10 + 4
    offsets_at = 8 + ifd_size
    counts_at = offsets_at + 4 * strips
    block_at = counts_at + 4 * strips
    entries = [
        (256, 4, 1, width),  # ImageWidth
        (257, 4, 1, height),  # ImageLength
        (258, 3, 1, 32),  # BitsPerSample
        (259, 3, 1, 8),  # Compression: deflate
        (262, 3, 1, 1),  # PhotometricInterpretation: black is zero
        (273, 4, strips, offsets_at),  # StripOffsets: where the offsets are
        (277, 3, 1, 1),  # SamplesPerPixel
        (278, 4, 1, rows_per_strip),  # RowsPerStrip
        (279, 4, strips, counts_at),  # StripByteCounts: where the counts are
        (339, 3, 1, sample_format),  # SampleFormat
    ]
    out = bytearray(b"II*\x00" + struct.pack("<I", 8) + struct.pack("<H", len(entries)))
    for tag, kind, count, value in entries:
        packed = (
            struct.pack("<HH", value, 0) if kind == 3 and count == 1 else struct.pack("<I", value)
        )
        out += struct.pack("<HHI", tag, kind, count) + packed
    out += struct.pack("<I", 0)
    out += struct.pack(f"<{strips}I", *([block_at] * strips))
    out += struct.pack(f"<{strips}I", *([len(block)] * strips))
    out += block
    return bytes(out)


def grey_png(width: int, height: int) -> bytes:
    """An all-black 8-bit grey PNG, built row by row (never whole in memory)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return (
            struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
        )

    deflate = zlib.compressobj(9)
    row = b"\x00" * (1 + width)
    body = b"".join(deflate.compress(row) for _ in range(height)) + deflate.flush()
    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", body) + chunk(b"IEND", b"")
    )


_MEASURE = """
import json, resource, sys
from llava_local import VisionChat, LlavaLocalError
from llava_local.images import prepare
import llava_local.backends.llama_cpp, llama_cpp
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
result = {}
try:
{body}
except LlavaLocalError as exc:
    result["error"] = f"{type(exc).__name__}: {exc}"
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
result["growth_mib"] = (peak - base) / 1024
print(json.dumps(result))
"""


def peak_growth(body: str, *args: str, timeout: float = 300) -> dict[str, Any]:
    """Run ``body`` (code that may set ``result[...]``; ``sys.argv[1:]`` are ``args``)
    in a new interpreter that has imported ``VisionChat``, ``prepare`` and llama.cpp;
    returns ``result`` plus ``growth_mib``, how far the peak resident memory grew
    meanwhile, and ``error``, the library error it raised (``Type: message``), if any."""
    indented = "\n".join("    " + line for line in body.strip().splitlines())
    code = _MEASURE.replace("{body}", indented)
    done = subprocess.run(
        [sys.executable, "-c", code, *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    measured: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    return measured


# -- KV-state files --------------------------------------------------------------------

#: llama.cpp's sequence state: u32 magic, i32 sequence, u32 streams, u32 cells, then per
#: cell (i32 position, u32 sequences, i32 sequence) for a model without M-RoPE.
CELLS_AT = 16
CELL_BYTES = 12


def digit_three(folder: Path) -> Path:
    """A picture of a 3 (from the demo's test digits) that the demo model reads as 3."""
    from llava_local.apps.datasets import load_set

    three = load_set("digits", limit=19)[18]
    assert str(three.label) == "3"
    path = folder / "three.png"
    source = three.source
    assert hasattr(source, "save")
    source.save(path)
    return path


def state_parts(raw: bytes) -> tuple[dict[str, Any], bytes, bytes, bytes]:
    """A KV-state file's header (parsed and raw), its state, and its last 32 bytes (the
    file's own check), as anyone who reads the module docstring can split it."""
    (length,) = struct.unpack_from("<Q", raw, 8)
    header = raw[16 : 16 + length]
    return json.loads(header), header, raw[16 + length : -32], raw[-32:]


def forged(state_from: bytes, keys_from: bytes) -> bytes:
    """The state of one file under the header (keys) of another, its check recomputed
    the way whoever writes the file can: a sha256 of header and state."""
    import hashlib

    _, header, _, _ = state_parts(keys_from)
    _, _, state, _ = state_parts(state_from)
    check = hashlib.sha256(header + state).digest()
    return raw_state_file(header, state, check)


def raw_state_file(header: bytes, state: bytes, check: bytes) -> bytes:
    return b"LLKVSTAT" + struct.pack("<Q", len(header)) + header + state + check


def unpack_keys(packed: list[Any]) -> tuple[Any, ...]:
    """The keys a header lists: token ids, and ``[sha256, n]`` as n picture positions."""
    keys: list[Any] = []
    for item in packed:
        if isinstance(item, int):
            keys.append(item)
        else:
            keys.extend((item[0], i) for i in range(item[1]))
    return tuple(keys)


def with_position(state: bytes, cell: int, position: int) -> bytes:
    """``state`` with cell ``cell`` moved to ``position``."""
    changed = bytearray(state)
    struct.pack_into("<i", changed, CELLS_AT + CELL_BYTES * cell, position)
    return bytes(changed)
