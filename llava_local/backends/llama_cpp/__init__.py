"""The in-process engine: llama.cpp and libmtmd through llama-cpp-python.

Modules, one job each: :mod:`.config` (settings, the files they name), :mod:`.lib`
(importing llama-cpp-python), :mod:`.model` (the loaded files), :mod:`.prompt` (turns
as tokens and picture chunks), :mod:`.sampling` (choosing tokens, stop strings),
:mod:`.scheduler` (slots and continuous batching), :mod:`.engine` (the
:class:`~llava_local.backends.base.Backend`).
"""

from __future__ import annotations

from ..registry import Capabilities, EngineSpec, register
from .config import LlamaCppConfig, open_engine
from .engine import LlamaCppBackend

__all__ = ["LlamaCppBackend", "LlamaCppConfig", "open_engine"]

register(
    EngineSpec(
        name="llama_cpp",
        aliases=("llamacpp", "llama", "llama.cpp"),
        config=LlamaCppConfig,
        open=open_engine,
        capabilities=Capabilities(reuses_turns=True, pulls_models=True),
        description="llama.cpp in this process (a GGUF model and its mmproj)",
    )
)
