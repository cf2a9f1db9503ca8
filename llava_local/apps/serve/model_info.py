"""The served model as clients see it: its name, and the facts the listing routes give
(size, digest, family, parameter count, context, the sampling a request without
options gets), read once from its files."""

from __future__ import annotations

import contextlib
import hashlib
import math
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

from ...chat import VisionChat
from ...errors import LlavaLocalError
from ...gguf_header import read_gguf
from ...protocols.ollama import ModelDetails
from ...sampling import Sampling


def default_name(chat: VisionChat) -> str:
    """The engine's catalogue name (the demo's too), else its file name without .gguf."""
    config = chat.plan.config if chat.plan is not None else chat.engine.config
    model = None if config is None else config.model
    if isinstance(model, str) and model and "/" not in model and not model.endswith(".gguf"):
        return model
    return Path(chat.model).name.removesuffix(".gguf")


@dataclass(frozen=True)
class ModelFacts:
    size: int
    digest: str
    family: str
    parameter_size: str
    context_length: int | None
    modified_at: datetime
    #: What a request without sampling options gets (None: the engine does not say).
    sampling: Sampling | None = None

    def details(self) -> ModelDetails:
        """Ollama's ``details`` of a model (``clip``: it sees pictures)."""
        return ModelDetails(
            format="gguf",
            family=self.family,
            families=[self.family, "clip"],
            parameter_size=self.parameter_size,
        )


def model_facts(chat: VisionChat) -> ModelFacts:
    """What the files of ``chat``'s engine say about its model (little for a server's)."""
    described = chat.engine.describe()
    files = [p for p in described.files if p.is_file()]
    size = sum(p.stat().st_size for p in files)
    family, params, context = "unknown", "", None
    if files:
        with contextlib.suppress(LlavaLocalError):
            header = read_gguf(files[0])
            family = str(header.meta.get("general.architecture", family))
            count = sum(math.prod(t.shape) for t in header.tensors)
            params = f"{count / 1e9:.1f}B" if count >= 1e8 else f"{count / 1e6:.0f}M"
            context = described.n_ctx
    modified = max((p.stat().st_mtime for p in files), default=time.time())
    stamp = datetime.fromtimestamp(modified, timezone.utc)
    names = "|".join(f"{p.resolve()}:{p.stat().st_size}:{p.stat().st_mtime_ns}" for p in files)
    digest = hashlib.sha256(names.encode()).hexdigest()
    sampling = getattr(chat.engine, "sampling", None)
    sampling = sampling if isinstance(sampling, Sampling) else None
    return ModelFacts(size, digest, family, params, context, stamp, sampling)
