"""Caption a folder of pictures into an output that survives crashes and resumes: on one
machine (:func:`caption`) or on a Ray cluster (:func:`caption_ray`).

This is the job people most often write by hand, and the hand-written versions lose work:
a crash half-way leaves a torn last line that breaks every later reader, a re-run asks
the model again about pictures already done, and one unreadable file stops the whole run.
A run writes one line per picture and prompt, as JSON Lines (a file) or Parquet (a
folder of part files: :mod:`.parquet`)::

    {"path": "photos/cat.jpg", "sha256": "<of the file's bytes>", "prompt": "Describe it.",
     "text": "A cat ...",
     "parsed": {...},  # only with a schema
     "model": "llava:latest", "backend": "ollama", "done_reason": "stop",
     "stats": {...Stats fields...}, "attempts": 1, "elapsed_s": 12.3,
     "image": {"width": 672, "height": 504, "changes": ["rotated upright ..."]}}

or, where a picture failed, ``error`` (one line, starting with the error type) and
``error_type`` instead of ``text``; ``sha256`` is null when the file's bytes could not be
had (missing, unreadable, empty or over the size limit). A file whose bytes another file
of the run (or of an earlier run) has too gets that file's line under its own ``path``,
with ``"copy_of": "<that file>"`` and ``elapsed_s`` 0: the model is not asked twice about
one picture, and no file goes without its line.

Several prompts: ``prompt=["Describe it.", "Tag it.", "What text is in it?"]`` (CLI
``-p A -p B`` or ``--prompts FILE``, one a line: :func:`read_prompts`) asks every prompt
about each picture, one line per picture and prompt. The picture is read from disk and
prepared once, and each prompt is a fresh conversation that begins with the same
picture. With several turns at once (``parallel``, :mod:`.pool`), a picture's prompts are
asked together: the llama.cpp engine encodes and reads the picture once and copies its
positions to the other slots, then writes the answers side by side; one at a time, the
engine keeps the picture's prefix of its KV cache from one prompt to the next and reads
only the new prompt's tokens (``stats.cached_tokens`` shows it; the Ollama daemon keeps
its own cache). Counts (``found``, ``done``...) are then of pictures times prompts.

Resuming: a line is about one file, its picture and one prompt, and every file gets its
line. The picture is identified by the sha256 of its bytes, so a renamed or copied file
is not asked about again: its line is a copy of the line its picture already has under
the other name (in this run or an earlier one), with ``copy_of`` naming that file. Where
there are no bytes to hash (``sha256`` null), a picture is identified by its ``path`` as
written in the line (the path as given to the run, so spell it the same way to resume).
A file, picture and prompt that already have a line of any kind, an error included, are
skipped: a broken file is recorded once, not again on every run. ``retry_errors=True``
asks again about those whose line is an error. Two exceptions: a line marked ``"retry":
true`` records a failure of the run rather than of the picture (the engine could not be
reached or timed out, the model is gone, the turn was cancelled: what stops a run), and
is asked about again by the next run anyway; and a line without ``prompt`` (written by
an older version) stands for any prompt. The newest line of a file, picture and prompt
is the one that counts (a retry appends; nothing is rewritten); :func:`read_captions`
reads an output that way. An output that is not a caption output is refused, never
modified, and only one run at a time may write to it (an advisory lock, where the OS
has one).

Failures: an unreadable picture, an answer that does not fit the schema (after one
retry), a too-long turn or an engine error on one picture is recorded and the run goes
on; what fails for every picture alike stops it (:mod:`.ledger`). Ctrl-C stops the turns
running, writes nothing more, and leaves an output the next run continues.

Modules, one job each: :mod:`.job` (the settings, :class:`CaptionJob`, and the
summary), :mod:`.lines` (a line as resuming knows it), :mod:`.output` with
:mod:`.jsonl` and :mod:`.parquet` (the formats), :mod:`.ledger` (skip, copy, write,
count, stop), :mod:`.asking` (one picture and prompt asked, the schema retry),
:mod:`.prefetch` (pictures read ahead), :mod:`.pool` (turns at once), :mod:`.local`
(the one-machine run) and :mod:`.on_ray` (the Ray run).
"""

from __future__ import annotations

from ...images import PICTURE_EXTENSIONS
from ...picture_files import find_pictures
from .job import CaptionJob, CaptionSummary, read_prompts
from .local import caption
from .on_ray import MAX_WORKER_DEATHS, caption_ray, local_cpus_needed
from .output import read_captions

__all__ = [
    "MAX_WORKER_DEATHS",
    "PICTURE_EXTENSIONS",
    "CaptionJob",
    "CaptionSummary",
    "caption",
    "caption_ray",
    "find_pictures",
    "local_cpus_needed",
    "read_captions",
    "read_prompts",
]
