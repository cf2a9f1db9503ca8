"""Known vision models for both engines: where their files are and what they need.

Each entry names the Ollama tag (if Ollama has the model) and the Hugging Face
repository with the GGUF language model and its mmproj projector, so
``llava-local pull NAME`` can fetch either. How far each fact was checked is
recorded in the entry, not implied:

- ``evidence="listing"``: file names and sizes read from the repository's own file
  listing; sizes are the listing's rounded figures (three significant digits).
- ``evidence="third-party"``: names (and exact byte sizes, where given) seen only in
  other projects' code that downloads these files; not checked against the repository.
- ``evidence="bundled"``: ships inside this package.

``evidence_note`` says what exactly was seen, including the chat format's source.
Sizes nobody published are ``None``, never guessed. ``memory_bytes`` *is* an
estimate, by :func:`estimate_memory`: both files, the KV cache of the default context
(one picture plus 2048 text tokens, f16) and llama.cpp's work buffers.

``lm_params`` (the language model's parameters, from its model card) and ``vision``
(the picture encoder's shape, from its published configuration) give the work a
picture and a token cost, from which :mod:`llava_local.devices` estimates speeds on a
Raspberry Pi.
"""

from __future__ import annotations

import difflib
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from .chat_formats import get_format
from .demo import DEMO_NAME
from .errors import ModelNotFoundError
from .sampling import Sampling

__all__ = [
    "CATALOG",
    "CatalogEntry",
    "Evidence",
    "VisionEncoder",
    "estimate_memory",
    "find",
    "match",
    "memory_parts",
    "names",
]

Evidence = Literal["listing", "third-party", "bundled"]

#: Text tokens the llama.cpp engine budgets beside the pictures when n_ctx is not given.
TEXT_TOKENS = 2048
_MIB = 1024 * 1024


def estimate_memory(
    lm_bytes: int,
    mmproj_bytes: int,
    *,
    kv_bytes_per_token: int | None = None,
    image_tokens: int = 576,
) -> int:
    """Bytes a GGUF pair needs in memory: the files (llama.cpp maps them whole), the
    f16 KV cache of one picture plus :data:`TEXT_TOKENS`, and ~5 % + 256 MiB of work
    buffers (:func:`memory_parts`)."""
    kv, work = memory_parts(
        lm_bytes, mmproj_bytes, kv_bytes_per_token=kv_bytes_per_token, image_tokens=image_tokens
    )
    return lm_bytes + mmproj_bytes + kv + work


def memory_parts(
    lm_bytes: int,
    mmproj_bytes: int,
    *,
    kv_bytes_per_token: int | None = None,
    image_tokens: int = 576,
    text_tokens: int = TEXT_TOKENS,
) -> tuple[int, int]:
    """:func:`estimate_memory` beyond the files: the KV cache (of one picture and
    ``text_tokens``) and the work buffers. Without the KV size per token, a quarter of
    the language model stands in (a 7B LLaMA's KV for 2.6k tokens is about that)."""
    if kv_bytes_per_token is None:
        kv = lm_bytes // 4
    else:
        kv = kv_bytes_per_token * (image_tokens + text_tokens)
    return kv, (lm_bytes + mmproj_bytes) // 20 + 256 * _MIB


