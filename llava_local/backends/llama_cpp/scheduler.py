"""Several conversations at once in one llama.cpp context: slots and continuous batching.

The context holds ``n_seq`` sequences (*slots*) in one pool of KV cells. Each turn is a
:class:`Job`; one driver thread owns every ``llama_decode`` and, step by step, puts
into ONE batch the next token of every answer being written and a chunk of the prompt
of every turn still reading (text tokens; a picture's embeddings go in a batch of their
own, a chunk at a time). So a new question does not wait for another client's whole
answer, and running answers keep flowing while a long prompt is read.

A slot keeps what its last turn left (the key of every position, as in
:mod:`.kv_cache`), so a follow-up reads only its new tokens. A turn takes the idle
slot that shares most of its prompt; it may instead copy a longer shared prefix (a
picture) from another slot's cells (``llama_memory_seq_cp``: no computing, no extra
memory), or restore one from the prefix cache. What a reused slot held is kept in the
prefix cache first when it is worth it, so a conversation that loses its slot resumes
from there.

The caller's thread does what needs no context: it tokenizes, encodes pictures with
CLIP (seconds on a CPU, in parallel with other answers' decoding) and reads the pieces
the driver sends, reporting status and noticing Ctrl-C there.
"""

from __future__ import annotations

import contextlib
import ctypes
import queue
import threading
import time
from collections import deque
from collections.abc import Callable
from typing import Any, Literal, TypeVar

import numpy as np

from ...control import (
    STATUS_ANSWERING,
    STATUS_READING_PICTURE,
    STATUS_READING_PROMPT,
)
from ...errors import BackendError, InvalidRequestError, LlavaLocalError
from ..base import Finish
from . import kv_cache
from .jobs import Job
from .kv_cache import Key, KVState
from .model import LoadedModel
from .prompt import Part, usable
from .sampling import Sampler, token_logprob
from .slots import Slot, Slots
from .stopflag import StopFlag

T = TypeVar("T")

#: Prompt tokens a reading turn may add to a step while other answers are being
#: written: small enough that their next tokens are not held up for long.
SHARED_PREFILL = 128


