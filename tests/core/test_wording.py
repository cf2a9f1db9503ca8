"""Counted nouns in messages: one helper says "1 picture" and "2 pictures", and the
command line and its jobs say counts through it."""

from __future__ import annotations

import ast
import itertools
import re

import pytest

from llava_local.wording import count, plural

from ..paths import PACKAGE

#: Nouns the command line counts; a formatted value right before one is a count.
NOUNS = (
    "pictures|answers|prompts|turns|workers|CPUs|models|errors|files|lines|tokens|bytes"
    "|positions|threads|cores|pairs|states|requests|conversations|times|labels"
)
_COUNTED = re.compile(rf"^ ({NOUNS})\b")
#: Formatted values followed by such a word that are not counts, and why.
NOT_COUNTS = {
    "_images.MAX_FILE_BYTES": "a constant of 256 MiB",
    "status.version": "'answers' is the verb: Ollama 0.5 answers at ...",
    "url": "'answers' is the verb",
    "kind": "a kind of label: 'colour labels include ...'",
}


@pytest.mark.parametrize(
    ("n", "noun", "said"),
    [
        (0, "picture", "0 pictures"),
        (1, "picture", "1 picture"),
        (2, "picture", "2 pictures"),
        (1, "CPU", "1 CPU"),
        (4, "CPU", "4 CPUs"),
        (3, "error line", "3 error lines"),
    ],
)
def test_count_uses_the_singular_for_one_only(n: int, noun: str, said: str) -> None:
    """count() says the singular for exactly one and the plural otherwise, zero included."""
    assert count(n, noun) == said


def test_verbs_and_pronouns_agree_with_the_count() -> None:
    """plural() turns a third-person verb or "it" to agree with a count."""
    assert [plural(1, w) for w in ("needs", "does", "it")] == ["needs", "does", "it"]
    assert [plural(2, w) for w in ("needs", "does", "it")] == ["need", "do", "them"]


def _counted_without_the_helper() -> list[str]:
    found = []
    for path in sorted(PACKAGE.rglob("*.py")):
        where = path.relative_to(PACKAGE).as_posix()
        # apps/serve/ is the HTTP server's: its messages go to clients, not the terminal
        if not where.startswith(("cli/", "apps/")) or where.startswith("apps/serve/"):
            continue
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if not isinstance(node, ast.JoinedStr):
                continue
            parts = node.values
            for value, text in itertools.pairwise(parts):
                if (
                    isinstance(value, ast.FormattedValue)
                    and isinstance(text, ast.Constant)
                    and _COUNTED.match(str(text.value))
                    and ast.unparse(value.value) not in NOT_COUNTS
                ):
                    found.append(f"{where}:{node.lineno}: {ast.unparse(node)[:90]}")
            for text in parts:
                if isinstance(text, ast.Constant) and re.search(r"\w\(s\)", str(text.value)):
                    found.append(f"{where}:{node.lineno}: (s) in {text.value!r}")
    return found


def test_the_command_line_counts_through_the_helper() -> None:
    """No message of the command line or its jobs writes a count before a plural noun
    itself ("1 pictures") or hedges with "(s)": counts go through wording.count."""
    assert _counted_without_the_helper() == []
