"""Checking a llama.cpp sequence state before llama.cpp reads it.

``llama_state_seq_set_data`` trusts its input. A cell at position INT32_MAX, for one,
survives every later removal (removals end before INT32_MAX) and makes each decode
fail with -1 until the process restarts. So a state's layout is walked here first, and
each count, size and position checked against the keys it is stored under and the
engine's context; a state that is not walked exactly is not restored (it loads cold).

The layout (llama-cpp-python 0.3.x, ``llama-context.cpp`` and ``llama-kv-cache.cpp``)::

    u32 magic 0xaf143cd8 | i32 sequence id
    then each KV cache (one; two for sliding-window models such as Gemma 3):
      u32 streams, and per stream: u32 cells, then if cells > 0:
        cells x (i32 position | u32 sequences = 1 | 12-byte ext, M-RoPE models only | i32 id)
        u32 v_trans | u32 layers | layers x (i32 type | u64 row bytes | cells x row bytes)
        V, per layer that has one: (i32 type | u64 row bytes | cells x row bytes), or when
        transposed (i32 type | u32 element bytes | u32 width | width x cells x element bytes)

Another kind of model memory (recurrent, hybrid) writes another layout: its states are
refused here, so they load cold. A new llama-cpp-python never reads older states (the
version is part of a state's identity, see :mod:`.kv_cache`).
"""

from __future__ import annotations

import struct
from typing import Any, Final

import numpy as np

MAGIC: Final = 0xAF143CD8
_MAX_STREAMS = 256
_MAX_LAYERS = 4096
_MAX_ROW = 1 << 28
_GGML_TYPES = 64  # ggml's type ids are below this
_EXT = 12  # llama_kv_cell_ext: x, y, tok


class _Bad(ValueError):
    """The bytes do not follow the layout (at this reading of it)."""


def problem(data: Any, n_keys: int, n_ctx: int) -> str | None:
    """Why the sequence state ``data`` (a buffer) must not be restored for ``n_keys``
    positions into a context of ``n_ctx`` cells, or None when nothing is wrong."""
    view = memoryview(data).cast("B")
    if not 0 < n_keys <= n_ctx:
        return f"{n_keys} positions do not fit a context of {n_ctx}"
    try:
        magic, _ = struct.unpack_from("<Ii", view, 0)
        if magic != MAGIC:
            return "not a llama.cpp sequence state"
        if not _caches(view, 8, n_keys, n_ctx, first=True):
            return "its layout is not one this version of llama.cpp writes"
    except (_Bad, struct.error) as exc:
        return str(exc) or "it ends too early"
    return None


def _caches(view: memoryview, off: int, n_keys: int, n_ctx: int, *, first: bool) -> bool:
    """Whether ``view[off:]`` is one or more whole KV caches."""
    if off == len(view):
        return not first
    (streams,) = _unpack("<I", view, off)
    if not 0 < streams <= _MAX_STREAMS:
        raise _Bad(f"{streams} streams")
    return _streams(view, off + 4, streams, n_keys, n_ctx, first=first)


def _streams(
    view: memoryview, off: int, left: int, n_keys: int, n_ctx: int, *, first: bool
) -> bool:
    """Whether ``left`` streams, then whatever caches follow, are whole from ``off``."""
    if left == 0:
        return _caches(view, off, n_keys, n_ctx, first=False)
    (cells,) = _unpack("<I", view, off)
    off += 4
    if cells == 0:
        return _streams(view, off, left - 1, n_keys, n_ctx, first=first)
    if cells > n_ctx:
        raise _Bad(f"{cells} cells do not fit a context of {n_ctx}")
    for ext in (0, _EXT):  # M-RoPE models add 12 bytes to each cell
        start = _cell_ends(view, off, cells, ext, n_keys, first=first)
        if start is None:
            continue
        for data_end in _data_ends(view, start, cells):
            if _streams(view, data_end, left - 1, n_keys, n_ctx, first=False):
                return True
    return False


def _cell_ends(
    view: memoryview, off: int, cells: int, ext: int, n_keys: int, *, first: bool
) -> int | None:
    """Where the cells end, if they read as cells with ``ext`` bytes each of extra."""
    stride = 12 + ext
    end = off + cells * stride
    if end > len(view):
        return None
    table = np.frombuffer(view[off:end], dtype="<i4").reshape(cells, stride // 4)
    positions, sequences = table[:, 0], table[:, 1]
    if (sequences != 1).any():
        return None
    if positions.min() < 0 or positions.max() >= n_keys:
        raise _Bad(f"a position outside 0..{n_keys - 1}")
    if ext == 0:  # one cell per position: no position twice, all of them in the first
        unique = np.unique(positions)
        if len(unique) != cells or (first and cells != n_keys):
            raise _Bad(f"{cells} cells for {n_keys} positions")
    elif first and positions.max() != n_keys - 1:
        raise _Bad(f"the last position is not {n_keys - 1}")
    return end


def _data_ends(view: memoryview, off: int, cells: int) -> list[int]:
    """Where the K and V data of ``cells`` cells from ``off`` can end: after V for
    every layer, or (models without V, such as MLA ones) after K alone."""
    v_trans, layers = _unpack("<II", view, off)
    if v_trans > 1 or not 0 < layers <= _MAX_LAYERS:
        raise _Bad("not KV data")
    off += 8
    for _ in range(layers):
        off = _rows(view, off, cells)
    ends = [off]
    try:
        for _ in range(layers):
            off = _columns(view, off, cells) if v_trans else _rows(view, off, cells)
        ends.insert(0, off)
    except (_Bad, struct.error):
        pass
    return ends


def _rows(view: memoryview, off: int, cells: int) -> int:
    kind, row = _unpack("<iQ", view, off)
    return _skip(view, off + 12, kind, row, cells)


def _columns(view: memoryview, off: int, cells: int) -> int:
    kind, element, width = _unpack("<iII", view, off)
    return _skip(view, off + 12, kind, element * width, cells)


def _skip(view: memoryview, off: int, kind: int, row: int, cells: int) -> int:
    if not 0 <= kind < _GGML_TYPES or not 0 < row <= _MAX_ROW:
        raise _Bad("not KV data")
    end = off + row * cells
    if end > len(view):
        raise _Bad("it ends too early")
    return end


def _unpack(fmt: str, view: memoryview, off: int) -> tuple[int, ...]:
    return struct.unpack_from(fmt, view, off)
