"""What the protocol modules share: the base of their shapes, and counters read leniently."""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidatorFunctionWrapHandler
from pydantic.functional_validators import WrapValidator

from ..types import Tool

__all__ = ["Count", "FunctionDef", "Number", "Shape", "ToolDef"]


class Shape(BaseModel):
    """A protocol's message: fields it does not name are ignored (a newer peer's
    additions never break parsing); read from a client library's own objects too
    (``model_validate(obj, from_attributes=True)``)."""

    model_config = ConfigDict(extra="ignore", from_attributes=True, populate_by_name=True)


def _unreported(value: Any, handler: ValidatorFunctionWrapHandler) -> Any:
    """A figure of the wrong type is one the peer did not report: None, not an error."""
    if isinstance(value, bool):
        return None
    try:
        return handler(value)
    except ValidationError:
        return None


#: A token count a peer reports; anything but a whole number reads as unreported.
Count = Annotated[int | None, WrapValidator(_unreported)]
#: A figure (milliseconds, nanoseconds) a peer reports; anything but a number reads as None.
Number = Annotated[float | None, WrapValidator(_unreported)]


class FunctionDef(Shape):
    """A function a request offers the model (both protocols name it the same way)."""

    name: str = Field(pattern=r"^[A-Za-z0-9_.-]{1,64}$")
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class ToolDef(Shape):
    """An entry of a request's ``tools``: ``{"type": "function", "function": {...}}``."""

    type: str = "function"
    function: FunctionDef

    def tool(self) -> Tool:
        """Our :class:`~llava_local.types.Tool` (a function without parameters takes an
        empty object)."""
        function = self.function
        if function.parameters is None:
            return Tool(name=function.name, description=function.description)
        return Tool(
            name=function.name, description=function.description, parameters=function.parameters
        )

    @classmethod
    def of(cls, tool: Tool) -> ToolDef:
        return cls(
            function=FunctionDef(
                name=tool.name, description=tool.description, parameters=tool.parameters
            )
        )
