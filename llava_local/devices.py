"""What a model costs on a Raspberry Pi: its memory against the board's, and estimated speeds.

**Memory** is counted as the llama.cpp engine counts it before loading
(:func:`llava_local.catalog.estimate_memory`: both files, the KV cache of the default
context, work buffers), plus what this library keeps beside it: the cache of picture
embeddings at its default bound (256 MiB). A model fits a board when that and the
engine's safety margin (:func:`llava_local.memory.margin`) fit in what Raspberry Pi OS
leaves (:data:`OS_RESERVE` below the board's RAM); when only a shorter context fits, the
budget says which, as the engine picks it (:func:`llava_local.memory.fitting_context`).
Half of what is left then goes to kept KV states, the engine's default
(``kv_cache_mb``), so they stay inside the board.

**Speeds are estimates**, never measurements: nothing here ran on a Pi (``make
arm64-check`` runs the library on emulated ones, which shows right answers, not their
speed). From the model's work and the board's published rates:

- *first answer*: encoding the picture (the FLOPs of its encoder, all tiles, at the
  board's rate for f16 matrices, or for quantized ones with a Q8_0 projector), then
  reading the prompt (two FLOPs per parameter per token, for the picture's tokens and
  :data:`PROMPT_TOKENS` of text) at the rate for quantized matrices; loading the model
  is not counted;
- *tokens/s*: each new token reads every weight once, and the KV cache so far: the
  board's memory bandwidth over those bytes.

The rates come from one benchmark run on both boards with llama.cpp itself: Justine
Tunney, "LLaMA Now Goes Faster on CPUs" (2024-03-31, https://justine.lol/matmul/),
TinyLlama 1.1B Q8_0 (1.17 GB), llama.cpp of 2024-03-26, 4 threads: prompts read at 10
tokens/s on a Pi 4 and 35 on a Pi 5, tokens generated at 3 and 9 per second; F16
prompts at 3 tokens/s on a Pi 4 (llama.cpp) and 8 on a Pi 5 (llamafile 0.6.2, which
ran llama.cpp's kernels of the time). The bandwidth they imply agrees with Ollama's
generation on a Pi 5 (Jeff Geerling, https://github.com/geerlingguy/ai-benchmarks/issues/7:
llama3.2:3b 4.5-4.9 tokens/s, llama3.1:8b 2.1-2.2; these rates predict 5.2 and 2.1).
llama.cpp reads prompts faster now (its ARM kernels for repacked Q4_0 use the Pi 5's
dotprod; a Pi 5 read a Llama 2 7B Q4_0 prompt at 8.1 tokens/s in April 2024,
https://github.com/ggml-org/llama.cpp/pull/6928, where these rates say 5.7), so first
answers on a Pi 5 are likely quicker than estimated.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, computed_field

from . import catalog, memory
from .catalog import CatalogEntry, VisionEncoder
from .gguf_header import read_gguf

__all__ = [
    "DEVICES",
    "Budget",
    "Device",
    "available_bytes",
    "budget",
    "file_facts",
    "find_device",
]

GiB = 1 << 30
#: What Raspberry Pi OS keeps of the RAM: the kernel, the firmware's share, the system's
#: services (a Lite install idles at ~0.25 GiB; a desktop at more).
OS_RESERVE = GiB // 2
#: Text tokens of a first question beside its picture (system prompt and question).
PROMPT_TOKENS = 64
#: The picture-embedding cache's default bound (``embedding_cache_mb``).
EMBEDDING_CACHE = 256 * 2**20
#: Cores of both boards (four Cortex-A72 or A76): the engine's threads there.
CORES = 4
#: TinyLlama 1.1B, the published figures' model: parameters and its Q8_0 file's bytes.
_REF_PARAMS, _REF_Q8_BYTES = 1.1e9, 1.17e9

DeviceName = Literal["pi4", "pi5"]


class Device(BaseModel):
    """A board: its memory sizes and the rates the estimates use."""

    model_config = ConfigDict(frozen=True)

    name: DeviceName
    title: str
    ram_gib: tuple[int, ...]
    #: FLOP/s on quantized matrices (prompts), on f16 ones (picture encoders), and the
    #: bytes/s of weights read while generating.
    quantized_flops: float
    f16_flops: float
    bandwidth: float
    figures: str


def _rates(prompt_q8: float, prompt_f16: float, generate_q8: float) -> dict[str, float]:
    """Rates from the reference model's published tokens per second."""
    return {
        "quantized_flops": 2 * _REF_PARAMS * prompt_q8,
        "f16_flops": 2 * _REF_PARAMS * prompt_f16,
        "bandwidth": _REF_Q8_BYTES * generate_q8,
    }


_SOURCE = "justine.lol/matmul (TinyLlama 1.1B, llama.cpp 2024-03-26)"
DEVICES: dict[str, Device] = {
    "pi4": Device(
        name="pi4",
        title="Raspberry Pi 4 (Cortex-A72, 1.8 GHz)",
        ram_gib=(4, 8),
        figures=f"{_SOURCE}: Q8_0 prompts 10 tok/s, generation 3 tok/s; F16 prompts 3 tok/s",
        **_rates(prompt_q8=10, prompt_f16=3, generate_q8=3),
    ),
    "pi5": Device(
        name="pi5",
        title="Raspberry Pi 5 (Cortex-A76, 2.4 GHz)",
        ram_gib=(4, 8),
        figures=f"{_SOURCE}: Q8_0 prompts 35 tok/s, generation 9 tok/s; F16 prompts 8 tok/s "
        "(llamafile 0.6.2)",
        **_rates(prompt_q8=35, prompt_f16=8, generate_q8=9),
    ),
}


