"""What a turn sends when the conversation outgrows the context (``on_overflow``).

"error" sends it whole (the engine then refuses with ContextOverflowError);
"drop_oldest" leaves out the oldest turns, the pictures still talked about moved
forward; "truncate" (Ollama's behaviour, for its routes) also cuts the start of a
message too long on its own and keeps a quarter of the context for the answer.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Literal

from .backends import Backend, Turn
from .types import Message

#: What a turn does when the conversation outgrows the context (VisionChat's on_overflow).
OnOverflow = Literal["error", "drop_oldest", "truncate"]


def fit(
    backend: Backend,
    system: list[Message],
    history: list[Message],
    message: Message,
    *,
    turn_of: Callable[[list[Message]], Turn],
    overflow: OnOverflow,
) -> tuple[Turn, int]:
    """The turn (made by ``turn_of``) to send for ``message`` after ``system`` and
    ``history``, and how many turns were left out to make it fit."""
    max_tokens = turn_of([message]).options.max_tokens  # the same options every time
    dropped = 0
    room = None  # tokens left for the answer once trimming started ("truncate")
    while True:
        turn = turn_of([*system, *history, message])
        if overflow == "error" or (not history and overflow == "drop_oldest"):
            return turn, dropped
        need = backend.context_needed(turn)
        if need is None:
            return turn, dropped
        if overflow == "truncate" and room is None and need[0] > need[1]:
            room = max_tokens or max(1, need[1] // 4)
        needed = need[0] if room is None else need[0] - (max_tokens or 1) + room
        if needed <= need[1]:
            return turn, dropped
        if not history:
            return cut(backend, turn, need[1] - room if room else need[1]), dropped
        history, message = drop_oldest_turn(history, message)
        dropped += 1


def cut(backend: Backend, turn: Turn, budget: int) -> Turn:
    """``turn`` with the start of its last message's text cut until its prompt is
    at most ``budget`` tokens (Ollama keeps the end of a prompt too long for the
    context); unchanged when even no text would fit (the pictures alone)."""
    *before, last = turn.messages

    def shortened(k: int) -> Turn:
        shorter = last.model_copy(update={"content": last.content[k:]})
        return dataclasses.replace(turn, messages=[*before, shorter])

    def fits(k: int) -> bool:
        need = backend.context_needed(shortened(k))
        one = turn.options.max_tokens or 1
        return need is None or need[0] - one <= budget

    low, high = 1, len(last.content)
    if high == 0 or not fits(high):
        return turn
    while low < high:  # the fewest characters to cut
        middle = (low + high) // 2
        if fits(middle):
            high = middle
        else:
            low = middle + 1
    return shortened(low)


def drop_oldest_turn(history: list[Message], message: Message) -> tuple[list[Message], Message]:
    """History without its oldest question and answer.

    Pictures of the dropped question travel to the oldest remaining question when no
    later message brings pictures of its own: the conversation is still about them.
    """
    dropped, rest = history[:2], history[2:]
    pictures = tuple(p for m in dropped for p in m.images)
    if not pictures or any(m.images for m in [*rest, message]):
        return rest, message
    for i, m in enumerate(rest):
        if m.role == "user":
            rest[i] = m.model_copy(update={"images": pictures})
            return rest, message
    return rest, message.model_copy(update={"images": pictures})
