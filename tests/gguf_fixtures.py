"""Tiny GGUF pairs for tests, and a small driver for llama.cpp's mtmd through ctypes.

Fixtures (session-scoped; import them into ``tests/conftest.py``):

- ``tiny_pair``: the ``"tiny"`` preset, f32 language model + f16 projector.
- ``tiny_pair_q4``: the same pair with the language model quantized to Q4_0 by llama.cpp.
- ``tiny_mtmd``: an :class:`MtmdRunner` loaded with ``tiny_pair``.

llama-cpp-python is part of the test install, so nothing here skips: without it the
fixtures fail with the ImportError.

:class:`MtmdRunner` is the low-level path a backend drives itself: ``mtmd_init_from_file``,
``mtmd_helper_bitmap_init_from_buf``, ``mtmd_tokenize`` with ``mtmd_default_marker()``,
then text chunks through ``Llama.eval`` and image chunks through
``mtmd_helper_eval_chunk_single``. Every native object is freed in ``finally`` blocks.
"""

from __future__ import annotations

import ctypes
import io
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from llava_local import gguf_writer
from llava_local.gguf_writer import TextConfig, VisionConfig, Vocab

__all__ = [
    "GgufPair",
    "MtmdRunner",
    "mtmd_embeddings",
    "mtmd_logits",
    "png_bytes",
    "tiny_mtmd",
    "tiny_pair",
    "tiny_pair_q4",
]


@dataclass(frozen=True)
class GgufPair:
    """Paths of a written pair and the shapes it was written with."""

    lm: Path
    mmproj: Path
    text: TextConfig
    vision: VisionConfig
    vocab: Vocab


