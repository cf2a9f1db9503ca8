"""llama.cpp's libmtmd driven directly, for tests, the demo's evaluation and benchmarks.

:class:`MtmdRunner` is the low-level path an engine drives itself, without the engine's
KV-cache reuse, embedding cache or stop requests: ``mtmd_init_from_file``,
``mtmd_helper_bitmap_init_from_buf``, ``mtmd_tokenize`` with ``mtmd_default_marker()``,
then text chunks through ``Llama.eval`` and image chunks through ``mtmd_encode_chunk``
and ``mtmd_helper_decode_image_chunk`` (what ``mtmd_helper_eval_chunk_single`` does,
split so the encode can be timed). Every native object is freed in ``finally`` blocks.
The library's engine (``llava_local.backends.llama_cpp``) is the other, and only other,
copy of this loop.
"""

from __future__ import annotations

import ctypes
import os
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import numpy.typing as npt

__all__ = ["MtmdRunner", "mtmd_embeddings", "mtmd_logits"]

F32Array = npt.NDArray[np.float32]
_T = TypeVar("_T")


class MtmdRunner:
    """A llama.cpp language model plus its mtmd projector context, ready for image turns.

    ``logits()`` runs one prompt from an empty KV cache and returns the next-token logits;
    ``greedy()`` continues it; ``evaluate()`` only reads it into the KV cache (and times
    the picture encoding); ``image_embeddings()`` encodes one picture alone. Close it (or
    use ``with``) to free the mtmd context; the Llama object frees itself.

    ``exact_clip`` turns flash attention off inside CLIP, so embeddings can be compared
    with a numpy reference; ``False`` keeps llama.cpp's default, as the engine does.
    ``n_batch`` defaults to ``n_ctx``; other keywords go to ``llama_cpp.Llama``.
    """

    def __init__(
        self,
        lm_path: str | Path,
        mmproj_path: str | Path,
        *,
        n_ctx: int = 1024,
        n_batch: int | None = None,
        exact_clip: bool = True,
        **llama_kw: Any,
    ) -> None:
        import llama_cpp
        from llama_cpp import _logger, mtmd_cpp

        self._mtmd: Any = mtmd_cpp
        self._llama_cpp: Any = llama_cpp
        batch = n_batch or n_ctx
        self.llama: Any = llama_cpp.Llama(
            str(lm_path),
            n_gpu_layers=0,
            n_ctx=n_ctx,
            n_batch=batch,
            n_ubatch=batch,
            verbose=False,
            **llama_kw,
        )
        # clip.cpp logs through mtmd's own logger; route it to llama-cpp-python's, which
        # honours verbose=False (the callback object lives in llama_cpp._logger).
        mtmd_cpp.mtmd_log_set(_logger.llama_log_callback, ctypes.c_void_p(0))
        mtmd_cpp.mtmd_helper_log_set(_logger.llama_log_callback, ctypes.c_void_p(0))
        params = mtmd_cpp.mtmd_context_params_default()
        params.use_gpu = False
        params.print_timings = False
        params.warmup = False
        params.n_threads = self.llama.n_threads
        if exact_clip:
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

    def _with_chunks(
        self, prompt: str, images: Sequence[bytes] | bytes, body: Callable[[Any], _T]
    ) -> _T:
        """Tokenize ``prompt`` (one marker per image) and call ``body(chunks)``; free all."""
        m = self._mtmd
        images = [images] if isinstance(images, bytes) else list(images)
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

        return self._with_chunks(prompt, images, body)

    def _evaluate(self, chunks: Any) -> float:
        """Every chunk into an emptied KV cache; the seconds spent encoding pictures."""
        m, lc, llama = self._mtmd, self._llama_cpp, self.llama
        llama.reset()
        llama._ctx.kv_cache_clear()
        encode_s = 0.0
        for i in range(m.mtmd_input_chunks_size(chunks)):
            chunk = m.mtmd_input_chunks_get(chunks, i)
            if m.mtmd_input_chunk_get_type(chunk) == m.MTMD_INPUT_CHUNK_TYPE_TEXT:
                n = ctypes.c_size_t()
                ptr = m.mtmd_input_chunk_get_tokens_text(chunk, ctypes.byref(n))
                llama.eval([ptr[j] for j in range(n.value)])
                continue
            t0 = time.perf_counter()
            if m.mtmd_encode_chunk(self.ctx, chunk) != 0:
                raise RuntimeError("mtmd_encode_chunk failed")
            embd = m.mtmd_get_output_embd(self.ctx)
            encode_s += time.perf_counter() - t0
            new_n_past = lc.llama_pos(0)
            status = m.mtmd_helper_decode_image_chunk(
                self.ctx,
                llama.ctx,
                chunk,
                embd,
                lc.llama_pos(llama.n_tokens),
                lc.llama_seq_id(0),
                llama.n_batch,
                ctypes.byref(new_n_past),
                m.mtmd_helper_post_decode_callback(),
                None,
            )
            if status != 0:
                raise RuntimeError(f"mtmd_helper_decode_image_chunk failed: {status}")
            llama.n_tokens = int(new_n_past.value)
        return encode_s

    def evaluate(self, prompt: str, images: Sequence[bytes] | bytes = ()) -> float:
        """Read ``prompt`` into an emptied KV cache; return the seconds spent encoding pictures.

        ``self.llama`` then continues from it (``llama.generate(..., reset=False)``).
        """
        return self._with_chunks(prompt, images, self._evaluate)

    def last_logits(self) -> F32Array:
        """The logits of the last position evaluated (a copy)."""
        lc, llama = self._llama_cpp, self.llama
        out = lc.llama_get_logits_ith(llama.ctx, -1)
        return np.ctypeslib.as_array(out, shape=(llama.n_vocab(),)).astype(np.float32)

    def logits(self, prompt: str, images: Sequence[bytes] | bytes = ()) -> F32Array:
        """Next-token logits after evaluating ``prompt`` from an empty context."""
        m = self._mtmd

        def body(chunks: Any) -> F32Array:
            n_chunks = m.mtmd_input_chunks_size(chunks)
            last = m.mtmd_input_chunks_get(chunks, n_chunks - 1)
            if m.mtmd_input_chunk_get_type(last) != m.MTMD_INPUT_CHUNK_TYPE_TEXT:
                # Image chunks are decoded without any output row, logits_last or not.
                raise ValueError("the prompt must end with text to have next-token logits")
            self._evaluate(chunks)
            return self.last_logits()

        return self._with_chunks(prompt, images, body)

    def greedy(
        self, prompt: str, images: Sequence[bytes] | bytes = (), max_tokens: int = 32
    ) -> list[int]:
        """The greedy continuation of ``prompt`` from an empty context, up to end-of-sequence."""
        logits = self.logits(prompt, images)
        eos = int(self.llama.token_eos())
        out: list[int] = []
        for _ in range(max_tokens):
            token = int(np.argmax(logits))
            if token == eos:
                break
            out.append(token)
            self.llama.eval([token])
            logits = self.last_logits()
        return out

    def image_embeddings(self, image: bytes) -> F32Array:
        """The projected embeddings of one picture, ``(n_image_tokens, n_embd)`` float32."""
        m = self._mtmd

        def body(chunks: Any) -> F32Array:
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
                return flat.reshape(n_tokens, n_embd).astype(np.float32)
            raise ValueError("the prompt has no picture")

        return self._with_chunks(self.marker, [image], body)


def mtmd_logits(lm_path: str | Path, mmproj_path: str | Path, png: bytes, prompt: str) -> F32Array:
    """One-shot: load the pair, evaluate ``prompt`` (with the marker, or it is prepended)."""
    with MtmdRunner(lm_path, mmproj_path) as runner:
        if runner.marker not in prompt:
            prompt = runner.marker + prompt
        return runner.logits(prompt, [png])


def mtmd_embeddings(lm_path: str | Path, mmproj_path: str | Path, png: bytes) -> F32Array:
    """One-shot: the projected embeddings of one picture."""
    with MtmdRunner(lm_path, mmproj_path) as runner:
        return runner.image_embeddings(png)
