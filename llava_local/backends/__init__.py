"""Engines behind :class:`~llava_local.VisionChat`, and the choice between them.

``backend="auto"`` takes, in order: a running Ollama daemon that has a vision
model; a GGUF pair named by ``LLAVA_LOCAL_MODEL`` / ``LLAVA_LOCAL_MMPROJ``; the
bundled demo model, with a one-line notice on stderr. For llama.cpp, ``model`` is
the path of a GGUF file or the name of a catalogue model pulled into the Hugging
Face cache (``llava-local pull NAME``).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from ..demo import DEMO_NAME, demo_paths, is_demo
from ..errors import InvalidRequestError, ModelNotFoundError
from .base import Backend, Finish, Turn

if TYPE_CHECKING:
    from ..catalog import CatalogEntry

__all__ = ["LLAMA_ARGS", "OLLAMA_ARGS", "Backend", "BackendName", "Finish", "Turn", "create"]

BackendName = Literal["auto", "ollama", "llama_cpp"]
#: Keyword arguments only one engine takes (the other engine refuses them by name).
OLLAMA_ARGS = {"host", "timeout", "pull", "keep_alive", "connect_timeout", "num_ctx"}
LLAMA_ARGS = {
    "mmproj",
    "n_ctx",
    "n_threads",
    "chat_format",
    "n_gpu_layers",
    "n_batch",
    "use_mmap",
    "verbose",
    "embedding_cache_mb",
    "force",
}


def create(backend: str = "auto", model: str | None = None, **kwargs: Any) -> Backend:
    """Build the engine ``backend`` names (see the module docstring for ``auto``)."""
    name = backend.replace("-", "_").lower()
    if name == "ollama":
        return _ollama(model, kwargs)
    if name in ("llama_cpp", "llamacpp", "llama"):
        return _llama_cpp(model, kwargs)
    if name == "auto":
        return _auto(model, kwargs)
    raise InvalidRequestError(f"unknown backend {backend!r}; choose auto, ollama or llama_cpp")


def _ollama(model: str | None, kwargs: dict[str, Any]) -> Backend:
    from .ollama import OllamaBackend

    return _construct(OllamaBackend, model or "llava", kwargs)


def _llama_cpp(model: str | None, kwargs: dict[str, Any]) -> Backend:
    from .llama_cpp import LlamaCppBackend

    mmproj = kwargs.pop("mmproj", None)
    catalog_name = None
    if model in (None, DEMO_NAME):
        if mmproj is not None:
            raise InvalidRequestError("the demo model comes with its own projector; drop mmproj=")
        model_path, mmproj_path = demo_paths()
    elif (pulled := None if mmproj else _pulled(str(model))) is not None:
        entry, model_path, mmproj_path = pulled
        catalog_name = entry.name
        if kwargs.get("chat_format") is None:
            kwargs["chat_format"] = entry.chat_format
    else:
        model_path = Path(str(model)).expanduser()
        mmproj_path = Path(mmproj).expanduser() if mmproj else _find_mmproj(model_path)
    kwargs["mmproj"] = mmproj_path
    backend = _construct(LlamaCppBackend, model_path, kwargs)
    backend.catalog_name = DEMO_NAME if is_demo(model_path) else catalog_name
    return backend


def _pulled(model: str) -> tuple[CatalogEntry, Path, Path] | None:
    """The pulled pair of a catalogue name; never for something that is a path."""
    if _looks_like_path(model) or Path(model).expanduser().exists():
        return None
    from ..models import pulled_pair

    return pulled_pair(model)


def _find_mmproj(model: Path) -> Path:
    """The one projector file beside the model, when the caller named none."""
    if not model.is_file():  # say what is wrong first: the model itself is missing
        raise ModelNotFoundError(
            f"no language model file at {model}; check the path, or pull a catalogue "
            "model (`llava-local models` lists them) and pass its name"
        )
    found = sorted(model.parent.glob("*mmproj*.gguf")) if model.parent.is_dir() else []
    if len(found) == 1:
        return found[0]
    hint = f" (found {len(found)} beside the model)" if found else ""
    raise InvalidRequestError(
        "the llama.cpp engine needs the projector file too: "
        f"pass mmproj='path/to/mmproj.gguf'{hint}"
    )


def _auto(model: str | None, kwargs: dict[str, Any]) -> Backend:
    from .ollama import find_vision_model

    llama_only = {k for k in kwargs if k in LLAMA_ARGS}
    if not llama_only and not _looks_like_path(model):
        found = find_vision_model(kwargs.get("host"), preferred=model)
        # A model the caller named must be that model, not another vision model.
        if found is not None and (model is None or found == model):
            return _ollama(found, kwargs)
    ollama_only = {k for k in kwargs if k in OLLAMA_ARGS}
    for key in ollama_only:
        kwargs.pop(key)
    env_model, env_mmproj = (
        os.environ.get("LLAVA_LOCAL_MODEL"),
        os.environ.get("LLAVA_LOCAL_MMPROJ"),
    )
    if model and model != DEMO_NAME:
        if _looks_like_path(model) or Path(model).expanduser().is_file():
            return _llama_cpp(model, kwargs)
        try:
            if _pulled(model):
                return _llama_cpp(model, kwargs)
        except ModelNotFoundError as exc:  # a catalogue name: `ollama pull NAME` is no advice
            raise ModelNotFoundError(f"{exc} (no Ollama daemon had it either)") from None
        raise ModelNotFoundError(
            f"model {model!r}: no Ollama daemon with it answered (run `ollama serve`, then "
            f"`ollama pull {model}`), and it is not the path of a GGUF file"
        )
    if env_model and model is None:
        kwargs.setdefault("mmproj", env_mmproj)
        return _llama_cpp(env_model, kwargs)
    try:
        backend = _llama_cpp(DEMO_NAME, kwargs)
    except ModelNotFoundError as exc:
        raise ModelNotFoundError(
            "no engine found: no Ollama daemon with a vision model answered, "
            "LLAVA_LOCAL_MODEL is not set, and the demo model is missing; "
            "run `ollama serve` and `ollama pull llava`, or pass model= and mmproj="
        ) from exc
    if model is None:
        print(
            "llava-local: no Ollama vision model or LLAVA_LOCAL_MODEL found; "
            "using the bundled demo model (digits and shapes only)",
            file=sys.stderr,
        )
    return backend


def _looks_like_path(model: str | None) -> bool:
    return bool(model) and (str(model).endswith(".gguf") or os.sep in str(model))


def _construct(cls: type[Backend], model: Any, kwargs: dict[str, Any]) -> Backend:
    try:
        return cls(model, **kwargs)  # type: ignore[call-arg]
    except TypeError as exc:
        if "unexpected keyword argument" in str(exc):
            raise InvalidRequestError(f"{cls.name} engine: {exc}") from exc
        raise
