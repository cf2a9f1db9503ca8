"""The engines by name: each engine module registers its name, aliases, settings and
capabilities here, and everything that lists or opens engines reads this table.

Adding an engine is one module that calls :func:`register` (an engine written outside
the package registers the same way, with one call, and is then usable by name in
``VisionChat``, the CLI's ``--backend`` and the web page)::

    register(EngineSpec("echo", EchoConfig, EchoBackend, Capabilities(...)))

Settings are a frozen pydantic model per engine (:class:`EngineConfig`): typed,
checked when the chat is made (a misspelt name is refused with the valid ones), and
JSON-serialisable, so a chat can be described and rebuilt in another process.
"""

from __future__ import annotations

import difflib
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from pydantic import BaseModel, ConfigDict, ValidationError, field_validator

from ..errors import InvalidRequestError, problems
from .base import Backend


class EngineConfig(BaseModel):
    """One engine's settings. Subclasses add fields; unknown names are refused."""

    model_config = ConfigDict(frozen=True, extra="forbid", protected_namespaces=())

    #: The model: a name the engine knows, a path, or None for the engine's default.
    model: str | None = None

    @classmethod
    def setting_names(cls) -> list[str]:
        """The names this engine takes as settings (its fields, unless it says more)."""
        return list(cls.model_fields)

    @classmethod
    def runtime_names(cls) -> frozenset[str]:
        """Settings that are live objects (an HTTP transport, a client): handed to the
        engine when it opens, never part of the config, so a rebuilt chat lacks them."""
        return frozenset()

    @classmethod
    def conversation_names(cls) -> frozenset[str]:
        """Settings a saved conversation records and loads again besides the model:
        what decides which model answers and what fits its context. Never where to
        connect (the engine's address is confirmed by the caller), keys, timeouts,
        folders, memory or threads: a saved file is data, and may come from anyone."""
        return frozenset()

    @field_validator("*", mode="before")
    @classmethod
    def _paths_as_text(cls, value: Any) -> Any:
        """Paths are recorded as text, so that the config stays JSON."""
        return os.fspath(value) if isinstance(value, os.PathLike) else value


class Capabilities(BaseModel):
    """What an engine can do, so that callers check one place instead of the name."""

    model_config = ConfigDict(frozen=True)

    stream: bool = True
    json_schema: bool = True
    several_pictures: bool = True
    #: Keeps earlier turns between requests, so a follow-up costs only its new tokens.
    reuses_turns: bool = False
    #: ``llava-local pull`` can fetch its models.
    pulls_models: bool = False


@dataclass(frozen=True)
class EngineSpec:
    """An engine as the registry knows it."""

    name: str
    config: type[EngineConfig]
    #: Opens the engine for a config and its runtime objects (see
    #: :meth:`EngineConfig.runtime_names`); imports heavy dependencies only when called.
    open: Callable[..., Backend]
    capabilities: Capabilities = field(default_factory=Capabilities)
    aliases: tuple[str, ...] = ()
    #: One line for lists (``--help``, the web page).
    description: str = ""
    #: The setting that holds a server's address, which the command line's ``--host``
    #: and the web page's address field fill (None: the engine runs in this process).
    address: str | None = None
    #: The address a value of that setting means (None: from the environment or the
    #: default), so two spellings of one server compare equal; raises
    #: InvalidRequestError for a value that is no address.
    resolve_address: Callable[[str | None], str] | None = None


_ENGINES: dict[str, EngineSpec] = {}
_ALIASES: dict[str, str] = {}
_BUILTINS_LOADED = False


def register(spec: EngineSpec) -> None:
    """Make ``spec`` usable by its name and aliases; registering a name again replaces it."""
    key = _key(spec.name)
    if key == "auto":
        raise InvalidRequestError("'auto' is the choice between engines, not an engine name")
    for alias, target in list(_ALIASES.items()):
        if target == key:
            del _ALIASES[alias]
    _ENGINES[key] = spec
    for alias in spec.aliases:
        _ALIASES[_key(alias)] = key


def names() -> list[str]:
    """The registered engines' names, built-in ones first."""
    _load_builtins()
    return list(_ENGINES)


def get(name: str) -> EngineSpec:
    """The engine called ``name`` (or one of its aliases)."""
    _load_builtins()
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
    _load_builtins()
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


def _load_builtins() -> None:
    """The package's own engines register when their modules are imported."""
    global _BUILTINS_LOADED  # noqa: PLW0603 - a once-only import, as Python's own caches
    if not _BUILTINS_LOADED:
        _BUILTINS_LOADED = True
        from . import (
            llama_cpp,  # noqa: F401
            ollama,  # noqa: F401 - imported for its register() call
            openai,  # noqa: F401
        )
