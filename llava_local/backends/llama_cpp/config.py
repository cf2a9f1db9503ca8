"""The in-process engine's settings, and the files they name.

:func:`settle` is the engine's part of planning (:func:`llava_local.backends.plan`):
it turns the settings as given into the config the engine opens and records, reading
only file headers and the Hugging Face cache, never loading a model; :func:`files`
finds that config's two files again (here, or in another process where the install
and the cache sit elsewhere).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Literal

from pydantic import Field

from ...demo import DEMO_NAME, demo_paths, is_demo
from ...errors import InvalidRequestError, ModelNotFoundError
from ...resolve import find_mmproj, pulled_entry, pulled_pair
from ..spec import EngineConfig, setting
from .kv_budget import KVBudget, budget

if TYPE_CHECKING:
    from .engine import LlamaCppBackend


class LlamaCppConfig(EngineConfig):
    """Settings of the in-process engine. ``model`` is a GGUF path, the name of a pulled
    catalogue model, or ``"demo"``/None for the bundled demo; as planned
    (:func:`settle`), catalogue models and the demo are recorded by name, other files as
    absolute paths with their projector, so a config also works where paths differ."""

    mmproj: str | None = setting(None, help="Path of the GGUF projector", flag="--mmproj")
    #: Positions one conversation may use (default: the pictures' tokens plus 2048).
    n_ctx: int | None = setting(None, help="Context window in tokens", flag="--n-ctx")
    n_threads: int | None = setting(None, help="CPU threads", flag="--threads")
    chat_format: str | None = setting(None, help="Prompt format, e.g. vicuna", flag="--chat-format")
    n_gpu_layers: int = 0
    n_batch: int = 512
    #: Memory-map the model file; None: yes, unless this CPU repacks most of its
    #: weights (then the file is read, so each weight is held once: memory.maps_weights).
    use_mmap: bool | None = None
    #: llama.cpp's fused attention, as llama-server uses it: a first turn about 15%
    #: faster on a CPU and a compute buffer that does not grow with the context. Off: as
    #: llama-cpp-python's ``Llama`` (KV states of one setting do not load in the other).
    flash_attn: bool = True
    verbose: bool = False
    embedding_cache_mb: float = 256
    #: KV states kept in memory, in MB: None sizes it from the memory available (half
    #: of what the model, its slots and the memory check's margin leave); 0 keeps none.
    kv_cache_mb: float | None = setting(
        None,
        help="Memory for KV states kept between conversations, in MB; default: half of "
        "what is free after loading, 0: none",
        flag="--kv-cache-mb",
        metavar="MB",
        ge=0,
    )
    #: A folder for KV states on disk (shared by processes), and its size bound in GB.
    kv_cache_dir: str | None = setting(
        None,
        help="Keep KV states in DIR: a picture read by an earlier run is restored, not read again",
        flag="--kv-cache",
        metavar="DIR",
    )
    kv_cache_dir_gb: float = 8.0
    #: Conversations answered at once (slots sharing one KV cache of n_ctx * parallel);
    #: "auto": as many as fit the memory available, up to
    #: :data:`llava_local.backends.llama_cpp.kv_budget.MAX_AUTO_PARALLEL`.
    parallel: Annotated[int, Field(ge=1, le=64)] | Literal["auto"] = 1
    force: bool = setting(
        False,
        help="Load the model even when the memory check says it does not fit; the system "
        "may then kill the process",
        flag="--force",
    )

    @classmethod
    def model_names(cls) -> frozenset[str]:
        return frozenset({"model", "mmproj"})

    @classmethod
    def conversation_names(cls) -> frozenset[str]:
        # the rest (threads, memory, folders, slots, force) is this machine's business,
        # never a file's
        return frozenset({"chat_format", "n_ctx"})


def settle(config: LlamaCppConfig) -> LlamaCppConfig:
    """``config`` as the engine opens and records it: the demo (``None``, ``"demo"`` or
    its files) and a pulled catalogue model (its name, an alias, or its files in the
    cache) by name with the catalogue's prompt format, any other model as the absolute
    path of an existing file with its projector (the one beside it when none is given),
    the KV folder as an absolute path. Raises ModelNotFoundError for a missing file."""
    model, mmproj = config.model, config.mmproj
    chat_format = config.chat_format
    if model in (None, DEMO_NAME):
        demo_mmproj = demo_paths()[1]
        if mmproj is not None and Path(mmproj).expanduser().resolve() != demo_mmproj.resolve():
            raise InvalidRequestError("the demo model comes with its own projector; drop mmproj=")
        model, mmproj = DEMO_NAME, None
    elif mmproj is None and (pulled := pulled_pair(str(model))) is not None:
        model, chat_format = pulled[0].name, chat_format or pulled[0].chat_format
    else:
        model_path = existing_file(Path(str(model)).expanduser(), "language model")
        mmproj_path = (
            existing_file(Path(mmproj).expanduser(), "projector (mmproj)")
            if mmproj
            else find_mmproj(model_path)
        )
        entry = pulled_entry(model_path, mmproj_path)
        if is_demo(model_path) and mmproj_path.resolve() == demo_paths()[1].resolve():
            model, mmproj = DEMO_NAME, None
        elif entry is not None:
            model, mmproj = entry.name, None
            chat_format = chat_format or entry.chat_format
        else:
            model, mmproj = str(model_path.resolve()), str(mmproj_path.resolve())
    folder = config.kv_cache_dir
    if folder is not None:
        folder = str(Path(folder).expanduser().absolute())
    return config.model_copy(
        update={
            "model": model,
            "mmproj": mmproj,
            "chat_format": chat_format,
            "kv_cache_dir": folder,
        }
    )


def files(config: LlamaCppConfig) -> tuple[Path, Path]:
    """The language model and projector files a settled config names, found here."""
    if config.model in (None, DEMO_NAME):
        return demo_paths()
    if config.mmproj is None:
        pulled = pulled_pair(str(config.model))
        if pulled is not None:
            return pulled[1], pulled[2]
        return settle_files(Path(str(config.model)).expanduser(), None)
    return settle_files(Path(str(config.model)).expanduser(), Path(config.mmproj).expanduser())


def settle_files(model: Path, mmproj: Path | None) -> tuple[Path, Path]:
    """``model`` and its projector (found beside it when None), both existing files."""
    model = existing_file(model, "language model")
    found = existing_file(mmproj, "projector (mmproj)") if mmproj else find_mmproj(model)
    return model, found


def existing_file(path: Path, what: str) -> Path:
    """``path``, if it is a file; else ModelNotFoundError saying what is wrong."""
    if not path.exists():
        raise ModelNotFoundError(f"no {what} file at {path}; check the path or download it first")
    if not path.is_file():
        raise ModelNotFoundError(f"the {what} path {path} is not a file")
    return path


def memory_budget(config: LlamaCppConfig, *, available: int | None = None) -> KVBudget:
    """What the engine opened with ``config`` will hold (:func:`.kv_budget.budget` with
    its settings): its context, slots and kept-state memory, decided before any
    loading, against ``available`` bytes (default: what this machine has now)."""
    model, mmproj = files(config)
    return budget(
        model,
        mmproj,
        n_ctx=config.n_ctx,
        parallel=config.parallel,
        kv_cache_mb=config.kv_cache_mb,
        n_batch=config.n_batch,
        flash_attn=config.flash_attn,
        use_mmap=config.use_mmap,
        n_threads=config.n_threads,
        force=config.force,
        n_gpu_layers=config.n_gpu_layers,
        available=available,
    )


def open_engine(config: LlamaCppConfig) -> LlamaCppBackend:
    """The engine for ``config`` (settled first, if the caller did not plan it)."""
    from .engine import LlamaCppBackend

    return LlamaCppBackend(config)
