"""What an engine is to the rest of the library: its settings (:class:`EngineConfig`),
what it can do (:class:`Capabilities`) and how it is found and opened
(:class:`EngineSpec`).

A leaf beside the seam (:mod:`.base`): the registry, which lists engines, and every
engine, which describes itself here, both import this module, and it imports neither,
so no engine is imported until it is asked for.
"""

from __future__ import annotations

import os
import types
import typing
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, JsonValue, field_validator
from pydantic_core import PydanticUndefined

if TYPE_CHECKING:
    from .base import Backend

__all__ = ["Capabilities", "EngineConfig", "EngineSpec", "Flag", "setting"]

FlagType = Literal["int", "float", "str", "bool"]


def setting(
    default: Any = PydanticUndefined,
    *,
    help: str,
    flag: str | None = None,
    metavar: str | None = None,
    **field: Any,
) -> Any:
    """A config field with the sentence that explains it and, with ``flag``, the command
    line option that sets it (``--n-ctx``): the CLI builds its engine options from these,
    so an engine (one of ours or a plugin's) brings its flags with its config.
    ``field`` takes pydantic's other ``Field`` arguments (``ge=``, ``default_factory=``)."""
    extra: dict[str, JsonValue] | None = {"flag": flag, "metavar": metavar} if flag else None
    return Field(default, description=help, json_schema_extra=extra, **field)


@dataclass(frozen=True)
class Flag:
    """A config field the command line sets: its option, the setting it fills, its
    help and its type (a bool is an on/off switch)."""

    option: str
    setting: str
    help: str
    type: FlagType
    metavar: str | None = None
    #: The least value allowed (a field's ``ge=``), for the command line's own check.
    minimum: float | None = None


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
        """Settings that are live objects (an HTTP transport, a client) or secrets (a key):
        handed to the engine when it opens, never part of the config, so a rebuilt chat
        lacks them."""
        return frozenset()

    @classmethod
    def model_names(cls) -> frozenset[str]:
        """The settings that name the model's files (``model``; llama.cpp adds its
        projector): a saved conversation records them and a load uses them again."""
        return frozenset({"model"})

    @classmethod
    def conversation_names(cls) -> frozenset[str]:
        """Settings a saved conversation records and loads again besides the model:
        what decides which model answers and what fits its context. Never where to
        connect (the engine's address is confirmed by the caller), keys, timeouts,
        folders, memory or threads: a saved file is data, and may come from anyone."""
        return frozenset()

    @classmethod
    def flags(cls) -> list[Flag]:
        """The command line's options for this engine's settings (see :func:`setting`)."""
        found = []
        for name, info in cls.model_fields.items():
            extra = info.json_schema_extra
            if not isinstance(extra, dict) or not extra.get("flag"):
                continue
            minimum = next(
                (float(getattr(m, "ge")) for m in info.metadata if hasattr(m, "ge")),  # noqa: B009
                None,
            )
            metavar = extra.get("metavar")
            found.append(
                Flag(
                    option=str(extra["flag"]),
                    setting=name,
                    help=info.description or "",
                    type=_flag_type(cls, name, info.annotation),
                    metavar=None if metavar is None else str(metavar),
                    minimum=minimum,
                )
            )
        return found

    @field_validator("*", mode="before")
    @classmethod
    def _paths_as_text(cls, value: Any) -> Any:
        """Paths are recorded as text, so that the config stays JSON."""
        return os.fspath(value) if isinstance(value, os.PathLike) else value


def _flag_type(cls: type[EngineConfig], name: str, annotation: Any) -> FlagType:
    """The command line type of a field: its annotation, ``None`` left out."""
    args = typing.get_args(annotation)
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        kinds = [a for a in args if a is not type(None)]
        annotation = kinds[0] if len(kinds) == 1 else None
    kinds_by_type: dict[Any, FlagType] = {int: "int", float: "float", str: "str", bool: "bool"}
    kind = kinds_by_type.get(annotation)
    if kind is None:
        raise TypeError(
            f"{cls.__name__}.{name} has a flag but its type {annotation!r} is none of "
            "int, float, str or bool (or one of them or None)"
        )
    return kind


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


def _as_given(config: EngineConfig) -> EngineConfig:
    return config


@dataclass(frozen=True)
class EngineSpec:
    """An engine as the registry knows it.

    An engine module (ours, or a plugin's, found by its ``llava_local.engines`` entry
    point) defines one of these; the registry lists it by ``name`` and ``aliases``.
    """

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
    #: The config as a plan records it: what the engine will open, every name and path
    #: resolved (the bundled demo and catalogue models by name, other files as absolute
    #: paths, a projector found beside its model), so two spellings of the same files
    #: are one config. It may read files and caches; it never loads a model. Raises the
    #: library's error for files that are missing.
    settle: Callable[[Any], EngineConfig] = _as_given
