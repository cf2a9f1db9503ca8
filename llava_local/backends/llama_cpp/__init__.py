"""The in-process engine: llama.cpp and libmtmd through llama-cpp-python.

Modules, one job each: :mod:`.config` (settings, the files they name, settled for a
plan), :mod:`.gguf_meta` (the pair checked from its headers before llama.cpp sees it),
:mod:`.lib` (importing llama-cpp-python), :mod:`.model` (the loaded files),
:mod:`.prompt` (turns as tokens and picture chunks), :mod:`.pictures` (CLIP, with
:mod:`.embedding_cache` for pictures seen before), :mod:`.sampling` (choosing tokens,
stop strings) with :mod:`.grammar` (schemas as grammars), :mod:`.scheduler` (slots and
continuous batching), :mod:`.kv_cache` (KV states kept in memory and on disk, checked by
:mod:`.kv_payload`, signed with :mod:`.state_key`), :mod:`.engine` (the
:class:`~llava_local.backends.base.Backend`). Only this package imports its helpers.
"""

from __future__ import annotations

from ..spec import Capabilities, EngineSpec
from .config import LlamaCppConfig, open_engine, settle
from .engine import LlamaCppBackend

__all__ = ["SPEC", "LlamaCppBackend", "LlamaCppConfig", "open_engine"]

#: The engine as the registry lists it (:data:`..registry.BUILTINS`).
SPEC = EngineSpec(
    name="llama_cpp",
    aliases=("llamacpp", "llama", "llama.cpp"),
    config=LlamaCppConfig,
    open=open_engine,
    capabilities=Capabilities(reuses_turns=True, pulls_models=True),
    description="llama.cpp in this process (a GGUF model and its mmproj)",
    settle=settle,
)
