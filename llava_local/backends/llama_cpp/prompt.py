"""A turn's prompt as libmtmd tokenizes it: chunks of text tokens and pictures, and the
KV key of every position (a token id, or ``(picture sha256, index)``), by which prompts
are compared with what a sequence already holds."""

from __future__ import annotations

import ctypes
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from ...errors import BackendError, ImageError
from ...types import PreparedImage
from .kv_cache import Key

PartKind = Literal["text", "image"]


@dataclass(frozen=True)
class Part:
    """One chunk of a prompt: its kind, libmtmd's chunk, and its first position."""

    kind: PartKind
    chunk: Any
    start: int
    length: int
    #: The picture's content hash (image parts).
    picture: str = ""

    @property
    def end(self) -> int:
        return self.start + self.length


@dataclass
class Prompt:
    """A tokenized turn. Owns libmtmd's chunks until :meth:`free`."""

    mtmd: Any
    chunks: Any
    keys: list[Key] = field(default_factory=list)
    parts: list[Part] = field(default_factory=list)

    def text_tokens(self, start: int, end: int) -> list[int]:
        return [int(k) for k in self.keys[start:end] if isinstance(k, int)]

    def free(self) -> None:
        if self.chunks:
            self.mtmd.mtmd_input_chunks_free(self.chunks)
            self.chunks = None


def tokenize(mtmd: Any, mctx: Any, text: str, images: Sequence[PreparedImage]) -> Prompt:
    """``text`` (with one marker per picture) and ``images`` as libmtmd's chunks."""
    bitmaps = []
    try:
        for image in images:
            buf = (ctypes.c_uint8 * len(image.data)).from_buffer_copy(image.data)
            bitmap = mtmd.mtmd_helper_bitmap_init_from_buf(mctx, buf, len(image.data), False)
            if not bitmap:
                raise ImageError(image.source, "llama.cpp could not decode the picture")
            mtmd.mtmd_bitmap_set_id(bitmap, image.sha256.encode())
            bitmaps.append(bitmap)
        chunks = mtmd.mtmd_input_chunks_init()
        data = text.encode()
        inp = mtmd.mtmd_input_text()
        inp.text, inp.text_len = data, len(data)
        inp.add_special, inp.parse_special = True, True
        array = (mtmd.mtmd_bitmap_p_ctypes * max(1, len(bitmaps)))(*bitmaps)
        code = mtmd.mtmd_tokenize(mctx, chunks, ctypes.byref(inp), array, len(bitmaps))
        if code != 0:
            mtmd.mtmd_input_chunks_free(chunks)
            raise BackendError(
                f"libmtmd could not tokenize the prompt (code {code}): "
                + ("picture and marker counts differ" if code == 1 else "preprocessing failed")
            )
    finally:
        for bitmap in bitmaps:
            mtmd.mtmd_bitmap_free(bitmap)
    return _index(mtmd, chunks)


def _index(mtmd: Any, chunks: Any) -> Prompt:
    prompt = Prompt(mtmd, chunks)
    for i in range(mtmd.mtmd_input_chunks_size(chunks)):
        chunk = mtmd.mtmd_input_chunks_get(chunks, i)
        start = len(prompt.keys)
        if mtmd.mtmd_input_chunk_get_type(chunk) == mtmd.MTMD_INPUT_CHUNK_TYPE_TEXT:
            n = ctypes.c_size_t()
            ptr = mtmd.mtmd_input_chunk_get_tokens_text(chunk, ctypes.byref(n))
            prompt.keys.extend(int(ptr[j]) for j in range(n.value))
            prompt.parts.append(Part("text", chunk, start, int(n.value)))
        else:
            ident = (mtmd.mtmd_input_chunk_get_id(chunk) or b"").decode()
            n_pos = int(mtmd.mtmd_input_chunk_get_n_pos(chunk))
            prompt.keys.extend((ident, j) for j in range(n_pos))
            prompt.parts.append(Part("image", chunk, start, n_pos, ident))
    return prompt


def inside_picture(key: Key) -> bool:
    return isinstance(key, tuple) and key[1] != 0


def usable(keys: Sequence[Key], shared: int) -> int:
    """Of ``shared`` leading positions held for ``keys``, how many a turn may keep:
    never all (the last position must be read again to yield logits) and never half
    a picture."""
    p = min(shared, len(keys))
    if p == len(keys):
        p -= 1
    while 0 < p < len(keys) and inside_picture(keys[p]):
        p -= 1
    return max(p, 0)
