"""From what the caller gave to files on disk: a catalogue name pulled into the Hugging
Face cache, the bundled demo, or a GGUF path and its projector. The engines and
``llava-local models`` read this one module, so a model named one way in Python is
found the same way by every command.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from . import catalog
from .catalog import CatalogEntry
from .errors import InvalidRequestError, MissingDependencyError, ModelNotFoundError
from .gguf_header import check_magic

__all__ = [
    "find_mmproj",
    "hf_cache_dir",
    "huggingface_hub",
    "looks_like_path",
    "pulled_entry",
    "pulled_pair",
]


def looks_like_path(model: str | None) -> bool:
    """A model string that names a file rather than a catalogue entry."""
    return bool(model) and (str(model).endswith(".gguf") or os.sep in str(model))


def hf_cache_dir(cache_dir: str | os.PathLike[str] | None = None) -> Path:
    """The Hugging Face cache in use: ``cache_dir``, else ``huggingface_hub``'s
    (``HF_HUB_CACHE``, ``HF_HOME/hub``, ``~/.cache/huggingface/hub``)."""
    if cache_dir is not None:
        return Path(cache_dir).expanduser()
    constants = huggingface_hub().constants
    return Path(constants.HF_HUB_CACHE)


def pulled_pair(
    name: str, cache_dir: str | os.PathLike[str] | None = None
) -> tuple[CatalogEntry, Path, Path] | None:
    """A catalogue model's GGUF pair in the Hugging Face cache, found by its name, so
    that ``model="smolvlm2-2.2b"`` works after ``llava-local pull smolvlm2-2.2b``.

    None when ``name`` is not the name of a catalogue entry with GGUF files; a
    :class:`ModelNotFoundError` saying how to get it when the pair is not (all) there.
    Only the cache is read, never the network; never for something that is a path.
    """
    if looks_like_path(name) or Path(name).expanduser().exists():
        return None
    found = catalog.match(name)
    if found is None or found[1] != "name" or not found[0].has_gguf:
        return None
    entry, hub = found[0], huggingface_hub()
    paths = []
    for filename in (str(entry.gguf), str(entry.mmproj)):
        path = hub.try_to_load_from_cache(str(entry.hf_repo), filename, cache_dir=cache_dir)
        if not isinstance(path, str):
            size = f" ({entry.download_bytes / 1e9:.1f} GB)" if entry.download_bytes else ""
            raise ModelNotFoundError(
                f"{entry.name} is not downloaded ({filename} is not in the Hugging Face "
                f"cache {hf_cache_dir(cache_dir)}): run `llava-local pull {entry.name}`{size}"
            )
        paths.append(Path(path))
    return entry, paths[0], paths[1]


def pulled_entry(model: Path, mmproj: Path) -> CatalogEntry | None:
    """The catalogue model whose pulled pair ``model`` and ``mmproj`` are (files given by
    their Hugging Face cache paths), so that a path and the name mean one model; None
    for files outside the cache or not a catalogue pair. Reads only the cache."""
    try:
        cache = hf_cache_dir().resolve()
    except MissingDependencyError:
        return None
    wanted = (model.resolve(), mmproj.resolve())
    if not wanted[0].is_relative_to(cache):
        return None
    for entry in catalog.CATALOG:
        if not entry.has_gguf:
            continue
        try:
            pair = pulled_pair(entry.name)
        except ModelNotFoundError:
            continue
        if pair is not None and (pair[1].resolve(), pair[2].resolve()) == wanted:
            return entry
    return None


def find_mmproj(model: Path) -> Path:
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


def huggingface_hub() -> Any:
    """``huggingface_hub``, imported when first needed (it is optional)."""
    try:
        import huggingface_hub
        import huggingface_hub.constants
        import huggingface_hub.errors
    except ImportError as exc:  # pragma: no cover - installed with the llama-cpp extra
        raise MissingDependencyError(
            "downloading and finding GGUF files needs huggingface_hub: "
            "pip install 'llava-local[llama-cpp]'"
        ) from exc
    return huggingface_hub
