"""What the protocol modules share: the base of their shapes, and counters read leniently."""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, ValidationError, ValidatorFunctionWrapHandler
from pydantic.functional_validators import WrapValidator

__all__ = ["Count", "Number", "Shape"]


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