class Scheduler:
    """The driver thread and the slots of one :class:`LoadedModel`.

    ``prefix_cache`` keeps states that lose their slot; ``stash_worth`` says whether a
    slot's content is worth keeping; ``check_state`` vets a state before it is restored.
    """

    def __init__(
        self,
        model: LoadedModel,
        prefix_cache: kv_cache.PrefixCache | None,
        *,
        non_causal: Callable[[Any], bool],
        mrope: bool,
        keep_on_disk: Callable[[KVState], object] | None = None,
    ) -> None:
        self.model = model
        self.lib = model.lib
        self.prefix_cache = prefix_cache
        self.non_causal = non_causal
        self.mrope = mrope
        #: Hands a state to the disk tier's writer (in the background), or None.
        self.keep_on_disk = keep_on_disk
        self.slots = Slots(model, prefix_cache)
        self._pending: deque[Job] = deque()
        self._active: list[Job] = []
        self._calls: deque[tuple[Callable[[], Any], queue.SimpleQueue[Any]]] = deque()
        self._cond = threading.Condition()
        self._stopping = False
        self._thread: threading.Thread | None = None
        self._decoding: list[Job] = []  # the jobs of the decode running now
        lib = self.lib
        #: Read by llama.cpp after every graph node, raised by :meth:`wake`.
        self._stop = StopFlag(lib.ggml_abort_callback)
        lib.llama_set_abort_callback(model.ctx, self._stop.callback, self._stop.data)
        n = model.n_batch
        self._tokens = lib.llama_batch_init(n, 0, 1)
        self._embd = lib.llama_batch_init(n, model.n_embd, 1)
        self.steps = 0  # decode calls made (for tests and benchmarks)
        self.shared_steps = 0  # of which advanced more than one turn

    # -- the caller's side ---------------------------------------------------------

    def submit(self, job: Job) -> None:
        with self._cond:
            if self._stopping:
                raise BackendError("the llama.cpp engine is closed")
            self._pending.append(job)
            self._start()
            self._cond.notify()

    def wake(self) -> None:
        """A turn was stopped, or work came: the running computation stops if every
        turn in it is stopped, and the driver looks again."""
        self._stop.check()
        with self._cond:
            self._cond.notify()

    def encoded(self, job: Job) -> None:
        """The caller has the embeddings of ``job``'s pictures: reading may start."""
        with self._cond:
            if job.state == "encoding":
                job.state = "reading"
            self._cond.notify()

    def call(self, fn: Callable[[], T]) -> T:
        """Run ``fn`` on the driver thread between steps (it touches the context)."""
        answer: queue.SimpleQueue[Any] = queue.SimpleQueue()
        with self._cond:
            if self._stopping:
                raise BackendError("the llama.cpp engine is closed")
            self._calls.append((fn, answer))
            self._start()
            self._cond.notify()
        ok, value = answer.get()
        if not ok:
            raise value
        return value  # type: ignore[no-any-return]

    @property
    def waiting(self) -> int:
        """Turns submitted and not yet given a slot."""
        return len(self._pending)

    @property
    def running(self) -> int:
        """Turns holding a slot."""
        return len(self._active)

    def close(self) -> None:
        """Stop every turn, then the driver."""
        with self._cond:
            self._stopping = True
            self._cond.notify()
            thread = self._thread
        if thread is not None:
            thread.join()
        for job in [*self._pending, *self._active]:
            self._cancel(job)
        self._pending.clear()
        self.lib.llama_batch_free(self._tokens)
        self.lib.llama_batch_free(self._embd)

    def _start(self) -> None:
        if self._thread is None or not self._thread.is_alive():
            self._thread = threading.Thread(
                target=self._run, name="llava-local llama.cpp", daemon=True
            )
            self._thread.start()

    # -- the driver ----------------------------------------------------------------

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._has_work():
                    if self._stopping:
                        return
                    self._cond.wait()
                if self._stopping:
                    return
                calls = list(self._calls)
                self._calls.clear()
            for fn, answer in calls:
                try:
                    answer.put((True, fn()))
                except BaseException as exc:  # handed to the caller's thread
                    answer.put((False, exc))
            try:
                self._admit()
                self._drop_stopped()
                self._unpark()
                self._step()
            except BaseException as exc:  # a bug: fail the turns, never hang them
                for job in list(self._active):
                    self._fail(job, BackendError(f"the llama.cpp engine failed: {exc!r}"))
                raise

    def _has_work(self) -> bool:
        if self._calls or any(j.stopped for j in self._active):
            return True
        if any(j.state in ("reading", "answering") for j in self._active):
            return True
        if any(
            j.state == "parked" and j.donor and j.donor[0].state == "done" for j in self._active
        ):
            return True
        return bool(self._pending) and (
            any(s.job is None for s in self.slots) or any(j.stopped for j in self._pending)
        )

    # -- admission: a slot for each waiting turn ------------------------------------

    def _admit(self) -> None:
        while self._pending:
            job = self._pending[0]
            if job.stopped:
                self._pending.popleft()
                self._cancel(job)
                continue
            slot = self._choose_slot(job)
            if slot is None:
                if all(s.job is not None and s.job.thread is job.thread for s in self.slots):
                    self._pending.popleft()
                    self._fail(
                        job,
                        InvalidRequestError(
                            "this thread is already reading a turn on this engine (through "
                            "another chat sharing it); finish or close that stream first"
                        ),
                    )
                    continue
                return
            self._pending.popleft()
            self._place(job, slot)

    def _choose_slot(self, job: Job) -> Slot | None:
        """The idle slot sharing most of ``job``'s prompt (an empty one, else the one
        used least recently, when none shares any); None when no slot is idle."""
        idle = self.slots.idle()
        if not idle:
            return None

        def score(slot: Slot) -> tuple[int, int, float]:
            shared = usable(job.keys, kv_cache.common_prefix(slot.keys, job.keys))
            return (shared, -len(slot.keys) if shared == 0 else 0, -slot.used)

        return max(idle, key=score)

    def _place(self, job: Job, slot: Slot) -> None:
        """Give ``job`` its slot holding the longest usable prefix of its prompt."""
        keys = job.keys
        live = usable(keys, kv_cache.common_prefix(slot.keys, keys))
        donor, shared = None, live
        for other in self.slots:
            if other is not slot:
                n = usable(keys, kv_cache.common_prefix(other.keys, keys))
                if n > shared:
                    donor, shared = other, n
        cached = self.prefix_cache.best(keys) if self.prefix_cache is not None else None
        from_cache = cached is not None and usable(keys, cached.shared) > shared
        if from_cache or donor is not None:
            self.slots.stash_lost(slot, keep_from=0)
        else:
            self.slots.stash_lost(slot, keep_from=live)
        keep = live
        if from_cache:
            assert cached is not None
            state = cached.load()
            keep = self.slots.restore(slot, state, keys) if state is not None else 0
            if state is not None and not slot.keys:
                cached.drop()  # llama.cpp refused it: never offered again
            elif keep:
                slot.suspect = cached.drop
        elif donor is not None:
            mem = self.model.memory
            self.lib.llama_memory_seq_rm(mem, slot.seq, 0, -1)
            self.lib.llama_memory_seq_cp(mem, donor.seq, slot.seq, 0, shared)
            slot.keys = list(donor.keys[:shared])
            keep = shared
        self.slots.trim(slot, keep)
        slot.job, slot.used = job, time.monotonic()
        job.slot, job.pos = slot, keep
        self._active.append(job)
        # Another turn still reading a prefix this one shares (several questions about
        # one picture at once, or a picture read ahead): wait for it, then copy it.
        ahead: tuple[Job, Slot, int] | None = None
        for reader in self._active:
            if reader is job or reader.slot is None:
                continue
            n = usable(keys, kv_cache.common_prefix(reader.keys, keys))
            if n > (ahead[2] if ahead else keep) and len(reader.slot.keys) < n:
                ahead = (reader, reader.slot, n)
        if ahead is not None:
            job.state, job.donor = "parked", ahead
            return
        self._start_reading(job)

    def _unpark(self) -> None:
        """Parked turns whose shared prefix is read copy it; those whose donor ended
        without reading it read it themselves."""
        for job in [j for j in self._active if j.state == "parked"]:
            assert job.donor is not None
            assert job.slot is not None
            donor, source, until = job.donor
            if len(source.keys) >= until and source.keys[:until] == job.keys[:until]:
                mem = self.model.memory
                self.lib.llama_memory_seq_cp(mem, source.seq, job.slot.seq, job.pos, until)
                job.slot.keys.extend(job.keys[job.pos : until])
                job.pos = until
            elif source.job is donor and donor.state != "done":
                continue
            job.donor = None
            self._start_reading(job)

    def _start_reading(self, job: Job) -> None:
        """``job`` holds what it reuses: its pictures are encoded (by its caller, if
        missing) and its prompt read from there."""
        keep = job.pos
        job.stats.cached_tokens = keep
        job.part = next((i for i, p in enumerate(job.prompt.parts) if p.end > keep), 0)
        missing = [
            p
            for p in job.prompt.parts[job.part :]
            if p.kind == "image" and p.picture not in job.embeddings
        ]
        if missing:
            job.state = "encoding"
            job.send("encode", missing)
        else:
            job.state = "reading"

    # -- one step ------------------------------------------------------------------

    def _drop_stopped(self) -> None:
        for job in list(self._active):
            if job.stopped:
                self._cancel(job)

    def _step(self) -> None:
        answering = [j for j in self._active if j.state == "answering"]
        reading = [j for j in self._active if j.state == "reading"]
        if not answering and not reading:
            return
        rows: list[tuple[Job, int]] = []  # (job, batch row) whose logits are read
        fed: list[tuple[Job, list[Key]]] = []  # what each job puts into its slot
        batch = self._tokens
        batch.n_tokens = 0
        for job in answering:
            assert job.next_token is not None
            rows.append((job, self._add(job, [job.next_token], logits_last=True)))
            fed.append((job, [job.next_token]))
        room = self.model.n_batch - len(answering)
        if answering:
            room = min(room, SHARED_PREFILL)
        completed: list[tuple[Job, int]] = []
        for job in reading:
            part = job.prompt.parts[job.part]
            if part.kind != "text" or room <= 0:
                continue
            take = min(part.end - job.pos, room)
            tokens = job.prompt.text_tokens(job.pos, job.pos + take)
            last = job.pos + take == len(job.keys)
            row = self._add(job, tokens, logits_last=last)
            room -= take
            fed.append((job, list(job.keys[job.pos : job.pos + take])))
            if last:
                completed.append((job, row))
            self._status(job, STATUS_READING_PROMPT)
        if batch.n_tokens:
            if not self._decode(batch, [j for j, _ in fed]):
                return
            for job, keys in fed:
                assert job.slot is not None
                job.slot.keys.extend(keys)
                job.pos += len(keys)
                if job.state == "reading" and job.pos >= job.prompt.parts[job.part].end:
                    job.part += 1
            for job, row in rows:
                self._next(job, row)
            for job, row in completed:
                self._prompt_read(job, row)
        self._picture_step()

    def _add(self, job: Job, tokens: list[int], *, logits_last: bool) -> int:
        """Append ``tokens`` of ``job`` to the token batch; returns the last row."""
        batch = self._tokens
        assert job.slot is not None
        seq = job.slot.seq
        for i, token in enumerate(tokens):
            row = batch.n_tokens
            batch.token[row] = token
            batch.pos[row] = job.pos + i
            batch.n_seq_id[row] = 1
            batch.seq_id[row][0] = seq
            batch.logits[row] = 1 if (logits_last and i == len(tokens) - 1) else 0
            batch.n_tokens += 1
        return int(batch.n_tokens) - 1

    def _picture_step(self) -> None:
        """A chunk of the first picture waiting to be read, in a batch of its own (a
        small one while other answers are being written)."""
        answering = any(j.state == "answering" for j in self._active)
        for job in self._active:
            if job.state != "reading":
                continue
            part = job.prompt.parts[job.part]
            if part.kind != "image":
                continue
            self._status(job, STATUS_READING_PICTURE)
            last = part.end == len(job.keys)
            if self.mrope or self.non_causal(part.chunk):
                ok = self._whole_picture(job, part)
                taken = part.length
            else:
                room = SHARED_PREFILL if answering else self.model.n_batch
                taken = min(part.end - job.pos, room)
                ends = last and job.pos + taken == part.end
                ok = self._picture_chunk(job, part, taken, logits_last=ends)
            if not ok:
                return
            assert job.slot is not None
            job.slot.keys.extend(job.keys[job.pos : job.pos + taken])
            job.pos += taken
            if job.pos >= part.end:
                job.part += 1
                if last:
                    self._prompt_read(job, -1)
            return

    def _picture_chunk(self, job: Job, part: Part, n: int, *, logits_last: bool) -> bool:
        batch, n_embd = self._embd, self.model.n_embd
        assert job.slot is not None
        embd = job.embeddings[part.picture]
        offset = job.pos - part.start
        src = embd[offset * n_embd : (offset + n) * n_embd]
        ctypes.memmove(batch.embd, src.ctypes.data, src.nbytes)
        for i in range(n):
            batch.pos[i] = job.pos + i
            batch.n_seq_id[i] = 1
            batch.seq_id[i][0] = job.slot.seq
            batch.logits[i] = 1 if (logits_last and i == n - 1) else 0
        batch.n_tokens = n
        return self._decode(batch, [job])

    def _whole_picture(self, job: Job, part: Part) -> bool:
        """Pictures whose attention is not causal, or whose positions are 2-D (M-RoPE),
        are read by libmtmd's helper, all at once."""
        lib, mtmd = self.lib, self.model.mtmd
        assert job.slot is not None
        embd = job.embeddings[part.picture]
        new_n_past = lib.llama_pos(0)
        self._decoding = [job]
        self._stop.arm(self._all_stopped)
        try:
            code = mtmd.mtmd_helper_decode_image_chunk(
                self.model.mctx,
                self.model.ctx,
                part.chunk,
                embd.ctypes.data_as(ctypes.POINTER(ctypes.c_float)),
                lib.llama_pos(job.pos),
                lib.llama_seq_id(job.slot.seq),
                self.model.n_batch,
                ctypes.byref(new_n_past),
                mtmd.mtmd_helper_post_decode_callback(),
                None,
            )
        finally:
            self._stop.disarm()
            self._decoding = []
        if code != 0:
            if job.stopped:
                self._cancel(job)
            else:
                self._fail(job, BackendError(f"llama.cpp failed to read a picture (code {code})"))
            return False
        return True

    def _decode(self, batch: Any, jobs: list[Job]) -> bool:
        """One ``llama_decode``; on failure the turns in it end (stopped or failed). A
        stop request for every turn in it cuts it short (:class:`.StopFlag`)."""
        lib, ctx = self.lib, self.model.ctx
        self._decoding = jobs
        try:
            with self.model.compute:  # not while a picture is encoded
                self._stop.arm(self._all_stopped)
                code = int(lib.llama_decode(ctx, batch))
        finally:
            self._stop.disarm()
            self._decoding = []
        self.steps += 1
        if code == 0:
            self.shared_steps += len(set(map(id, jobs))) > 1
            for job in jobs:
                if job.slot is not None:
                    job.slot.suspect = None  # its state read on: it was sound
            return True
        for job in dict.fromkeys(jobs):  # what a failed decode left is not recorded
            if job.slot is not None:
                self.slots.trim(job.slot, len(job.slot.keys))
        if code == 1 and self.slots.free_cells():
            return self._decode(batch, jobs)
        for job in dict.fromkeys(jobs):
            slot = job.slot
            if slot is not None and slot.suspect is not None and not job.stopped:
                self._read_cold(job, slot)
            elif job.stopped:
                self._cancel(job)
            elif code == 1:
                self._fail(
                    job,
                    BackendError(
                        "llama.cpp has no room left in its KV cache for this turn; "
                        "fewer conversations at once (parallel) or a larger n_ctx"
                    ),
                )
            else:
                self._fail(job, BackendError(f"llama.cpp failed to decode (code {code})"))
        return False

    def _read_cold(self, job: Job, slot: Slot) -> None:
        """Reading failed on top of a restored state: forget the state (its file too)
        and read ``job``'s prompt from the start."""
        suspect = slot.suspect
        assert suspect is not None
        with contextlib.suppress(OSError):
            suspect()
        self.slots.empty(slot)
        if slot.broken:  # the slot cannot be used until the KV cache is cleared whole
            self._fail(job, BackendError("llama.cpp could not read a restored KV state"))
            return
        job.pos, job.next_token = 0, None
        self._start_reading(job)

    def _all_stopped(self) -> bool:
        """Whether every turn in the running decode was stopped (one that still wants
        its answer is never cut short)."""
        jobs = self._decoding
        return bool(jobs) and all(job.stopped for job in jobs)

    # -- tokens out ----------------------------------------------------------------

    def _prompt_read(self, job: Job, row: int) -> None:
        """The prompt is in the slot: the answer starts (or its logits are handed over)."""
        now = time.perf_counter()
        job.stats.prompt_s = now - job.started
        job.stats.prompt_tokens = len(job.keys) - (job.stats.cached_tokens or 0)
        if job.prefetch:
            self._release(job)
            job.send("logits", None)
            return
        if job.logits_only:
            ptr = self.lib.llama_get_logits_ith(self.model.ctx, row)
            logits = np.ctypeslib.as_array(ptr, shape=(self.model.n_vocab,)).copy()
            self._release(job)
            job.send("logits", logits)
            return
        job.state = "answering"
        job.decode_started = now
        self._status(job, STATUS_ANSWERING)
        read_a_picture = any(
            p.kind == "image" and p.end > (job.stats.cached_tokens or 0) for p in job.prompt.parts
        )
        job.sampler = Sampler(
            self.lib,
            self.model.vocab,
            self.model.n_vocab,
            job.options,
            grammar=job.grammar,
            seed=job.seed,
            defaults=self.model.sampling,
        )
        self._next(job, row)
        if read_a_picture:
            self._keep_on_disk(job)

    def _keep_on_disk(self, job: Job) -> None:
        """Once a turn has read a picture and its first token is out, its state goes to
        the disk tier in the background: a script that never closes its chat, or a
        killed process, still leaves it for the next process."""
        cache, slot = self.prefix_cache, job.slot
        if self.keep_on_disk is None or cache is None or slot is None:
            return
        if cache.wants(slot.keys[: job.pos])[1]:
            state = self.slots.get_state(slot)
            if state is not None:
                self.keep_on_disk(state)

    def _next(self, job: Job, row: int) -> None:
        """Sample ``job``'s next token from batch row ``row`` and pass its text on."""
        assert job.sampler is not None
        token = job.sampler.sample(self.model.ctx, row)
        if self.model.is_eog(token):
            self._finish(job, "stop")
            return
        job.count += 1
        if job.options.logprobs is not None:  # from the same row the sampler read
            ptr = self.lib.llama_get_logits_ith(self.model.ctx, row)
            logits = np.ctypeslib.as_array(ptr, shape=(self.model.n_vocab,))
            job.logprobs.append(
                token_logprob(logits, token, job.options.logprobs, self.model.piece)
            )
        piece = job.utf8.decode(self.model.piece(token))
        if job.leading:
            piece = piece.lstrip()
            job.leading = not piece
        out, hit = job.stopper.feed(piece)
        if out:
            self._piece(job, out)
        limit = job.options.max_tokens
        if hit:
            self._finish(job, "stop")
        elif (limit is not None and job.count >= limit) or job.pos + 1 >= self.model.n_ctx:
            self._finish(job, "length")
        else:
            job.next_token = token

    def _piece(self, job: Job, text: str) -> None:
        if job.stats.first_token_s is None:
            job.stats.first_token_s = time.perf_counter() - job.started
        job.send("piece", text)

    def _status(self, job: Job, status: str) -> None:
        if job.status != status:
            job.status = status
            job.send("status", status)

    def _finish(self, job: Job, reason: Literal["stop", "length"]) -> None:
        tail = job.stopper.flush(job.utf8.decode(b"", final=True))
        if tail:
            self._piece(job, tail)
        now = time.perf_counter()
        stats = job.stats
        stats.completion_tokens = job.count
        stats.decode_s = now - job.decode_started
        stats.total_s = now - job.started
        self._release(job)
        logprobs = tuple(job.logprobs) if job.options.logprobs is not None else None
        job.send("finish", Finish(reason, stats, logprobs))

    def _fail(self, job: Job, error: LlavaLocalError) -> None:
        self._release(job)
        job.send("error", error)

    def _cancel(self, job: Job) -> None:
        self._release(job)
        job.send("cancelled")

    def _release(self, job: Job) -> None:
        """``job`` lets go of its slot (keeping what it decoded) and its resources."""
        slot = job.slot
        if slot is not None:
            self.slots.trim(slot, len(slot.keys))
            slot.job, slot.used = None, time.monotonic()
            job.slot = None
        if job in self._active:
            self._active.remove(job)
        if job.sampler is not None:
            job.sampler.close()
            job.sampler = None
        job.state = "done"
        self.slots.mend()
        job.done.set()
