"""A model's recommended sampling: what a turn that sets no sampling option gets.

Clients often send no ``temperature`` (Open WebUI does not), so what the engine
samples with then matters. Where it comes from, first found wins:

1. the language model's GGUF: the ``general.sampling.*`` keys llama.cpp defines
   (``temp``, ``top_k``, ``top_p``, ``min_p``, ``penalty_repeat``), which a model's
   author writes to say how it samples best; keys a file leaves out keep llama.cpp's
   values, and a value out of its range is ignored (the file is not trusted);
2. the catalogue entry's ``sampling``, for models whose files say nothing;
3. llama.cpp's own defaults (``llama-cli``'s: temperature 0.8, top-k 40, top-p 0.95,
   min-p 0.05, no repeat penalty).

A turn's own options always win over these. ``serve`` says which applies in
``/api/show`` (``parameters``, and a comment in ``modelfile`` naming the source).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from .types import Options

__all__ = ["GGUF_KEYS", "LLAMA_CPP", "Sampling", "SamplingSource", "recommended"]

SamplingSource = Literal["gguf", "catalog", "llama.cpp"]

#: ``general.sampling.<key>`` in a GGUF -> our name.
GGUF_KEYS: Mapping[str, str] = {
    "temp": "temperature",
    "top_k": "top_k",
    "top_p": "top_p",
    "min_p": "min_p",
    "penalty_repeat": "repeat_penalty",
}


class Sampling(BaseModel):
    """The sampling a turn gets for every option it leaves unset, and where it came from."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    temperature: float = Field(default=0.8, ge=0.0, le=5.0)
    top_k: int = Field(default=40, ge=0)
    top_p: float = Field(default=0.95, gt=0.0, le=1.0)
    min_p: float = Field(default=0.05, ge=0.0, le=1.0)
    repeat_penalty: float = Field(default=1.0, gt=0.0, le=5.0)
    source: SamplingSource = "llama.cpp"

    def fill(self, options: Options) -> Options:
        """``options`` with each unset sampling option taken from here."""
        mine = Options(
            temperature=self.temperature,
            top_k=self.top_k,
            top_p=self.top_p,
            repeat_penalty=self.repeat_penalty,
        )
        return mine.overlay(options)

    @property
    def described(self) -> str:
        """Where these values come from, in words."""
        return {
            "gguf": "recommended by the model's GGUF (general.sampling.*)",
            "catalog": "recommended by llava-local's catalogue entry for the model",
            "llama.cpp": "llama.cpp's defaults (the model recommends none)",
        }[self.source]

    def values(self) -> dict[str, float]:
        """The values by Ollama's parameter names."""
        return self.model_dump(exclude={"source"})

    def parameters(self) -> str:
        """Ollama's ``parameters`` text: one ``name value`` line each."""
        return "\n".join(f"{name:<30} {value:g}" for name, value in self.values().items())


#: llama.cpp's own defaults.
LLAMA_CPP = Sampling()


def recommended(metadata: Mapping[str, Any], catalog: Sampling | None = None) -> Sampling:
    """The sampling for a model with this GGUF ``metadata`` (values as llama.cpp gives
    them: text) and its catalogue entry's ``sampling`` (``catalog``), if any."""
    given: dict[str, Any] = {}
    for key, name in GGUF_KEYS.items():
        value = metadata.get(f"general.sampling.{key}")
        if value is None:
            continue
        try:
            number = float(value)
            one: dict[str, Any] = {name: int(number) if name == "top_k" else number}
            checked = Sampling.model_validate(one)
        except (TypeError, ValueError, ValidationError):
            continue  # out of range or not a number: this key says nothing
        given[name] = getattr(checked, name)
    if given:
        return Sampling(**given, source="gguf")
    if catalog is not None:
        return catalog.model_copy(update={"source": "catalog"})
    return LLAMA_CPP
