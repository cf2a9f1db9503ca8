"""Write LLaVA-style GGUF pairs (a llama language model + a CLIP ``mmproj``) from numpy.

Three users: the test-suite (tiny random pairs that run a whole turn in milliseconds),
benchmarks (random-weight "twins" with a real model's shapes, so they cost what the real
model costs) and the demo-model trainer (who exports trained PyTorch weights through
:func:`write_language_model` and :func:`write_projector`). Every fact below was checked
against the llama.cpp vendored by llama-cpp-python 0.3.36 (``src/models/llama.cpp``,
``tools/mtmd/clip.cpp``, ``tools/mtmd/models/llava.cpp``, ``tools/mtmd/mtmd-image.cpp``)
and, where marked *tested*, against that build's numbers in ``tests/dev/test_gguf_writer.py``.

Part of the development package (``pip install -e ./dev``): it needs the ``gguf`` package,
which the installed library never imports.

Weights
=======
``weights`` maps GGUF tensor names to arrays in **PyTorch layout**: ``nn.Linear.weight`` is
``(out_features, in_features)``, ``nn.Embedding.weight`` is ``(n_rows, n_embd)``,
``nn.Conv2d.weight`` is ``(out, in, kh, kw)``. GGUF stores the reversed shape, so the bytes
of a row-major PyTorch tensor are exactly what llama.cpp reads; no transposes are needed.
Missing names are filled with seeded random values (:func:`random_text_weights`,
:func:`random_vision_weights`); unknown names or wrong shapes raise ``ValueError``.

Language model (architecture ``llama``; E = n_embd, F = n_ff, V = vocabulary size,
H = n_head, Hkv = n_head_kv, d = E / H)::

    token_embd.weight            (V, E)
    output_norm.weight           (E,)        RMSNorm weight
    output.weight                (V, E)      not tied: pass token_embd's array to tie
    blk.{i}.attn_norm.weight     (E,)
    blk.{i}.attn_q.weight        (H*d, E)    head h = rows h*d .. h*d+d-1
    blk.{i}.attn_k.weight        (Hkv*d, E)
    blk.{i}.attn_v.weight        (Hkv*d, E)
    blk.{i}.attn_output.weight   (E, H*d)
    blk.{i}.ffn_norm.weight      (E,)
    blk.{i}.ffn_gate.weight      (F, E)      ffn(x) = down(silu(gate(x)) * up(x))
    blk.{i}.ffn_up.weight        (F, E)
    blk.{i}.ffn_down.weight      (E, F)

Pre-norm blocks without biases: ``x += attn(rmsnorm(x))``, ``x += ffn(rmsnorm(x))``,
``logits = output(rmsnorm(x))``; RMSNorm is ``x / sqrt(mean(x**2) + rms_eps) * w``;
attention is causal with scale ``1/sqrt(d)``; K/V head ``j`` serves query heads
``j*H/Hkv .. (j+1)*H/Hkv - 1``.

**RoPE.** llama.cpp gives ``LLM_ARCH_LLAMA`` ``LLAMA_ROPE_TYPE_NORM``
(``llama_model_rope_type`` in ``src/llama-model.cpp``: "a normal RoPE, operating on pairs
of consecutive head values"). ``ggml_compute_forward_rope_flt`` (``ggml-cpu/ops.cpp``)
then rotates, within each head, the *adjacent* pairs ``(q[2i], q[2i+1])`` for
``i < d/2`` by ``pos * rope_theta ** (-2i/d)``: ``q[2i]' = q[2i] cos - q[2i+1] sin``,
``q[2i+1]' = q[2i] sin + q[2i+1] cos``, positions counting from 0 over every token in the
context (image tokens included). That is Meta's original LLaMA convention
(``torch.view_as_complex`` on consecutive pairs), so weights trained with it need no Q/K
permutation. Weights trained with Hugging Face's ``rotate_half`` (the halves
``(q[i], q[i+d/2])``) do: apply ``LlamaModel.permute`` from llama.cpp's
``conversion/llama.py`` to ``attn_q`` (with H) and ``attn_k`` (with Hkv) first. *Tested*:
a numpy forward with adjacent-pair RoPE reproduces llama.cpp's logits, a rotate-half one
does not.

Projector (architecture ``clip``, projector type ``"mlp"``; E = vision n_embd,
F = vision n_ff, p = patch_size, N = (image_size/p)**2, D = projection_dim = LM n_embd)::

    v.patch_embd.weight          (E, 3, p, p)  Conv2d, stride p, no bias
    v.class_embd                 (E,)
    v.position_embd.weight       (N+1, E)
    v.pre_ln.weight / .bias      (E,)          LayerNorm
    v.blk.{i}.ln1.weight / .bias (E,)
    v.blk.{i}.attn_q.weight      (E, E)  + .bias (E,)   likewise attn_k, attn_v
    v.blk.{i}.attn_out.weight    (E, E)  + .bias (E,)
    v.blk.{i}.ln2.weight / .bias (E,)
    v.blk.{i}.ffn_up.weight      (F, E)  + .bias (F,)   CLIP's mlp.fc1
    v.blk.{i}.ffn_down.weight    (E, F)  + .bias (E,)   CLIP's mlp.fc2
    mm.0.weight (D, E) + mm.0.bias (D,)                 LLaVA-1.5 projector linear 1
    mm.2.weight (D, D) + mm.2.bias (D,)                 linear 2

(llama.cpp's legacy converter writes fc1 as ``ffn_down`` and clip.cpp swaps the pair back
when ``ffn_down``'s input width equals E; that test misfires when F == E, so
:class:`VisionConfig` refuses F == E.) There is no ``v.post_ln``: LLaVA drops it.

Vision graph (``clip_graph_llava::build``), *tested* against :func:`reference_image_embeddings`:

1. Patch embedding, patches in raster order (row by row). ``ggml_conv_2d`` builds an f16
   im2col, so pixels and kernel are rounded to f16 even in an f32 file.
2. **The class token goes last**: the sequence is ``[patch_0 .. patch_{N-1}, CLS]`` and
   ``v.position_embd`` row ``j`` is added to element ``j``, so patch ``i`` gets row ``i``
   and CLS gets row ``N`` (upstream bug ggml-org/llama.cpp#25814; Hugging Face CLIP puts
   CLS first with row 0). Train with this order to match this build.
3. ``pre_ln``, then only the first ``block_count - 1`` blocks run (the LLaVA "penultimate
   layer"); the last stored block must be present but is never used. Blocks are pre-norm:
   ``x += out(attn(ln1(x)))``, ``x += down(act(up(ln2(x))))``, bidirectional attention,
   scale ``1/sqrt(E/n_head)``, LayerNorm eps from ``clip.vision.attention.layer_norm_epsilon``.
   ``act`` is quick GELU ``x * sigmoid(1.702 x)`` when ``clip.use_gelu`` is false (CLIP
   ViT-L) and tanh-approximated GELU when true.
4. No post-LayerNorm. The sequence rows ``1 .. N`` go to the projector, which is
   ``mm.2(gelu_tanh(mm.0(x)))``. Because of 2, those rows are patches ``1 .. N-1`` followed
   by CLS: patch 0 is dropped and the CLS output is the last image token.
5. The N projected rows enter the LM as N consecutive input embeddings (no begin/end
   markers for ``"mlp"``), at the positions where the image marker stood.

Precision: both GELUs go through ggml's f16 lookup tables, and with f16 weights ggml
rounds each matmul's activations to f16; expect ~1e-3 relative differences from float32.
Real LLaVA-1.5 ``mmproj`` files store 23 of CLIP ViT-L's 24 blocks (the converter drops the
last) with ``block_count = 23``, so llama.cpp runs 22 (ggml-org/llama.cpp#25817); the twin
presets copy that file layout.

Image preprocessing for a fixed-size ``"mlp"`` projector (``mtmd_image_preprocessor_fixed_size``,
``img_tool::resize`` in ``mtmd-image.cpp``), replicated by :func:`clip_square` and
:func:`clip_preprocess` (*tested*: byte-identical). The file is decoded by stb_image to
8-bit RGB (alpha dropped, EXIF orientation ignored). A picture already ``S x S``
(S = image_size) is used as is. Otherwise ``scale = min(S/w, S/h)`` in float32,
``nw = min(ceil(w*scale), S)``, ``nh = min(ceil(h*scale), S)``, and the picture is resized
to ``nw x nh`` with a port of Pillow's bicubic resampling (a = -0.5, antialiased when
shrinking, 22-bit fixed point): first horizontally to ``nw x h``, rounded to 8 bits, then
vertically. It is pasted at ``((S-nw)//2, (S-nh)//2)`` onto an ``S x S`` canvas filled with
RGB (122, 116, 104); no crop. Then ``(u8/255 - image_mean)/image_std`` per channel, in
float32. (Hugging Face LLaVA pads to a square first and resizes after, so borders differ.)
"""

