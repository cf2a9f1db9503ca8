"""Read a GGUF file's header (metadata and tensor table) without touching its weights.

Why not ``gguf.GGUFReader``: it takes about a second on a 7B file, because it builds
an array view per vocabulary entry, and it is a heavy dependency for reading a few
keys. Checks before loading (:func:`check_magic` here, for the resolver too;
:mod:`llava_local.backends.llama_cpp.gguf_meta`) and the memory estimate
(:mod:`llava_local.memory`) need only the header.
"""

from __future__ import annotations

import os
import struct
from dataclasses import dataclass
from enum import IntEnum
from pathlib import Path
from typing import Any, BinaryIO

from .errors import ModelLoadError


class GgmlType(IntEnum):
    """ggml tensor type ids (``enum ggml_type`` in ggml.h): the library's one type table."""

    F32 = 0
    F16 = 1
    Q4_0 = 2
    Q4_1 = 3
    Q5_0 = 6
    Q5_1 = 7
    Q8_0 = 8
    Q8_1 = 9
    Q2_K = 10
    Q3_K = 11
    Q4_K = 12
    Q5_K = 13
    Q6_K = 14
    Q8_K = 15
    IQ2_XXS = 16
    IQ2_XS = 17
    IQ3_XXS = 18
    IQ1_S = 19
    IQ4_NL = 20
    IQ3_S = 21
    IQ2_S = 22
    IQ4_XS = 23
    I8 = 24
    I16 = 25
    I32 = 26
    I64 = 27
    F64 = 28
    IQ1_M = 29
    BF16 = 30
    TQ1_0 = 34
    TQ2_0 = 35
    MXFP4 = 39
    NVFP4 = 40
    Q1_0 = 41


# ggml type -> (elements per block, bytes per block), as in ggml.c.
GGML_BLOCKS: dict[int, tuple[int, int]] = {
    GgmlType.F32: (1, 4),
    GgmlType.F16: (1, 2),
    GgmlType.Q4_0: (32, 18),
    GgmlType.Q4_1: (32, 20),
    GgmlType.Q5_0: (32, 22),
    GgmlType.Q5_1: (32, 24),
    GgmlType.Q8_0: (32, 34),
    GgmlType.Q8_1: (32, 36),
    GgmlType.Q2_K: (256, 84),
    GgmlType.Q3_K: (256, 110),
    GgmlType.Q4_K: (256, 144),
    GgmlType.Q5_K: (256, 176),
    GgmlType.Q6_K: (256, 210),
    GgmlType.Q8_K: (256, 292),
    GgmlType.IQ2_XXS: (256, 66),
    GgmlType.IQ2_XS: (256, 74),
    GgmlType.IQ3_XXS: (256, 98),
    GgmlType.IQ1_S: (256, 50),
    GgmlType.IQ4_NL: (32, 18),
    GgmlType.IQ3_S: (256, 110),
    GgmlType.IQ2_S: (256, 82),
    GgmlType.IQ4_XS: (256, 136),
    GgmlType.I8: (1, 1),
    GgmlType.I16: (1, 2),
    GgmlType.I32: (1, 4),
    GgmlType.I64: (1, 8),
    GgmlType.F64: (1, 8),
    GgmlType.IQ1_M: (256, 56),
    GgmlType.BF16: (1, 2),
    GgmlType.TQ1_0: (256, 54),
    GgmlType.TQ2_0: (256, 66),
    GgmlType.MXFP4: (32, 17),
    GgmlType.NVFP4: (64, 36),
    GgmlType.Q1_0: (128, 18),
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


GGUF_MAGIC = b"GGUF"
#: How pictures begin: the files most often given as a model by mistake.
_PICTURES = {b"\x89PNG": "PNG", b"\xff\xd8\xff": "JPEG", b"GIF8": "GIF", b"RIFF": "WebP"}


def check_magic(path: Path) -> None:
    """Raise :class:`ModelLoadError` unless ``path`` begins as a GGUF file does."""
    with path.open("rb") as f:
        magic = f.read(4)
    if magic == GGUF_MAGIC:
        return
    picture = next((kind for start, kind in _PICTURES.items() if magic.startswith(start)), None)
    what = f"it is a {picture} picture" if picture else f"it starts with {magic!r}"
    raise ModelLoadError(
        f"{path} is not a GGUF file ({what}); llama.cpp needs GGUF model files, "
        "e.g. the ones listed by `llava-local models`"
    )


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
