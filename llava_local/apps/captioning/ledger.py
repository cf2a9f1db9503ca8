"""The output's side of a run: which picture and prompt to leave alone, each line written
and counted, and when to stop. The one-machine run and the Ray driver share it, so both
skip, copy, count and stop alike.

Stopping: what fails for every picture alike (a line marked ``"retry": true``: the
engine cannot be reached or timed out, the model is gone, cannot see pictures or cannot
load, the turn was cancelled) stops the run once its line is written, and so do
``max_failures_in_a_row`` engine failures in a row (unreadable pictures do not count);
their lines are the pictures' own. The error is raised; a re-run continues."""

from __future__ import annotations

from typing import Literal

from ...errors import BackendError, ImageError
from ...progress import RunProgress
from ...wording import count
from .asking import Answer
from .job import CaptionJob, CaptionSummary
from .lines import Identity, Pair, key, settled
from .output import Output

#: What a file needs for a picture and prompt: nothing ("again": this run wrote its line;
#: "skip": the file already has it), a copy of the line the same picture has under
#: another name ("copy"), or the model's answer ("ask").
Plan = Literal["again", "skip", "copy", "ask"]


class Ledger:
    """Plans, writes and counts the lines of one run (see the module docstring)."""

    def __init__(self, output: Output, summary: CaptionSummary, job: CaptionJob) -> None:
        self.output = output
        self.summary = summary
        self.prompts = len(job.prompts)
        self.limit = job.limit
        self.retry_errors = job.retry_errors
        self.max_failures_in_a_row = job.max_failures_in_a_row
        self.failures_in_a_row = 0
        self.bar: RunProgress | None = None  # set once the bar is drawn
        self.asked: set[Pair] = set()  # answered in this run: a copy reuses the answer
        self.written: set[tuple[Identity, str, str]] = set()  # lines of this run
        self.error_files: set[str] = set()  # files whose earlier error line was kept

    def to_ask(self) -> int:
        """How many lines this run still expects the model to answer, as far as it knows."""
        left = self.summary.found - self.summary.skipped - self.summary.copied
        return left if self.limit is None else min(self.limit * self.prompts, left)

    def plan(self, identity: Identity, prompt: str, path: str) -> Plan:
        """What the file ``path`` needs for this picture and prompt (see ``Plan``): every
        file gets its line, and a picture is asked about once whatever its names."""
        if (identity, prompt, path) in self.written:
            return "again"
        if settled(self.output.own(identity, prompt, path), self.retry_errors):
            return "skip"
        earlier = self.output.earlier(identity, prompt)
        if (identity, prompt) in self.asked or settled(earlier, self.retry_errors):
            return "copy"
        return "ask"

    def skip(self, identity: Identity, prompt: str, path: str) -> None:
        """Count a line the file already has."""
        self.summary.skipped += 1
        if self.output.own(identity, prompt, path) != "done":
            self.summary.skipped_errors += 1
            self.error_files.add(path)
            self.summary.skipped_error_pictures = len(self.error_files)
        if self.bar is not None:
            self.bar.set_total(self.to_ask())

    def copy(self, identity: Identity, prompt: str, path: str) -> None:
        """Write the file's line as a copy of the same picture's line under another name:
        the answer, or the error, is the picture's, so the model is not asked again."""
        record = self.output.answer(identity, prompt)
        source = str(record.get("copy_of") or record["path"])
        line = {**record, "path": path, "elapsed_s": 0.0, "copy_of": source}
        line.pop("retry", None)  # never copied: a run stops on such a line
        if "error" in line:  # the error names the file it is about
            line["error"] = str(line["error"]).replace(str(record["path"]), path)
        self.write(Answer(line, 0.0), copied=True)

    def write(self, answer: Answer, *, copied: bool = False) -> None:
        """Append the line, count it; raise when the run should stop rather than go on
        failing (after the line is written)."""
        record = answer.record
        identity, prompt = key(record)
        assert prompt is not None
        path = str(record["path"])
        self.summary.retried += self.output.own(identity, prompt, path) is not None
        self.output.append(record)
        self.written.add((identity, prompt, path))
        self.asked.add((identity, prompt))
        self.summary.copied += copied
        failed = "error" in record
        self.summary.done += not failed
        self.summary.failed += failed
        if copied:  # no answer of the model's: not in the bar's count, nor in a row
            if self.bar is not None:
                self.bar.set_total(self.to_ask())
            return
        if not failed:
            self.failures_in_a_row = 0
            if self.bar is not None:
                self.bar.answered(answer.seconds)
            return
        if self.bar is not None:
            self.bar.failed()
            self.bar.describe(f"captioning ({self.summary.failed} failed)")
        if record.get("retry"):
            raise answer.error or BackendError(
                f"stopped: {record['error']} (on {record['path']}); the results so far are "
                f"in {self.output.path}"
            )
        if record.get("error_type") == ImageError.__name__:
            return
        self.failures_in_a_row += 1
        if self.failures_in_a_row >= self.max_failures_in_a_row:
            raise BackendError(
                f"stopped: the last {count(self.failures_in_a_row, 'picture')} all failed in "
                f"the engine (the last with {record['error']}); the results so far are in "
                f"{self.output.path}"
            ) from answer.error
