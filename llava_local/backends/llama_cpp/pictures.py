"""libmtmd in the callers' threads: prompts tokenized, pictures encoded by CLIP (the
dearest part of a first look on a CPU, seconds for ViT-L/14-336), one caller at a time,
stoppable between pieces of CLIP's graph; embeddings kept by picture hash."""

from __future__ import annotations

import threading
import time
from collections.abc import Sequence
from typing import Any

import numpy as np

from ...control import STATUS_ENCODING, TurnControl
from ...errors import BackendError
from ...types import PreparedImage
from .embedding_cache import EmbeddingCache
from .jobs import Job
from .model import LoadedModel
from .prompt import Part, Prompt, tokenize

#: CLIP's graph is computed in pieces of this many nodes, so that a stop request is seen
#: between pieces (a ViT-L at 336 px has about 700 nodes: ~45 pieces, no measurable cost).
CLIP_NODES_PER_CHECK = 16


class _Stopped(Exception):
    """C code stopped at the turn's request; TurnControl turns it into the right error."""


class Pictures:
    """libmtmd's context, used by one caller at a time (:attr:`lock`), and the
    projected embeddings of pictures seen before, by content hash."""

    def __init__(self, lib: Any, cache_bytes: int) -> None:
        self.mtmd = lib.mtmd_cpp
        self.lock = threading.Lock()
        self.embeddings = EmbeddingCache(cache_bytes)
        #: Graph nodes of the last encoding computed so far (tests read it).
        self.clip_nodes = 0
        self._encoding: TurnControl | None = None
        #: Given to libmtmd when the projector loads (kept alive here: C holds only the
        #: pointer).
        self.clip_callback = lib.ggml_backend_sched_eval_callback(self._clip_eval)

    def tokenize(self, model: LoadedModel, text: str, images: Sequence[PreparedImage]) -> Prompt:
        with self.lock:
            return tokenize(self.mtmd, model.mctx, text, images)

    def encode(self, model: LoadedModel, job: Job, parts: Sequence[Part]) -> None:
        """CLIP for the pictures ``job`` needs read, in the caller's thread: tokenizing
        and the embedding cache go on beside other conversations' answers, the encoding
        itself between two of their decode steps (:attr:`LoadedModel.compute`)."""
        mtmd = self.mtmd
        for part in parts:
            if part.picture in job.embeddings:
                continue
            job.control.report(STATUS_ENCODING)
            with self.lock:
                cached = self.embeddings.get(part.picture)
                if cached is not None:
                    job.embeddings[part.picture] = cached
                    continue
                t0 = time.perf_counter()
                self._encoding, self.clip_nodes = job.control, 0
                try:
                    with model.compute:  # between the driver's decode steps
                        code = mtmd.mtmd_encode_chunk(model.mctx, part.chunk)
                    if job.control.cancelled:  # a stopped encode returns half-computed data
                        raise _Stopped
                    if code != 0:
                        raise BackendError("libmtmd failed to encode a picture")
                    n_tokens = int(mtmd.mtmd_input_chunk_get_n_tokens(part.chunk))
                    out = mtmd.mtmd_get_output_embd(model.mctx)
                    embd = np.ctypeslib.as_array(out, shape=(n_tokens * model.n_embd,)).copy()
                finally:
                    self._encoding = None
            job.stats.image_encode_s = (job.stats.image_encode_s or 0.0) + (
                time.perf_counter() - t0
            )
            job.stats.images_encoded = (job.stats.images_encoded or 0) + 1
            job.embeddings[part.picture] = embd
            if part.picture:
                self.embeddings.put(part.picture, embd)

    def _clip_eval(self, _tensor: Any, ask: bool, _data: Any) -> bool:
        """ggml's scheduler asks, node by node, whether we want to look at a result
        (then it computes up to there and calls again); saying yes every few nodes
        gives us a moment to say stop, returning False on the second call."""
        control = self._encoding
        stop = control is not None and control.cancelled
        if ask:
            self.clip_nodes += 1
            return self.clip_nodes % CLIP_NODES_PER_CHECK == 0 or stop
        return not stop
