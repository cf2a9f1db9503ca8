"""Deciding which engine to open, apart from opening it.

:func:`plan` is pure as far as models go: it checks the settings against the engine's
config, settles what names and paths mean (the demo, a catalogue name, a path and the
projector beside it), and for ``auto`` may ask an Ollama daemon what it has; it never
loads a model. What it returns, an :class:`EnginePlan`, says all there is to know
before anything is opened: the engine, its canonical JSON config, the runtime objects
only this process has (a key, an HTTP transport), and a notice for the user (the
demo-fallback line), which whoever acts on the plan prints. :func:`open` opens it.

So a program can decide on one machine and open elsewhere (``caption --ray`` plans on
the driver and sends the config to its workers, which alone load the model), and two
choices that mean the same files are one plan (:attr:`EnginePlan.key`): ``auto`` and
``llama_cpp``, ``None`` and ``"demo"``, a catalogue name and its files' paths.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
from collections.abc import Hashable, Mapping
from dataclasses import dataclass, field
from typing import Any

from ..errors import InvalidRequestError
from . import registry
from .base import Backend
from .spec import EngineConfig, EngineSpec

__all__ = ["EnginePlan", "announce", "open", "plan", "plan_for"]


@dataclass(frozen=True, eq=False)
class EnginePlan:
    """An engine decided on and not opened: which one, its settled config, the runtime
    objects handed to it as it opens (never part of the config), and a notice for the
    user (None: nothing to say). Plans compare equal when they open the same engine on
    the same files and settings (:attr:`key`)."""

    spec: EngineSpec
    config: EngineConfig
    runtime: Mapping[str, Any] = field(default_factory=dict, repr=False)
    notice: str | None = None

    @property
    def engine(self) -> str:
        """The engine's registered name."""
        return self.spec.name

    def settings(self) -> dict[str, Any]:
        """The config as JSON data, defaults left out (``chat.config["engine"]``)."""
        return self.config.model_dump(mode="json", exclude_defaults=True)

    def describe(self) -> dict[str, Any]:
        """``{"backend": name, "engine": settings}``: what another process needs to plan
        the same engine again (:func:`plan_for`)."""
        return {"backend": self.engine, "engine": self.settings()}

    def replace(self, **settings: Any) -> EnginePlan:
        """This plan with some settings changed (checked, then settled again)."""
        merged = {**self.config.model_dump(), **settings}
        config = self.spec.settle(registry.make_config(self.engine, merged))
        return EnginePlan(self.spec, config, self.runtime, self.notice)

    @property
    def key(self) -> Hashable:
        """What makes two plans the same engine: the engine, its settled config (a
        server's address as the address it means) and its runtime objects (the same
        key, or the same transport object)."""
        settings = self.config.model_dump(mode="json")
        address, resolve = self.spec.address, self.spec.resolve_address
        if address is not None and resolve is not None:
            # not an address: compared as written (and refused when opened)
            with contextlib.suppress(InvalidRequestError):
                settings[address] = resolve(settings.get(address))
        runtime = tuple(sorted((name, _identity(value)) for name, value in self.runtime.items()))
        return (self.engine, json.dumps(settings, sort_keys=True), runtime)

    def __repr__(self) -> str:
        notice = f", notice={self.notice!r}" if self.notice else ""
        return f"EnginePlan({self.engine!r}, {self.settings()!r}{notice})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, EnginePlan) and self.key == other.key

    def __hash__(self) -> int:
        return hash(self.key)


def _identity(value: Any) -> Hashable:
    """A runtime object as a plan's key holds it: text and numbers by value, objects by
    identity (two transports are two engines)."""
    if value is None or isinstance(value, str | int | float | bool):
        return (type(value).__name__, value)
    return ("object", id(value))


def plan(
    backend: str = "auto", model: str | os.PathLike[str] | None = None, **settings: Any
) -> EnginePlan:
    """The engine ``backend`` (an engine's name or alias, or ``"auto"``, see
    :mod:`llava_local.backends`) for ``model`` and ``settings``, decided and settled,
    not opened. Raises the errors opening would raise for settings and files (a
    misspelt setting, a missing model file), before anything is loaded."""
    named = None if model is None else os.fspath(model)
    if backend.strip().replace("-", "_").lower() == "auto":
        from .auto import choose

        return choose(named, settings)
    return plan_for(backend, named, settings)


def plan_for(
    backend: str, model: str | None, settings: Mapping[str, Any], notice: str | None = None
) -> EnginePlan:
    """The plan for one named engine (no choosing): ``settings`` checked into its config
    and settled, the runtime objects set apart."""
    spec = registry.get(backend)
    merged = {**settings, **({} if model is None else {"model": model})}
    runtime = {k: merged[k] for k in spec.config.runtime_names() if k in merged}
    config = spec.settle(registry.make_config(spec.name, merged))
    return EnginePlan(spec, config, runtime, notice)


def open(plan: EnginePlan) -> Backend:
    """Open the engine ``plan`` decided on (loading its model, connecting to its server)."""
    engine: Backend = plan.spec.open(plan.config, **plan.runtime)
    return engine


def announce(plan: EnginePlan) -> None:
    """Print the plan's notice for the user, if any, on stderr (what opening it from a
    name, as ``VisionChat`` and the command line do, has always said)."""
    if plan.notice:
        print(f"llava-local: {plan.notice}", file=sys.stderr)
