"""What a caption run is asked (:class:`CaptionJob`, the same for the one-machine and
the Ray run) and what it did (:class:`CaptionSummary`)."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, ValidationError

from ... import structured
from ...errors import InvalidRequestError
from ...structured import Schema
from ...types import Options
from ...wording import count


class CaptionJob(BaseModel):
    """The settings of a caption run, checked once before the output is touched.

    ``prompts``: each asked about every picture, a line each (a prompt given twice is
    asked once). ``schema``: what every answer must fit. ``limit``: pictures asked about
    in this run (skipped and copied ones do not count). ``retry_errors``: ask again
    about pictures whose line is an error. ``options``: generation options.
    ``parallel``: turns at once (None: the engine's slots when it has several, else 1).
    """

    model_config = ConfigDict(frozen=True, arbitrary_types_allowed=True, populate_by_name=True)

    prompts: tuple[str, ...]
    schema_: Schema | None = Field(default=None, alias="schema")
    limit: Annotated[int, Field(ge=0)] | None = None
    recursive: bool = False
    retry_errors: bool = False
    max_failures_in_a_row: Annotated[int, Field(ge=1)] = 5
    options: dict[str, Any] = Field(default_factory=dict)
    parallel: Annotated[int, Field(ge=1)] | None = None

    @classmethod
    def of(
        cls,
        prompt: str | Sequence[str],
        *,
        schema: Schema | None = None,
        limit: int | None = None,
        recursive: bool = False,
        retry_errors: bool = False,
        max_failures_in_a_row: int = 5,
        parallel: int | None = None,
        options: dict[str, Any] | None = None,
    ) -> CaptionJob:
        """The job, or an :class:`InvalidRequestError` saying what is wrong with it
        (before the output file is touched, not once per picture)."""
        prompts = _prompt_list(prompt)
        if limit is not None and (not _whole(limit) or limit < 0):
            raise InvalidRequestError(f"limit must be a non-negative integer, not {limit!r}")
        if max_failures_in_a_row < 1:
            raise InvalidRequestError("max_failures_in_a_row must be at least 1")
        if parallel is not None and (not _whole(parallel) or parallel < 1):
            raise InvalidRequestError(f"parallel must be a positive integer, not {parallel!r}")
        if schema is not None:
            structured.json_schema(schema)
        options = dict(options or {})
        try:
            Options(**options)
        except ValidationError as exc:
            names = ", ".join(str(e["loc"][0]) for e in exc.errors() if e["loc"])
            raise InvalidRequestError(f"invalid generation options: {names}") from None
        return cls(
            prompts=prompts,
            schema=schema,
            limit=limit,
            recursive=recursive,
            retry_errors=retry_errors,
            max_failures_in_a_row=max_failures_in_a_row,
            options=options,
            parallel=parallel,
        )

    @property
    def unit(self) -> str:
        """What the progress bar counts: pictures, or answers with several prompts."""
        return "picture" if len(self.prompts) == 1 else "answer"

    def summary(self, out: Path, pictures: int, repaired_bytes: int) -> CaptionSummary:
        """An empty summary of this job over ``pictures`` pictures."""
        summary = CaptionSummary(
            out=out, found=pictures * len(self.prompts), repaired_bytes=repaired_bytes
        )
        summary._prompts = len(self.prompts)
        return summary


def _whole(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _prompt_list(prompt: str | Sequence[str]) -> tuple[str, ...]:
    given = [prompt] if isinstance(prompt, str) else prompt
    if not isinstance(given, Sequence) or not given:
        raise InvalidRequestError("give a prompt, or a list of prompts")
    for one in given:
        if not isinstance(one, str) or not one.strip():
            raise InvalidRequestError("each prompt must be a non-empty string")
    return tuple(dict.fromkeys(given))  # a prompt given twice is asked once


def read_prompts(path: str | os.PathLike[str]) -> list[str]:
    """The prompts in a text file, one a line (``--prompts FILE``); blank lines are left
    out. A prompt that spans lines cannot be given this way: pass a list to
    :func:`~llava_local.apps.captioning.caption`."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else exc
        raise InvalidRequestError(f"cannot read prompts from {path}: {reason}") from None
    prompts = [line.strip() for line in text.splitlines() if line.strip()]
    if not prompts:
        raise InvalidRequestError(f"{path} holds no prompt; write one prompt a line")
    return prompts


class CaptionSummary(BaseModel):
    """What a caption run did, counted in lines: pictures times prompts (with one
    prompt, pictures). ``found - done - skipped - failed`` were not reached (``limit``).

    ``skipped``: lines the file already had (``skipped_errors`` of them an error line,
    about ``skipped_error_pictures`` files). ``copied``: lines written for a file whose
    picture (the same bytes) was answered under another name, in this run or an earlier
    one, and not asked about again; they are counted in ``done`` or ``failed`` too.
    ``retried``: lines that were an error and were written again; they are counted in
    ``done`` or ``failed`` too.
    """

    out: Path
    found: int
    done: int = 0
    skipped: int = 0
    failed: int = 0
    copied: int = 0
    retried: int = 0
    skipped_errors: int = 0
    skipped_error_pictures: int = 0
    elapsed_s: float = 0.0
    repaired_bytes: int = 0
    #: prompts per picture, for the text (the counts above already include them)
    _prompts: int = PrivateAttr(default=1)

    def __str__(self) -> str:
        errors = f" ({self.skipped_errors} of them errors)" if self.skipped_errors else ""
        found = count(self.found, "picture")
        if self._prompts > 1:
            pictures = count(self.found // self._prompts, "picture")
            found = f"{count(self.found, 'answer')} ({pictures} x {count(self._prompts, 'prompt')})"
        text = (
            f"{self.done} captioned, {self.skipped} already recorded{errors}, "
            f"{self.failed} failed of {found} in {self.elapsed_s:.1f} s -> {self.out}"
        )
        if self.copied:
            text += f"; {self.copied} copied from the same picture under another name"
        if self.retried:
            text += f"; {self.retried} retried after an earlier error"
        if self.repaired_bytes:
            text += f" (cut a torn last line of {count(self.repaired_bytes, 'byte')})"
        return text
