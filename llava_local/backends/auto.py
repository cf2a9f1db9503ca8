"""``backend="auto"``: the choice between engines, made while planning.

In order: a running Ollama daemon that has a vision model; a GGUF pair named by
``LLAVA_LOCAL_MODEL`` / ``LLAVA_LOCAL_MMPROJ``; the bundled demo model, with a notice
for the user (the plan's, printed by whoever acts on it). A daemon the caller named
(``host=`` or ``OLLAMA_HOST``) means Ollama: if it does not answer, or has no vision
model, that is the error, unless the call names llama.cpp itself (a GGUF file, the
demo, a pulled catalogue model, llama.cpp-only arguments). Asking the daemon is the
only thing done here besides reading files: no model is loaded.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from ..demo import DEMO_NAME
from ..errors import BackendUnavailableError, ModelNotFoundError
from ..resolve import looks_like_path, pulled_pair
from . import registry
from .plan import EnginePlan, plan_for

__all__ = ["choose", "settings_only_for"]


def settings_only_for(name: str) -> frozenset[str]:
    """The settings engine ``name`` takes and no other registered engine does: naming
    one of them picks that engine for ``auto``, and other engines refuse it."""
    spec = registry.get(name)
    others = {
        setting
        for other in registry.names()
        if other != spec.name
        for setting in registry.get(other).config.setting_names()
    }
    return frozenset(spec.config.setting_names()) - others - {"model"}


def choose(model: str | None, given: dict[str, Any]) -> EnginePlan:
    """The plan ``auto`` makes for ``model`` and the settings ``given``."""
    from .ollama import find_vision_model, resolve_host

    kwargs = dict(given)
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
            return plan_for("ollama", found, kwargs)
        if named and model is None:
            raise ModelNotFoundError(
                f"Ollama at {resolve_host(host)} has no vision model: run `ollama pull llava` "
                "(or another vision model), or choose another engine with backend="
            )
    # What the daemon takes and llama.cpp does not (not settings_only_for: the openai
    # engine shares timeout with Ollama, and llama.cpp would refuse it).
    llama_takes = set(registry.get("llama_cpp").config.setting_names())
    for key in (set(registry.get("ollama").config.setting_names()) - llama_takes) & set(kwargs):
        kwargs.pop(key)
    env_model, env_mmproj = (
        os.environ.get("LLAVA_LOCAL_MODEL"),
        os.environ.get("LLAVA_LOCAL_MMPROJ"),
    )
    if model and model != DEMO_NAME:
        if looks_like_path(model) or Path(model).expanduser().is_file():
            return plan_for("llama_cpp", model, kwargs)
        try:
            if pulled_pair(model):
                return plan_for("llama_cpp", model, kwargs)
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
        return plan_for("llama_cpp", env_model, kwargs)
    notice = None
    if model is None:
        daemon = f"no Ollama vision model at {resolve_host()} and " if asked else ""
        notice = (
            f"{daemon}no LLAVA_LOCAL_MODEL; using the bundled demo model (digits and shapes only)"
        )
    try:
        return plan_for("llama_cpp", DEMO_NAME, kwargs, notice)
    except ModelNotFoundError as exc:
        raise ModelNotFoundError(
            "no engine found: no Ollama daemon with a vision model answered, "
            "LLAVA_LOCAL_MODEL is not set, and the demo model is missing; "
            "run `ollama serve` and `ollama pull llava`, or pass model= and mmproj="
        ) from exc


def _for_llama_cpp(model: str | None, kwargs: dict[str, Any]) -> bool:
    """Whether the call itself names the in-process engine: a GGUF file, the demo,
    or arguments only llama.cpp takes (then no daemon is asked, named or not)."""
    if settings_only_for("llama_cpp") & set(kwargs):
        return True
    return bool(model) and (
        model == DEMO_NAME or looks_like_path(model) or Path(str(model)).expanduser().is_file()
    )


def _in_catalogue(model: str) -> bool:
    """Whether ``model`` is the name of a catalogue model with GGUF files."""
    from ..catalog import match

    found = match(model)
    return found is not None and found[1] == "name" and found[0].has_gguf
