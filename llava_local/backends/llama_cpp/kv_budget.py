"""The llama.cpp engine's memory, decided once before loading: how long one
conversation may be, how many are answered at once, and how much memory keeps earlier
KV states.

Why one budget: the three draw on the same memory (the slots' KV cache grows with
both the context and the slots; kept states take part of what is left), and what
``doctor`` and ``models`` say a model will do must be what loading does. So
:class:`~llava_local.backends.llama_cpp.LlamaCppBackend` opens with :func:`budget`'s
numbers and nothing else, and the commands show the same record.

The rules, from the two files' headers, the settings and the memory available:

- **context** (per conversation): ``n_ctx`` if given; else one picture and the longest
  of :data:`~llava_local.memory.TEXT_BUDGETS` whose estimate (for the slots given, one
  with ``"auto"``) fits with :func:`~llava_local.memory.check`'s margin, never beyond the
  trained context (not shortened when forced or offloaded to a GPU);
- **slots** (conversations at once): ``parallel`` if given; ``"auto"``: the most, up to
  :data:`MAX_AUTO_PARALLEL`, whose estimate and margin fit in :data:`AUTO_SHARE` of the
  memory available, leaving the rest for kept states and the machine;
- **kept states** (earlier KV states in RAM): ``kv_cache_mb`` if given; else half of
  what the estimate and the margin leave (the other half, and the margin, stay free).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, computed_field

from ... import host, memory
from ...memory import MemoryEstimate, human
from ...wording import count
from . import gguf_meta

__all__ = ["AUTO_SHARE", "MAX_AUTO_PARALLEL", "KVBudget", "budget"]

#: The most slots ``parallel="auto"`` chooses: beyond four answers a step, a CPU's
#: memory bandwidth is spent and each answer slows down.
MAX_AUTO_PARALLEL = 4
#: The share of the memory available that the slots of ``parallel="auto"`` (with the
#: model and the margin) may take; the rest is for kept states and the machine.
AUTO_SHARE = 0.8
#: Tokens one picture takes when the projector does not say (LLaVA-1.5's 576).
DEFAULT_IMAGE_TOKENS = 576
#: The context assumed when the model's header does not give its trained one.
DEFAULT_TRAINED = 4096

Parallel = int | Literal["auto"]


class KVBudget(BaseModel):
    """What the llama.cpp engine holds for a GGUF pair with its settings, in bytes.

    The parts add up: ``weights + projector + kv + compute + overhead`` is what loading
    must fit (``estimate.needed_bytes``), plus ``kept_bytes`` for kept states is
    ``total_bytes``, and ``left_bytes`` is what remains of ``available_bytes`` (negative
    when it does not fit).
    """

    model_config = ConfigDict(frozen=True)

    model: str
    mmproj: str
    #: The memory the budget was made against.
    available_bytes: int
    #: Positions of one conversation, and the ones it would have had with the first text
    #: budget (larger when only a shorter context fits).
    n_ctx: int
    n_ctx_wanted: int
    #: Conversations answered at once (slots sharing one KV cache of ``n_ctx * parallel``).
    parallel: int
    #: llama.cpp's part: the estimate for all the slots.
    estimate: MemoryEstimate
    #: The memory tier's bound for kept KV states; 0 keeps none in RAM.
    kept_bytes: int

    @computed_field  # type: ignore[prop-decorator]
    @property
    def margin_bytes(self) -> int:
        """Room left free beyond the estimate (the memory check's margin, which kept
        states never take either)."""
        return memory.margin(self.estimate)

    @computed_field  # type: ignore[prop-decorator]
    @property
    def kv_bytes(self) -> int:
        """The slots' KV cache (f16): ``n_ctx * parallel`` positions."""
        return self.estimate.kv_bytes

    @computed_field  # type: ignore[prop-decorator]
    @property
    def weights_bytes(self) -> int:
        """The language model's weights as they must fit (a repacked copy replaces the
        file's pages, which the kernel may drop)."""
        est = self.estimate
        return est.weights_bytes + est.repack_bytes - est.reclaimable_bytes

    @computed_field  # type: ignore[prop-decorator]
    @property
    def projector_bytes(self) -> int:
        return self.estimate.projector_bytes

    @computed_field  # type: ignore[prop-decorator]
    @property
    def compute_bytes(self) -> int:
        """Compute buffers: the language model's graph and one picture's."""
        return self.estimate.compute_bytes

    @computed_field  # type: ignore[prop-decorator]
    @property
    def overhead_bytes(self) -> int:
        return self.estimate.overhead_bytes

    @computed_field  # type: ignore[prop-decorator]
    @property
    def total_bytes(self) -> int:
        """Everything the engine may hold: what loading needs and the kept states."""
        return self.estimate.needed_bytes + self.kept_bytes

    @computed_field  # type: ignore[prop-decorator]
    @property
    def left_bytes(self) -> int:
        """What is left for the rest of the machine (the margin included)."""
        return self.available_bytes - self.total_bytes

    @computed_field  # type: ignore[prop-decorator]
    @property
    def fits(self) -> bool:
        """Whether loading passes the memory check (the estimate and its margin fit)."""
        return self.estimate.needed_bytes + self.margin_bytes <= self.available_bytes

    def summary(self, name: str | None = None) -> str:
        """The budget in one line, e.g. ``demo: 4 conversations at once x 1040
        positions, KV 32 MiB; kept states up to 1.1 GiB in RAM; 5.3 GiB left``."""
        at_once = (
            "one conversation at a time"
            if self.parallel == 1
            else f"{count(self.parallel, 'conversation')} at once"
        )
        kept = (
            f"kept states up to {human(self.kept_bytes)} in RAM"
            if self.kept_bytes
            else "no kept states in RAM"
        )
        left = f"{human(self.left_bytes)} left" if self.fits else "does not fit"
        return (
            f"{name or self.model}: {at_once} x {count(self.n_ctx, 'position')}, KV "
            f"{human(self.kv_bytes)}; {kept}; {left}"
        )


