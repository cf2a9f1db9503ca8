"""Engines behind :class:`~llava_local.VisionChat`, and the choice between them.

Opening an engine is two steps: :func:`plan` decides (which engine, its settled config,
the notice for the user; for ``backend="auto"`` it may ask an Ollama daemon, see
:mod:`.auto`) and never loads a model; :func:`open` opens the plan. :func:`create` does
both. For llama.cpp, ``model`` is the path of a GGUF file or the name of a catalogue
model pulled into the Hugging Face cache (``llava-local pull NAME``).

Layout: :mod:`.base` (the seam: ``Backend``, ``Turn``, ``Finish``), :mod:`.spec` (what an
engine is: config, capabilities, spec), :mod:`.registry` (the engines by name, the
built-in ones and the installed plugins'), :mod:`.plan` and :mod:`.auto` (deciding),
then one module or package per engine.
"""

from __future__ import annotations

from typing import Any

from . import registry
from .auto import settings_only_for
from .base import Backend, Finish, ModelDescription, Turn
from .plan import EnginePlan, announce, open, plan

__all__ = [
    "Backend",
    "EnginePlan",
    "Finish",
    "ModelDescription",
    "Turn",
    "announce",
    "create",
    "engine_names",
    "open",
    "plan",
    "settings_only_for",
]


def engine_names() -> list[str]:
    """What ``backend=`` (and ``--backend``, the web page) accepts: auto, then every
    registered engine."""
    return ["auto", *registry.names()]


def create(backend: str = "auto", model: str | None = None, **kwargs: Any) -> Backend:
    """``open(plan(backend, model, **kwargs))``, saying the plan's notice on stderr."""
    chosen = plan(backend, model, **kwargs)
    announce(chosen)
    return open(chosen)
