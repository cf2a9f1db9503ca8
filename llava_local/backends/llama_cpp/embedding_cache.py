"""A bounded cache of projected picture embeddings, so a picture seen before skips CLIP.

CLIP is the dearest part of a first look at a picture on a CPU (seconds for
ViT-L/14-336). The KV cache already spares a follow-up turn from it; this cache
spares a picture that comes back in another conversation, at another position.
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt

from ...lru import ByteLRU

Embeddings = npt.NDArray[np.float32]


def _nbytes(value: Embeddings) -> int:
    return int(value.nbytes)


class EmbeddingCache(ByteLRU[str, Embeddings]):
    """Least-recently-used embeddings by picture hash, at most ``max_bytes`` in all.

    Values are kept as given: the caller hands over a copy it no longer changes.
    """

    def __init__(self, max_bytes: int) -> None:
        super().__init__(max(0, int(max_bytes)), _nbytes)
