"""Read a GGUF file's header (metadata and tensor table) without touching its weights.

Why not ``gguf.GGUFReader``: it takes about a second on a 7B file, because it builds
an array view per vocabulary entry, and it is a heavy dependency for reading a few
keys. Checks before loading (:mod:`llava_local.backends.gguf_meta`) and the memory
estimate (:mod:`llava_local.memory`) need only the header.
"""

from __future__ import annotations

import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

from .errors import ModelLoadError

# ggml type id -> (elements per block, bytes per block), as in ggml.c.
GGML_BLOCKS: dict[int, tuple[int, int]] = {
    0: (1, 4),  # F32
    1: (1, 2),  # F16
    2: (32, 18),  # Q4_0
    3: (32, 20),  # Q4_1
    6: (32, 22),  # Q5_0
    7: (32, 24),  # Q5_1
    8: (32, 34),  # Q8_0
    9: (32, 36),  # Q8_1
    10: (256, 84),  # Q2_K
    11: (256, 110),  # Q3_K
    12: (256, 144),  # Q4_K
    13: (256, 176),  # Q5_K
    14: (256, 210),  # Q6_K
    15: (256, 292),  # Q8_K
    16: (256, 66),  # IQ2_XXS
    17: (256, 74),  # IQ2_XS
    18: (256, 98),  # IQ3_XXS
    19: (256, 50),  # IQ1_S
    20: (32, 18),  # IQ4_NL
    21: (256, 110),  # IQ3_S
    22: (256, 82),  # IQ2_S
    23: (256, 136),  # IQ4_XS
    24: (1, 1),  # I8
    25: (1, 2),  # I16
    26: (1, 4),  # I32
    27: (1, 8),  # I64
    28: (1, 8),  # F64
    29: (256, 56),  # IQ1_M
    30: (1, 2),  # BF16
    34: (256, 54),  # TQ1_0
    35: (256, 66),  # TQ2_0
    39: (32, 17),  # MXFP4
    40: (64, 36),  # NVFP4
    41: (128, 18),  # Q1_0
}


@dataclass(frozen=True)
class GgufTensor:
    """One tensor's entry in a GGUF header."""

    name: str
    shape: tuple[int, ...]  # ggml order: shape[0] is the row length, shape[1] the rows
    ggml_type: int
    nbytes: int


@dataclass(frozen=True)
class GgufHeader:
    """A GGUF file's metadata and tensor table."""

    meta: dict[str, Any]
    tensors: list[GgufTensor]


_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q"}
_SCALARS.update({11: "<q", 12: "<d"})
_STRING, _ARRAY = 8, 9
_ARRAY_KEEP = 4096  # longer arrays (vocabularies) are skipped, only their length kept


def read_gguf(path: Path) -> GgufHeader:
    """Metadata and tensor table of a GGUF file, from its header alone.

    Written here rather than with ``gguf.GGUFReader``, which takes about a second on
    a 7B file because it builds an array view per vocabulary entry. Arrays longer
    than 4096 items are replaced by their length.
    """
    try:
        with path.open("rb") as f:
            return _parse_gguf(f)
    except (OSError, struct.error, UnicodeDecodeError, ValueError) as exc:
        raise ModelLoadError(f"cannot read the GGUF header of {path}: {exc}") from exc


def _parse_gguf(f: BinaryIO) -> GgufHeader:
    def take(fmt: str) -> Any:
        size = struct.calcsize(fmt)
        data = f.read(size)
        if len(data) != size:
            raise ValueError("the file ends inside its header")
        return struct.unpack(fmt, data)[0]

    def string() -> str:
        n = take("<Q")
        if n > 1 << 24:
            raise ValueError(f"implausible string length {n}")
        data = f.read(n)
        if len(data) != n:
            raise ValueError("the file ends inside its header")
        return data.decode("utf-8")

    def value(kind: int) -> Any:
        if kind in _SCALARS:
            return take(_SCALARS[kind])
        if kind == _STRING:
            return string()
        if kind == _ARRAY:
            item, count = take("<I"), take("<Q")
            if count <= _ARRAY_KEEP:
                return [value(item) for _ in range(count)]
            if item in _SCALARS:
                f.seek(struct.calcsize(_SCALARS[item]) * count, os.SEEK_CUR)
            else:
                for _ in range(count):
                    value(item)
            return ArrayLength(count)
        raise ValueError(f"unknown GGUF value type {kind}")

    if f.read(4) != b"GGUF":
        raise ValueError("not a GGUF file")
    version = take("<I")
    if version not in (2, 3):
        raise ValueError(f"unsupported GGUF version {version}")
    n_tensors, n_kv = take("<Q"), take("<Q")
    meta = {}
    for _ in range(n_kv):
        key = string()
        meta[key] = value(take("<I"))
    entries = []
    for _ in range(n_tensors):
        name = string()
        n_dims = take("<I")
        if n_dims > 4:
            raise ValueError(f"tensor {name} has {n_dims} dimensions (ggml has at most 4)")
        shape = tuple(take("<Q") for _ in range(n_dims))
        entries.append((name, shape, take("<I"), take("<Q")))
    # A type this table does not know takes the room up to the next tensor's data.
    data_size = os.fstat(f.fileno()).st_size - align(
        f.tell(), int(meta.get("general.alignment", 32))
    )
    ends = sorted({offset for *_, offset in entries} | {data_size})
    tensors = []
    for name, shape, ggml_type, offset in entries:
        count = 1
        for dim in shape:
            count *= dim
        if ggml_type in GGML_BLOCKS:
            block, size = GGML_BLOCKS[ggml_type]
            nbytes = count // block * size
        else:
            nbytes = min((e for e in ends if e > offset), default=offset) - offset
        tensors.append(GgufTensor(name=name, shape=shape, ggml_type=ggml_type, nbytes=nbytes))
    return GgufHeader(meta=meta, tensors=tensors)


class ArrayLength(int):
    """Stands for a long GGUF array (a vocabulary) of which only the length was read."""


def align(n: int, multiple: int) -> int:
    """``n`` rounded up to a multiple of ``multiple`` (GGUF data, llama.cpp's KV cells)."""
    return -(-n // multiple) * multiple