from __future__ import annotations

import ctypes
import math
import os
import zlib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import gguf
import numpy as np
import numpy.typing as npt
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, LlamaFileType

from llava_local.errors import MissingDependencyError, ModelLoadError

if TYPE_CHECKING:
    from PIL import Image

__all__ = [
    "PRESETS",
    "Preset",
    "TextConfig",
    "VisionConfig",
    "Vocab",
    "byte_vocab",
    "clip_preprocess",
    "clip_square",
    "padded_vocab",
    "quantize",
    "random_text_weights",
    "random_vision_weights",
    "reference_image_embeddings",
    "write_language_model",
    "write_pair",
    "write_preset",
    "write_projector",
]

F32Array = npt.NDArray[np.float32]
LmDtype = Literal["f32", "f16", "q8_0", "q4_0"]
MmDtype = Literal["f32", "f16"]
QuantKind = Literal["q4_0", "q8_0", "q4_k_m"]

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
PAD_COLOR = (122, 116, 104)  # clip.cpp's pad colour for llava projectors (CLIP mean * 255)


# ---------------------------------------------------------------------------- configs


@dataclass(frozen=True)
class TextConfig:
    """Shape of a llama-architecture language model."""

    n_embd: int
    n_layer: int
    n_ff: int
    n_head: int
    n_head_kv: int | None = None  # None: same as n_head (no grouped-query attention)
    context_length: int = 2048
    rms_eps: float = 1e-5
    rope_theta: float = 10000.0

    def __post_init__(self) -> None:
        if min(self.n_embd, self.n_layer, self.n_ff, self.n_head, self.kv_heads) < 1:
            raise ValueError(f"every size must be positive: {self}")
        if self.n_embd % self.n_head or self.head_dim % 2:
            raise ValueError("n_embd must split into n_head heads of even width (for RoPE)")
        if self.n_head % self.kv_heads:
            raise ValueError("n_head must be a multiple of n_head_kv")

    @property
    def kv_heads(self) -> int:
        """Number of key/value heads."""
        return self.n_head if self.n_head_kv is None else self.n_head_kv

    @property
    def head_dim(self) -> int:
        """Width of one attention head (also the RoPE dimension count)."""
        return self.n_embd // self.n_head


