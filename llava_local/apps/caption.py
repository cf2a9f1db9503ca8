"""Caption a folder of pictures into a JSON Lines file that survives crashes and resumes.

This is the job people most often write by hand, and the hand-written versions lose work:
a crash half-way leaves a torn last line that breaks every later reader, a re-run asks
the model again about pictures already done, and one unreadable file stops the whole run.
:func:`caption` writes one JSON object per picture::

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
picture, so the in-process engine keeps that prefix of its KV cache and reads only the
new prompt's tokens (``stats.cached_tokens`` shows it; the Ollama daemon keeps its own
cache). Counts (``found``, ``done``...) are then of pictures times prompts.

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
reads a file that way.

Each line is written whole with one ``write``, flushed and fsynced; on start, a torn
last line left by a crash is cut off (a last line that is whole JSON and only lacks its
newline is kept). A file that is not a caption file is refused, never modified, and
only one run at a time may write to a file (an advisory lock, where the OS has one).

Failures: an unreadable picture, an answer that does not fit the schema (after one
retry), a too-long turn or an engine error on one picture is recorded and the run goes
on. What fails for every picture alike stops the run after its line (marked
``"retry": true``) is written: the engine cannot be reached or timed out (a dead or
stuck daemon), the model is gone, cannot see pictures or cannot load. So do
``max_failures_in_a_row`` engine failures in a row (unreadable pictures do not count);
their lines are the pictures' own. The error is raised; a re-run continues.

The progress bar's rate and ETA count the pictures the model answered, and the time
it took on them: failed and skipped pictures move the count, not the rate.

Pictures are read, hashed and prepared in a background thread a few pictures ahead, so
the model never waits on the disk; the thread is stopped and joined before
:func:`caption` returns or raises, Ctrl-C included.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import queue
import threading
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any, Literal, NamedTuple

from pydantic import BaseModel, PrivateAttr, ValidationError

from .. import images as _images
from .. import structured
from ..chat import VisionChat
from ..errors import (
    BackendError,
    ContextOverflowError,
    ImageError,
    InvalidRequestError,
    LlavaLocalError,
    SchemaError,
)
from ..images import PICTURE_EXTENSIONS
from ..picture_files import find_pictures
from ..progress import RunProgress
from ..structured import Schema
from ..types import Options, PreparedImage, Reply
from ..wording import count

try:  # POSIX; elsewhere two runs on one file are not prevented
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None  # type: ignore[assignment]

__all__ = [
    "PICTURE_EXTENSIONS",
    "CaptionSummary",
    "caption",
    "find_pictures",
    "read_captions",
    "read_prompts",
]

#: Pictures prepared ahead of the model: enough to hide disk and decoding time, few
#: enough to bound memory.
PREFETCH_AHEAD = 3
#: How every line this module writes begins; a torn line is recognised by it.
_LINE_START = b'{"path": '

#: Failures that belong to one picture; any other library error stops the run.
_PER_PICTURE = (ImageError, SchemaError, ContextOverflowError, BackendError)

#: A picture as resuming knows it: ``("sha256", hex digest)``, or ``("path", path)`` for
#: a file whose bytes could not be read.
_Identity = tuple[Literal["sha256", "path"], str]
#: One line's subject: a picture and a prompt.
_Pair = tuple[_Identity, str]
#: What the newest line of a picture and prompt says: answered; failed (kept unless
#: retry_errors); or the run failed on it (asked about again).
_Status = Literal["done", "failed", "retry"]


class CaptionSummary(BaseModel):
    """What a :func:`caption` run did, counted in lines: pictures times prompts (with one
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
    **options: Any,
) -> CaptionSummary:
    """Ask ``prompt`` about every picture of ``inputs`` and append the answers to ``out``.

    ``inputs`` is a directory, a glob pattern, a picture, or a list of these (see
    :func:`find_pictures`). ``prompt`` is one prompt or a list of them (each picture is
    read once and asked every prompt, one line each). ``limit`` bounds the pictures
    asked about in this run, done or failed (skipped and copied ones do not count), so a
    big folder can be done in chunks. A picture that already has a line for a prompt in ``out`` is
    not asked that prompt again, an error line included, unless ``retry_errors`` asks
    again about those whose newest line is an error. ``options`` are generation options
    (``temperature=0``...). See the module docstring for the line format and what
    resuming, failures and Ctrl-C do.
    """
    prompts = _check_call(prompt, schema, limit, max_failures_in_a_row, options)
    started = time.monotonic()
    pictures = find_pictures(inputs, recursive=recursive)
    with _Output(Path(out)) as output:
        summary = _summary(output, len(pictures), prompts)
        ledger = _Ledger(
            output,
            summary,
            prompts=len(prompts),
            limit=limit,
            retry_errors=retry_errors,
            max_failures_in_a_row=max_failures_in_a_row,
        )
        run = _Run(_Asker(chat, schema=schema, options=options), ledger, prompts)
        try:
            with (
                _Prefetch(
                    pictures, output.settled_all(prompts, retry_errors), chat.max_image_side
                ) as items,
                RunProgress(
                    "captioning",
                    total=ledger.to_ask(),
                    unit=_unit(prompts),
                    enabled=progress,
                ) as bar,
            ):
                ledger.bar = bar
                run.process(items, limit)
        finally:
            chat.reset()
            summary.elapsed_s = time.monotonic() - started
    return summary


