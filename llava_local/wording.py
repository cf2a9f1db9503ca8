"""Counted nouns in messages: "1 picture", "3 pictures", never "1 pictures".

Every message that says how many of something goes through :func:`count`, once,
instead of an ``'s' if n != 1`` of its own (``tests/core/test_wording.py`` looks for
counts written any other way in the command line and the jobs behind it).
"""

from __future__ import annotations

#: Plurals that are not the word plus "s": the verbs that agree with a count.
_IRREGULAR = {
    "was": "were",
    "is": "are",
    "has": "have",
    "does": "do",
    "needs": "need",
    "takes": "take",
    "it": "them",
}


def plural(n: int, noun: str) -> str:
    """``noun`` (or a verb in the third person, or "it") as it goes with ``n``: as given
    for exactly one, else its plural (``plural(2, "needs") == "need"``)."""
    if n == 1:
        return noun
    return _IRREGULAR.get(noun, noun + "s")


def count(n: int, noun: str) -> str:
    """``n`` and the noun that goes with it: ``count(1, "picture") == "1 picture"``."""
    return f"{n} {plural(n, noun)}"
