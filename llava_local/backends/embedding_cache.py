"""A bounded cache of projected picture embeddings, so a picture seen before skips CLIP.

CLIP is the dearest part of a first look at a picture on a CPU (seconds for
ViT-L/14-336). The KV cache already spares a follow-up turn from it; this cache
spares a picture that comes back in another conversation, at another position.
"""

from __future__ import annotations

import threading
from collections import OrderedDict

import numpy as np
import numpy.typing as npt

Embeddings = npt.NDArray[np.float32]


class EmbeddingCache:
    """Least-recently-used embeddings by picture hash, at most ``max_bytes`` in all."""

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max(0, int(max_bytes))
        self._items: OrderedDict[str, Embeddings] = OrderedDict()
        self._lock = threading.Lock()
        self.nbytes = 0

    def get(self, key: str) -> Embeddings | None:
        with self._lock:
            value = self._items.get(key)
            if value is not None:
                self._items.move_to_end(key)
            return value

    def put(self, key: str, value: Embeddings) -> None:
        """Keep ``value`` (a copy the caller no longer changes); too large ones are skipped."""
        if value.nbytes > self.max_bytes:
            return
        with self._lock:
            old = self._items.pop(key, None)
            if old is not None:
                self.nbytes -= old.nbytes
            self._items[key] = value
            self.nbytes += value.nbytes
            while self.nbytes > self.max_bytes:
                _, evicted = self._items.popitem(last=False)
                self.nbytes -= evicted.nbytes

    def __len__(self) -> int:
        return len(self._items)

    def clear(self) -> None:
        with self._lock:
            self._items.clear()
            self.nbytes = 0