def png_bytes(
    size: tuple[int, int] = (56, 56), color: tuple[int, int, int] = (200, 30, 30), seed: int = 0
) -> bytes:
    """A PNG of random noise over a solid colour: distinct seeds give distinct pictures."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    base = np.broadcast_to(np.asarray(color, np.int16), (size[1], size[0], 3))
    noisy = np.clip(base + rng.integers(-40, 41, base.shape), 0, 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(noisy, "RGB").save(buf, format="PNG")
    return buf.getvalue()


class MtmdRunner:
    """A llama.cpp language model plus its mtmd projector context, ready for image turns.

    ``logits()`` runs one prompt from an empty KV cache and returns the next-token logits;
    ``image_embeddings()`` encodes one picture alone. Close it (or use ``with``) to free
    the mtmd context; the Llama object frees itself.
    """

    def __init__(
        self, lm_path: str | Path, mmproj_path: str | Path, *, n_ctx: int = 1024, **llama_kw: Any
    ) -> None:
        import llama_cpp
        from llama_cpp import mtmd_cpp

        self._mtmd = mtmd_cpp
        self._llama_cpp = llama_cpp
        self.llama = llama_cpp.Llama(
            str(lm_path),
            n_gpu_layers=0,
            n_ctx=n_ctx,
            n_batch=n_ctx,
            n_ubatch=n_ctx,
            verbose=False,
            **llama_kw,
        )
        # clip.cpp logs through mtmd's own logger; route it to llama-cpp-python's, which
        # honours verbose=False (the callback object lives in llama_cpp._logger).
        from llama_cpp import _logger

        mtmd_cpp.mtmd_helper_log_set(_logger.llama_log_callback, ctypes.c_void_p(0))
        params = mtmd_cpp.mtmd_context_params_default()
        params.use_gpu = False
        params.print_timings = False
        params.warmup = False
        params.n_threads = self.llama.n_threads
        # f32 attention inside CLIP, so embeddings can be compared with a numpy reference.
        params.flash_attn_type = llama_cpp.LLAMA_FLASH_ATTN_TYPE_DISABLED
        ctx = mtmd_cpp.mtmd_init_from_file(os.fsencode(mmproj_path), self.llama.model, params)
        if not ctx:
            raise RuntimeError(f"mtmd_init_from_file refused {mmproj_path}")
        self.ctx: int | None = ctx
        self.marker: str = mtmd_cpp.mtmd_default_marker().decode()

    def close(self) -> None:
        """Free the mtmd context (idempotent)."""
        if self.ctx:
            self._mtmd.mtmd_free(self.ctx)
            self.ctx = None

    def __enter__(self) -> MtmdRunner:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _bitmap(self, image: bytes) -> int:
        buf = (ctypes.c_uint8 * len(image)).from_buffer_copy(image)
        bitmap = self._mtmd.mtmd_helper_bitmap_init_from_buf(self.ctx, buf, len(image), False)
        if not bitmap:
            raise ValueError("mtmd could not decode the picture")
        return int(bitmap)

    def _with_chunks(self, prompt: str, images: Sequence[bytes], body: Any) -> Any:
        """Tokenize ``prompt`` (one marker per image) and call ``body(chunks)``; free all."""
        m = self._mtmd
        bitmaps: list[int] = []
        chunks = None
        try:
            for image in images:
                bitmaps.append(self._bitmap(image))
            text = m.mtmd_input_text()
            encoded = prompt.encode()
            text.text = encoded
            text.text_len = len(encoded)
            text.add_special = True  # BOS
            text.parse_special = True  # "</s>" -> EOS
            chunks = m.mtmd_input_chunks_init()
            array = (m.mtmd_bitmap_p_ctypes * max(1, len(bitmaps)))(*bitmaps)
            status = m.mtmd_tokenize(self.ctx, chunks, ctypes.byref(text), array, len(bitmaps))
            if status != 0:
                raise ValueError(f"mtmd_tokenize failed with {status}")
            return body(chunks)
        finally:
            if chunks:
                m.mtmd_input_chunks_free(chunks)
            for bitmap in bitmaps:
                m.mtmd_bitmap_free(bitmap)

    def chunk_token_counts(self, prompt: str, images: Sequence[bytes]) -> list[tuple[str, int]]:
        """``[("text" | "image", n_tokens), ...]`` for the tokenized prompt."""
        m = self._mtmd

        def body(chunks: Any) -> list[tuple[str, int]]:
            out = []
            for i in range(m.mtmd_input_chunks_size(chunks)):
                chunk = m.mtmd_input_chunks_get(chunks, i)
                kind = m.mtmd_input_chunk_get_type(chunk)
                label = "image" if kind == m.MTMD_INPUT_CHUNK_TYPE_IMAGE else "text"
                out.append((label, int(m.mtmd_input_chunk_get_n_tokens(chunk))))
            return out

        result: list[tuple[str, int]] = self._with_chunks(prompt, images, body)
        return result

    def logits(self, prompt: str, images: Sequence[bytes] | bytes = ()) -> np.ndarray:
        """Next-token logits after evaluating ``prompt`` from an empty context."""
        m, lc, llama = self._mtmd, self._llama_cpp, self.llama
        images = [images] if isinstance(images, bytes) else list(images)

        def body(chunks: Any) -> np.ndarray:
            n_chunks = m.mtmd_input_chunks_size(chunks)
            last = m.mtmd_input_chunks_get(chunks, n_chunks - 1)
            if m.mtmd_input_chunk_get_type(last) != m.MTMD_INPUT_CHUNK_TYPE_TEXT:
                # Image chunks are decoded without any output row, logits_last or not.
                raise ValueError("the prompt must end with text to have next-token logits")
            llama.reset()
            llama._ctx.kv_cache_clear()
            for i in range(n_chunks):
                chunk = m.mtmd_input_chunks_get(chunks, i)
                if m.mtmd_input_chunk_get_type(chunk) == m.MTMD_INPUT_CHUNK_TYPE_TEXT:
                    n = ctypes.c_size_t()
                    ptr = m.mtmd_input_chunk_get_tokens_text(chunk, ctypes.byref(n))
                    llama.eval([ptr[j] for j in range(n.value)])
                else:
                    new_n_past = lc.llama_pos(0)
                    status = m.mtmd_helper_eval_chunk_single(
                        self.ctx,
                        llama.ctx,
                        chunk,
                        lc.llama_pos(llama.n_tokens),
                        lc.llama_seq_id(0),
                        llama.n_batch,
                        False,  # logits_last: ignored for image chunks anyway
                        ctypes.byref(new_n_past),
                    )
                    if status != 0:
                        raise RuntimeError(f"mtmd_helper_eval_chunk_single failed: {status}")
                    llama.n_tokens = new_n_past.value
            out = lc.llama_get_logits_ith(llama.ctx, -1)
            return np.ctypeslib.as_array(out, shape=(llama.n_vocab(),)).copy()

        result: np.ndarray = self._with_chunks(prompt, images, body)
        return result

    def image_embeddings(self, image: bytes) -> np.ndarray:
        """The projected embeddings of one picture, ``(n_image_tokens, n_embd)`` float32."""
        m = self._mtmd

        def body(chunks: Any) -> np.ndarray:
            for i in range(m.mtmd_input_chunks_size(chunks)):
                chunk = m.mtmd_input_chunks_get(chunks, i)
                if m.mtmd_input_chunk_get_type(chunk) != m.MTMD_INPUT_CHUNK_TYPE_IMAGE:
                    continue
                n_tokens = int(m.mtmd_input_chunk_get_n_tokens(chunk))
                if m.mtmd_encode_chunk(self.ctx, chunk) != 0:
                    raise RuntimeError("mtmd_encode_chunk failed")
                embd = m.mtmd_get_output_embd(self.ctx)
                n_embd = self.llama.n_embd()
                flat = np.ctypeslib.as_array(embd, shape=(n_tokens * n_embd,))
                return flat.reshape(n_tokens, n_embd).copy()
            raise AssertionError("no image chunk")

        result: np.ndarray = self._with_chunks(self.marker, [image], body)
        return result


def mtmd_logits(
    lm_path: str | Path, mmproj_path: str | Path, png: bytes, prompt: str
) -> np.ndarray:
    """One-shot: load the pair, evaluate ``prompt`` (with the marker, or it is prepended)."""
    with MtmdRunner(lm_path, mmproj_path) as runner:
        if runner.marker not in prompt:
            prompt = runner.marker + prompt
        return runner.logits(prompt, [png])


def mtmd_embeddings(lm_path: str | Path, mmproj_path: str | Path, png: bytes) -> np.ndarray:
    """One-shot: the projected embeddings of one picture."""
    with MtmdRunner(lm_path, mmproj_path) as runner:
        return runner.image_embeddings(png)


def _tiny(directory: Path) -> GgufPair:
    import llama_cpp  # noqa: F401  (fail loudly here if the engine is missing)

    preset = gguf_writer.PRESETS["tiny"]
    lm, mm = gguf_writer.write_preset(preset, directory)
    return GgufPair(lm, mm, preset.text, preset.vision, gguf_writer.byte_vocab())


@pytest.fixture(scope="session")
def tiny_pair(tmp_path_factory: pytest.TempPathFactory) -> GgufPair:
    """The tiny random pair: f32 LM (byte vocabulary) + f16 projector, 16 image tokens."""
    return _tiny(tmp_path_factory.mktemp("tiny_pair"))


@pytest.fixture(scope="session")
def tiny_pair_q4(tiny_pair: GgufPair, tmp_path_factory: pytest.TempPathFactory) -> GgufPair:
    """``tiny_pair`` with its LM quantized to Q4_0 by llama.cpp (same projector)."""
    out = tmp_path_factory.mktemp("tiny_pair_q4") / "model-q4_0.gguf"
    lm = gguf_writer.quantize(tiny_pair.lm, out, "q4_0")
    return GgufPair(lm, tiny_pair.mmproj, tiny_pair.text, tiny_pair.vision, tiny_pair.vocab)


@pytest.fixture(scope="session")
def tiny_mtmd(tiny_pair: GgufPair) -> Iterator[MtmdRunner]:
    """An :class:`MtmdRunner` on ``tiny_pair``, shared by the session."""
    with MtmdRunner(tiny_pair.lm, tiny_pair.mmproj) as runner:
        yield runner
