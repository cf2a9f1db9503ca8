"""How much memory a GGUF pair will take in llama.cpp, and whether this machine has it.

Why: when a model does not fit, the kernel does not refuse it politely, it kills
the process mid-load (or the machine swaps to a halt). So before loading, the
pair's memory is estimated from the files' headers and compared with what the
machine (or the container's cgroup) has available.

What llama.cpp (0.3.x, CPU) holds, and how each part is estimated here:

- **weights**: the language model is memory-mapped; every page of it is read at
  load or on the first turn, so its tensor bytes count as resident. Where this CPU
  repacks most of them (below) the engine reads the file instead (:func:`maps_weights`),
  so only the tensors not repacked count here.
- **repack**: on CPUs with fast integer kernels (x86 AVX2; ARM NEON with dotprod
  or i8mm) llama.cpp copies Q4_0, IQ4_NL, Q4_K, MXFP4 (and on ARM also Q5_K,
  Q6_K, Q8_0; on AVX512 also Q2_K) matrices into an interleaved layout, an
  extra buffer as large as those tensors (``ggml-cpu/repack.cpp``). The token
  embedding (a row lookup, not a matrix product) is never repacked. The mapped
  pages those tensors came from are never read again, so the kernel can drop
  them under pressure: they count in peak RSS but not in what must fit.
- **projector**: clip.cpp reads the whole mmproj file into memory.
- **KV cache**: ``n_layer * n_ctx * (n_head_kv * head_dim_k + n_head_kv * head_dim_v)``
  f16 values, ``n_ctx`` rounded up to 256, zeroed at load (so resident).
- **compute**: llama.cpp reserves one buffer for its worst-case graph. Fitted to the
  buffer sizes llama.cpp reports, with ``u = min(n_batch, n_ctx)`` and ``k = n_ctx``
  rounded to 256::

      attention = 2 * u * k + 4 * u * (3 * n_ff + 4 * n_embd)   (flash attention)
                = 4 * u * (k * (n_head + 1) + 5 * n_embd + 2 * n_head_kv * head_dim)
                                                               (without: the KQ matrix)
      output    = 4 * u * (n_vocab + 3 * n_embd)
      compute   = max(attention, output)

  plus the CPU's scratch for quantizing activations (``u * max(n_ff, n_embd)``
  bytes), and for the projector, one picture's graph with flash attention
  (``4 * (3 * S**2 + 2 * n_pos * max(n_ff, n_embd))``) and its embeddings.
- **overhead**: libraries, threads and the tokenizer's tables, measured.

Measured against peak RSS (see ``tests/core/test_memory.py``): the estimate is the
peak over a long conversation, so one short turn measures somewhat below it.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, computed_field

from . import host
from .errors import InsufficientMemoryError, LlavaLocalError, ModelLoadError
from .gguf_header import GgmlType, GgufTensor, align, read_gguf

MiB = 1 << 20
GiB = 1 << 30

# Engine overhead measured on this library's test pairs: ggml contexts, thread
# pools and the graph metadata (a fixed part), tokenizer tables (per token), and
# each thread's stack and scratch.
OVERHEAD_FIXED = 16 * MiB
OVERHEAD_PER_TOKEN = 512
OVERHEAD_PER_THREAD = 1 * MiB

#: Text tokens beside one picture when n_ctx is not given: the longest that fits the
#: memory available, so a small machine (a 4 GB Raspberry Pi) loads a model with shorter
#: conversations rather than refusing it.
TEXT_BUDGETS = (2048, 1024, 512)

# check(): what must be left free beyond the estimate, for Python, the pictures
# being prepared and estimation error.
MARGIN_FRACTION = 0.10
MARGIN_MIN = 256 * MiB

# The ggml types the repack rule names, from gguf_header's type table.
Q4_0, Q4_1, Q8_0, Q2_K, Q4_K, Q5_K, Q6_K = (
    GgmlType.Q4_0,
    GgmlType.Q4_1,
    GgmlType.Q8_0,
    GgmlType.Q2_K,
    GgmlType.Q4_K,
    GgmlType.Q5_K,
    GgmlType.Q6_K,
)
IQ4_NL, IQ4_XS, MXFP4 = GgmlType.IQ4_NL, GgmlType.IQ4_XS, GgmlType.MXFP4

# Tensors read by row lookup (GET_ROWS), never by a matrix product: never repacked.
_LOOKUP_TENSORS = ("token_embd.weight", "token_types.weight", "position_embd.weight")


# ------------------------------------------------------------------------ repacking


def cpu_features() -> frozenset[str]:
    """The CPU features llama.cpp was built with and detected, as its system info names them.

    Falls back to ``/proc/cpuinfo`` flags when llama-cpp-python is not installed.
    """
    try:
        import llama_cpp

        info = llama_cpp.llama_print_system_info().decode()
    except (ImportError, AttributeError, OSError):
        return _cpuinfo_features()
    # "CPU : SSE3 = 1 | AVX2 = 1 | ... | REPACK = 1 |"
    names = set()
    for part in info.split("|"):
        name, _, flag = part.rpartition("=")
        if flag.strip() == "1":
            names.add(name.rpartition(":")[2].strip().upper())
    return frozenset(names)


def _cpuinfo_features() -> frozenset[str]:
    flags = host.cpu_flags()
    names = {"avx2": "AVX2", "avx512f": "AVX512", "asimd": "NEON", "asimddp": "DOTPROD"}
    names["i8mm"] = "MATMUL_INT8"
    out = {names[f] for f in flags if f in names}
    return frozenset(out | {"REPACK"}) if out else frozenset()


def repack_rule(features: frozenset[str]) -> Callable[[int, int], bool]:
    """``rule(ggml_type, rows)``: whether llama.cpp repacks such a matrix on this CPU.

    A copy of ``ggml_repack_get_optimal_repack_type`` (ggml-cpu/repack.cpp), where
    ``rows`` is the tensor's ``ne[1]`` (its row count must divide into the
    interleave of 4 or 8).
    """
    if "REPACK" not in features and "AMX_INT8" not in features:
        return lambda ggml_type, rows: False
    avx2, avx512 = "AVX2" in features, "AVX512" in features
    neon = "NEON" in features
    i8mm = neon and "MATMUL_INT8" in features
    dot = neon and "DOTPROD" in features
    need: dict[int, int] = {}  # type -> the row multiple it needs

    def allow(ggml_type: int, multiple: int, when: bool) -> None:
        if when and ggml_type not in need:
            need[ggml_type] = multiple

    allow(Q4_0, 8, avx2)
    allow(Q4_0, 4, i8mm or dot)
    allow(Q4_K, 8, avx2 or i8mm or dot)
    allow(Q2_K, 8, avx512)
    allow(Q5_K, 8, i8mm or dot)
    allow(Q6_K, 8, i8mm or dot)
    allow(IQ4_NL, 8, avx2)
    allow(IQ4_NL, 4, dot)
    allow(MXFP4, 8, avx2)
    allow(MXFP4, 4, dot)
    allow(Q8_0, 4, i8mm or dot)
    if "AMX_INT8" in features:  # the AMX buffer type takes these first (approximately)
        for ggml_type in (Q4_0, Q4_1, Q8_0, Q4_K, Q5_K, Q6_K, IQ4_XS):
            need[ggml_type] = 32
    return lambda ggml_type, rows: ggml_type in need and rows % need[ggml_type] == 0


def _packed_bytes(tensors: list[GgufTensor], features: frozenset[str] | None) -> int:
    """Bytes of the tensors llama.cpp repacks on a CPU with ``features`` (default: this
    one's)."""
    rule = repack_rule(cpu_features() if features is None else features)
    return sum(t.nbytes for t in tensors if _repacked(t, rule))


def _repacked(tensor: GgufTensor, rule: Callable[[int, int], bool]) -> bool:
    if tensor.name in _LOOKUP_TENSORS or len(tensor.shape) < 2:
        return False
    if len(tensor.shape) > 2 and not tensor.name.endswith("_exps.weight"):
        return False
    return rule(tensor.ggml_type, tensor.shape[1])


# ------------------------------------------------------------------------- estimate


class MemoryEstimate(BaseModel):
    """The memory a GGUF pair takes once loaded, in bytes, part by part.

    ``total_bytes`` is the expected peak resident size over a conversation that fills
    ``n_ctx``; ``needed_bytes`` leaves out ``reclaimable_bytes``, mapped file pages
    that are never read again after loading, which the kernel drops when short of
    memory. :func:`check` compares ``needed_bytes`` with what is available.
    """

    model_config = ConfigDict(frozen=True)

    model: str
    mmproj: str
    n_ctx: int
    n_batch: int
    weights_bytes: int
    repack_bytes: int
    projector_bytes: int
    kv_bytes: int
    lm_compute_bytes: int
    projector_compute_bytes: int
    overhead_bytes: int
    reclaimable_bytes: int
    #: Whether the model file is memory-mapped (else read, its repacked matrices once).
    mapped: bool = True

    @computed_field  # type: ignore[prop-decorator]
    @property
    def compute_bytes(self) -> int:
        """Compute buffers: the language model's graph and one picture's."""
        return self.lm_compute_bytes + self.projector_compute_bytes

    @computed_field  # type: ignore[prop-decorator]
    @property
    def total_bytes(self) -> int:
        """Expected peak RSS growth from loading and talking."""
        return (
            self.weights_bytes
            + self.repack_bytes
            + self.projector_bytes
            + self.kv_bytes
            + self.compute_bytes
            + self.overhead_bytes
        )

    @computed_field  # type: ignore[prop-decorator]
    @property
    def needed_bytes(self) -> int:
        """What must fit in memory: the total less the pages the kernel can drop."""
        return self.total_bytes - self.reclaimable_bytes

    def explain(self) -> str:
        """The estimate in a few lines of words, for error messages and ``--verbose``."""
        repack = ""
        if self.repack_bytes:
            repack = (
                f"\n  + {human(self.repack_bytes)} repacked copy of its matrices for this CPU"
                f" (their {human(self.reclaimable_bytes)} of mapped pages can be dropped)"
                if self.mapped
                else f"\n  + {human(self.repack_bytes)} of its matrices, repacked for this CPU"
            )
        return (
            f"{self.model} + {self.mmproj}, n_ctx {self.n_ctx}, n_batch {self.n_batch}:\n"
            f"  {human(self.weights_bytes)} language model weights "
            f"({'memory-mapped' if self.mapped else 'read from the file'}){repack}\n"
            f"  + {human(self.projector_bytes)} projector weights\n"
            f"  + {human(self.kv_bytes)} KV cache (f16, {align(self.n_ctx, 256)} positions)\n"
            f"  + {human(self.compute_bytes)} compute buffers\n"
            f"  + {human(self.overhead_bytes)} engine overhead\n"
            f"  = {human(self.total_bytes)} at peak; {human(self.needed_bytes)} must fit in memory"
        )


def human(n: int) -> str:
    """Bytes in GiB or MiB, as people read them."""
    if abs(n) >= GiB:
        return f"{n / GiB:.1f} GiB"
    if abs(n) >= 10 * MiB:
        return f"{n / MiB:.0f} MiB"
    return f"{n / MiB:.1f} MiB"


def _int(meta: dict[str, Any], key: str, default: int | None = None) -> int:
    value = meta.get(key, default)
    if isinstance(value, list):  # per-layer values (some architectures)
        value = max((int(v) for v in value), default=default)
    if value is None:
        raise ModelLoadError(f"the GGUF header lacks {key}")
    return int(value)


def _per_layer(meta: dict[str, Any], key: str, n_layer: int, default: int) -> list[int]:
    value = meta.get(key, default)
    if isinstance(value, list) and len(value) == n_layer:
        return [int(v) for v in value]
    if isinstance(value, list):
        value = max((int(v) for v in value), default=default)
    return [int(value)] * n_layer


def estimate(
    model: Path,
    mmproj: Path,
    *,
    n_ctx: int,
    n_batch: int = 512,
    n_threads: int | None = None,
    use_mmap: bool = True,
    flash_attn: bool = True,
    features: frozenset[str] | None = None,
) -> MemoryEstimate:
    """Estimate the memory llama.cpp needs for ``model`` + ``mmproj`` with these settings.

    ``n_ctx``, ``n_batch`` and ``flash_attn`` as given to llama.cpp; ``features`` are the
    CPU features that decide repacking (default: :func:`cpu_features`).
    """
    lm, mm = read_gguf(Path(model)), read_gguf(Path(mmproj))
    arch = str(lm.meta.get("general.architecture", "llama"))
    shapes = {t.name: t.shape for t in lm.tensors}

    packed = _packed_bytes(lm.tensors, features)
    weights = sum(t.nbytes for t in lm.tensors)

    embd = shapes.get("token_embd.weight", ())
    n_embd = _int(lm.meta, f"{arch}.embedding_length", embd[0] if embd else None)
    n_vocab = embd[1] if len(embd) > 1 else len(lm.meta.get("tokenizer.ggml.tokens", ())) or 32000
    n_layer = _int(lm.meta, f"{arch}.block_count")
    n_head = _int(lm.meta, f"{arch}.attention.head_count")
    n_ff = _int(lm.meta, f"{arch}.feed_forward_length", 4 * n_embd)
    head_k = _int(lm.meta, f"{arch}.attention.key_length", n_embd // n_head)
    head_v = _int(lm.meta, f"{arch}.attention.value_length", head_k)
    kv_heads = _per_layer(lm.meta, f"{arch}.attention.head_count_kv", n_layer, n_head)

    cells = align(n_ctx, 256)
    kv = sum(cells * h * (head_k + head_v) * 2 for h in kv_heads)
    u = max(1, min(n_batch, n_ctx))
    lm_compute = llama_compute_bytes(
        n_ctx=n_ctx,
        n_batch=u,
        n_embd=n_embd,
        n_head=n_head,
        kv_width=max(kv_heads) * head_k,
        n_vocab=n_vocab,
        n_ff=n_ff,
        flash_attn=flash_attn,
    )
    threads = n_threads or os.cpu_count() or 1
    overhead = (
        OVERHEAD_FIXED
        + OVERHEAD_PER_TOKEN * n_vocab
        + OVERHEAD_PER_THREAD * threads
        + u * max(n_ff, n_embd) * 34 // 32  # activations quantized to Q8 for the matmuls
    )
    return MemoryEstimate(
        model=Path(model).name,
        mmproj=Path(mmproj).name,
        n_ctx=n_ctx,
        n_batch=u,
        weights_bytes=weights - packed if not use_mmap else weights,
        repack_bytes=packed,
        projector_bytes=sum(t.nbytes for t in mm.tensors),
        kv_bytes=kv,
        lm_compute_bytes=lm_compute,
        projector_compute_bytes=projector_compute_bytes(mm.meta),
        overhead_bytes=overhead,
        reclaimable_bytes=packed if use_mmap else 0,
        mapped=use_mmap,
    )


def maps_weights(model: Path, features: frozenset[str] | None = None) -> bool:
    """Whether to memory-map ``model`` (the engine's ``use_mmap=None``): yes unless this
    CPU repacks most of its weights. A repacked matrix is copied out of the mapping, so
    mapping it would keep the file's pages resident beside their copy (the 7B twin: 9.1
    GiB instead of 5.8 after loading); reading the file instead holds each weight once.
    """
    lm = read_gguf(Path(model))
    packed = _packed_bytes(lm.tensors, features)
    return 2 * packed <= sum(t.nbytes for t in lm.tensors)


def llama_compute_bytes(
    *,
    n_ctx: int,
    n_batch: int,
    n_embd: int,
    n_head: int,
    kv_width: int,
    n_vocab: int,
    n_ff: int = 0,
    flash_attn: bool = True,
) -> int:
    """The compute buffer llama.cpp reserves for a llama-like graph.

    Fitted to the sizes llama.cpp reports (``sched_reserve: CPU compute buffer size``)
    over n_ctx 512-8192, n_batch 32-1024 and shapes from n_embd 64 to 4096 (vocabularies
    258-152k). Without flash attention: from 0.3% below to 6% above; the KQ matrix
    (``u * k * n_head`` floats) dominates at long contexts, 285 MiB against 70 MiB for the
    1.1B twin at n_ctx 4096. With it: exact for the 7B twin's shape, up to 30% above for
    narrow test models, whose feed-forward buffers llama.cpp partly reuses.
    ``kv_width`` is ``n_head_kv * head_dim``.
    """
    k = align(n_ctx, 256)
    u = max(1, min(n_batch, n_ctx))
    if flash_attn:  # the f16 mask beside the feed-forward's gate, up and product
        attention = 2 * u * k + 4 * u * (3 * n_ff + 4 * n_embd)
    else:
        attention = 4 * u * (k * (n_head + 1) + 5 * n_embd + 2 * kv_width)  # KQ, mask, q/k/v
    output = 4 * u * (n_vocab + 3 * n_embd)  # logits for a full batch
    return max(attention, output)


def projector_compute_bytes(meta: dict[str, Any]) -> int:
    """One picture through the vision encoder (flash attention, clip.cpp's CPU default),
    plus the embeddings it hands to the language model."""
    size = _int(meta, "clip.vision.image_size", 336)
    patch = _int(meta, "clip.vision.patch_size", 14)
    width = _int(meta, "clip.vision.embedding_length", 1024)
    n_ff = _int(meta, "clip.vision.feed_forward_length", 4 * width)
    out = _int(meta, "clip.vision.projection_dim", width)
    patches = (size // max(patch, 1)) ** 2
    tiles = 5 if "clip.vision.image_grid_pinpoints" in meta else 1  # llava-1.6: overview + 4
    graph = 4 * (3 * size * size + 2 * (patches + 1) * max(n_ff, width, out))
    embeddings = 4 * tiles * patches * out
    return graph + embeddings


# --------------------------------------------------------------------------- check


def margin(est: MemoryEstimate) -> int:
    """Room :func:`check` keeps free beyond the estimate."""
    return margin_bytes(est.needed_bytes)


def margin_bytes(needed: int) -> int:
    """Room kept free beyond ``needed`` bytes: a tenth, at least :data:`MARGIN_MIN`."""
    return max(MARGIN_MIN, int(needed * MARGIN_FRACTION))


def check(est: MemoryEstimate, *, force: bool = False, available: int | None = None) -> None:
    """Raise :class:`InsufficientMemoryError` unless ``est`` fits with a safety margin.

    ``available`` defaults to :func:`llava_local.host.available_bytes`; ``force=True``
    skips the check (the caller accepts the risk of the kernel's out-of-memory killer).
    """
    if force:
        return
    free = host.available_bytes() if available is None else available
    needed = est.needed_bytes + margin(est)
    if needed <= free:
        return
    kv_share = f" (its KV cache takes {human(est.kv_bytes)})" if est.kv_bytes >= 64 * MiB else ""
    raise InsufficientMemoryError(
        f"not enough memory to load {est.model} with {est.mmproj}: it needs about "
        f"{human(needed)} ({human(est.needed_bytes)} estimated plus "
        f"{human(margin(est))} to spare) but only {human(free)} is available. "
        "Options: use a smaller model or a smaller quantization of it; pass a smaller "
        f"n_ctx= than {est.n_ctx}{kv_share}; or pass force=True to load anyway "
        "(the system may then kill the process).\n" + est.explain(),
        needed=needed,
        available=free,
    )


# ------------------------------------------------------------------ default context


class ShorterContextWarning(LlavaLocalError, UserWarning):
    """The model was loaded with a shorter context than the default, to fit the memory
    available: a conversation longer than it gets ``ContextOverflowError``."""


def fitting_context(
    model: Path,
    mmproj: Path,
    *,
    image_tokens: int,
    trained: int,
    n_batch: int = 512,
    n_threads: int | None = None,
    use_mmap: bool = True,
    flash_attn: bool = True,
    slots: int = 1,
    available: int,
) -> tuple[int, int]:
    """The n_ctx for one picture and the longest of :data:`TEXT_BUDGETS` whose estimate
    (for ``slots`` conversations at once) fits ``available`` bytes with :func:`check`'s
    margin, never beyond the ``trained`` context, and the one wanted (the first budget).
    The two are equal when it fits, or when none does (:func:`check` then refuses with
    its numbers); a shorter one is announced with :func:`shorter_context`'s warning."""
    sizes = [min(trained, image_tokens + text) for text in TEXT_BUDGETS]
    for n_ctx in sizes:
        est = estimate(
            model,
            mmproj,
            n_ctx=n_ctx * slots,
            n_batch=n_batch,
            n_threads=n_threads,
            use_mmap=use_mmap,
            flash_attn=flash_attn,
        )
        if est.needed_bytes + margin(est) <= available:
            return n_ctx, sizes[0]
    return sizes[0], sizes[0]


def shorter_context(model: str, n_ctx: int, wanted: int, available: int) -> ShorterContextWarning:
    """The warning for ``model`` loaded with ``n_ctx`` instead of ``wanted`` positions,
    because only that fits ``available`` bytes."""
    return ShorterContextWarning(
        f"{model} is loaded with a context of {n_ctx} tokens, not {wanted}: with {wanted} "
        f"it would not fit the {human(available)} of memory available. A conversation "
        f"longer than {n_ctx} tokens is refused; pass n_ctx= to choose, or free memory"
    )