@dataclass(frozen=True)
class VisionConfig:
    """Shape of a CLIP ViT encoder with a LLaVA-1.5 MLP projector (linear, GELU, linear)."""

    image_size: int
    patch_size: int
    n_embd: int
    n_ff: int
    n_head: int
    n_layer: int  # blocks stored; llama.cpp runs n_layer - 1 of them
    projection_dim: int  # = the language model's n_embd
    eps: float = 1e-5
    image_mean: tuple[float, float, float] = CLIP_MEAN
    image_std: tuple[float, float, float] = CLIP_STD
    use_gelu: bool = False  # False: quick GELU (CLIP); True: tanh GELU

    def __post_init__(self) -> None:
        sizes = (self.image_size, self.patch_size, self.n_embd, self.n_ff, self.n_head)
        if min(*sizes, self.n_layer, self.projection_dim) < 1:
            raise ValueError(f"every size must be positive: {self}")
        if self.image_size % self.patch_size:
            raise ValueError("image_size must be a multiple of patch_size")
        if self.n_embd % self.n_head:
            raise ValueError("n_embd must be a multiple of n_head")
        if self.n_ff == self.n_embd:
            # clip.cpp decides whether ffn_up/ffn_down are swapped (legacy naming) by
            # comparing ffn_down's input width with n_embd; with n_ff == n_embd it
            # always swaps, silently exchanging the two layers.
            raise ValueError("n_ff == n_embd is ambiguous to clip.cpp; pick another n_ff")

    @property
    def n_image_tokens(self) -> int:
        """Tokens one picture becomes in the language model."""
        return (self.image_size // self.patch_size) ** 2


@dataclass(frozen=True)
class Vocab:
    """A GPT-2 style (byte-level BPE) vocabulary as GGUF stores it."""

    tokens: list[str]
    token_types: list[int]  # GGUF TokenType: 1 normal, 3 control, 4 user-defined, ...
    merges: list[str]
    bos_id: int
    eos_id: int

    def __post_init__(self) -> None:
        if len(self.tokens) != len(self.token_types):
            raise ValueError("tokens and token_types differ in length")
        if len(set(self.tokens)) != len(self.tokens):
            raise ValueError("duplicate token text")
        if not self.merges:
            raise ValueError("llama.cpp refuses a gpt2 vocabulary without merges")
        for tok in (self.bos_id, self.eos_id):
            if not 0 <= tok < len(self.tokens):
                raise ValueError(f"special token id {tok} out of range")


TOKEN_NORMAL, TOKEN_CONTROL, TOKEN_USER_DEFINED = 1, 3, 4


def _gpt2_byte_symbols() -> list[str]:
    """GPT-2's byte-to-unicode table, indexed by byte value."""
    printable = [
        *range(ord("!"), ord("~") + 1),
        *range(ord("¡"), ord("¬") + 1),
        *range(ord("®"), ord("ÿ") + 1),
    ]
    table: dict[int, str] = {b: chr(b) for b in printable}
    extra = 0
    for b in range(256):
        if b not in table:
            table[b] = chr(256 + extra)
            extra += 1
    return [table[b] for b in range(256)]


BOS_ID, EOS_ID, MERGED_ID, FIRST_EXTRA_ID = 256, 257, 258, 259


def byte_vocab(extra_tokens: Sequence[str] = ()) -> Vocab:
    """A vocabulary in which text tokenizes to exactly its UTF-8 bytes.

    Ids: ``0..255`` are the bytes (token id ``i`` is byte ``i``, written as GPT-2's
    byte-to-unicode symbol); ``256`` is ``"<s>"`` (BOS) and ``257`` is ``"</s>"`` (EOS),
    both CONTROL, so ``"</s>"`` in a prompt becomes EOS when special tokens are parsed;
    ``258`` is the one merge's product, ``"þÿ"`` (bytes 0xFE 0xFF, which never occur in
    valid UTF-8, so the merge never fires); ``259..`` are ``extra_tokens`` in order, as
    USER_DEFINED tokens (llama.cpp matches those in text even without special parsing).
    """
    symbols = _gpt2_byte_symbols()
    merged = symbols[0xFE] + symbols[0xFF]
    tokens = [*symbols, "<s>", "</s>", merged, *extra_tokens]
    types = [TOKEN_NORMAL] * 256 + [TOKEN_CONTROL, TOKEN_CONTROL, TOKEN_NORMAL]
    types += [TOKEN_USER_DEFINED] * len(extra_tokens)
    return Vocab(tokens, types, [f"{symbols[0xFE]} {symbols[0xFF]}"], BOS_ID, EOS_ID)


def padded_vocab(size: int) -> Vocab:
    """:func:`byte_vocab` padded with unreachable normal tokens to ``size`` entries.

    For twins: the vocabulary size sets the embedding and output matrices' cost. The
    padding is NORMAL (not user-defined) so llama.cpp's special-token scan stays short.
    """
    base = byte_vocab()
    if size < len(base.tokens):
        raise ValueError(f"a byte vocabulary needs at least {len(base.tokens)} tokens")
    pad = [f"<unused{i}>" for i in range(size - len(base.tokens))]
    types = base.token_types + [TOKEN_NORMAL] * len(pad)
    return replace(base, tokens=base.tokens + pad, token_types=types)


# ------------------------------------------------------------------ tensor catalogue


@dataclass(frozen=True)
class _Spec:
    """One tensor: its PyTorch shape and how to draw it when the caller gives none."""

    name: str
    shape: tuple[int, ...]
    init: Literal["normal", "around_one"]  # around_one: 1 + std * N(0, 1), for norms
    std: float


def _text_specs(cfg: TextConfig, n_vocab: int) -> list[_Spec]:
    e, f, kv = cfg.n_embd, cfg.n_ff, cfg.kv_heads * cfg.head_dim
    specs = [
        _Spec("token_embd.weight", (n_vocab, e), "normal", 1.0),
        _Spec("output_norm.weight", (e,), "around_one", 0.1),
        _Spec("output.weight", (n_vocab, e), "normal", e**-0.5),
    ]
    for i in range(cfg.n_layer):
        b = f"blk.{i}."
        specs += [
            _Spec(b + "attn_norm.weight", (e,), "around_one", 0.1),
            _Spec(b + "attn_q.weight", (e, e), "normal", e**-0.5),
            _Spec(b + "attn_k.weight", (kv, e), "normal", e**-0.5),
            _Spec(b + "attn_v.weight", (kv, e), "normal", e**-0.5),
            _Spec(b + "attn_output.weight", (e, e), "normal", e**-0.5),
            _Spec(b + "ffn_norm.weight", (e,), "around_one", 0.1),
            _Spec(b + "ffn_gate.weight", (f, e), "normal", e**-0.5),
            _Spec(b + "ffn_up.weight", (f, e), "normal", e**-0.5),
            _Spec(b + "ffn_down.weight", (e, f), "normal", f**-0.5),
        ]
    return specs


def _vision_specs(cfg: VisionConfig) -> list[_Spec]:
    e, f, d, p = cfg.n_embd, cfg.n_ff, cfg.projection_dim, cfg.patch_size
    bias = 0.1  # non-zero, so a bias landing on the wrong layer changes the output
    specs = [
        _Spec("mm.0.weight", (d, e), "normal", e**-0.5),
        _Spec("mm.0.bias", (d,), "normal", bias),
        _Spec("mm.2.weight", (d, d), "normal", d**-0.5),
        _Spec("mm.2.bias", (d,), "normal", bias),
        _Spec("v.patch_embd.weight", (e, 3, p, p), "normal", (3 * p * p) ** -0.5),
        _Spec("v.class_embd", (e,), "normal", 1.0),
        _Spec("v.position_embd.weight", (cfg.n_image_tokens + 1, e), "normal", 0.2),
        _Spec("v.pre_ln.weight", (e,), "around_one", 0.1),
        _Spec("v.pre_ln.bias", (e,), "normal", bias),
    ]
    for i in range(cfg.n_layer):
        b = f"v.blk.{i}."
        specs += [
            _Spec(b + "ln1.weight", (e,), "around_one", 0.1),
            _Spec(b + "ln1.bias", (e,), "normal", bias),
        ]
        for proj in ("attn_q", "attn_k", "attn_v", "attn_out"):
            specs += [
                _Spec(b + proj + ".weight", (e, e), "normal", e**-0.5),
                _Spec(b + proj + ".bias", (e,), "normal", bias),
            ]
        specs += [
            _Spec(b + "ln2.weight", (e,), "around_one", 0.1),
            _Spec(b + "ln2.bias", (e,), "normal", bias),
            _Spec(b + "ffn_up.weight", (f, e), "normal", e**-0.5),
            _Spec(b + "ffn_up.bias", (f,), "normal", bias),
            _Spec(b + "ffn_down.weight", (e, f), "normal", f**-0.5),
            _Spec(b + "ffn_down.bias", (e,), "normal", bias),
        ]
    return specs


def _rng(seed: int, name: str) -> np.random.Generator:
    # One stream per (seed, tensor name): a tensor's random values do not depend on
    # which other tensors the caller supplied, nor on the order of writing.
    seq = np.random.SeedSequence([seed, zlib.crc32(name.encode())])
    return np.random.Generator(np.random.SFC64(seq))


def _draw(spec: _Spec, seed: int) -> F32Array:
    values = _rng(seed, spec.name).standard_normal(spec.shape, dtype=np.float32)
    values *= np.float32(spec.std)
    if spec.init == "around_one":
        values += np.float32(1.0)
    return values


def random_text_weights(cfg: TextConfig, vocab_size: int, seed: int) -> dict[str, F32Array]:
    """Every LM tensor, drawn as :func:`write_language_model` draws a missing one.

    Linear weights have std ``1/sqrt(in_features)`` and embeddings std 1, so the residual
    stream stays near unit scale; norm weights are ``1 + 0.1 N(0,1)``. Holds the whole
    model in float32: for small configurations only.
    """
    return {s.name: _draw(s, seed) for s in _text_specs(cfg, vocab_size)}


def random_vision_weights(cfg: VisionConfig, seed: int) -> dict[str, F32Array]:
    """Every projector tensor, drawn as :func:`write_projector` draws a missing one."""
    return {s.name: _draw(s, seed) for s in _vision_specs(cfg)}


def _checked(weights: Mapping[str, Any] | None, specs: Sequence[_Spec]) -> dict[str, F32Array]:
    """The caller's arrays as C-contiguous float32, refusing unknown names and shapes."""
    if not weights:
        return {}
    by_name = {s.name: s for s in specs}
    unknown = sorted(set(weights) - set(by_name))
    if unknown:
        raise ValueError(f"unknown tensor names: {', '.join(unknown[:8])}")
    out: dict[str, F32Array] = {}
    for name, value in weights.items():
        array = np.ascontiguousarray(value, dtype=np.float32)
        if array.shape != by_name[name].shape:
            raise ValueError(
                f"{name}: shape {array.shape}, expected {by_name[name].shape} (PyTorch layout)"
            )
        if not np.isfinite(array).all():
            raise ValueError(f"{name}: contains NaN or infinity")
        out[name] = array
    return out


# ---------------------------------------------------------------------- ggml encoding

# The ggml types written here; their (block size, bytes per block) is gguf's GGML_QUANT_SIZES.
F32, F16, Q4_0, Q8_0, Q6_K = (
    GGMLQuantizationType.F32,
    GGMLQuantizationType.F16,
    GGMLQuantizationType.Q4_0,
    GGMLQuantizationType.Q8_0,
    GGMLQuantizationType.Q6_K,
)
_FILE_TYPE = {
    "f32": LlamaFileType.ALL_F32,
    "f16": LlamaFileType.MOSTLY_F16,
    "q4_0": LlamaFileType.MOSTLY_Q4_0,
    "q8_0": LlamaFileType.MOSTLY_Q8_0,
}


def _nbytes(shape: tuple[int, ...], ggml_type: GGMLQuantizationType) -> int:
    block, size = GGML_QUANT_SIZES[ggml_type]
    if shape[-1] % block:
        raise ValueError(f"rows of {shape[-1]} values do not split into blocks of {block}")
    return math.prod(shape[:-1]) * (shape[-1] // block) * size


def _random_blocks(
    shape: tuple[int, ...], ggml_type: GGMLQuantizationType, std: float, seed: int, name: str
) -> npt.NDArray[np.uint8]:
    """Random quantized blocks with roughly the given std, straight from random bits.

    Much faster than drawing floats and quantizing them, which is what makes a 7B twin
    quick to write. Q4_0: ``d * (q - 8)``, q uniform in 0..15 (std 4.61 d); Q8_0:
    ``d * q``, q uniform int8 (std 73.9 d); Q6_K: ``d * scale * (q - 32)``, q uniform
    in 0..63 (std 18.5), every sub-block scale 16.
    """
    block, size = GGML_QUANT_SIZES[ggml_type]
    n_blocks = math.prod(shape) // block
    n_words = (n_blocks * size + 7) // 8
    bits = np.random.SFC64(np.random.SeedSequence([seed, zlib.crc32(name.encode())]))
    raw = bits.random_raw(n_words).view(np.uint8)[: n_blocks * size].reshape(n_blocks, size)
    if ggml_type == Q4_0:
        raw[:, :2] = np.array([std / 4.61], dtype=np.float16).view(np.uint8)
    elif ggml_type == Q8_0:
        raw[:, :2] = np.array([std / 73.9], dtype=np.float16).view(np.uint8)
    elif ggml_type == Q6_K:
        raw[:, 192:208] = 16  # int8 sub-block scales
        raw[:, 208:210] = np.array([std / (16 * 18.5)], dtype=np.float16).view(np.uint8)
    else:
        raise ValueError(f"no random blocks for ggml type {ggml_type}")
    return raw.reshape(*shape[:-1], -1)


@dataclass
class _Planned:
    """A tensor to write: its GGUF type and a function that makes its bytes when needed."""

    name: str
    shape: tuple[int, ...]
    ggml_type: GGMLQuantizationType
    make: Callable[[], np.ndarray[Any, Any]] = field(repr=False)


def _encoder(
    ggml_type: GGMLQuantizationType, values: Callable[[], F32Array]
) -> Callable[[], np.ndarray[Any, Any]]:
    def make() -> np.ndarray[Any, Any]:
        array = values()
        if ggml_type == F32:
            return array
        if ggml_type == F16:
            return array.astype(np.float16)
        return np.asarray(gguf.quants.quantize(array, ggml_type))

    return make


def _constant(array: F32Array) -> Callable[[], F32Array]:
    return lambda: array


def _drawer(spec: _Spec, seed: int) -> Callable[[], F32Array]:
    return lambda: _draw(spec, seed)


def _write(path: Path, writer: gguf.GGUFWriter, plan: Sequence[_Planned]) -> Path:
    """Stream the planned tensors into ``path``, one at a time, through a temporary file."""
    for t in plan:
        nbytes = _nbytes(t.shape, t.ggml_type)
        if t.ggml_type in (F32, F16):
            dtype = np.dtype(np.float32 if t.ggml_type == F32 else np.float16)
            writer.add_tensor_info(t.name, t.shape, dtype, nbytes)
        else:
            byte_shape = gguf.quant_shape_to_byte_shape(t.shape, t.ggml_type)
            writer.add_tensor_info(t.name, byte_shape, np.dtype(np.uint8), nbytes, t.ggml_type)
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".partial")
    try:
        writer.write_header_to_file(partial)
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        for t in plan:
            data = t.make()
            if data.nbytes != _nbytes(t.shape, t.ggml_type):
                raise AssertionError(f"{t.name}: made {data.nbytes} bytes")
            writer.write_tensor_data(data)
            del data
        writer.close()
        os.replace(partial, path)
    except BaseException:
        writer.close()
        partial.unlink(missing_ok=True)
        raise
    return path


# ------------------------------------------------------------------ language model


#: The ``general.sampling.*`` keys ``write_language_model`` writes (llama.cpp reads them).
SAMPLING_KEYS = ("temp", "top_k", "top_p", "min_p", "penalty_repeat")


def write_language_model(
    path: str | os.PathLike[str],
    cfg: TextConfig,
    *,
    weights: Mapping[str, npt.ArrayLike] | None = None,
    vocab: Vocab | None = None,
    dtype: LmDtype = "f32",
    chat_template: str | None = None,
    name: str = "llava-local test model",
    seed: int = 0,
    sampling: Mapping[str, float] | None = None,
) -> Path:
    """Write a llama-architecture GGUF; see the module docstring for names and layout.

    ``sampling`` writes the model's recommended sampling as llama.cpp's
    ``general.sampling.<key>`` (``temp``, ``top_k``, ``top_p``, ``min_p``,
    ``penalty_repeat``; ``top_k`` as an integer, the rest as float32).

    ``dtype`` applies to 2-D tensors; 1-D norms stay float32 (llama.cpp's own rule).
    ``q8_0``/``q4_0`` quantize given weights with ``gguf.quants`` (rows must be multiples
    of 32) and draw missing ones directly as random blocks, tensor by tensor, so a 7B
    twin is written in seconds with little memory. Like llama.cpp's Q4_0 recipe,
    ``q4_0`` keeps ``output.weight`` finer: Q6_K when random (rows multiple of 256),
    else Q8_0 (gguf has no Q6_K quantizer).
    """
    vocab = vocab or byte_vocab()
    specs = _text_specs(cfg, len(vocab.tokens))
    given = _checked(weights, specs)
    quantized = dtype in ("q4_0", "q8_0")
    plan: list[_Planned] = []
    for spec in specs:
        if len(spec.shape) == 1:
            gtype = F32
        elif dtype == "q4_0" and spec.name == "output.weight":
            random_ok = spec.name not in given and spec.shape[-1] % 256 == 0
            gtype = Q6_K if random_ok else Q8_0
        else:
            gtype = {"f32": F32, "f16": F16, "q8_0": Q8_0, "q4_0": Q4_0}[dtype]
        if spec.name in given:
            make = _encoder(gtype, _constant(given[spec.name]))
        elif quantized and gtype not in (F32, F16):
            make = _random_maker(spec, gtype, seed)
        else:
            make = _encoder(gtype, _drawer(spec, seed))
        plan.append(_Planned(spec.name, spec.shape, gtype, make))

    w = gguf.GGUFWriter(None, "llama")
    w.add_string("general.name", name)
    w.add_uint32("general.file_type", _FILE_TYPE[dtype])
    if quantized:
        w.add_uint32("general.quantization_version", 2)
    w.add_uint32("llama.vocab_size", len(vocab.tokens))
    w.add_uint32("llama.context_length", cfg.context_length)
    w.add_uint32("llama.embedding_length", cfg.n_embd)
    w.add_uint32("llama.block_count", cfg.n_layer)
    w.add_uint32("llama.feed_forward_length", cfg.n_ff)
    w.add_uint32("llama.attention.head_count", cfg.n_head)
    w.add_uint32("llama.attention.head_count_kv", cfg.kv_heads)
    w.add_float32("llama.attention.layer_norm_rms_epsilon", cfg.rms_eps)
    w.add_uint32("llama.rope.dimension_count", cfg.head_dim)
    w.add_float32("llama.rope.freq_base", cfg.rope_theta)
    w.add_string("tokenizer.ggml.model", "gpt2")
    w.add_string("tokenizer.ggml.pre", "default")
    w.add_array("tokenizer.ggml.tokens", vocab.tokens)
    w.add_array("tokenizer.ggml.token_type", vocab.token_types)
    w.add_array("tokenizer.ggml.merges", vocab.merges)
    w.add_uint32("tokenizer.ggml.bos_token_id", vocab.bos_id)
    w.add_uint32("tokenizer.ggml.eos_token_id", vocab.eos_id)
    w.add_bool("tokenizer.ggml.add_bos_token", True)
    w.add_bool("tokenizer.ggml.add_eos_token", False)
    if chat_template:
        w.add_string("tokenizer.chat_template", chat_template)
    _add_sampling(w, sampling or {})
    return _write(Path(path), w, plan)


def _add_sampling(w: gguf.GGUFWriter, sampling: Mapping[str, float]) -> None:
    for key, value in sampling.items():
        if key not in SAMPLING_KEYS:
            raise ValueError(f"general.sampling.{key} is not one of {', '.join(SAMPLING_KEYS)}")
        if key == "top_k":
            w.add_int32(f"general.sampling.{key}", int(value))
        else:
            w.add_float32(f"general.sampling.{key}", float(value))


def _random_maker(
    spec: _Spec, gtype: GGMLQuantizationType, seed: int
) -> Callable[[], np.ndarray[Any, Any]]:
    return lambda: _random_blocks(spec.shape, gtype, spec.std, seed, spec.name)


# ------------------------------------------------------------------------ projector


def write_projector(
    path: str | os.PathLike[str],
    cfg: VisionConfig,
    *,
    weights: Mapping[str, npt.ArrayLike] | None = None,
    dtype: MmDtype = "f16",
    name: str = "llava-local test projector",
    seed: int = 0,
) -> Path:
    """Write a CLIP + LLaVA-1.5 ``mmproj`` GGUF; see the module docstring for the graph.

    With ``f16``, 2-D and 4-D weights (position embedding included) are float16 and
    biases, norms and the class embedding float32, as llama.cpp's converter writes them.
    """
    specs = _vision_specs(cfg)
    given = _checked(weights, specs)
    plan: list[_Planned] = []
    for spec in specs:
        gtype = F16 if dtype == "f16" and len(spec.shape) >= 2 else F32
        if spec.name in given:
            make = _encoder(gtype, _constant(given[spec.name]))
        else:
            make = _encoder(gtype, _drawer(spec, seed))
        plan.append(_Planned(spec.name, spec.shape, gtype, make))

    w = gguf.GGUFWriter(None, "clip")
    w.add_string("general.name", name)
    w.add_string("general.description", "CLIP ViT + LLaVA-1.5 MLP projector (llava-local)")
    w.add_uint32("general.file_type", _FILE_TYPE[dtype])
    w.add_bool("clip.has_text_encoder", False)
    w.add_bool("clip.has_vision_encoder", True)
    w.add_bool("clip.has_llava_projector", True)  # informative; clip.cpp infers it from "mlp"
    w.add_string("clip.projector_type", "mlp")
    w.add_bool("clip.use_gelu", cfg.use_gelu)
    w.add_uint32("clip.vision.image_size", cfg.image_size)
    w.add_uint32("clip.vision.patch_size", cfg.patch_size)
    w.add_uint32("clip.vision.embedding_length", cfg.n_embd)
    w.add_uint32("clip.vision.feed_forward_length", cfg.n_ff)
    w.add_uint32("clip.vision.projection_dim", cfg.projection_dim)
    w.add_uint32("clip.vision.attention.head_count", cfg.n_head)
    w.add_float32("clip.vision.attention.layer_norm_epsilon", cfg.eps)
    w.add_uint32("clip.vision.block_count", cfg.n_layer)
    w.add_array("clip.vision.image_mean", [float(x) for x in cfg.image_mean])
    w.add_array("clip.vision.image_std", [float(x) for x in cfg.image_std])
    return _write(Path(path), w, plan)


# ----------------------------------------------------------------------------- pairs


def write_pair(
    directory: str | os.PathLike[str],
    text: TextConfig,
    vision: VisionConfig,
    *,
    lm_dtype: LmDtype = "f32",
    mm_dtype: MmDtype = "f16",
    seed: int = 0,
    lm_weights: Mapping[str, npt.ArrayLike] | None = None,
    mm_weights: Mapping[str, npt.ArrayLike] | None = None,
    vocab: Vocab | None = None,
    chat_template: str | None = None,
    name: str = "llava-local test model",
) -> tuple[Path, Path]:
    """Write ``model-<lm_dtype>.gguf`` and ``mmproj-<mm_dtype>.gguf`` into ``directory``."""
    if vision.projection_dim != text.n_embd:
        raise ValueError(
            f"projection_dim {vision.projection_dim} must equal the LM's n_embd {text.n_embd}"
        )
    directory = Path(directory)
    lm = write_language_model(
        directory / f"model-{lm_dtype}.gguf",
        text,
        weights=lm_weights,
        vocab=vocab,
        dtype=lm_dtype,
        chat_template=chat_template,
        name=name,
        seed=seed,
    )
    mm = write_projector(
        directory / f"mmproj-{mm_dtype}.gguf",
        vision,
        weights=mm_weights,
        dtype=mm_dtype,
        name=f"{name} (projector)",
        seed=seed,
    )
    return lm, mm


@dataclass(frozen=True)
class Preset:
    """A named pair shape with the dtypes it is usually written in."""

    text: TextConfig
    vision: VisionConfig
    vocab_size: int
    lm_dtype: LmDtype
    mm_dtype: MmDtype
    description: str

    def shrunk(self, text_layers: int = 1, vision_layers: int = 2) -> Preset:
        """The same widths with fewer blocks: a quick stand-in for tests."""
        return replace(
            self,
            text=replace(self.text, n_layer=text_layers),
            vision=replace(self.vision, n_layer=vision_layers),
            description=f"{self.description}, shrunk to {text_layers}+{vision_layers} blocks",
        )


_CLIP_L_336 = VisionConfig(
    image_size=336,
    patch_size=14,
    n_embd=1024,
    n_ff=4096,
    n_head=16,
    n_layer=23,  # 24 in the ViT; real llava-1.5 mmproj files store 23 (runs 22)
    projection_dim=4096,
)

PRESETS: dict[str, Preset] = {
    "tiny": Preset(
        TextConfig(n_embd=64, n_layer=2, n_ff=128, n_head=4, n_head_kv=2),
        VisionConfig(
            image_size=56,
            patch_size=14,
            n_embd=32,
            n_ff=64,
            n_head=4,
            n_layer=3,
            projection_dim=64,
        ),
        vocab_size=FIRST_EXTRA_ID,
        lm_dtype="f32",
        mm_dtype="f16",
        description="tiny random pair for tests: 56 px, 16 image tokens",
    ),
    "llava-1.5-7b": Preset(
        TextConfig(n_embd=4096, n_layer=32, n_ff=11008, n_head=32, context_length=4096),
        _CLIP_L_336,
        vocab_size=32000,
        lm_dtype="q4_0",
        mm_dtype="f16",
        description="LLaVA-1.5 7B twin: LLaMA-7B Q4_0 + CLIP ViT-L/14-336 f16",
    ),
    "tinyllava-1.1b": Preset(
        TextConfig(n_embd=2048, n_layer=22, n_ff=5632, n_head=32, n_head_kv=4),
        replace(_CLIP_L_336, projection_dim=2048),
        vocab_size=32000,
        lm_dtype="q4_0",
        mm_dtype="f16",
        description="TinyLLaVA 1.1B twin: TinyLlama Q4_0 + CLIP ViT-L/14-336 f16",
    ),
}


def write_preset(
    preset: str | Preset,
    directory: str | os.PathLike[str],
    *,
    seed: int = 0,
    lm_dtype: LmDtype | None = None,
    mm_dtype: MmDtype | None = None,
) -> tuple[Path, Path]:
    """Write a random pair with a preset's shapes (a name from :data:`PRESETS` or a Preset)."""
    p = PRESETS[preset] if isinstance(preset, str) else preset
    vocab = byte_vocab() if p.vocab_size == FIRST_EXTRA_ID else padded_vocab(p.vocab_size)
    return write_pair(
        directory,
        p.text,
        p.vision,
        lm_dtype=lm_dtype or p.lm_dtype,
        mm_dtype=mm_dtype or p.mm_dtype,
        seed=seed,
        vocab=vocab,
        name=f"llava-local twin: {p.description}",
    )


# ------------------------------------------------------------------------- quantize


def quantize(
    src: str | os.PathLike[str], dst: str | os.PathLike[str], kind: QuantKind = "q4_0"
) -> Path:
    """Quantize a language model with llama.cpp's own recipe (``llama_model_quantize``)."""
    try:
        import llama_cpp
    except ImportError as exc:
        raise MissingDependencyError(
            "quantizing needs llama-cpp-python: pip install 'llava-local[llama-cpp]'"
        ) from exc
    ftype = {
        "q4_0": llama_cpp.LLAMA_FTYPE_MOSTLY_Q4_0,
        "q8_0": llama_cpp.LLAMA_FTYPE_MOSTLY_Q8_0,
        "q4_k_m": llama_cpp.LLAMA_FTYPE_MOSTLY_Q4_K_M,
    }[kind]
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = ftype
    dst = Path(dst)
    dst.parent.mkdir(parents=True, exist_ok=True)
    status = llama_cpp.llama_model_quantize(
        os.fsencode(src), os.fsencode(dst), ctypes.byref(params)
    )
    if status != 0:
        raise ModelLoadError(f"llama.cpp could not quantize {src} to {kind} (status {status})")
    return dst


# ------------------------------------------------------------------ reference forward


def clip_square(image: Image.Image, image_size: int) -> Image.Image:
    """The ``S x S`` RGB picture clip.cpp normalizes for a fixed-size ``"mlp"`` projector.

    Replica of ``mtmd_image_preprocessor_fixed_size`` (see the module docstring). clip.cpp
    always resamples horizontally, rounds to 8 bits, then vertically; Pillow's own
    two-axis resize sometimes runs the vertical pass first, so this does two single-axis
    Pillow resizes, which match clip.cpp byte for byte.
    """
    from PIL import Image as PILImage

    size = image_size
    rgb = image.convert("RGB")
    w, h = rgb.size
    if (w, h) == (size, size):
        return rgb
    scale = min(np.float32(size) / np.float32(w), np.float32(size) / np.float32(h))
    nw = min(math.ceil(np.float32(w) * scale), size)
    nh = min(math.ceil(np.float32(h) * scale), size)
    bicubic = PILImage.Resampling.BICUBIC
    resized = rgb.resize((nw, h), bicubic).resize((nw, nh), bicubic)
    canvas = PILImage.new("RGB", (size, size), PAD_COLOR)
    canvas.paste(resized, ((size - nw) // 2, (size - nh) // 2))
    return canvas


def clip_preprocess(image: Image.Image, cfg: VisionConfig) -> F32Array:
    """The normalized pixels clip.cpp feeds the encoder, ``(3, S, S)`` float32 (CHW)."""
    square = clip_square(image, cfg.image_size)
    pixels = np.asarray(square, dtype=np.float32) / np.float32(255.0)
    mean = np.asarray(cfg.image_mean, np.float32)
    std = np.asarray(cfg.image_std, np.float32)
    return np.ascontiguousarray(((pixels - mean) / std).transpose(2, 0, 1))


def _layer_norm(x: F32Array, w: F32Array, b: F32Array, eps: float) -> F32Array:
    mean = x.mean(-1, keepdims=True)
    var = ((x - mean) ** 2).mean(-1, keepdims=True)
    return np.asarray((x - mean) / np.sqrt(var + eps) * w + b, dtype=np.float32)


def _gelu_tanh(x: F32Array) -> F32Array:
    # ggml_vec_gelu_f32: identity above 10, zero below -10, else an f16 lookup table.
    r = x.astype(np.float16).astype(np.float32)
    y = 0.5 * r * (1.0 + np.tanh(np.sqrt(2.0 / np.pi) * (r + 0.044715 * r**3)))
    y = y.astype(np.float16).astype(np.float32)
    return np.asarray(np.where(x <= -10, 0.0, np.where(x >= 10, x, y)), dtype=np.float32)


def _gelu_quick(x: F32Array) -> F32Array:
    # ggml_vec_gelu_quick_f32: always the f16 lookup table.
    r = x.astype(np.float16).astype(np.float32)
    y = (r / (1.0 + np.exp(-1.702 * r))).astype(np.float16)
    return np.asarray(y, dtype=np.float32)


def reference_image_embeddings(
    cfg: VisionConfig, weights: Mapping[str, npt.ArrayLike], pixels: npt.ArrayLike
) -> F32Array:
    """What llama.cpp's llava graph computes, in numpy: ``(n_image_tokens, projection_dim)``.

    ``pixels`` is :func:`clip_preprocess`'s output. Meant as the executable statement of
    the module docstring's vision-graph facts (CLS last, ``n_layer - 1`` blocks, rows
    ``1..N``) for anyone porting the graph to a training framework.
    """
    w = {k: np.asarray(v, dtype=np.float32) for k, v in weights.items()}
    e, p, s = cfg.n_embd, cfg.patch_size, cfg.image_size
    g = s // p
    f16 = np.float16
    x = np.asarray(pixels, dtype=np.float32).astype(f16).reshape(3, g, p, g, p)
    patches = x.transpose(1, 3, 0, 2, 4).reshape(g * g, 3 * p * p)  # raster order
    kernel = w["v.patch_embd.weight"].astype(f16).reshape(e, -1)  # f16 im2col
    h = patches.astype(np.float32) @ kernel.astype(np.float32).T
    h = np.concatenate([h, w["v.class_embd"][None, :]])  # class token LAST
    h = h + w["v.position_embd.weight"]
    h = _layer_norm(h, w["v.pre_ln.weight"], w["v.pre_ln.bias"], cfg.eps)
    n_head, d = cfg.n_head, e // cfg.n_head
    for i in range(cfg.n_layer - 1):
        b = f"v.blk.{i}."
        y = _layer_norm(h, w[b + "ln1.weight"], w[b + "ln1.bias"], cfg.eps)
        q, k, v = (
            (y @ w[b + n + ".weight"].T + w[b + n + ".bias"]).reshape(-1, n_head, d)
            for n in ("attn_q", "attn_k", "attn_v")
        )
        scores = np.einsum("qhd,khd->hqk", q, k) / np.float32(math.sqrt(d))
        scores = np.exp(scores - scores.max(-1, keepdims=True))
        scores /= scores.sum(-1, keepdims=True)
        att = np.einsum("hqk,khd->qhd", scores, v).reshape(-1, e)
        h = h + att @ w[b + "attn_out.weight"].T + w[b + "attn_out.bias"]
        y = _layer_norm(h, w[b + "ln2.weight"], w[b + "ln2.bias"], cfg.eps)
        y = y @ w[b + "ffn_up.weight"].T + w[b + "ffn_up.bias"]
        y = _gelu_tanh(y) if cfg.use_gelu else _gelu_quick(y)
        h = h + y @ w[b + "ffn_down.weight"].T + w[b + "ffn_down.bias"]
    h = h[1:]  # rows 1..N: patches 1..N-1, then the class token
    h = _gelu_tanh(h @ w["mm.0.weight"].T + w["mm.0.bias"])
    return np.asarray(h @ w["mm.2.weight"].T + w["mm.2.bias"], dtype=np.float32)
