"""Tools (function calling) for models that were not trained to choose one.

A LLaVA-style model's chat format has no tools section: it cannot decide by itself
whether to call a function, nor write a call in any trained form. Ollama refuses
``tools`` for such a model with a 400 ``"<model> does not support tools"``, and so do
this library and ``serve`` when the model is left to choose (``tool_choice`` ``"auto"``
or absent). What can be honoured is a *forced* call: the function named by
``tool_choice`` (``{"type": "function", "function": {"name": ...}}``), or the one tool
of ``"required"``. Its arguments are then the answer, written by the grammar to the
function's parameter schema and checked against it, and returned as a tool call.
``"none"`` answers in text and ignores the tools.

:func:`as_tool` reads the forms callers give a tool in; :func:`forced_tool` makes the
decision above, once, for the library and both HTTP protocols.
"""

from __future__ import annotations

import uuid
from collections.abc import Mapping, Sequence
from typing import Any

from pydantic import BaseModel, ValidationError

from .errors import InvalidRequestError, problems
from .types import Tool

__all__ = ["ToolSpec", "as_tool", "call_id", "forced_tool", "not_supported"]

#: What a tool may be given as: a :class:`Tool`, a pydantic model class (its name, its
#: docstring and its JSON schema), or a dict in OpenAI's form
#: (``{"type": "function", "function": {...}}``) or as the function itself.
ToolSpec = Tool | type[BaseModel] | Mapping[str, Any]


def as_tool(spec: ToolSpec) -> Tool:
    """``spec`` as a :class:`Tool` (an :class:`InvalidRequestError` if it is none)."""
    if isinstance(spec, Tool):
        return spec
    if isinstance(spec, type) and issubclass(spec, BaseModel):
        doc = (spec.__doc__ or "").strip() or None
        return _tool(name=spec.__name__, description=doc, parameters=spec.model_json_schema())
    if isinstance(spec, Mapping):
        function = spec.get("function", spec)
        if isinstance(function, Mapping):
            given = {k: function[k] for k in ("name", "description", "parameters") if k in function}
            if given.get("parameters") is None:
                given.pop("parameters", None)
            return _tool(**given)
    raise InvalidRequestError(
        f"a tool is a llava_local.Tool, a pydantic model class or a dict "
        f'({{"name": ..., "parameters": {{...}}}}), not {type(spec).__name__}'
    )


def _tool(**fields: Any) -> Tool:
    try:
        return Tool(**fields)
    except ValidationError as exc:
        raise InvalidRequestError(f"invalid tool ({problems(exc)})") from None


def not_supported(model: str) -> InvalidRequestError:
    """Ollama's answer to ``tools`` for a model without a tools section, with the way out."""
    return InvalidRequestError(
        f"{model} does not support tools: it was not trained to choose a function. Force "
        'one with tool_choice {"type": "function", "function": {"name": "..."}} (or '
        '"required" with one tool) and its arguments are written to its parameter schema'
    )


def forced_tool(
    tools: Sequence[Tool], choice: str | Mapping[str, Any] | None, model: str
) -> Tool | None:
    """The tool a turn must call, None when it answers in text (no tools, or
    ``"none"``); an :class:`InvalidRequestError` when the model would have to choose."""
    if isinstance(choice, Mapping):
        function = choice.get("function", choice)
        name = function.get("name") if isinstance(function, Mapping) else None
        if not isinstance(name, str):
            raise InvalidRequestError(
                'tool_choice names a function as {"type": "function", "function": {"name": ...}}'
            )
        for tool in tools:
            if tool.name == name:
                return tool
        listed = ", ".join(repr(t.name) for t in tools) or "none"
        raise InvalidRequestError(
            f"tool_choice names {name!r}, which is not among the request's tools ({listed})"
        )
    if not tools or choice == "none":
        return None
    if choice == "required":
        if len(tools) == 1:
            return tools[0]
        raise InvalidRequestError(
            f"tool_choice 'required' with {len(tools)} tools leaves the choice to {model}, "
            "which was not trained to choose a function; name the one to call: "
            '{"type": "function", "function": {"name": "..."}}'
        )
    if choice in (None, "auto"):
        raise not_supported(model)
    raise InvalidRequestError(
        f"tool_choice {choice!r} is not one of 'none', 'auto', 'required' or a named function"
    )


def call_id() -> str:
    """A new tool call's id, in OpenAI's form."""
    return f"call_{uuid.uuid4().hex[:24]}"
