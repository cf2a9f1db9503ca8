"""The engines by name: everything that lists or opens engines reads this table.

The table is filled the first time it is read, never at import: first the package's
own engines (:data:`BUILTINS`, module paths, imported then), then every engine another
installed package announces under the entry-point group ``llava_local.engines``, as
simonw/llm finds its plugins. An engine package needs no file of ours, only this in its
``pyproject.toml``::

    [project.entry-points."llava_local.engines"]
    echo = "echo_engine:SPEC"

where ``SPEC`` is an :class:`~.spec.EngineSpec` (or a function returning one). It is
then usable by name in ``VisionChat``, ``--backend`` (with its flags), the web page and
``serve``. A program can also call :func:`register` itself. A name is registered once:
replacing one is said with ``replace=True``, else it is an error (an entry point that
takes a registered name is skipped with an :class:`EnginePluginWarning`, as is one that
fails to load, so one broken plugin does not stop the others).

This module imports no engine (the configs and specs live in :mod:`.spec`).
"""

from __future__ import annotations

import difflib
import importlib
import threading
import warnings
from collections.abc import Mapping
from importlib.metadata import entry_points
from typing import Any

from pydantic import ValidationError

from ..errors import EnginePluginWarning, InvalidRequestError, problems
from .spec import Capabilities, EngineConfig, EngineSpec, Flag, setting

__all__ = [
    "BUILTINS",
    "ENTRY_POINT_GROUP",
    "Capabilities",
    "EngineConfig",
    "EngineSpec",
    "Flag",
    "address_settings",
    "engine_of",
    "get",
    "make_config",
    "names",
    "register",
    "setting",
    "specs",
]

#: The package's own engines: ``module:attribute`` of each one's :class:`EngineSpec`.
BUILTINS = (
    "llava_local.backends.ollama:SPEC",
    "llava_local.backends.llama_cpp:SPEC",
    "llava_local.backends.openai:SPEC",
)
#: The entry-point group other packages announce their engines under.
ENTRY_POINT_GROUP = "llava_local.engines"

_ENGINES: dict[str, EngineSpec] = {}
_ALIASES: dict[str, str] = {}
_loaded = False
_loading = threading.RLock()  # two threads asking first load the table once


def register(spec: EngineSpec, *, replace: bool = False) -> None:
    """Make ``spec`` usable by its name and aliases. A name or alias another engine has
    is refused (InvalidRequestError) unless ``replace`` is True."""
    if not isinstance(spec, EngineSpec):
        raise InvalidRequestError(f"register() takes an EngineSpec, not {type(spec).__name__}")
    with _loading:
        _load()
        _add(spec, replace=replace)


def _add(spec: EngineSpec, *, replace: bool) -> None:
    key = _key(spec.name)
    if key == "auto":
        raise InvalidRequestError("'auto' is the choice between engines, not an engine name")
    taken = [name for name in (key, *map(_key, spec.aliases)) if _owner(name) is not None]
    if taken and not replace:
        raise InvalidRequestError(
            f"{taken[0]!r} already names the registered {_owner(taken[0])} engine; "
            "register(spec, replace=True) replaces it"
        )
    for alias, target in list(_ALIASES.items()):
        if target == key:
            del _ALIASES[alias]
    _ENGINES[key] = spec
    for alias in spec.aliases:
        _ALIASES[_key(alias)] = key


def _owner(name: str) -> str | None:
    """The engine a name or alias is taken by, if any."""
    return _ALIASES.get(name, name if name in _ENGINES else None)


def names() -> list[str]:
    """The registered engines' names, built-in ones first."""
    _load()
    return list(_ENGINES)


def specs() -> list[EngineSpec]:
    """The registered engines, built-in ones first."""
    _load()
    return list(_ENGINES.values())


def get(name: str) -> EngineSpec:
    """The engine called ``name`` (or one of its aliases)."""
    _load()
    key = _key(name)
    spec = _ENGINES.get(_ALIASES.get(key, key))
    if spec is None:
        raise InvalidRequestError(f"unknown backend {name!r}; choose auto, " + ", ".join(_ENGINES))
    return spec


def make_config(name: str, settings: Mapping[str, Any]) -> EngineConfig:
    """``settings`` checked into engine ``name``'s config; wrong names and values are
    refused with what the engine takes."""
    spec = get(name)
    cls = spec.config
    valid = [*cls.setting_names(), *sorted(cls.runtime_names())]
    unknown = sorted(set(settings) - set(valid))
    if unknown:
        close = difflib.get_close_matches(unknown[0], valid, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise InvalidRequestError(
            f"the {spec.name} engine has no setting {unknown[0]!r}{hint}; its settings: "
            + ", ".join(valid)
        )
    try:
        return cls(**{k: v for k, v in settings.items() if k not in cls.runtime_names()})
    except ValidationError as exc:
        raise InvalidRequestError(
            f"invalid {spec.name} engine settings ({problems(exc)})"
        ) from None


def engine_of(config: EngineConfig) -> EngineSpec:
    """The registered engine whose config class ``config`` is."""
    _load()
    for spec in _ENGINES.values():
        if type(config) is spec.config:
            return spec
    raise InvalidRequestError(f"no registered engine takes a {type(config).__name__}")


def address_settings(backend: str, settings: Mapping[str, Any]) -> dict[str, Any]:
    """``settings`` with a server address given as ``host`` (the command line's
    ``--host``, the web page's field) under the name engine ``backend`` gives it;
    for ``auto``, and an engine that takes no address, they are returned as given."""
    if _key(backend) == "auto" or "host" not in settings:
        return dict(settings)
    address = get(backend).address
    if address is None or address == "host":
        return dict(settings)
    moved = {key: value for key, value in settings.items() if key != "host"}
    moved.setdefault(address, settings["host"])
    return moved


def _key(name: str) -> str:
    return name.strip().replace("-", "_").lower()


def _load() -> None:
    """Fill the table once: the built-in engines, then the installed plugins'."""
    global _loaded  # noqa: PLW0603 - a once-only load, as Python's own caches
    if _loaded:
        return
    with _loading:
        if _loaded:
            return
        _loaded = True
        for path in BUILTINS:
            module, _, attribute = path.partition(":")
            _add(getattr(importlib.import_module(module), attribute), replace=False)
        for point in entry_points(group=ENTRY_POINT_GROUP):
            _add_plugin(point)


def _add_plugin(point: Any) -> None:
    """Register the engine an entry point names; a failure is a warning, not an error."""
    where = f"{point.value} ({getattr(point.dist, 'name', None) or 'an installed package'})"
    try:
        found = point.load()
        spec = found() if callable(found) and not isinstance(found, EngineSpec) else found
        if not isinstance(spec, EngineSpec):
            raise TypeError(f"it is a {type(spec).__name__}, not an EngineSpec")
        _add(spec, replace=False)
    except Exception as exc:
        warnings.warn(
            EnginePluginWarning(
                f"the engine {point.name!r} from {where} is left out: {exc}; "
                "update or uninstall that package"
            ),
            stacklevel=3,
        )
