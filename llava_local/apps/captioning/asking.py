"""Asking the engine about one picture and prompt, and the line that says how it went:
the answer (with a schema, an answer that does not fit is asked once more), or the
error. The one-machine run and each Ray worker ask the same way, so their lines are the
same."""

from __future__ import annotations

import contextlib
import json
import time
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel

from ... import structured
from ...chat import ReplyStream, VisionChat
from ...errors import LlavaLocalError, SchemaError
from ...structured import Schema
from ...types import Reply
from .lines import PER_PICTURE
from .prefetch import Item

#: Watches a turn while it runs (a pool registers it, to cancel it when the run stops).
Watch = Callable[[ReplyStream], AbstractContextManager[None]]


@dataclass(frozen=True)
class Answer:
    """One picture and prompt's line, and what the engine raised when it is an error
    (None where only the line travelled, from a Ray worker)."""

    record: dict[str, Any]
    seconds: float
    error: LlavaLocalError | None = None


def _unwatched(stream: ReplyStream) -> AbstractContextManager[None]:
    return contextlib.nullcontext()


class Asker:
    """Asks ``chat`` and makes the lines (not written anywhere: that is the run's job)."""

    def __init__(
        self,
        chat: VisionChat,
        *,
        schema: Schema | None,
        options: dict[str, Any],
        watch: Watch = _unwatched,
    ) -> None:
        self.chat = chat
        self.schema = schema
        self.options = options
        self.watch = watch

    def answer(self, item: Item, prompt: str) -> Answer:
        """Ask ``prompt`` about ``item`` in a fresh conversation; its line either way."""
        started = time.monotonic()
        try:
            reply, attempts = self._ask(item, prompt)
        except LlavaLocalError as exc:
            elapsed = time.monotonic() - started
            return Answer(self._failure(item, prompt, exc, elapsed), elapsed, exc)
        elapsed = time.monotonic() - started
        return Answer(self._success(item, prompt, reply, attempts, elapsed), elapsed)

    def _ask(self, item: Item, prompt: str) -> tuple[Reply, int]:
        """The reply, in a fresh conversation; a misfit answer is asked once more, with
        the schema spelt out in the prompt: a different prompt is what changes a greedy
        (temperature 0) answer, where asking the same again would repeat it.

        Every conversation begins with the picture, so the in-process engine's KV cache
        keeps it from one prompt (or attempt) to the next and reads only the new text."""
        if item.error is not None:
            raise item.error
        asked = [prompt] if self.schema is None else [prompt, self._firmer(prompt)]
        for attempt, text in enumerate(asked, 1):
            self.chat.reset()
            try:
                return self._reply(text, item), attempt
            except SchemaError:
                if attempt == len(asked):
                    raise
        raise AssertionError("unreachable")  # pragma: no cover

    def _reply(self, prompt: str, item: Item) -> Reply:
        stream = self.chat.stream(prompt, image=item.image, schema=self.schema, **self.options)
        with self.watch(stream), stream:
            for _ in stream:
                pass
        reply = stream.reply
        if self.schema is not None and reply.done_reason == "length" and reply.parsed is None:
            # The chat keeps an answer cut short (parsed None); a line needs the object.
            raise SchemaError(
                "the answer was cut at max_tokens before its JSON ended; raise --max-tokens",
                reply.text,
            )
        return reply

    def _firmer(self, prompt: str) -> str:
        assert self.schema is not None
        spelt = json.dumps(structured.json_schema(self.schema), separators=(",", ":"))
        return (
            f"{prompt}\n\nAnswer with one JSON object and nothing else. "
            f"It must follow this JSON schema: {spelt}"
        )

    def _success(
        self, item: Item, prompt: str, reply: Reply, attempts: int, elapsed: float
    ) -> dict[str, Any]:
        record: dict[str, Any] = {"path": str(item.path), "sha256": item.sha256}
        record |= {"prompt": prompt, "text": reply.text}
        if self.schema is not None:
            parsed = reply.parsed
            record["parsed"] = (
                parsed.model_dump(mode="json") if isinstance(parsed, BaseModel) else parsed
            )
        image = item.image
        assert image is not None
        return record | {
            "model": reply.model,
            "backend": reply.backend,
            "done_reason": reply.done_reason,
            "stats": reply.stats.model_dump(),
            "attempts": attempts,
            "elapsed_s": round(elapsed, 3),
            "image": {"width": image.width, "height": image.height, "changes": image.changes},
        }

    def _failure(
        self, item: Item, prompt: str, exc: LlavaLocalError, elapsed: float
    ) -> dict[str, Any]:
        message = " ".join(f"{type(exc).__name__}: {exc}".split())
        record: dict[str, Any] = {"path": str(item.path), "sha256": item.sha256}
        record |= {"prompt": prompt, "error": message, "error_type": type(exc).__name__}
        if isinstance(exc, SchemaError):
            record["rejected_text"] = exc.text
        record |= {"model": self.chat.model, "backend": self.chat.backend}
        record["elapsed_s"] = round(elapsed, 3)
        if not isinstance(exc, PER_PICTURE):  # it says nothing about the picture:
            record["retry"] = True  # the next run asks again
        return record
