"""Caption a folder of pictures into a JSON Lines file that survives crashes and resumes.

This is the job people most often write by hand, and the hand-written versions lose work:
a crash half-way leaves a torn last line that breaks every later reader, a re-run asks
the model again about pictures already done, and one unreadable file stops the whole run.
:func:`caption` writes one JSON object per picture::

    {"path": "photos/cat.jpg", "sha256": "<of the file's bytes>", "text": "A cat ...",
     "parsed": {...},  # only with a schema
     "model": "llava:latest", "backend": "ollama", "done_reason": "stop",
     "stats": {...Stats fields...}, "attempts": 1, "elapsed_s": 12.3,
     "image": {"width": 672, "height": 504, "changes": ["rotated upright ..."]}}

or, where a picture failed, ``error`` (one line, starting with the error type) and
``error_type`` instead of ``text``; ``sha256`` is null when the file could not be read.

Resuming: pictures whose ``sha256`` already has a line without ``error`` are skipped, so
renamed or copied files are not asked about again. Failed pictures are tried again on
the next run, which appends a new line: the last line for a ``sha256`` is the one that
counts. Each line is written whole with one ``write``, flushed and fsynced; on start, a
torn last line left by a crash is cut off (a last line that is whole JSON and only lacks
its newline is kept). A file that is not a caption file is refused, never modified,
and only one run at a time may write to a file (an advisory lock, where the OS has one).

Failures: an unreadable picture, an answer that does not fit the schema (after one
retry), a too-long turn or an engine error on one picture is recorded and the run goes
on. What fails for every picture alike stops the run after its line is written: the
engine cannot be reached or timed out (a dead or stuck daemon), the model is gone,
cannot see pictures or cannot load, and also ``max_failures_in_a_row`` engine failures
in a row (unreadable pictures do not count). The error is raised; a re-run continues.

Pictures are read, hashed and prepared in a background thread a few pictures ahead, so
the model never waits on the disk; the thread is stopped and joined before
:func:`caption` returns or raises, Ctrl-C included.
"""

from __future__ import annotations

import contextlib
import glob
import hashlib
import json
import os
import queue
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any

from pydantic import BaseModel, ValidationError
from rich.progress import TaskID

from . import images as _images
from . import structured
from .chat import VisionChat
from .errors import (
    BackendError,
    ContextOverflowError,
    ImageError,
    InvalidRequestError,
    LlavaLocalError,
    SchemaError,
)
from .progress import picture_progress
from .structured import Schema
from .types import Options, PreparedImage, Reply

try:  # POSIX; elsewhere two runs on one file are not prevented
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None  # type: ignore[assignment]

__all__ = ["PICTURE_EXTENSIONS", "CaptionSummary", "caption", "find_pictures"]

#: File name extensions (lower case, no dot) that directories and globs are searched for.
PICTURE_EXTENSIONS = frozenset(
    {"jpg", "jpeg", "png", "webp", "gif", "bmp", "tif", "tiff", "ico", "heic", "heif", "avif"}
)
#: Pictures prepared ahead of the model: enough to hide disk and decoding time, few
#: enough to bound memory.
PREFETCH_AHEAD = 3
_GLOB_CHARS = frozenset("*?[")
#: How every line this module writes begins; a torn line is recognised by it.
_LINE_START = b'{"path": '

#: Failures that belong to one picture; any other library error stops the run.
_PER_PICTURE = (ImageError, SchemaError, ContextOverflowError, BackendError)


class CaptionSummary(BaseModel):
    """What a :func:`caption` run did. ``found - done - skipped - failed`` were not
    reached (``limit``)."""

    out: Path
    found: int
    done: int = 0
    skipped: int = 0
    failed: int = 0
    elapsed_s: float = 0.0
    repaired_bytes: int = 0

    def __str__(self) -> str:
        text = (
            f"{self.done} captioned, {self.skipped} already done, {self.failed} failed "
            f"of {self.found} pictures in {self.elapsed_s:.1f} s -> {self.out}"
        )
        if self.repaired_bytes:
            text += f" (cut a torn last line of {self.repaired_bytes} bytes)"
        return text


def caption(
    chat: VisionChat,
    inputs: str | os.PathLike[str] | Sequence[str | os.PathLike[str]],
    out: str | os.PathLike[str],
    *,
    prompt: str,
    schema: Schema | None = None,
    limit: int | None = None,
    recursive: bool = False,
    progress: bool = True,
    max_failures_in_a_row: int = 5,
    **options: Any,
) -> CaptionSummary:
    """Ask ``prompt`` about every picture of ``inputs`` and append the answers to ``out``.

    ``inputs`` is a directory, a glob pattern, a picture, or a list of these (see
    :func:`find_pictures`). ``limit`` bounds the pictures recorded in this run, done or
    failed (skipped ones do not count), so a big folder can be done in chunks. ``options`` are
    generation options (``temperature=0``...). See the module docstring for the line
    format and what resuming, failures and Ctrl-C do.
    """
    _check_call(prompt, schema, limit, max_failures_in_a_row, options)
    started = time.monotonic()
    pictures = find_pictures(inputs, recursive=recursive)
    with _Output(Path(out)) as output:
        summary = CaptionSummary(
            out=output.path, found=len(pictures), repaired_bytes=output.repaired_bytes
        )
        run = _Run(
            chat,
            output,
            summary,
            prompt=prompt,
            schema=schema,
            options=options,
            max_failures_in_a_row=max_failures_in_a_row,
        )
        try:
            with (
                _Prefetch(pictures, output.done, chat.max_image_side) as items,
                _Bar(summary, limit, enabled=progress) as bar,
            ):
                run.process(items, bar, limit)
        finally:
            chat.reset()
            summary.elapsed_s = time.monotonic() - started
    return summary


