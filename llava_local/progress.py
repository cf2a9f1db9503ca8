"""Progress bars: long runs (captioning a folder, evaluating a labelled set) and
downloads (pulling a model through Ollama).

One look for both: the count of what is counted (pictures, answers), its rate, elapsed
time and ETA, on stderr so that stdout stays clean for ``--json`` and pipes.

The rate and the ETA come from the items the model actually answered and the seconds
the caller measured for them, not from rich's clock over every step: a broken file is
done in a millisecond, and counting it would show "1766 pictures/s, ETA 0:00:01" after
two of them. Items that failed or were skipped move the count, never the rate.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import timedelta
from types import TracebackType
from typing import Protocol, TypeVar

from rich.console import Console
from rich.progress import (
    BarColumn,
    DownloadColumn,
    Progress,
    ProgressColumn,
    Task,
    TaskID,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
    TransferSpeedColumn,
)
from rich.table import Column
from rich.text import Text

from .wording import plural

__all__ = ["DownloadProgress", "RunProgress"]

_P = TypeVar("_P", bound="RunProgress")


class _PullUpdate(Protocol):
    """One progress line of a pull (``ollama.ProgressResponse`` has these)."""

    status: str | None
    digest: str | None
    total: int | None
    completed: int | None


class _Figure(ProgressColumn):
    """A column that shows what a function of the run says."""

    def __init__(self, text: Callable[[], str], style: str) -> None:
        super().__init__(table_column=Column(no_wrap=True))
        self._text = text
        self._style = style

    def render(self, task: Task) -> Text:
        return Text(self._text(), style=self._style)


class RunProgress:
    """A progress bar over ``total`` items of ``unit`` (``"picture"``, ``"answer"``).

    Tell it how each item ended: :meth:`answered` with the seconds the answer took,
    :meth:`failed`, or :meth:`skip` (an item that leaves the run, so ``total`` shrinks).
    :attr:`rate` and :attr:`eta_s` count answered items only. ``enabled=False`` draws
    nothing (``--no-progress``, pipes) but keeps the figures.
    """

    def __init__(self, description: str, *, total: int, unit: str, enabled: bool) -> None:
        self.unit = unit
        self.total = total
        self.answered_count = 0
        self.failed_count = 0
        self.answer_s = 0.0
        self._progress = Progress(
            # a long description (a set's path) is cut, so the figures always show
            TextColumn(
                "{task.description}",
                style="progress.description",
                markup=False,
                table_column=Column(max_width=30, overflow="ellipsis", no_wrap=True),
            ),
            BarColumn(bar_width=20),
            _Figure(self.count_text, "progress.download"),
            _Figure(self.rate_text, "progress.data.speed"),
            TimeElapsedColumn(),
            _Figure(self.eta_text, "progress.remaining"),
            console=Console(stderr=True),
            disable=not enabled,
        )
        self._task = self._progress.add_task(description, total=total)

    def __enter__(self: _P) -> _P:
        self._progress.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._progress.stop()

    # --- what happened -----------------------------------------------------------------

    def answered(self, seconds: float) -> None:
        """One item answered by the model in ``seconds``."""
        self.answered_count += 1
        self.answer_s += max(seconds, 0.0)
        self._progress.update(self._task, advance=1)

    def failed(self) -> None:
        """One item done without an answer: counted, but not in the rate."""
        self.failed_count += 1
        self._progress.update(self._task, advance=1)

    def skip(self) -> None:
        """One item that will not be asked about after all: the total shrinks."""
        self.set_total(self.total - 1)

    def set_total(self, total: int) -> None:
        self.total = max(total, self.completed)
        self._progress.update(self._task, total=self.total)

    def describe(self, description: str) -> None:
        self._progress.update(self._task, description=description)

    # --- the figures shown -------------------------------------------------------------

    @property
    def completed(self) -> int:
        return self.answered_count + self.failed_count

    @property
    def rate(self) -> float | None:
        """Answers per second of answering, or None before the first timed answer."""
        if not self.answered_count or self.answer_s <= 0:
            return None
        return self.answered_count / self.answer_s

    @property
    def eta_s(self) -> float | None:
        """Seconds until the rest is answered at :attr:`rate`, or None while unknown."""
        left = self.total - self.completed
        if left <= 0:
            return 0.0
        rate = self.rate
        return None if rate is None else left / rate

    def count_text(self) -> str:
        return f"{self.completed}/{self.total} {plural(self.total, self.unit)}"

    def rate_text(self) -> str:
        rate = self.rate
        if rate is None:
            return f"-- s/{self.unit}"
        return f"{rate:.2f} {self.unit}s/s" if rate >= 1 else f"{1 / rate:.1f} s/{self.unit}"

    def eta_text(self) -> str:
        eta = self.eta_s
        return "ETA -:--:--" if eta is None else f"ETA {timedelta(seconds=round(eta))}"


class DownloadProgress:
    """A pull's progress on stderr: one bar per blob, status lines as they come.

    Call it with each update of ``ollama.Client.pull`` (anything with ``status``,
    ``digest``, ``total`` and ``completed``), as ``pull_model(on_update=...)`` does.
    """

    def __init__(self, model: str, *, enabled: bool = True) -> None:
        self.model = model
        self._bars: dict[str, TaskID] = {}
        self._progress = Progress(
            TextColumn("{task.description}", markup=False),
            BarColumn(),
            DownloadColumn(),
            TransferSpeedColumn(),
            TimeRemainingColumn(),
            console=Console(stderr=True),
            disable=not enabled,
        )

    def __enter__(self) -> DownloadProgress:
        self._progress.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._progress.stop()

    def __call__(self, update: _PullUpdate) -> None:
        if update.digest and update.total:
            if update.digest not in self._bars:
                label = update.status or update.digest
                self._bars[update.digest] = self._progress.add_task(label, total=update.total)
            self._progress.update(self._bars[update.digest], completed=update.completed or 0)
        elif update.status and not self._progress.disable:
            line = f"{self.model}: {update.status}"
            self._progress.console.print(line, markup=False, highlight=False)
