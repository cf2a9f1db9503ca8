"""The progress bar of long runs (captioning a folder, evaluating a labelled set).

One look for both: count, pictures per second (or seconds per picture, which reads
better on a CPU), elapsed time and ETA, on stderr so that stdout stays clean for
``--json`` and pipes.
"""

from __future__ import annotations

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    ProgressColumn,
    Task,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.text import Text


class RateColumn(ProgressColumn):
    """Pictures per second, or seconds per picture when that reads better (CPUs)."""

    def render(self, task: Task) -> Text:
        speed = task.finished_speed or task.speed
        if not speed:
            return Text("-- s/pic", style="progress.data.speed")
        text = f"{speed:.2f} pic/s" if speed >= 1 else f"{1 / speed:.1f} s/pic"
        return Text(text, style="progress.data.speed")


def picture_progress(*, enabled: bool) -> Progress:
    """A progress bar over pictures; ``enabled=False`` draws nothing (``--quiet``, pipes)."""
    return Progress(
        TextColumn("[progress.description]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        RateColumn(),
        TimeElapsedColumn(),
        TextColumn("ETA"),
        TimeRemainingColumn(),
        console=Console(stderr=True),
        disable=not enabled,
        speed_estimate_period=3600,  # one picture may take a minute on a CPU
    )
