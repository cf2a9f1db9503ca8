"""The shipped demo pair: an independent numpy forward pass agrees with llama.cpp.

The numpy reference reads the weights back from ``llava_local/data/demo/*.gguf`` with the
``gguf`` package's GGUFReader (no torch), runs the LLaVA-1.5 graph as this llama.cpp build
does (vision: ``llava_local.gguf_writer.reference_image_embeddings``; LM: the llama graph
below, adjacent-pair RoPE) and is compared with libmtmd's projected image embeddings and
llama.cpp's next-token logits. training/train_demo.py also checks PyTorch against these
functions when it exports.

Tolerances: the projector output within 1e-3 of its largest magnitude (ggml rounds the
patch im2col and both GELUs through f16 tables, which the reference copies; float32
summation order then sometimes tips a value to the neighbouring f16 step, an error that
grows with the activations: 2e-4 of the scale for the shipped model, whose embeddings reach
~300); logits within 2e-3 absolute, on logits of magnitude ~10.
"""

from __future__ import annotations

import io
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from llava_local import gguf_writer as gw
from tests.gguf_fixtures import MtmdRunner

DEMO_DIR = Path(__file__).resolve().parents[1] / "llava_local" / "data" / "demo"
SYSTEM = (
    "A chat between a curious human and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the human's questions."
)
EMBD_RTOL = 1e-3  # of the largest embedding magnitude
LOGITS_ATOL = 2e-3


# ------------------------------------------------------------------- numpy reference


@dataclass(frozen=True)
class DemoPair:
    """The demo's configs and float32 weights (PyTorch layout), read from its GGUF files."""

    text: gw.TextConfig
    vision: gw.VisionConfig
    lm: dict[str, np.ndarray]
    mm: dict[str, np.ndarray]


def _read(path: Path) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    from gguf import GGUFReader

    reader = GGUFReader(path)
    meta = {name: field.contents() for name, field in reader.fields.items()}
    weights = {
        t.name: np.asarray(t.data, dtype=np.float32).reshape([int(n) for n in t.shape[::-1]])
        for t in reader.tensors
    }
    return meta, weights


def read_demo_pair(lm_path: Path, mm_path: Path) -> DemoPair:
    """Configs and weights of a demo pair, from the files alone."""
    lm_meta, lm = _read(lm_path)
    mm_meta, mm = _read(mm_path)
    text = gw.TextConfig(
        n_embd=int(lm_meta["llama.embedding_length"]),
        n_layer=int(lm_meta["llama.block_count"]),
        n_ff=int(lm_meta["llama.feed_forward_length"]),
        n_head=int(lm_meta["llama.attention.head_count"]),
        n_head_kv=int(lm_meta["llama.attention.head_count_kv"]),
        rms_eps=float(lm_meta["llama.attention.layer_norm_rms_epsilon"]),
        rope_theta=float(lm_meta["llama.rope.freq_base"]),
    )
    vision = gw.VisionConfig(
        image_size=int(mm_meta["clip.vision.image_size"]),
        patch_size=int(mm_meta["clip.vision.patch_size"]),
        n_embd=int(mm_meta["clip.vision.embedding_length"]),
        n_ff=int(mm_meta["clip.vision.feed_forward_length"]),
        n_head=int(mm_meta["clip.vision.attention.head_count"]),
        n_layer=int(mm_meta["clip.vision.block_count"]),
        projection_dim=int(mm_meta["clip.vision.projection_dim"]),
        eps=float(mm_meta["clip.vision.attention.layer_norm_epsilon"]),
        image_mean=tuple(float(x) for x in mm_meta["clip.vision.image_mean"]),  # type: ignore[arg-type]
        image_std=tuple(float(x) for x in mm_meta["clip.vision.image_std"]),  # type: ignore[arg-type]
        use_gelu=bool(mm_meta["clip.use_gelu"]),
    )
    return DemoPair(text, vision, lm, mm)


