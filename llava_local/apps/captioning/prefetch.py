"""Pictures read, hashed and prepared in a background thread a few ahead of the model,
so the model never waits on the disk; the thread is stopped and joined whatever way the
run ends, Ctrl-C included."""

from __future__ import annotations

import contextlib
import hashlib
import queue
import threading
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

from ... import images as _images
from ...errors import ImageError
from ...types import PreparedImage
from .lines import Identity, identity

#: Pictures prepared ahead of the model beyond those being asked about: enough to hide
#: disk and decoding time, few enough to bound memory.
PREFETCH_AHEAD = 3


@dataclass(frozen=True)
class Item:
    """One picture as the prefetch thread hands it over: ready, or failed."""

    path: Path
    sha256: str | None
    image: PreparedImage | None = None
    error: ImageError | None = None

    @property
    def identity(self) -> Identity:
        return identity(self.sha256, self.path)


@dataclass(frozen=True)
class Crash:
    """An unexpected exception in a helper thread, to be raised in the caller's."""

    exc: BaseException


_END = object()


class Prefetch:
    """Read, hash and prepare pictures in a thread, ``ahead`` of the model.

    The queue is bounded, so memory is too; leaving the ``with`` block stops the thread
    and joins it, so no thread outlives the run whatever way it ends.
    """

    def __init__(
        self,
        paths: Sequence[Path],
        settled: Iterable[Identity],
        max_side: int,
        *,
        ahead: int = PREFETCH_AHEAD,
    ) -> None:
        self._paths = list(paths)
        # not decoded, as they will be skipped; the caller decides again with what it knows
        self._settled = frozenset(settled)
        self._max_side = max_side
        self._queue: queue.Queue[object] = queue.Queue(maxsize=max(1, ahead))
        self._stop = threading.Event()
        self._thread = threading.Thread(
            target=self._produce, name="llava-local-caption-prefetch", daemon=True
        )

    def __enter__(self) -> Iterator[Item]:
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

    def _items(self) -> Iterator[Item]:
        while (item := self._queue.get()) is not _END:
            if isinstance(item, Crash):
                raise item.exc
            assert isinstance(item, Item)
            yield item

    def _produce(self) -> None:
        try:
            for path in self._paths:
                if not self._put(load_item(path, self._settled, self._max_side)):
                    return
        except BaseException as exc:  # a bug here must surface in the caller, not vanish
            self._put(Crash(exc))
        self._put(_END)

    def _put(self, item: object) -> bool:
        """Queue ``item`` unless told to stop first (checked while the queue is full)."""
        while not self._stop.is_set():
            with contextlib.suppress(queue.Full):
                self._queue.put(item, timeout=0.1)
                return True
        return False


def load_item(
    path: Path,
    settled: frozenset[Identity],
    max_side: int,
    *,
    data: bytes | None = None,
    source: Path | None = None,
) -> Item:
    """Read (unless ``data`` is given), hash and prepare one picture; failures are kept
    in the item. A picture in ``settled`` is hashed but not decoded: it will be skipped.
    ``source`` is where to read it when that is not ``path`` (the path as given, which
    the line and any error name)."""
    if data is None:
        try:
            data = _read(source or path)
        except ImageError as exc:
            return Item(path, None, error=ImageError(str(path), exc.reason))
    elif not data:
        return Item(path, None, error=ImageError(str(path), "empty file"))
    sha256 = hashlib.sha256(data).hexdigest()
    if ("sha256", sha256) in settled:
        return Item(path, sha256)  # no need to decode it
    try:
        image = _images.prepare(data, max_side=max_side, cache=None)
    except ImageError as exc:
        return Item(path, sha256, error=ImageError(str(path), exc.reason))
    return Item(path, sha256, image=image)


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
