"""Engines behind :class:`~llava_local.VisionChat`, and the choice between them.

``backend="auto"`` takes, in order: a running Ollama daemon that has a vision
model; a GGUF pair named by ``LLAVA_LOCAL_MODEL`` / ``LLAVA_LOCAL_MMPROJ``; the
bundled demo model, with a one-line notice on stderr. A daemon the caller named
(``host=`` or ``OLLAMA_HOST``) means Ollama: if it does not answer, or has no vision
model, that is the error, unless the call names llama.cpp itself (a GGUF file, the
demo, a pulled catalogue model, llama.cpp-only arguments). For llama.cpp, ``model`` is
the path of a GGUF file or the name of a catalogue model pulled into the Hugging
Face cache (``llava-local pull NAME``).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from ..demo import DEMO_NAME, demo_paths, is_demo
from ..errors import BackendUnavailableError, InvalidRequestError, ModelNotFoundError
from .base import Backend, Finish, Turn
from .gguf_meta import check_magic

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
    check_magic(model)  # a picture given as the model is not a missing projector
    found = sorted(model.parent.glob("*mmproj*.gguf")) if model.parent.is_dir() else []
    if len(found) == 1:
        return found[0]
    hint = f" (found {len(found)} beside the model)" if found else ""
    raise InvalidRequestError(
        "the llama.cpp engine needs the projector file too: "
        f"pass mmproj='path/to/mmproj.gguf'{hint}"
    )


def _auto(model: str | None, kwargs: dict[str, Any]) -> Backend:
    from .ollama import find_vision_model, resolve_host

    host = kwargs.get("host")
    # A daemon the caller named (host=, --host, OLLAMA_HOST) means Ollama: when it does
    # not answer, that is the error to report, not a reason to answer with the demo.
    named = host is not None or bool(os.environ.get("OLLAMA_HOST", "").strip())
    unreachable = ""  # the named daemon that did not answer, while a catalogue name is tried
    asked = not _for_llama_cpp(model, kwargs)
    if asked:
        try:
            found = find_vision_model(
                host, preferred=model, timeout=3.0 if named else 1.0, required=named
            )
        except BackendUnavailableError:
            if not (model and _in_catalogue(model)):  # a pulled pair is still that model
                raise
            found, unreachable = None, f"; none answered at {resolve_host(host)}"
        # A model the caller named must be that model, not another vision model.
        if found is not None and (model is None or found == model):
            return _ollama(found, kwargs)
        if named and model is None:
            raise ModelNotFoundError(
                f"Ollama at {resolve_host(host)} has no vision model: run `ollama pull llava` "
                "(or another vision model), or choose another engine with backend="
            )
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
            raise ModelNotFoundError(
                f"{exc} (no Ollama daemon had it either{unreachable})"
            ) from None
        if named:
            raise ModelNotFoundError(
                f"Ollama at {resolve_host(host)} has no vision model {model!r} (run "
                f"`ollama pull {model}`), and it is not the path of a GGUF file"
            )
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
        daemon = f"no Ollama vision model at {resolve_host()} and " if asked else ""
        print(
            f"llava-local: {daemon}no LLAVA_LOCAL_MODEL; "
            "using the bundled demo model (digits and shapes only)",
            file=sys.stderr,
        )
    return backend


def _for_llama_cpp(model: str | None, kwargs: dict[str, Any]) -> bool:
    """Whether the call itself names the in-process engine: a GGUF file, the demo,
    or arguments only llama.cpp takes (then no daemon is asked, named or not)."""
    if any(k in LLAMA_ARGS for k in kwargs):
        return True
    return bool(model) and (
        model == DEMO_NAME or _looks_like_path(model) or Path(str(model)).expanduser().is_file()
    )


def _in_catalogue(model: str) -> bool:
    """Whether ``model`` is the name of a catalogue model with GGUF files."""
    from ..catalog import match

    found = match(model)
    return found is not None and found[1] == "name" and found[0].has_gguf


def _looks_like_path(model: str | None) -> bool:
    return bool(model) and (str(model).endswith(".gguf") or os.sep in str(model))


def _construct(cls: type[Backend], model: Any, kwargs: dict[str, Any]) -> Backend:
    try:
        return cls(model, **kwargs)  # type: ignore[call-arg]
    except TypeError as exc:
        if "unexpected keyword argument" in str(exc):
            raise InvalidRequestError(f"{cls.name} engine: {exc}") from exc
        raise