def numpy_image_embeddings(pair: DemoPair, pixels: np.ndarray) -> np.ndarray:
    """Projected embeddings (n_image_tokens, n_embd) of clip-preprocessed ``pixels``."""
    return gw.reference_image_embeddings(pair.vision, pair.mm, pixels)


def _rms(x: np.ndarray, w: np.ndarray, eps: float) -> np.ndarray:
    return x / np.sqrt((x * x).mean(-1, keepdims=True) + eps) * w


def _rope_adjacent(x: np.ndarray, theta: float) -> np.ndarray:
    """llama.cpp's "normal" RoPE on (tokens, heads, d): pairs (2i, 2i+1), positions 0.."""
    d = x.shape[-1]
    angle = np.arange(x.shape[0])[:, None] * theta ** (-2 * np.arange(d // 2) / d)
    cos, sin = np.cos(angle)[:, None, :], np.sin(angle)[:, None, :]
    a, b = x[..., 0::2], x[..., 1::2]
    out = np.empty_like(x)
    out[..., 0::2], out[..., 1::2] = a * cos - b * sin, a * sin + b * cos
    return out


def numpy_lm_logits(pair: DemoPair, x: np.ndarray) -> np.ndarray:
    """The llama graph on input embeddings ``x`` (tokens, n_embd): the last row's logits."""
    cfg, w = pair.text, pair.lm
    n, h, d = x.shape[0], cfg.n_head, cfg.head_dim
    x = x.astype(np.float64)
    mask = np.triu(np.full((n, n), -np.inf), 1)
    for i in range(cfg.n_layer):
        b = f"blk.{i}."
        y = _rms(x, w[b + "attn_norm.weight"], cfg.rms_eps)
        q = _rope_adjacent((y @ w[b + "attn_q.weight"].T).reshape(n, h, d), cfg.rope_theta)
        k = _rope_adjacent((y @ w[b + "attn_k.weight"].T).reshape(n, h, d), cfg.rope_theta)
        v = (y @ w[b + "attn_v.weight"].T).reshape(n, h, d)
        scores = np.einsum("qhd,khd->hqk", q, k) / np.sqrt(d) + mask
        scores = np.exp(scores - scores.max(-1, keepdims=True))
        scores /= scores.sum(-1, keepdims=True)
        att = np.einsum("hqk,khd->qhd", scores, v).reshape(n, -1)
        x = x + att @ w[b + "attn_output.weight"].T
        y = _rms(x, w[b + "ffn_norm.weight"], cfg.rms_eps)
        gate = y @ w[b + "ffn_gate.weight"].T
        x = (
            x
            + (gate / (1 + np.exp(-gate)) * (y @ w[b + "ffn_up.weight"].T))
            @ w[b + "ffn_down.weight"].T
        )
    last = _rms(x, w["output_norm.weight"], cfg.rms_eps)[-1]
    return np.asarray(last @ w["output.weight"].T, dtype=np.float32)


def numpy_next_logits(
    pair: DemoPair, before: Sequence[int], image: np.ndarray, after: Sequence[int]
) -> np.ndarray:
    """Next-token logits for token ids ``before``, the image embeddings, ids ``after``."""
    embd = pair.lm["token_embd.weight"]
    x = np.concatenate([embd[list(before)], image, embd[list(after)]])
    return numpy_lm_logits(pair, x)


# ---------------------------------------------------------------------------- tests


@pytest.fixture(scope="module")
def demo_pair() -> DemoPair:
    """The shipped demo pair, read with GGUFReader."""
    return read_demo_pair(DEMO_DIR / "demo-lm.gguf", DEMO_DIR / "demo-mmproj.gguf")


@pytest.fixture(scope="module")
def demo_runner() -> Iterator[MtmdRunner]:
    """llama.cpp (through libmtmd) on the shipped demo pair, with an f32 KV cache."""
    kv32 = {"type_k": 0, "type_v": 0}  # GGML_TYPE_F32
    with MtmdRunner(DEMO_DIR / "demo-lm.gguf", DEMO_DIR / "demo-mmproj.gguf", **kv32) as r:
        yield r


def _picture(size: int) -> tuple[Image.Image, bytes]:
    """A drawn '7' as dark ink on light paper, ``size`` pixels square, and its PNG."""
    seven = np.array(
        [
            [0, 0, 0, 0, 0, 0, 0, 0],
            [0, 2, 12, 16, 16, 16, 9, 0],
            [0, 1, 5, 4, 6, 16, 7, 0],
            [0, 0, 0, 0, 11, 12, 0, 0],
            [0, 0, 0, 4, 16, 3, 0, 0],
            [0, 0, 0, 12, 10, 0, 0, 0],
            [0, 0, 2, 16, 4, 0, 0, 0],
            [0, 0, 3, 11, 0, 0, 0, 0],
        ],
        dtype=np.float32,
    )
    grey = np.round(255 - seven * (255 / 16)).astype(np.uint8)
    image = Image.fromarray(grey, mode="L").resize((size, size), Image.Resampling.NEAREST)
    image = image.convert("RGB")
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return image, buffer.getvalue()


def test_projected_image_embeddings_match_numpy(
    demo_pair: DemoPair, demo_runner: MtmdRunner
) -> None:
    """libmtmd's projector output for a picture at image_size equals the numpy reference."""
    image, png = _picture(demo_pair.vision.image_size)
    pixels = gw.clip_preprocess(image, demo_pair.vision)
    got = demo_runner.image_embeddings(png)
    want = numpy_image_embeddings(demo_pair, pixels)
    assert got.shape == (demo_pair.vision.n_image_tokens, demo_pair.text.n_embd)
    np.testing.assert_allclose(got, want, atol=EMBD_RTOL * np.abs(want).max())
    assert np.abs(want).max() > 0.1  # the comparison is not between two near-zero arrays


def test_next_token_logits_match_numpy(demo_pair: DemoPair, demo_runner: MtmdRunner) -> None:
    """llama.cpp's next-token logits after a prompt with a picture equal the numpy graph's."""
    image, png = _picture(demo_pair.vision.image_size)
    before = f"{SYSTEM} USER: "
    after = "\nWhat digit is this? ASSISTANT:"
    got = demo_runner.logits(before + demo_runner.marker + after, png)
    pixels = gw.clip_preprocess(image, demo_pair.vision)
    want = numpy_next_logits(
        demo_pair,
        [gw.BOS_ID, *before.encode()],
        numpy_image_embeddings(demo_pair, pixels),
        list(after.encode()),
    )
    np.testing.assert_allclose(got, want, atol=LOGITS_ATOL)
    assert int(np.argmax(got)) == int(np.argmax(want))


def test_prompt_tokenizes_to_bos_bytes_image_bytes(demo_runner: MtmdRunner) -> None:
    """libmtmd splits the prompt into BOS+bytes, the image tokens, then bytes: nothing else."""
    _, png = _picture(32)
    before, after = f"{SYSTEM} USER: ", "\nWhat digit is this? ASSISTANT:"
    chunks = demo_runner.chunk_token_counts(before + demo_runner.marker + after, [png])
    n_image = demo_runner.image_embeddings(png).shape[0]
    assert chunks == [
        ("text", 1 + len(before.encode())),
        ("image", n_image),
        ("text", len(after.encode())),
    ]
    tokenize = demo_runner.llama.tokenize
    assert tokenize(before.encode(), add_bos=True, special=True) == [
        gw.BOS_ID,
        *before.encode(),
    ]
    assert tokenize(after.encode(), add_bos=False, special=True) == list(after.encode())
    history = " This digit is 7.</s>USER: Sure? ASSISTANT:"
    assert tokenize(history.encode(), add_bos=False, special=True) == [
        *b" This digit is 7.",
        gw.EOS_ID,
        *b"USER: Sure? ASSISTANT:",
    ]