class VisionEncoder(BaseModel):
    """The shape of a picture encoder (a ViT), enough to count the work of one picture.

    ``patches`` is what one tile of the picture becomes (with the class token if the
    encoder has one), ``tokens`` what the language model receives per tile (fewer when
    the projector pools or merges patches), ``layers`` the blocks that run (LLaVA stops
    one short of CLIP's 24). ``gated`` feed-forward blocks have three matrices, not two;
    ``window`` is the patches each attends to in the layers other than ``full_layers``
    (0: every layer attends to the whole tile).
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    width: int = Field(gt=0)
    layers: int = Field(gt=0)
    ff: int = Field(gt=0)
    patches: int = Field(gt=0)
    tokens: int = Field(gt=0)
    gated: bool = False
    window: int = 0
    full_layers: int = 0

    def flops(self, tiles: int = 1) -> float:
        """Floating-point operations to encode ``tiles`` tiles (a multiply-add is two):
        the matrices of every block, then attention; the projector is left out (a few
        per cent)."""
        p, d = self.patches, self.width
        dense = 2 * p * (4 * d * d + (3 if self.gated else 2) * d * self.ff)
        full = 4 * p * p * d
        attention = self.layers * full
        if self.window:
            windowed = 4 * p * min(self.window, p) * d
            attention = self.full_layers * full + (self.layers - self.full_layers) * windowed
        return float(tiles * (self.layers * dense + attention))


#: CLIP ViT-L/14 at 336 pixels (LLaVA-1.5 and its kin): 577 patches, 23 of 24 blocks.
CLIP_L_336 = VisionEncoder(width=1024, layers=23, ff=4096, patches=577, tokens=576)
#: SigLIP so400m/14 at 378 or 384 pixels: 729 patches.
SIGLIP_SO400M = VisionEncoder(width=1152, layers=27, ff=4304, patches=729, tokens=729)


class CatalogEntry(BaseModel):
    """One model: its files for llama.cpp, its Ollama tag, and how both were verified."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    name: str = Field(min_length=1)
    description: str
    ollama: str | None = None
    hf_repo: str | None = None
    gguf: str | None = None
    mmproj: str | None = None
    gguf_bytes: int | None = None
    mmproj_bytes: int | None = None
    #: KV-cache bytes per token (f16) and tokens per picture, for :func:`estimate_memory`.
    kv_bytes_per_token: int | None = None
    image_tokens: int = 576
    #: The language model's parameters and the picture encoder, for speed estimates.
    lm_params: float | None = None
    vision: VisionEncoder | None = None
    chat_format: str | None = None
    evidence: Evidence
    evidence_note: str = ""
    aliases: tuple[str, ...] = ()
    #: The sampling the model's authors recommend, for files whose GGUF says none
    #: (see :mod:`llava_local.sampling`); None: llama.cpp's defaults. Set only from the
    #: model card, named in ``evidence_note``.
    sampling: Sampling | None = None

    @field_validator("chat_format")
    @classmethod
    def _known_format(cls, value: str | None) -> str | None:
        """Only built-in formats (None = the GGUF's own template); checked at import."""
        return None if value is None else get_format(value).name

    @property
    def has_gguf(self) -> bool:
        """Whether llama.cpp files can be downloaded for it."""
        return bool(self.hf_repo and self.gguf and self.mmproj)

    @property
    def download_bytes(self) -> int | None:
        """Both files together, when both sizes are known."""
        if self.gguf_bytes is None or self.mmproj_bytes is None:
            return None
        return self.gguf_bytes + self.mmproj_bytes

    @property
    def vision_flops(self) -> float | None:
        """The work of encoding one picture (all its tiles), when the encoder is known."""
        if self.vision is None:
            return None
        return self.vision.flops(max(1, self.image_tokens // self.vision.tokens))

    @property
    def memory_bytes(self) -> int | None:
        """Estimated memory for the llama.cpp engine; None when a file size is unknown."""
        if self.gguf_bytes is None or self.mmproj_bytes is None:
            return None
        return estimate_memory(
            self.gguf_bytes,
            self.mmproj_bytes,
            kv_bytes_per_token=self.kv_bytes_per_token,
            image_tokens=self.image_tokens,
        )


def _kv(layers: int, kv_width: int) -> int:
    """f16 KV-cache bytes per token: keys and values, every layer."""
    return 2 * layers * kv_width * 2


def _listed(gigabytes: float) -> int:
    """A size as a file listing shows it (decimal units, rounded by the site)."""
    return round(gigabytes * 1e9)


_LISTING = "file names and sizes read from the repository's file listing"

CATALOG: tuple[CatalogEntry, ...] = (
    CatalogEntry(
        name="llava-1.5-7b",
        description="LLaVA-1.5 7B (Vicuna): the classic, 576 tokens a picture; 2.5 tok/s on a Pi 5",
        ollama="llava:7b-v1.5-q4_K_M",
        hf_repo="mys/ggml_llava-v1.5-7b",
        gguf="ggml-model-q4_k.gguf",
        mmproj="mmproj-model-f16.gguf",
        gguf_bytes=_listed(4.08),
        mmproj_bytes=_listed(0.624),
        kv_bytes_per_token=_kv(32, 4096),
        lm_params=6.74e9,
        vision=CLIP_L_336,
        chat_format="vicuna",
        evidence="listing",
        evidence_note=f"{_LISTING}; Vicuna format per LLaVA's conv_vicuna_v1; "
        "Ollama tag seen in third-party code",
        aliases=("llava-v1.5-7b", "llava1.5"),
    ),
    CatalogEntry(
        name="llava-1.5-13b",
        description="LLaVA-1.5 13B (Vicuna): better answers, twice the memory and time of 7B",
        ollama="llava:13b-v1.5-q4_K_M",
        hf_repo="mys/ggml_llava-v1.5-13b",
        gguf="ggml-model-q4_k.gguf",
        mmproj="mmproj-model-f16.gguf",
        gguf_bytes=_listed(7.87),
        mmproj_bytes=_listed(0.645),
        kv_bytes_per_token=_kv(40, 5120),
        lm_params=13.0e9,
        vision=CLIP_L_336,
        chat_format="vicuna",
        evidence="listing",
        evidence_note=f"{_LISTING}; Vicuna format per LLaVA's conv_vicuna_v1; "
        "Ollama tag seen in third-party code",
        aliases=("llava-v1.5-13b",),
    ),
    CatalogEntry(
        name="llava-1.6-mistral-7b",
        description="LLaVA-1.6 on Mistral 7B: sharper pictures (up to 2880 tokens each); "
        "Ollama's plain `llava` tag is this model",
        ollama="llava:7b-v1.6-mistral-q4_K_M",
        hf_repo="cjpais/llava-1.6-mistral-7b-gguf",
        gguf="llava-v1.6-mistral-7b.Q4_K_M.gguf",
        mmproj="mmproj-model-f16.gguf",
        gguf_bytes=_listed(4.37),
        mmproj_bytes=_listed(0.624),
        kv_bytes_per_token=_kv(32, 1024),
        image_tokens=2880,
        lm_params=7.24e9,
        vision=CLIP_L_336,
        chat_format="mistral",
        evidence="listing",
        evidence_note=f"{_LISTING}; [INST] format per LLaVA's conv_mistral_instruct; "
        "Ollama tag seen in third-party code",
        aliases=("llava-1.6", "llava-v1.6-mistral-7b"),
    ),
    CatalogEntry(
        name="bakllava-1",
        description="BakLLaVA-1: LLaVA-1.5 recipe on Mistral 7B",
        ollama="bakllava",
        hf_repo="mys/ggml_bakllava-1",
        gguf="ggml-model-q4_k.gguf",
        mmproj="mmproj-model-f16.gguf",
        gguf_bytes=_listed(4.37),
        mmproj_bytes=_listed(0.624),
        kv_bytes_per_token=_kv(32, 1024),
        lm_params=7.24e9,
        vision=CLIP_L_336,
        chat_format="vicuna",
        evidence="listing",
        evidence_note=f"{_LISTING}; chat format not confirmed by the model card "
        "(assumed LLaVA-1.5's, the recipe it was trained with)",
    ),
    CatalogEntry(
        name="moondream2",
        description="Moondream2 (1.9B): small and quick captions; 729 tokens per picture",
        ollama="moondream",
        hf_repo="moondream/moondream2-gguf",
        gguf="moondream2-text-model-f16.gguf",
        mmproj="moondream2-mmproj-f16.gguf",
        gguf_bytes=_listed(2.84),
        mmproj_bytes=_listed(0.910),
        kv_bytes_per_token=_kv(24, 2048),
        image_tokens=729,
        lm_params=1.42e9,
        vision=SIGLIP_SO400M,
        chat_format="moondream",
        evidence="listing",
        evidence_note=f"{_LISTING}; Question/Answer format per llama-cpp-python's "
        "MoondreamChatHandler",
    ),
    CatalogEntry(
        name="llava-phi3-mini",
        description="LLaVA-Phi-3-mini (3.8B): LLaVA quality at half the size; "
        "~4 tok/s measured on a Pi 5 with Ollama",
        ollama="llava-phi3",
        hf_repo="xtuner/llava-phi-3-mini-gguf",
        gguf="llava-phi-3-mini-int4.gguf",
        mmproj="llava-phi-3-mini-mmproj-f16.gguf",
        gguf_bytes=_listed(2.32),
        mmproj_bytes=_listed(0.608),
        kv_bytes_per_token=_kv(32, 3072),
        lm_params=3.82e9,
        vision=CLIP_L_336,
        chat_format=None,
        evidence="listing",
        evidence_note=f"{_LISTING}; Phi-3 format, taken from the GGUF's own template "
        "(no built-in Phi-3 format)",
        aliases=("llava-phi-3-mini",),
    ),
    CatalogEntry(
        name="smolvlm-256m",
        description="SmolVLM-256M: the smallest useful one (~280 MB); fine on a Pi 4",
        hf_repo="ggml-org/SmolVLM-256M-Instruct-GGUF",
        gguf="SmolVLM-256M-Instruct-Q8_0.gguf",
        mmproj="mmproj-SmolVLM-256M-Instruct-Q8_0.gguf",
        gguf_bytes=175_054_528,
        mmproj_bytes=103_769_856,
        kv_bytes_per_token=_kv(30, 192),
        image_tokens=64,
        lm_params=0.135e9,
        vision=VisionEncoder(width=768, layers=12, ff=3072, patches=1024, tokens=64),
        chat_format=None,
        evidence="third-party",
        evidence_note="names and exact sizes from two projects' download code; "
        "chat format from the GGUF's template",
    ),
    CatalogEntry(
        name="smolvlm-500m",
        description="SmolVLM-500M: small, better than 256M (~550 MB); fine on a Pi 4",
        hf_repo="ggml-org/SmolVLM-500M-Instruct-GGUF",
        gguf="SmolVLM-500M-Instruct-Q8_0.gguf",
        mmproj="mmproj-SmolVLM-500M-Instruct-Q8_0.gguf",
        gguf_bytes=436_806_912,
        mmproj_bytes=108_783_360,
        kv_bytes_per_token=_kv(32, 320),
        image_tokens=64,
        lm_params=0.362e9,
        vision=VisionEncoder(width=768, layers=12, ff=3072, patches=1024, tokens=64),
        chat_format=None,
        evidence="third-party",
        evidence_note="language model named on the model card; mmproj name and both "
        "exact sizes from other projects' code; chat format from the GGUF's template",
    ),
    CatalogEntry(
        name="smolvlm2-2.2b",
        description="SmolVLM2-2.2B: good quality for its size; ~9 tok/s expected on a Pi 5",
        hf_repo="ggml-org/SmolVLM2-2.2B-Instruct-GGUF",
        gguf="SmolVLM2-2.2B-Instruct-Q4_K_M.gguf",
        mmproj="mmproj-SmolVLM2-2.2B-Instruct-Q8_0.gguf",
        gguf_bytes=1_112_602_656,
        mmproj_bytes=592_523_200,
        kv_bytes_per_token=_kv(24, 2048),
        image_tokens=81,
        lm_params=1.71e9,
        vision=VisionEncoder(width=1152, layers=27, ff=4304, patches=729, tokens=81),
        chat_format=None,
        evidence="third-party",
        evidence_note="language model named on the model card; mmproj name and exact "
        "sizes (with sha256) from several projects' code, agreeing with the listing's "
        "1.11 GB / 593 MB; chat format from the GGUF's template",
    ),
    CatalogEntry(
        name="qwen2.5-vl-3b",
        description="Qwen2.5-VL-3B: strong at reading text in pictures",
        ollama="qwen2.5vl:3b",
        hf_repo="ggml-org/Qwen2.5-VL-3B-Instruct-GGUF",
        gguf="Qwen2.5-VL-3B-Instruct-Q4_K_M.gguf",
        mmproj="mmproj-Qwen2.5-VL-3B-Instruct-Q8_0.gguf",
        gguf_bytes=1_929_901_056,
        mmproj_bytes=844_757_728,
        kv_bytes_per_token=_kv(36, 256),
        image_tokens=1024,
        lm_params=3.09e9,
        vision=VisionEncoder(
            width=1280,
            layers=32,
            ff=3420,
            patches=4096,
            tokens=1024,
            gated=True,
            window=64,
            full_layers=4,
        ),
        chat_format=None,
        evidence="third-party",
        evidence_note="names in several projects' code (one pinning sha256s), exact sizes "
        "from one, consistent with another's 1.79 GiB / 806 MiB; the GGUF's own template",
    ),
    CatalogEntry(
        name="gemma3-4b",
        description="Gemma 3 4B: good general answers, 256 tokens per picture",
        ollama="gemma3:4b",
        hf_repo="ggml-org/gemma-3-4b-it-GGUF",
        gguf="gemma-3-4b-it-Q4_K_M.gguf",
        mmproj="mmproj-model-f16.gguf",
        gguf_bytes=_listed(2.49),
        mmproj_bytes=_listed(0.851),
        kv_bytes_per_token=_kv(34, 1024),
        image_tokens=256,
        lm_params=3.88e9,
        vision=VisionEncoder(width=1152, layers=27, ff=4304, patches=4096, tokens=256),
        chat_format=None,
        evidence="listing",
        evidence_note=f"{_LISTING}; the GGUF's own template",
    ),
    CatalogEntry(
        name="minicpm-v-2",
        description="MiniCPM-V 2 (2.8B): OCR-minded; Ollama's minicpm-v is the larger 2.6",
        hf_repo="openbmb/MiniCPM-V-2-gguf",
        gguf="ggml-model-Q4_K_M.gguf",
        mmproj="mmproj-model-f16.gguf",
        gguf_bytes=_listed(1.96),
        mmproj_bytes=_listed(0.866),
        kv_bytes_per_token=_kv(40, 2304),
        image_tokens=640,
        lm_params=2.4e9,
        vision=VisionEncoder(width=1152, layers=27, ff=4304, patches=1024, tokens=64),
        chat_format=None,
        evidence="listing",
        evidence_note=f"{_LISTING}; chat format not confirmed (the GGUF's own template)",
    ),
    CatalogEntry(
        name="granite-vision-3.2-2b",
        description="Granite Vision 3.2 2B: documents, charts and tables",
        ollama="granite3.2-vision",
        hf_repo="ibm-research/granite-vision-3.2-2b-GGUF",
        gguf="granite-vision-3.2-2b-Q4_K_M.gguf",
        mmproj="mmproj-model-f16.gguf",
        gguf_bytes=_listed(1.55),
        mmproj_bytes=_listed(0.893),
        kv_bytes_per_token=_kv(40, 512),
        image_tokens=3645,
        lm_params=2.53e9,
        vision=SIGLIP_SO400M,
        chat_format=None,
        evidence="listing",
        evidence_note=f"{_LISTING}; chat format not confirmed (the GGUF's own template)",
    ),
    CatalogEntry(
        name=DEMO_NAME,
        description="the bundled demo: a tiny LLaVA-1.5-style model that knows digits, "
        "shapes and colours only",
        evidence="bundled",
        evidence_note="ships inside the package (llava_local/data/demo)",
        image_tokens=16,
    ),
)


def names() -> list[str]:
    """The catalogue's names, in catalogue order."""
    return [entry.name for entry in CATALOG]


def _tag(text: str) -> str:
    """An Ollama tag as the daemon stores it: lower case, ``:latest`` when untagged."""
    text = text.strip().lower()
    return text if ":" in text.rsplit("/", 1)[-1] else f"{text}:latest"


def match(name: str) -> tuple[CatalogEntry, Literal["name", "ollama"]] | None:
    """The entry ``name`` means, and whether it named the entry or its Ollama tag."""
    key = name.strip().lower()
    for entry in CATALOG:
        if key == entry.name or key in entry.aliases:
            return entry, "name"
    for entry in CATALOG:
        if entry.ollama and _tag(key) == _tag(entry.ollama):
            return entry, "ollama"
    return None


def find(name: str) -> CatalogEntry:
    """The entry called ``name`` (a catalogue name, an alias or its Ollama tag).

    Raises :class:`ModelNotFoundError` naming the closest names and all choices.
    """
    found = match(name)
    if found is not None:
        return found[0]
    choices = names()
    spellings = choices + [alias for entry in CATALOG for alias in entry.aliases]
    close = difflib.get_close_matches(name.strip().lower(), spellings, n=3, cutoff=0.5)
    hint = f" (did you mean {', '.join(close)}?)" if close else ""
    raise ModelNotFoundError(
        f"no model {name!r} in the catalogue{hint}; choose one of: {', '.join(choices)}"
    )