def find_device(name: str) -> Device:
    """The board called ``name`` (``pi4`` or ``pi5``)."""
    try:
        return DEVICES[name.strip().lower()]
    except KeyError:
        raise ValueError(f"no device {name!r}; choose {' or '.join(DEVICES)}") from None


def available_bytes(ram_gib: int) -> int:
    """What a model has on a board with ``ram_gib`` GiB: the RAM less what the system
    keeps (:data:`OS_RESERVE`) and the picture cache (:data:`EMBEDDING_CACHE`)."""
    return ram_gib * GiB - OS_RESERVE - EMBEDDING_CACHE


class Budget(BaseModel):
    """One model on one board: memory by part against each RAM size, estimated speeds."""

    model: str
    device: DeviceName
    weights_bytes: int
    projector_bytes: int
    kv_bytes: int
    work_bytes: int
    cache_bytes: int
    n_ctx: int
    #: RAM size (GiB) -> whether it fits at the default context (``n_ctx``), the context
    #: the engine loads it with there (shorter when only that fits; None: it does not
    #: load), and what kept KV states then get by default.
    fits: dict[int, bool]
    context: dict[int, int | None]
    kept_states_bytes: dict[int, int]
    first_answer_s: float | None = None
    tokens_per_s: float | None = None
    #: Always true: the speeds are estimates, never measured.
    estimate: Literal[True] = True

    @computed_field  # type: ignore[prop-decorator]
    @property
    def needed_bytes(self) -> int:
        """Everything together: the engine's estimate and our caches."""
        return (
            self.weights_bytes
            + self.projector_bytes
            + self.kv_bytes
            + self.work_bytes
            + self.cache_bytes
        )


def budget(
    entry: CatalogEntry,
    device: Device,
    *,
    lm_bytes: int | None = None,
    mmproj_bytes: int | None = None,
    lm_params: float | None = None,
    vision_flops: float | None = None,
) -> Budget | None:
    """``entry`` on ``device``; the keyword arguments stand in for what the catalogue
    lacks (the bundled demo's files). None when a file size is unknown."""
    lm = entry.gguf_bytes if lm_bytes is None else lm_bytes
    mm = entry.mmproj_bytes if mmproj_bytes is None else mmproj_bytes
    if lm is None or mm is None:
        return None

    def parts(text: int) -> tuple[int, int]:
        """The KV cache and the engine's whole estimate with ``text`` text tokens."""
        kv, work = catalog.memory_parts(
            lm,
            mm,
            kv_bytes_per_token=entry.kv_bytes_per_token,
            image_tokens=entry.image_tokens,
            text_tokens=text,
        )
        return kv, lm + mm + kv + work

    kv, engine = parts(memory.TEXT_BUDGETS[0])
    fits: dict[int, bool] = {}
    context: dict[int, int | None] = {}
    kept: dict[int, int] = {}
    for gib in device.ram_gib:
        context[gib], kept[gib] = None, 0
        for text in memory.TEXT_BUDGETS:  # as the engine picks its default context
            whole = parts(text)[1]
            room = available_bytes(gib) - whole - memory.margin_bytes(whole)
            if room >= 0:
                context[gib], kept[gib] = entry.image_tokens + text, room // 2
                break
        fits[gib] = context[gib] == entry.image_tokens + memory.TEXT_BUDGETS[0]
    params = entry.lm_params if lm_params is None else lm_params
    flops = entry.vision_flops if vision_flops is None else vision_flops
    first = speed = None
    if params is not None and flops is not None:
        quantized = entry.mmproj is not None and "f16" not in entry.mmproj.lower()
        rate = device.quantized_flops if quantized else device.f16_flops
        prompt = 2 * params * (entry.image_tokens + PROMPT_TOKENS)
        first = flops / rate + prompt / device.quantized_flops
        per_token = entry.kv_bytes_per_token or 0
        speed = device.bandwidth / (lm + per_token * (entry.image_tokens + PROMPT_TOKENS))
    return Budget(
        model=entry.name,
        device=device.name,
        weights_bytes=lm,
        projector_bytes=mm,
        kv_bytes=kv,
        work_bytes=engine - lm - mm - kv,
        cache_bytes=EMBEDDING_CACHE,
        n_ctx=entry.image_tokens + memory.TEXT_BUDGETS[0],
        fits=fits,
        context=context,
        kept_states_bytes=kept,
        first_answer_s=first,
        tokens_per_s=speed,
    )


def file_facts(model: Path, mmproj: Path, image_tokens: int) -> tuple[float, float]:
    """The language model's parameters and one picture's encoder FLOPs, read from a GGUF
    pair's headers (for a pair the catalogue does not describe: the bundled demo)."""
    lm, mm = read_gguf(model), read_gguf(mmproj)
    params = float(sum(math.prod(t.shape) for t in lm.tensors if t.name != "token_embd.weight"))
    meta = mm.meta
    size = int(meta.get("clip.vision.image_size", 336))
    patch = max(1, int(meta.get("clip.vision.patch_size", 14)))
    patches = (size // patch) ** 2 + (1 if "v.class_embd" in {t.name for t in mm.tensors} else 0)
    width = int(meta.get("clip.vision.embedding_length", 1024))
    encoder = VisionEncoder(
        width=width,
        layers=max(1, int(meta.get("clip.vision.block_count", 24)) - 1),
        ff=int(meta.get("clip.vision.feed_forward_length", 4 * width)),
        patches=patches,
        tokens=max(1, image_tokens),
    )
    return params, encoder.flops()
