"""The in-process engine's settings, and the files they name."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Literal

from pydantic import Field

from ...demo import DEMO_NAME, demo_paths
from ...errors import InvalidRequestError
from ...resolve import find_mmproj, pulled_pair
from ..registry import EngineConfig

#: The most slots ``parallel=None`` chooses: beyond four answers a step, a CPU's
#: memory bandwidth is spent and each answer slows down.
MAX_AUTO_PARALLEL = 4

if TYPE_CHECKING:
    from .engine import LlamaCppBackend


class LlamaCppConfig(EngineConfig):
    """Settings of the in-process engine. ``model`` is a GGUF path, the name of a pulled
    catalogue model, or ``"demo"``/None for the bundled demo; catalogue models and the
    demo are recorded by name, so a config also works where paths differ."""

    mmproj: str | None = None
    #: Positions one conversation may use (default: the pictures' tokens plus 2048).
    n_ctx: int | None = None
    n_threads: int | None = None
    chat_format: str | None = None
    n_gpu_layers: int = 0
    n_batch: int = 512
    use_mmap: bool = True
    verbose: bool = False
    embedding_cache_mb: float = 256
    #: KV states kept in memory, in MB: None sizes it from the memory available after
    #: loading (half of what the memory preflight's margin leaves); 0 keeps none.
    kv_cache_mb: float | None = None
    #: A folder for KV states on disk (shared by processes), and its size bound in GB.
    kv_cache_dir: str | None = None
    kv_cache_dir_gb: float = 8.0
    #: Conversations answered at once (slots sharing one KV cache of n_ctx * parallel);
    #: "auto": as many as fit the memory available, up to :data:`MAX_AUTO_PARALLEL`.
    parallel: Annotated[int, Field(ge=1, le=64)] | Literal["auto"] = 1
    force: bool = False

    @classmethod
    def conversation_names(cls) -> frozenset[str]:
        # mmproj is recorded beside the model; the rest (threads, memory, folders,
        # slots, force) is this machine's business, never a file's.
        return frozenset({"chat_format", "n_ctx"})


def open_engine(config: LlamaCppConfig) -> LlamaCppBackend:
    """The engine for ``config``: the demo, a pulled catalogue model (with its prompt
    format), or a GGUF path with its projector (found beside it when there is one)."""
    from .engine import LlamaCppBackend

    settings = config.model_dump(exclude={"model", "mmproj"})
    model, mmproj = config.model, config.mmproj
    catalog_name = None
    if model in (None, DEMO_NAME):
        if mmproj is not None:
            raise InvalidRequestError("the demo model comes with its own projector; drop mmproj=")
        model_path, mmproj_path = demo_paths()
    elif (pulled := None if mmproj else pulled_pair(str(model))) is not None:
        entry, model_path, mmproj_path = pulled
        catalog_name = entry.name
        if settings["chat_format"] is None:
            settings["chat_format"] = entry.chat_format
    else:
        model_path = Path(str(model)).expanduser()
        mmproj_path = Path(mmproj).expanduser() if mmproj else find_mmproj(model_path)
    return LlamaCppBackend(model_path, mmproj_path, catalog_name=catalog_name, **settings)