def read_prompts(path: str | os.PathLike[str]) -> list[str]:
    """The prompts in a text file, one a line (``--prompts FILE``); blank lines are left
    out. A prompt that spans lines cannot be given this way: pass a list to
    :func:`caption`."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else exc
        raise InvalidRequestError(f"cannot read prompts from {path}: {reason}") from None
    prompts = [line.strip() for line in text.splitlines() if line.strip()]
    if not prompts:
        raise InvalidRequestError(f"{path} holds no prompt; write one prompt a line")
    return prompts


def read_captions(path: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """The lines of a caption file that count: the newest for each file, picture and
    prompt.

    Lines are returned as dicts, in the order they were written (a retried picture
    takes the place of its retry). A picture is identified as resuming identifies it
    (see the module docstring): by ``sha256``, or by ``path`` where that is null; a
    line without ``prompt`` (an older version's) is replaced by any newer line of its
    file and picture. A torn last line (a run writing, or a crash) is left out; a file
    that is not a caption file is an :class:`InvalidRequestError`.
    """
    path = Path(path)
    rows: dict[tuple[_Identity, str | None, str], dict[str, Any]] = {}
    try:
        with path.open("rb") as file:
            for number, line in enumerate(file, 1):
                if not line.strip():
                    continue
                try:
                    record = _parse(line)
                except ValueError:
                    ours = line.startswith(_LINE_START) or _LINE_START.startswith(line)
                    if line.endswith(b"\n") or not ours:
                        raise _foreign(path, number, "give a file written by caption") from None
                    break  # the torn last line
                identity, prompt = _key(record)
                name = str(record["path"])
                rows.pop((identity, prompt, name), None)
                rows.pop((identity, None, name), None)
                rows[identity, prompt, name] = record
    except OSError as exc:
        raise InvalidRequestError(
            f"cannot read the caption file {path}: {exc.strerror or exc}"
        ) from None
    return list(rows.values())


# --- checks before anything runs -----------------------------------------------------


def _check_call(
    prompt: str | Sequence[str],
    schema: Schema | None,
    limit: int | None,
    max_failures_in_a_row: int,
    options: dict[str, Any],
) -> tuple[str, ...]:
    """Refuse a mistake before the output file is touched, not once per picture; the
    prompts, each once, in the order given."""
    prompts = _prompt_list(prompt)
    if limit is not None and (isinstance(limit, bool) or limit < 0):
        raise InvalidRequestError(f"limit must be a non-negative integer, not {limit!r}")
    if max_failures_in_a_row < 1:
        raise InvalidRequestError("max_failures_in_a_row must be at least 1")
    if schema is not None:
        structured.json_schema(schema)
    try:
        Options(**options)
    except ValidationError as exc:
        names = ", ".join(str(e["loc"][0]) for e in exc.errors() if e["loc"])
        raise InvalidRequestError(f"invalid generation options: {names}") from None
    return prompts


def _prompt_list(prompt: str | Sequence[str]) -> tuple[str, ...]:
    given = [prompt] if isinstance(prompt, str) else prompt
    if not isinstance(given, Sequence) or not given:
        raise InvalidRequestError("give a prompt, or a list of prompts")
    for one in given:
        if not isinstance(one, str) or not one.strip():
            raise InvalidRequestError("each prompt must be a non-empty string")
    return tuple(dict.fromkeys(given))  # a prompt given twice is asked once


def _summary(output: _Output, pictures: int, prompts: Sequence[str]) -> CaptionSummary:
    summary = CaptionSummary(
        out=output.path, found=pictures * len(prompts), repaired_bytes=output.repaired_bytes
    )
    summary._prompts = len(prompts)
    return summary


def _unit(prompts: Sequence[str]) -> str:
    """What the progress bar counts: pictures, or answers with several prompts."""
    return "picture" if len(prompts) == 1 else "answer"


# --- the output file -----------------------------------------------------------------


class _Output:
    """The JSON Lines file: locked, checked, repaired, then appended to a line at a time."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.repaired_bytes = 0
        self._fd = -1
        #: the newest line of each picture and prompt, whichever file it names
        self._newest: dict[tuple[_Identity, str | None], _Line] = {}
        #: the newest line of each file, picture and prompt
        self._own: dict[tuple[_Identity, str | None, str], _Line] = {}
        self._lines = 0
        self._end = 0  # where the next line starts

    def __enter__(self) -> _Output:
        self._fd = self._open()
        try:
            self._lock()
            self._load()
        except BaseException:
            os.close(self._fd)
            raise
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        try:
            self.flush()
        finally:
            os.close(self._fd)  # closing also releases the lock

    def _open(self) -> int:
        """The descriptor the run's lock is taken on: here the file itself."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        return os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_APPEND, 0o644)

    def earlier(self, identity: _Identity, prompt: str) -> _Status | None:
        """What the newest line about this picture and prompt says, under any file name,
        or None (no line)."""
        newest = self._newest_line(identity, prompt)
        return None if newest is None else newest.status

    def own(self, identity: _Identity, prompt: str, path: str) -> _Status | None:
        """What the newest line about this picture and prompt under the file name
        ``path`` says, or None (that file has no line of its own)."""
        lines = [self._own.get((identity, prompt, path)), self._own.get((identity, None, path))]
        newest = max((line for line in lines if line is not None), default=None)
        return None if newest is None else newest.status

    def answer(self, identity: _Identity, prompt: str) -> dict[str, Any]:
        """The newest line about this picture and prompt, read back from the file."""
        newest = self._newest_line(identity, prompt)
        assert newest is not None
        return self._read(newest.where)

    def _newest_line(self, identity: _Identity, prompt: str) -> _Line | None:
        lines = [self._newest.get((identity, prompt)), self._newest.get((identity, None))]
        return max((line for line in lines if line is not None), default=None)

    def _read(self, where: Any) -> dict[str, Any]:
        """The line at ``where`` (its offset and length)."""
        offset, length = where
        return _parse(os.pread(self._fd, length, offset))

    def settled(self, prompts: Sequence[str], retry_errors: bool) -> frozenset[_Pair]:
        """The pictures and prompts that a run will not ask about again."""
        identities = {identity for identity, _ in self._newest}
        return frozenset(
            (identity, prompt)
            for identity in identities
            for prompt in prompts
            if _settled(self.earlier(identity, prompt), retry_errors)
        )

    def settled_all(self, prompts: Sequence[str], retry_errors: bool) -> frozenset[_Identity]:
        """The pictures that a run will ask no prompt about: no need to prepare them."""
        pairs = self.settled(prompts, retry_errors)
        return frozenset(
            identity
            for identity, _ in pairs
            if all((identity, prompt) in pairs for prompt in prompts)
        )

    def append(self, record: dict[str, Any]) -> None:
        """Write one whole line and make it durable before the next picture."""
        try:
            data = (json.dumps(record, ensure_ascii=False) + "\n").encode()
        except UnicodeEncodeError:  # a file name that is not UTF-8: escape, stay valid JSON
            data = (json.dumps(record) + "\n").encode()
        view = memoryview(data)
        while view:
            view = view[os.write(self._fd, view) :]
        os.fsync(self._fd)
        self._remember(record, (self._end, len(data)))
        self._end += len(data)

    def flush(self) -> None:
        """Nothing to do: each line is durable once :meth:`append` returns."""

    def _lock(self) -> None:
        if fcntl is None:  # pragma: no cover - Windows
            return
        try:
            fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise InvalidRequestError(
                f"another caption run is writing to {self.path}; wait for it or choose another file"
            ) from None

    def _load(self) -> None:
        """Read what earlier runs did, a line at a time (the file may be large)."""
        offset = 0
        with self.path.open("rb") as file:
            for number, line in enumerate(file, 1):
                if not line.endswith(b"\n"):  # only the last line can lack its newline
                    self._last_line(line, offset, number)
                elif line.strip():
                    self._remember(self._record(line, number), (offset, len(line)))
                offset += len(line)
        self._end = os.fstat(self._fd).st_size

    def _last_line(self, line: bytes, offset: int, number: int) -> None:
        """Cut a line torn by a crash, but only in our own files; keep a whole one."""
        if not line.strip():
            return
        if not (line.startswith(_LINE_START) or _LINE_START.startswith(line)):
            raise self._foreign(number)
        try:
            record = self._record(line, number)
        except InvalidRequestError:  # torn in the middle of a write
            os.ftruncate(self._fd, offset)
            self.repaired_bytes = len(line)
            return
        self._remember(record, (offset, len(line)))
        os.write(self._fd, b"\n")  # a whole line that only lost its newline

    def _record(self, line: bytes, number: int) -> dict[str, Any]:
        try:
            return _parse(line)
        except ValueError:
            raise self._foreign(number) from None

    def _foreign(self, number: int) -> InvalidRequestError:
        return _foreign(self.path, number)

    def _remember(self, record: dict[str, Any], where: Any) -> None:
        """Know ``record``, a line found at ``where`` (what :meth:`_read` reads it with)."""
        status: _Status = (
            "done" if "error" not in record else "retry" if record.get("retry") else "failed"
        )
        self._lines += 1
        identity, prompt = _key(record)
        line = _Line(self._lines, status, where)
        self._newest[identity, prompt] = line
        self._own[identity, prompt, str(record["path"])] = line


class _Line(NamedTuple):
    """What a run knows of a line without keeping it: its place among the file's lines
    (the newest wins), what it says, and where to read it back (for a copy's line)."""

    number: int
    status: _Status
    where: Any


def _parse(line: bytes) -> dict[str, Any]:
    """One caption line, or ValueError when it is not one (torn, or another file's)."""
    record = json.loads(line)
    if not isinstance(record, dict) or "sha256" not in record or "path" not in record:
        raise ValueError("not a caption record")
    return record


def _foreign(
    path: Path, number: int, advice: str = "choose another output file"
) -> InvalidRequestError:
    return InvalidRequestError(
        f"{path} is not a caption file (line {number} is not a caption record); {advice}"
    )


def _identity(sha256: object, path: object) -> _Identity:
    return ("sha256", sha256) if isinstance(sha256, str) else ("path", str(path))


def _key(record: dict[str, Any]) -> tuple[_Identity, str | None]:
    prompt = record.get("prompt")
    return _identity(record["sha256"], record["path"]), prompt if isinstance(prompt, str) else None


def _settled(status: _Status | None, retry_errors: bool) -> bool:
    """Whether a picture whose newest line says ``status`` is left alone."""
    return status == "done" or (status == "failed" and not retry_errors)


# --- reading pictures ahead ----------------------------------------------------------


@dataclass(frozen=True)
class _Item:
    """One picture as the prefetch thread hands it over: ready, or failed."""

    path: Path
    sha256: str | None
    image: PreparedImage | None = None
    error: ImageError | None = None

    @property
    def identity(self) -> _Identity:
        return _identity(self.sha256, self.path)


@dataclass(frozen=True)
class _Crash:
    """An unexpected exception in the prefetch thread, to be raised in the caller's."""

    exc: BaseException


_END = object()


class _Prefetch:
    """Read, hash and prepare pictures in a thread, a few ahead of the model.

    The queue is bounded, so memory is too; ``close`` stops the thread and joins it,
    so no thread outlives :func:`caption` whatever way it ends.
    """

    def __init__(self, paths: Sequence[Path], settled: Iterable[_Identity], max_side: int) -> None:
        self._paths = list(paths)
        # not decoded, as they will be skipped; the caller decides again with what it knows
        self._settled = frozenset(settled)
        self._max_side = max_side
        self._queue: queue.Queue[object] = queue.Queue(maxsize=PREFETCH_AHEAD)
        self._stop = threading.Event()
        self._thread = threading.Thread(
            target=self._produce, name="llava-local-caption-prefetch", daemon=True
        )

    def __enter__(self) -> Iterator[_Item]:
        self._thread.start()
        return self._items()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._stop.set()
        self._thread.join()

    def _items(self) -> Iterator[_Item]:
        while (item := self._queue.get()) is not _END:
            if isinstance(item, _Crash):
                raise item.exc
            assert isinstance(item, _Item)
            yield item

    def _produce(self) -> None:
        try:
            for path in self._paths:
                if not self._put(self._load(path)):
                    return
        except BaseException as exc:  # a bug here must surface in the caller, not vanish
            self._put(_Crash(exc))
        self._put(_END)

    def _put(self, item: object) -> bool:
        """Queue ``item`` unless told to stop first (checked while the queue is full)."""
        while not self._stop.is_set():
            with contextlib.suppress(queue.Full):
                self._queue.put(item, timeout=0.1)
                return True
        return False

    def _load(self, path: Path) -> _Item:
        return _load_item(path, self._settled, self._max_side)


def _load_item(
    path: Path,
    settled: frozenset[_Identity],
    max_side: int,
    *,
    data: bytes | None = None,
    source: Path | None = None,
) -> _Item:
    """Read (unless ``data`` is given), hash and prepare one picture; failures are kept
    in the item. A picture in ``settled`` is hashed but not decoded: it will be skipped.
    ``source`` is where to read it when that is not ``path`` (the path as given, which
    the line and any error name)."""
    if data is None:
        try:
            data = _read(source or path)
        except ImageError as exc:
            return _Item(path, None, error=ImageError(str(path), exc.reason))
    elif not data:
        return _Item(path, None, error=ImageError(str(path), "empty file"))
    sha256 = hashlib.sha256(data).hexdigest()
    if ("sha256", sha256) in settled:
        return _Item(path, sha256)  # no need to decode it
    try:
        image = _images.prepare(data, max_side=max_side, cache=None)
    except ImageError as exc:
        return _Item(path, sha256, error=ImageError(str(path), exc.reason))
    return _Item(path, sha256, image=image)


def _read(path: Path) -> bytes:
    """The file's bytes, or an :class:`ImageError` saying why they cannot be had."""
    try:
        with path.open("rb") as file:
            data = file.read(_images.MAX_FILE_BYTES + 1)
    except FileNotFoundError:
        raise ImageError(str(path), "no such file (removed during the run?)") from None
    except OSError as exc:
        raise ImageError(str(path), f"cannot read it: {exc.strerror or exc}") from None
    if not data:
        raise ImageError(str(path), "empty file")
    if len(data) > _images.MAX_FILE_BYTES:
        raise ImageError(str(path), f"larger than the limit of {_images.MAX_FILE_BYTES} bytes")
    return data


# --- asking --------------------------------------------------------------------------


@dataclass(frozen=True)
class _Answer:
    """One picture and prompt's line, and what the engine raised when it is an error
    (None where only the line travelled, from a Ray worker)."""

    record: dict[str, Any]
    seconds: float
    error: LlavaLocalError | None = None


class _Asker:
    """Asks the engine and writes the lines (not to a file): the part of a run that
    needs the model. A Ray worker holds one too, so the two runs' lines are the same."""

    def __init__(self, chat: VisionChat, *, schema: Schema | None, options: dict[str, Any]) -> None:
        self.chat = chat
        self.schema = schema
        self.options = options

    def answer(self, item: _Item, prompt: str) -> _Answer:
        """Ask ``prompt`` about ``item`` in a fresh conversation; its line either way."""
        started = time.monotonic()
        try:
            reply, attempts = self._ask(item, prompt)
        except LlavaLocalError as exc:
            elapsed = time.monotonic() - started
            return _Answer(self._failure(item, prompt, exc, elapsed), elapsed, exc)
        elapsed = time.monotonic() - started
        return _Answer(self._success(item, prompt, reply, attempts, elapsed), elapsed)

    def _ask(self, item: _Item, prompt: str) -> tuple[Reply, int]:
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

    def _reply(self, prompt: str, item: _Item) -> Reply:
        reply = self.chat.ask(prompt, image=item.image, schema=self.schema, **self.options)
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
        self, item: _Item, prompt: str, reply: Reply, attempts: int, elapsed: float
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
        self, item: _Item, prompt: str, exc: LlavaLocalError, elapsed: float
    ) -> dict[str, Any]:
        message = " ".join(f"{type(exc).__name__}: {exc}".split())
        record: dict[str, Any] = {"path": str(item.path), "sha256": item.sha256}
        record |= {"prompt": prompt, "error": message, "error_type": type(exc).__name__}
        if isinstance(exc, SchemaError):
            record["rejected_text"] = exc.text
        record |= {"model": self.chat.model, "backend": self.chat.backend}
        record["elapsed_s"] = round(elapsed, 3)
        if not isinstance(exc, _PER_PICTURE):  # it says nothing about the picture:
            record["retry"] = True  # the next run asks again
        return record


#: What a file needs for a picture and prompt: nothing ("again": this run wrote its line;
#: "skip": the file already has it), a copy of the line the same picture has under
#: another name ("copy"), or the model's answer ("ask").
_Plan = Literal["again", "skip", "copy", "ask"]


class _Ledger:
    """The output file's side of a run: which picture and prompt to leave alone, each
    line written and counted, and when to stop. The one-machine run and the Ray driver
    share it, so both skip, copy, count and stop alike."""

    def __init__(
        self,
        output: _Output,
        summary: CaptionSummary,
        *,
        prompts: int,
        limit: int | None,
        retry_errors: bool,
        max_failures_in_a_row: int,
    ) -> None:
        self.output = output
        self.summary = summary
        self.prompts = prompts
        self.limit = limit
        self.retry_errors = retry_errors
        self.max_failures_in_a_row = max_failures_in_a_row
        self.failures_in_a_row = 0
        self.bar: RunProgress | None = None  # set once the bar is drawn
        self.asked: set[_Pair] = set()  # answered in this run: a copy reuses the answer
        self.written: set[tuple[_Identity, str, str]] = set()  # lines of this run
        self.error_files: set[str] = set()  # files whose earlier error line was kept

    def to_ask(self) -> int:
        """How many lines this run still expects the model to answer, as far as it knows."""
        left = self.summary.found - self.summary.skipped - self.summary.copied
        return left if self.limit is None else min(self.limit * self.prompts, left)

    def plan(self, identity: _Identity, prompt: str, path: str) -> _Plan:
        """What the file ``path`` needs for this picture and prompt (see ``_Plan``): every
        file gets its line, and a picture is asked about once whatever its names."""
        if (identity, prompt, path) in self.written:
            return "again"
        if _settled(self.output.own(identity, prompt, path), self.retry_errors):
            return "skip"
        earlier = self.output.earlier(identity, prompt)
        if (identity, prompt) in self.asked or _settled(earlier, self.retry_errors):
            return "copy"
        return "ask"

    def skip(self, identity: _Identity, prompt: str, path: str) -> None:
        """Count a line the file already has."""
        self.summary.skipped += 1
        if self.output.own(identity, prompt, path) != "done":
            self.summary.skipped_errors += 1
            self.error_files.add(path)
            self.summary.skipped_error_pictures = len(self.error_files)
        if self.bar is not None:
            self.bar.set_total(self.to_ask())

    def copy(self, identity: _Identity, prompt: str, path: str) -> None:
        """Write the file's line as a copy of the same picture's line under another name:
        the answer, or the error, is the picture's, so the model is not asked again."""
        record = self.output.answer(identity, prompt)
        source = str(record.get("copy_of") or record["path"])
        line = {**record, "path": path, "elapsed_s": 0.0, "copy_of": source}
        line.pop("retry", None)  # never copied: a run stops on such a line
        if "error" in line:  # the error names the file it is about
            line["error"] = str(line["error"]).replace(str(record["path"]), path)
        self.write(_Answer(line, 0.0), copied=True)

    def write(self, answer: _Answer, *, copied: bool = False) -> None:
        """Append the line, count it; raise when the run should stop rather than go on
        failing (after the line is written)."""
        record = answer.record
        identity, prompt = _key(record)
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


class _Run:
    """The loop over the pictures of one machine: each picture's prompts asked in turn."""

    def __init__(self, asker: _Asker, ledger: _Ledger, prompts: Sequence[str]) -> None:
        self.asker = asker
        self.ledger = ledger
        self.prompts = prompts
        self.pictures = 0  # asked about in this run, for the limit

    def process(self, items: Iterator[_Item], limit: int | None) -> None:
        ledger = self.ledger
        for item in items:
            path = str(item.path)
            plans = [(prompt, ledger.plan(item.identity, prompt, path)) for prompt in self.prompts]
            asks = any(plan == "ask" for _, plan in plans)
            if asks and limit is not None and self.pictures >= limit:
                return
            self.pictures += asks
            for prompt, plan in plans:
                if plan == "ask":
                    ledger.write(self.asker.answer(item, prompt))
                elif plan == "copy":
                    ledger.copy(item.identity, prompt, path)
                elif plan == "skip":
                    ledger.skip(item.identity, prompt, path)
