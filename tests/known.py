"""``known(x)``: a figure the engine under test always reports (llama.cpp, Ollama)."""

from __future__ import annotations

from typing import TypeVar

T = TypeVar("T")


def known(value: T | None) -> T:
    """``value``, failing the test when the engine left it unknown (None)."""
    assert value is not None, "the engine reported no figure here"
    return value