def find_pictures(
    inputs: str | os.PathLike[str] | Sequence[str | os.PathLike[str]], *, recursive: bool = False
) -> list[Path]:
    """The pictures ``inputs`` names, sorted by path, each once.

    A directory gives its files with a picture extension (any case), skipping hidden
    ones such as macOS ``._IMG.jpg`` crumbs; ``recursive`` descends into subdirectories.
    A glob pattern (``**`` allowed) gives the matching files with a picture extension.
    A file is taken as given, whatever its name. A path that does not exist and is not
    a pattern is an :class:`InvalidRequestError` (a typo should not caption nothing).
    """
    items = [inputs] if isinstance(inputs, str | os.PathLike) else list(inputs)
    found: dict[str, Path] = {}
    for item in items:
        for path in _expand(os.fspath(item), recursive):
            found.setdefault(os.path.normpath(path), path)
    return sorted(found.values(), key=str)


# --- finding the pictures ------------------------------------------------------------


def _expand(text: str, recursive: bool) -> list[Path]:
    path = Path(text).expanduser()
    if path.is_dir():
        return _scan(path, recursive)
    if path.is_file():
        return [path]
    if _GLOB_CHARS & set(text):
        matches = glob.glob(os.path.expanduser(text), recursive=True)
        return [Path(m) for m in matches if os.path.isfile(m) and _is_picture(m)]
    raise InvalidRequestError(f"no such file or directory: {text}")


def _scan(folder: Path, recursive: bool) -> list[Path]:
    if not recursive:
        return [p for p in folder.iterdir() if _visible(p.name) and p.is_file() and _is_picture(p)]
    found = []
    for root, dirs, files in os.walk(folder):
        dirs[:] = [d for d in dirs if _visible(d)]
        found += [Path(root, f) for f in files if _visible(f) and _is_picture(f)]
    return found


def _visible(name: str) -> bool:
    return not name.startswith(".")


def _is_picture(name: str | Path) -> bool:
    return Path(name).suffix[1:].lower() in PICTURE_EXTENSIONS


# --- checks before anything runs -----------------------------------------------------


def _check_call(
    prompt: str,
    schema: Schema | None,
    limit: int | None,
    max_failures_in_a_row: int,
    options: dict[str, Any],
) -> None:
    """Refuse a mistake before the output file is touched, not once per picture."""
    if not isinstance(prompt, str) or not prompt.strip():
        raise InvalidRequestError("the prompt must be a non-empty string")
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


# --- the output file -----------------------------------------------------------------


