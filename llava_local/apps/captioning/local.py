"""The one-machine run: :func:`caption` asks about every picture of a folder and appends
a line per picture and prompt to an output (JSON Lines, or Parquet) that survives
crashes and resumes.

Pictures are prepared a few ahead (:mod:`.prefetch`) and asked about by a pool of chats
on the one engine (:mod:`.pool`): ``parallel`` turns at once, one picture's prompts
together where there are several (one read of the picture, then its answers side by
side), the next picture's as threads come free. The run's thread alone writes the lines,
as each answer finishes. The progress bar's rate and ETA count the answers of the model
over the time the run spent getting them: failed and skipped pictures move the count,
not the rate.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator, Sequence
from typing import Any

from ...chat import VisionChat
from ...picture_files import find_pictures
from ...progress import RunProgress
from ...structured import Schema
from .asking import Answer
from .job import CaptionJob, CaptionSummary
from .ledger import Ledger
from .output import Format, open_output, settled_all
from .pool import Pool, pool_size
from .prefetch import Item, Prefetch


def caption(
    chat: VisionChat,
    inputs: str | os.PathLike[str] | Sequence[str | os.PathLike[str]],
    out: str | os.PathLike[str],
    *,
    prompt: str | Sequence[str],
    schema: Schema | None = None,
    limit: int | None = None,
    recursive: bool = False,
    progress: bool = True,
    max_failures_in_a_row: int = 5,
    retry_errors: bool = False,
    parallel: int | None = None,
    format: Format = "jsonl",
    **options: Any,
) -> CaptionSummary:
    """Ask ``prompt`` about every picture of ``inputs`` and append the answers to ``out``.

    ``inputs`` is a directory, a glob pattern, a picture, or a list of these (see
    :func:`~llava_local.picture_files.find_pictures`). ``prompt`` is one prompt or a
    list of them (each picture is read once and asked every prompt, one line each).
    ``limit`` bounds the pictures asked about in this run, done or failed (skipped and
    copied ones do not count), so a big folder can be done in chunks. A picture that
    already has a line for a prompt in ``out`` is not asked that prompt again, an error
    line included, unless ``retry_errors`` asks again about those whose newest line is
    an error. ``parallel``: turns at once, each on its own chat over ``chat``'s engine
    (default: the engine's slots when it has several, else 1; the llama.cpp engine must
    hold that many: ``parallel=`` when it is opened). ``format``: ``"jsonl"`` (``out``
    is a file) or ``"parquet"`` (``out`` is a folder of part files). ``options`` are
    generation options (``temperature=0``...). See :mod:`llava_local.apps.captioning`
    for the line format and what resuming, failures and Ctrl-C do.
    """
    job = CaptionJob.of(
        prompt,
        schema=schema,
        limit=limit,
        recursive=recursive,
        retry_errors=retry_errors,
        max_failures_in_a_row=max_failures_in_a_row,
        parallel=parallel,
        options=options,
    )
    size = pool_size(chat, job.parallel)
    started = time.monotonic()
    pictures = find_pictures(inputs, recursive=job.recursive)
    with open_output(out, format) as output:
        summary = job.summary(output.path, len(pictures), output.repaired_bytes)
        ledger = Ledger(output, summary, job)
        settled = settled_all(output.settled(job.prompts, job.retry_errors), job.prompts)
        try:
            with (
                Pool(chat, size, schema=job.schema_, options=job.options) as pool,
                Prefetch(pictures, settled, chat.max_image_side, ahead=size + 2) as items,
                RunProgress(
                    "captioning", total=ledger.to_ask(), unit=job.unit, enabled=progress
                ) as bar,
            ):
                ledger.bar = bar
                _Run(pool, ledger, job).process(items)
        finally:
            chat.reset()
            summary.elapsed_s = time.monotonic() - started
    return summary


class _Run:
    """The loop over the pictures: each picture's prompts handed to the pool, each line
    written as its answer comes back."""

    def __init__(self, pool: Pool, ledger: Ledger, job: CaptionJob) -> None:
        self.pool = pool
        self.ledger = ledger
        self.prompts = job.prompts
        self.limit = job.limit
        self.pictures = 0  # asked about in this run, for the limit
        self.clock = time.monotonic()

    def process(self, items: Iterator[Item]) -> None:
        ledger, pool = self.ledger, self.pool
        for item in items:
            while pool.asking(item.identity):  # a copy of a picture being asked about:
                self._write(pool.take())  # its line is copied once the answer is in
            path = str(item.path)
            plans = [(prompt, ledger.plan(item.identity, prompt, path)) for prompt in self.prompts]
            asks = any(plan == "ask" for _, plan in plans)
            if asks and self.limit is not None and self.pictures >= self.limit:
                break
            self.pictures += asks
            for prompt, plan in plans:
                if plan == "ask":
                    while not pool.free:
                        self._write(pool.take())
                    pool.submit(item, prompt)
                elif plan == "copy":  # after the answers asked before it, as one at a time
                    for done in pool.drain():
                        self._write(done)
                    ledger.copy(item.identity, prompt, path)
                elif plan == "skip":
                    ledger.skip(item.identity, prompt, path)
        for done in pool.drain():
            self._write(done)

    def _write(self, done: tuple[Item, str, Answer]) -> None:
        """Write an answer's line; the bar is given the time since the last answer (the
        whole pool's rate, as turns overlap)."""
        answer = done[2]
        now = time.monotonic()
        seconds, self.clock = now - self.clock, now
        if self.pool.size > 1:
            answer = Answer(answer.record, seconds, answer.error)
        self.ledger.write(answer)