def budget(
    model: str | os.PathLike[str],
    mmproj: str | os.PathLike[str],
    *,
    n_ctx: int | None = None,
    parallel: Parallel = 1,
    kv_cache_mb: float | None = None,
    n_batch: int = 512,
    flash_attn: bool = True,
    use_mmap: bool | None = None,
    n_threads: int | None = None,
    force: bool = False,
    n_gpu_layers: int = 0,
    available: int | None = None,
    features: frozenset[str] | None = None,
) -> KVBudget:
    """The memory ``model`` + ``mmproj`` take in the llama.cpp engine with these settings
    (:class:`~llava_local.backends.llama_cpp.LlamaCppConfig`'s, ``None`` meaning its
    defaults), against ``available`` bytes (default: what this machine has now). Reads
    the files' headers only; raises :class:`~llava_local.errors.ModelLoadError` for a
    pair that is not one. ``features``: the CPU features that decide repacking
    (default: this CPU's)."""
    model, mmproj = Path(model), Path(mmproj)
    free = host.available_bytes() if available is None else available
    lm_meta, mm_meta = gguf_meta.check_pair(model, mmproj)
    image_tokens = gguf_meta.image_tokens(mm_meta) or DEFAULT_IMAGE_TOKENS
    trained = int(lm_meta.get("context_length") or DEFAULT_TRAINED)
    threads = n_threads or host.physical_cores()
    mapped = memory.maps_weights(model, features) if use_mmap is None else use_mmap

    def estimate(positions: int) -> MemoryEstimate:
        return memory.estimate(
            model,
            mmproj,
            n_ctx=positions,
            n_batch=n_batch,
            n_threads=threads,
            use_mmap=mapped,
            flash_attn=flash_attn,
            features=features,
        )

    wanted = n_ctx if n_ctx is not None else min(trained, image_tokens + memory.TEXT_BUDGETS[0])
    context = wanted
    if n_ctx is None and n_gpu_layers == 0 and not force:
        context, wanted = memory.fitting_context(
            model,
            mmproj,
            image_tokens=image_tokens,
            trained=trained,
            n_batch=n_batch,
            n_threads=threads,
            use_mmap=mapped,
            flash_attn=flash_attn,
            slots=1 if parallel == "auto" else parallel,
            available=free,
        )
    slots = (
        _auto_parallel(lambda n: estimate(context * n), free) if parallel == "auto" else parallel
    )
    est = estimate(context * slots)
    if kv_cache_mb is None:
        kept = max(0, (free - est.needed_bytes - memory.margin(est)) // 2)
    else:
        kept = max(0, int(kv_cache_mb * memory.MiB))
    return KVBudget(
        model=model.name,
        mmproj=mmproj.name,
        available_bytes=free,
        n_ctx=context,
        n_ctx_wanted=wanted,
        parallel=slots,
        estimate=est,
        kept_bytes=kept,
    )


def _auto_parallel(estimate: Callable[[int], MemoryEstimate], available: int) -> int:
    """The most slots (up to :data:`MAX_AUTO_PARALLEL`) whose estimate fits with the
    memory check's margin in :data:`AUTO_SHARE` of ``available``; at least one."""
    for slots in range(MAX_AUTO_PARALLEL, 1, -1):
        est = estimate(slots)
        if est.needed_bytes + memory.margin(est) <= available * AUTO_SHARE:
            return slots
    return 1