class _Output:
    """The JSON Lines file: locked, checked, repaired, then appended to a line at a time."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.done: set[str] = set()
        self.repaired_bytes = 0
        self._fd = -1

    def __enter__(self) -> _Output:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_APPEND, 0o644)
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
        os.close(self._fd)  # closing also releases the lock

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
                    self._remember(self._record(line, number))
                offset += len(line)

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
        self._remember(record)
        os.write(self._fd, b"\n")  # a whole line that only lost its newline

    def _record(self, line: bytes, number: int) -> dict[str, Any]:
        try:
            record = json.loads(line)
        except ValueError:
            record = None
        if not isinstance(record, dict) or "sha256" not in record:
            raise self._foreign(number)
        return record

    def _foreign(self, number: int) -> InvalidRequestError:
        return InvalidRequestError(
            f"{self.path} is not a caption file (line {number} is not a caption record); "
            "choose another output file"
        )

    def _remember(self, record: dict[str, Any]) -> None:
        if "error" not in record and isinstance(record["sha256"], str):
            self.done.add(record["sha256"])


# --- reading pictures ahead ----------------------------------------------------------


@dataclass(frozen=True)
class _Item:
    """One picture as the prefetch thread hands it over: ready, or failed."""

    path: Path
    sha256: str | None
    image: PreparedImage | None = None
    error: ImageError | None = None


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

    def __init__(self, paths: Sequence[Path], done: set[str], max_side: int) -> None:
        self._paths = list(paths)
        self._done = frozenset(done)  # a snapshot: skipping is decided again by the caller
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
        try:
            data = _read(path)
        except ImageError as exc:
            return _Item(path, None, error=exc)
        sha256 = hashlib.sha256(data).hexdigest()
        if sha256 in self._done:
            return _Item(path, sha256)  # no need to decode it
        try:
            image = _images.prepare(data, max_side=self._max_side, cache=None)
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


class _Run:
    """The loop over the pictures: ask, record, count, and decide when to stop."""

    def __init__(
        self,
        chat: VisionChat,
        output: _Output,
        summary: CaptionSummary,
        *,
        prompt: str,
        schema: Schema | None,
        options: dict[str, Any],
        max_failures_in_a_row: int,
    ) -> None:
        self.chat = chat
        self.output = output
        self.summary = summary
        self.prompt = prompt
        self.schema = schema
        self.options = options
        self.max_failures_in_a_row = max_failures_in_a_row
        self.failures_in_a_row = 0

    def process(self, items: Iterator[_Item], bar: _Bar, limit: int | None) -> None:
        for item in items:
            if item.sha256 is not None and item.sha256 in self.output.done:
                self.summary.skipped += 1
                bar.skipped()
                continue
            if limit is not None and self.summary.done + self.summary.failed >= limit:
                return
            self.one(item)
            bar.advanced()

    def one(self, item: _Item) -> None:
        started = time.monotonic()
        try:
            reply, attempts = self._ask(item)
        except LlavaLocalError as exc:
            self._failed(item, exc, time.monotonic() - started)
            return
        self.output.append(self._success(item, reply, attempts, time.monotonic() - started))
        self.summary.done += 1
        self.failures_in_a_row = 0
        if item.sha256 is not None:
            self.output.done.add(item.sha256)

    def _ask(self, item: _Item) -> tuple[Reply, int]:
        """The reply, in a fresh conversation; a misfit answer is asked once more, with
        the schema spelt out in the prompt: a different prompt is what changes a greedy
        (temperature 0) answer, where asking the same again would repeat it."""
        if item.error is not None:
            raise item.error
        prompts = [self.prompt] if self.schema is None else [self.prompt, self._firmer()]
        for attempt, prompt in enumerate(prompts, 1):
            self.chat.reset()
            try:
                return self._reply(prompt, item), attempt
            except SchemaError:
                if attempt == len(prompts):
                    raise
        raise AssertionError("unreachable")  # pragma: no cover

    def _reply(self, prompt: str, item: _Item) -> Reply:
        return self.chat.ask(prompt, image=item.image, schema=self.schema, **self.options)

    def _firmer(self) -> str:
        assert self.schema is not None
        spelt = json.dumps(structured.json_schema(self.schema), separators=(",", ":"))
        return (
            f"{self.prompt}\n\nAnswer with one JSON object and nothing else. "
            f"It must follow this JSON schema: {spelt}"
        )

    def _success(self, item: _Item, reply: Reply, attempts: int, elapsed: float) -> dict[str, Any]:
        record: dict[str, Any] = {"path": str(item.path), "sha256": item.sha256}
        record["text"] = reply.text
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

    def _failed(self, item: _Item, exc: LlavaLocalError, elapsed: float) -> None:
        """Record the failure; raise when the run should stop rather than go on failing."""
        message = " ".join(f"{type(exc).__name__}: {exc}".split())
        record: dict[str, Any] = {"path": str(item.path), "sha256": item.sha256}
        record |= {"error": message, "error_type": type(exc).__name__}
        if isinstance(exc, SchemaError):
            record["rejected_text"] = exc.text
        record |= {"model": self.chat.model, "backend": self.chat.backend}
        self.output.append(record | {"elapsed_s": round(elapsed, 3)})
        self.summary.failed += 1
        if not isinstance(exc, _PER_PICTURE):
            raise exc
        if isinstance(exc, ImageError):
            return
        self.failures_in_a_row += 1
        if self.failures_in_a_row >= self.max_failures_in_a_row:
            raise BackendError(
                f"stopped: the last {self.failures_in_a_row} pictures all failed in the engine "
                f"(the last with {message}); the results so far are in {self.output.path}"
            ) from exc


# --- the progress bar ----------------------------------------------------------------


class _Bar:
    """A rich progress bar on stderr whose total counts only the pictures to ask about,
    so that the rate and ETA are not flattered by skipped ones."""

    def __init__(self, summary: CaptionSummary, limit: int | None, *, enabled: bool) -> None:
        self._summary = summary
        self._limit = limit
        self._progress = picture_progress(enabled=enabled)
        self._task = TaskID(0)

    def __enter__(self) -> _Bar:
        self._progress.start()
        self._task = self._progress.add_task("captioning", total=self._total())
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._progress.stop()

    def _total(self) -> int:
        left = self._summary.found - self._summary.skipped
        return left if self._limit is None else min(self._limit, left)

    def skipped(self) -> None:
        self._progress.update(self._task, total=self._total())

    def advanced(self) -> None:
        failed = self._summary.failed
        label = f"captioning ({failed} failed)" if failed else "captioning"
        self._progress.update(self._task, advance=1, description=label)
