"""The generation options as keyword arguments, typed: ``chat.ask(q, **GREEDY)`` with
``GREEDY: OptionArgs`` lets mypy check each name against ``ask``'s own parameters
(a plain ``dict[str, int]`` would be matched against ``images=`` and ``schema=`` too)."""

from __future__ import annotations

from typing import TypedDict


class OptionArgs(TypedDict, total=False):
    """The fields of ``llava_local.types.Options`` (tests/core/test_public_api.py keeps
    them equal)."""

    temperature: float
    top_p: float
    top_k: int
    max_tokens: int
    seed: int
    stop: tuple[str, ...]
    repeat_penalty: float
    logprobs: int
