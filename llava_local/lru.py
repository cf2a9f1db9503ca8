"""One least-recently-used map bounded by the bytes of its values, shared by every cache.

Prepared pictures (:class:`~llava_local.images.ImageCache`), projected picture
embeddings (:class:`~llava_local.backends.llama_cpp.embedding_cache.EmbeddingCache`) and KV
states kept in memory (:mod:`llava_local.backends.llama_cpp.kv_cache`) all hold values whose
size varies by orders of magnitude, so each is bounded by total bytes, not by count.
``cachetools.LRUCache`` with ``getsizeof`` does the bookkeeping; this adds a lock
(threads share an engine and the picture cache) and skips values larger than the
whole budget instead of raising.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Hashable
from typing import Generic, TypeVar

from cachetools import LRUCache

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")


class ByteLRU(Generic[K, V]):
    """A thread-safe LRU map holding at most ``max_bytes``, as ``sizeof`` counts them."""

    def __init__(self, max_bytes: int, sizeof: Callable[[V], int]) -> None:
        if max_bytes < 0:
            raise ValueError(f"max_bytes must be >= 0, not {max_bytes}")
        self.max_bytes = int(max_bytes)
        self._items: LRUCache[K, V] = LRUCache(maxsize=self.max_bytes, getsizeof=sizeof)
        self._sizeof = sizeof
        self._lock = threading.Lock()

    def get(self, key: K) -> V | None:
        """The value under ``key`` (now the most recently used), or None."""
        with self._lock:
            return self._items.get(key)

    def put(self, key: K, value: V) -> bool:
        """Keep ``value``, evicting the least recently used until the total fits.

        A value larger than the whole budget is not kept (and replaces nothing):
        returns False then.
        """
        if self._sizeof(value) > self.max_bytes:
            return False
        with self._lock:
            self._items[key] = value
        return True

    def pop(self, key: K) -> V | None:
        """Remove and return the value under ``key``, or None."""
        with self._lock:
            return self._items.pop(key, None)

    def pop_oldest(self) -> V | None:
        """Remove and return the least recently used value, or None when empty."""
        with self._lock:
            if not self._items:
                return None
            return self._items.popitem()[1]

    def items(self) -> list[tuple[K, V]]:
        """A snapshot of the entries (their recency is not touched)."""
        with self._lock:
            return list(self._items.items())

    @property
    def nbytes(self) -> int:
        """Total size of the values kept."""
        return int(self._items.currsize)

    def __len__(self) -> int:
        return len(self._items)

    def clear(self) -> None:
        """Forget everything."""
        with self._lock:
            self._items.clear()
