"""A numpy reference of what llama.cpp computes for a LLaVA-1.5 pair written by gguf_writer.

:func:`read_pair` reads a pair's configs and float32 weights back from its GGUF files
(with the ``gguf`` package's GGUFReader, no torch); :func:`image_embeddings` is the
vision graph (:func:`llava_local_dev.gguf_writer.reference_image_embeddings`) and
:func:`lm_logits` the llama graph with adjacent-pair RoPE, as this llama.cpp build runs
them. ``tests/core/test_demo_parity.py`` compares them with llama.cpp on the shipped demo
pair; ``training/train_demo.py`` compares PyTorch with them when it exports.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
from gguf import GGUFReader

from .gguf_writer import TextConfig, VisionConfig, reference_image_embeddings

__all__ = ["PairWeights", "image_embeddings", "lm_logits", "next_logits", "read_pair"]

F32Array = npt.NDArray[np.float32]
Array = npt.NDArray[Any]


@dataclass(frozen=True)
class PairWeights:
    """A pair's configs and float32 weights (PyTorch layout), read from its GGUF files."""

    text: TextConfig
    vision: VisionConfig
    lm: dict[str, F32Array]
    mm: dict[str, F32Array]


def _read(path: Path) -> tuple[dict[str, Any], dict[str, F32Array]]:
    reader = GGUFReader(path)
    meta = {name: field.contents() for name, field in reader.fields.items()}
    weights = {
        t.name: np.asarray(t.data, dtype=np.float32).reshape([int(n) for n in t.shape[::-1]])
        for t in reader.tensors
    }
    return meta, weights


def _floats3(values: Any) -> tuple[float, float, float]:
    a, b, c = (float(x) for x in values)
    return a, b, c


def read_pair(lm_path: Path, mm_path: Path) -> PairWeights:
    """Configs and weights of an f32/f16 pair, from the files alone."""
    lm_meta, lm = _read(lm_path)
    mm_meta, mm = _read(mm_path)
    text = TextConfig(
        n_embd=int(lm_meta["llama.embedding_length"]),
        n_layer=int(lm_meta["llama.block_count"]),
        n_ff=int(lm_meta["llama.feed_forward_length"]),
        n_head=int(lm_meta["llama.attention.head_count"]),
        n_head_kv=int(lm_meta["llama.attention.head_count_kv"]),
        rms_eps=float(lm_meta["llama.attention.layer_norm_rms_epsilon"]),
        rope_theta=float(lm_meta["llama.rope.freq_base"]),
    )
    vision = VisionConfig(
        image_size=int(mm_meta["clip.vision.image_size"]),
        patch_size=int(mm_meta["clip.vision.patch_size"]),
        n_embd=int(mm_meta["clip.vision.embedding_length"]),
        n_ff=int(mm_meta["clip.vision.feed_forward_length"]),
        n_head=int(mm_meta["clip.vision.attention.head_count"]),
        n_layer=int(mm_meta["clip.vision.block_count"]),
        projection_dim=int(mm_meta["clip.vision.projection_dim"]),
        eps=float(mm_meta["clip.vision.attention.layer_norm_epsilon"]),
        image_mean=_floats3(mm_meta["clip.vision.image_mean"]),
        image_std=_floats3(mm_meta["clip.vision.image_std"]),
        use_gelu=bool(mm_meta["clip.use_gelu"]),
    )
    return PairWeights(text, vision, lm, mm)


def image_embeddings(pair: PairWeights, pixels: npt.ArrayLike) -> F32Array:
    """Projected embeddings (n_image_tokens, n_embd) of clip-preprocessed ``pixels``."""
    return reference_image_embeddings(pair.vision, pair.mm, pixels)


def _rms(x: Array, w: Array, eps: float) -> Array:
    out: Array = x / np.sqrt((x * x).mean(-1, keepdims=True) + eps) * w
    return out


def _rope_adjacent(x: Array, theta: float) -> Array:
    """llama.cpp's "normal" RoPE on (tokens, heads, d): pairs (2i, 2i+1), positions 0.."""
    d = x.shape[-1]
    angle = np.arange(x.shape[0])[:, None] * theta ** (-2 * np.arange(d // 2) / d)
    cos, sin = np.cos(angle)[:, None, :], np.sin(angle)[:, None, :]
    a, b = x[..., 0::2], x[..., 1::2]
    out = np.empty_like(x)
    out[..., 0::2], out[..., 1::2] = a * cos - b * sin, a * sin + b * cos
    return out


def lm_logits(pair: PairWeights, x: npt.ArrayLike) -> F32Array:
    """The llama graph on input embeddings ``x`` (tokens, n_embd): the last row's logits."""
    cfg, w = pair.text, pair.lm
    h: Array = np.asarray(x, dtype=np.float64)
    n, n_head, d = h.shape[0], cfg.n_head, cfg.head_dim
    mask = np.triu(np.full((n, n), -np.inf), 1)
    for i in range(cfg.n_layer):
        b = f"blk.{i}."
        y = _rms(h, w[b + "attn_norm.weight"], cfg.rms_eps)
        q = _rope_adjacent((y @ w[b + "attn_q.weight"].T).reshape(n, n_head, d), cfg.rope_theta)
        k = _rope_adjacent((y @ w[b + "attn_k.weight"].T).reshape(n, n_head, d), cfg.rope_theta)
        v = (y @ w[b + "attn_v.weight"].T).reshape(n, n_head, d)
        scores = np.einsum("qhd,khd->hqk", q, k) / np.sqrt(d) + mask
        scores = np.exp(scores - scores.max(-1, keepdims=True))
        scores /= scores.sum(-1, keepdims=True)
        att = np.einsum("hqk,khd->qhd", scores, v).reshape(n, -1)
        h = h + att @ w[b + "attn_output.weight"].T
        y = _rms(h, w[b + "ffn_norm.weight"], cfg.rms_eps)
        gate = y @ w[b + "ffn_gate.weight"].T
        h = (
            h
            + (gate / (1 + np.exp(-gate)) * (y @ w[b + "ffn_up.weight"].T))
            @ w[b + "ffn_down.weight"].T
        )
    last = _rms(h, w["output_norm.weight"], cfg.rms_eps)[-1]
    return np.asarray(last @ w["output.weight"].T, dtype=np.float32)


def next_logits(
    pair: PairWeights, before: Sequence[int], image: npt.ArrayLike, after: Sequence[int]
) -> F32Array:
    """Next-token logits for token ids ``before``, the image embeddings, ids ``after``."""
    embd = pair.lm["token_embd.weight"]
    x = np.concatenate([embd[list(before)], np.asarray(image), embd[list(after)]])
    return lm_logits(pair, x)
