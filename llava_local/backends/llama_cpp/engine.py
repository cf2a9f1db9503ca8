"""In-process llama.cpp: a GGUF language model plus its mmproj, driven through libmtmd.

Why drive libmtmd ourselves instead of llama-cpp-python's chat handlers: every
handler call clears the KV cache and encodes every picture again, so on a CPU a
follow-up question costs as much as the first (llama-cpp-python issue 2222).
This engine remembers what each sequence of its KV cache holds, position by position
(text tokens, and picture positions named by the picture's content hash), and each
turn evaluates only what differs from it: a picture is encoded once per
conversation. Several conversations are answered at once (:mod:`.scheduler`), and
copies of earlier KV states (:mod:`.kv_cache`, in memory and optionally on disk) let
another conversation, a loaded one or a new process restore the longest prefix they
share instead of reading it again.
"""

from __future__ import annotations

import contextlib
import os
import threading
import time
import warnings
from collections.abc import Generator, Iterator, Sequence
from pathlib import Path
from typing import Any

from ... import catalog, host, memory
from ...chat_formats import ChatFormat, choose_format
from ...control import TurnControl
from ...errors import (
    ContextOverflowError,
    InvalidRequestError,
    LlavaLocalError,
    TurnCancelledError,
)
from ...sampling import Sampling
from ...types import Message, Options
from ...wording import count, plural
from ..base import Backend, Finish, ModelDescription, Turn
from ..registry import make_config
from . import gguf_meta, kv_cache
from .config import LlamaCppConfig, files, memory_budget, settle
from .jobs import Job
from .lib import import_llama_cpp
from .model import LoadedModel
from .pictures import Pictures
from .prompt import Prompt
from .scheduler import Scheduler

#: The driver's last message for a turn.
_LAST = frozenset({"finish", "error", "cancelled", "logits"})


class LlamaCppBackend(Backend):
    """llama.cpp in this process, CPU by default, model memory-mapped; ``parallel``
    conversations are answered at once, each with a window of ``n_ctx`` positions."""

    name = "llama_cpp"
    keeps_state = True

    def __init__(
        self,
        config: LlamaCppConfig | str | os.PathLike[str],
        mmproj: str | os.PathLike[str] | None = None,
        **settings: Any,
    ) -> None:
        """Open ``config`` (as :func:`~llava_local.backends.plan` made it), or, by hand,
        a model file, its projector and :class:`LlamaCppConfig`'s other settings (the
        same checks and the same settled config)."""
        if isinstance(config, LlamaCppConfig):
            if mmproj is not None or settings:
                raise InvalidRequestError(
                    "give the engine a LlamaCppConfig alone, or a model file with mmproj= "
                    "and settings"
                )
            given = config
        else:
            files_given = {"model": os.fspath(config), "mmproj": mmproj}
            made = make_config(self.name, {**files_given, **settings})
            assert isinstance(made, LlamaCppConfig)
            given = made
        #: The settings this engine was opened with, as a plan records them and
        #: :meth:`VisionChat.from_config` rebuilds them (see :func:`.config.settle`).
        self.config: LlamaCppConfig = settle(given)
        config = self.config
        self._lib = import_llama_cpp()
        self._mtmd = self._lib.mtmd_cpp
        #: Tokenizing prompts and encoding pictures (libmtmd, in the callers' threads).
        self.pictures = Pictures(self._lib, int(config.embedding_cache_mb * 2**20))
        #: Projected embeddings of pictures seen before, by content hash.
        self.embeddings = self.pictures.embeddings
        self.model_path, self.mmproj_path = files(config)
        self.model = self.model_path.name
        _, mm_meta = gguf_meta.check_pair(self.model_path, self.mmproj_path)
        self._image_tokens = gguf_meta.image_tokens(mm_meta)
        self._image_size = gguf_meta.image_size(mm_meta)
        self.n_threads = config.n_threads or host.physical_cores()
        #: What this engine holds, decided before loading (the same record ``doctor`` and
        #: ``models`` show): its context, slots and the memory for kept KV states.
        self.memory_budget = budget = memory_budget(config)
        if budget.n_ctx < budget.n_ctx_wanted:
            warnings.warn(
                memory.shorter_context(
                    self.model, budget.n_ctx, budget.n_ctx_wanted, budget.available_bytes
                ),
                stacklevel=2,
            )
        #: Whether the model file is memory-mapped (or read into memory).
        self.use_mmap = use_mmap = budget.estimate.mapped
        #: Conversations answered at once.
        self.parallel = parallel = budget.parallel
        #: What loading is expected to take; checked against free memory first, because
        #: the kernel's answer to a model that does not fit is to kill the process.
        self.memory_estimate = budget.estimate
        if config.n_gpu_layers == 0:  # with GPU offload the host holds less than this
            memory.check(self.memory_estimate, force=config.force, available=budget.available_bytes)
        start = time.perf_counter()
        self._loaded = LoadedModel(
            self._lib,
            self.model_path,
            self.mmproj_path,
            n_ctx=budget.n_ctx,
            n_seq=parallel,
            n_batch=config.n_batch,
            n_threads=self.n_threads,
            n_gpu_layers=config.n_gpu_layers,
            use_mmap=use_mmap,
            flash_attn=config.flash_attn,
            verbose=config.verbose,
            clip_callback=self.pictures.clip_callback,
            catalog_sampling=_catalog_sampling(config.model),
        )
        self._load_s = time.perf_counter() - start
        self._n_gpu_layers = config.n_gpu_layers
        loaded = self._loaded
        self._marker = loaded.marker
        self.chat_format: ChatFormat = choose_format(
            config.chat_format,
            loaded.metadata,
            bos=loaded.piece(loaded.bos, special=True).decode("utf-8", "replace"),
            eos=loaded.piece(loaded.eos, special=True).decode("utf-8", "replace"),
        )
        self._memo: tuple[tuple[str, tuple[str, ...]], Prompt] | None = None
        self._memo_lock = threading.Lock()
        #: What a KV state is valid for; states made for anything else are never used.
        self.identity = kv_cache.identity(
            self.model_path,
            self.mmproj_path,
            settings=self._state_settings(),
            llama_cpp_version=str(getattr(self._lib, "__version__", "?")),
        )
        #: Earlier KV states, restored when a prompt shares a longer prefix with one of
        #: them than any slot holds (see :mod:`.kv_cache`).
        self.kv_cache = self._open_kv_cache(config.kv_cache_dir, config.kv_cache_dir_gb)
        mctx, mtmd = loaded.mctx, self._mtmd
        disk = self.kv_cache.disk if self.kv_cache is not None else None
        self._writer = kv_cache.BackgroundWriter(disk) if disk is not None else None
        self._scheduler = Scheduler(
            loaded,
            self.kv_cache,
            non_causal=lambda chunk: bool(mtmd.mtmd_decode_use_non_causal(mctx, chunk)),
            mrope=bool(mtmd.mtmd_decode_use_mrope(mctx)),
            keep_on_disk=self._writer.put if self._writer is not None else None,
        )
        self._closed = False

    # -- loading ---------------------------------------------------------------

    def _state_settings(self) -> dict[str, Any]:
        """The settings a KV state depends on besides the two files."""
        params = self._loaded.params
        fields = ["n_batch", "n_ubatch", "type_k", "type_v", "flash_attn_type"]
        fields += ["rope_freq_base", "rope_freq_scale", "swa_full"]
        settings = {name: getattr(params, name, None) for name in fields}
        settings["n_ctx"] = self._loaded.n_ctx
        settings["n_gpu_layers"] = self._n_gpu_layers
        settings["chat_format"] = self.chat_format.name
        settings["image_tokens"] = self._image_tokens
        return settings

    def _state_limits(self) -> kv_cache.Limits:
        """What a state read from a file may hold: fewer positions than the context,
        token ids of this vocabulary, and at most twice one conversation's KV cache."""
        n_ctx = self.n_ctx
        per_conversation = self.memory_estimate.kv_bytes // max(1, self.parallel)
        return kv_cache.Limits(
            max_keys=n_ctx - 1,
            n_vocab=self._loaded.n_vocab,
            max_state_bytes=2 * per_conversation + 64 * n_ctx + (1 << 20),
        )

    def _open_kv_cache(
        self, directory: str | os.PathLike[str] | None, directory_gb: float
    ) -> kv_cache.PrefixCache | None:
        """The kept states: in RAM within the budget's share (the memory check's margin
        always left free), and on disk when a folder is given."""
        budget = self.memory_budget
        tier = (
            kv_cache.MemoryTier(budget.kept_bytes, budget.margin_bytes)
            if budget.kept_bytes > 0
            else None
        )
        disk = None
        if directory is not None:
            disk = kv_cache.DiskTier(
                Path(directory).expanduser(),
                self.identity,
                int(directory_gb * 2**30),
                self._state_limits(),
            )
        if tier is None and disk is None:
            return None
        return kv_cache.PrefixCache(tier, disk)

    @property
    def max_image_side(self) -> int:
        # A fixed-size encoder (LLaVA-1.5: 336 px) resizes anything larger itself;
        # sending it twice that keeps detail for its own resampling and no more.
        if self._image_size:
            return max(self._image_size * 2, 64)
        return self.default_max_image_side

    @property
    def sampling(self) -> Sampling:
        """What a turn samples with where its options say nothing: the GGUF's
        recommendation, else the catalogue's, else llama.cpp's defaults."""
        return self._loaded.sampling

    @property
    def n_ctx(self) -> int:
        """The context window of one conversation, in tokens (positions)."""
        return self._loaded.n_ctx

    def describe(self) -> ModelDescription:
        return ModelDescription(
            files=(self.model_path, self.mmproj_path),
            n_ctx=self.n_ctx,
            parallel=self.parallel,
            kv_bytes=self.memory_estimate.kv_bytes,
            kept_bytes=self.memory_budget.kept_bytes,
        )

    @property
    def n_vocab(self) -> int:
        return self._loaded.n_vocab

    @property
    def closed(self) -> bool:
        """Whether :meth:`close` has freed the model."""
        return self._closed

    @property
    def steps_shared(self) -> int:
        """Decoding steps so far that advanced more than one conversation at once."""
        return self._scheduler.shared_steps

    @property
    def turns_waiting(self) -> int:
        """Turns waiting for a slot (all ``parallel`` slots busy)."""
        return self._scheduler.waiting

    @property
    def turns_running(self) -> int:
        """Turns holding a slot: reading, encoding their pictures, or answering."""
        return self._scheduler.running

    @contextlib.contextmanager
    def hold(self) -> Iterator[None]:
        """Keep the engine between two steps while the block runs: turns submitted
        meanwhile start together when it ends (a consistent moment to look at the slots;
        tests use it to run turns side by side for certain)."""
        entered, release = threading.Event(), threading.Event()

        def wait() -> None:
            entered.set()
            release.wait()

        holder = threading.Thread(target=self._scheduler.call, args=(wait,), daemon=True)
        holder.start()
        entered.wait()
        try:
            yield
        finally:
            release.set()
            holder.join()

    def flush(self) -> None:
        """Wait until the states handed to the disk tier in the background are written."""
        if self._writer is not None:
            self._writer.join()

    def slot_keys(self) -> list[tuple[kv_cache.Key, ...]]:
        """What each slot holds, position by position: what earlier turns left to reuse
        (for diagnostics and tests)."""
        return [tuple(slot.keys) for slot in self._scheduler.slots]

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        cache = self.kv_cache
        if cache is not None and cache.disk is not None:
            # what the slots hold is what a later process most likely asks about
            self._scheduler.call(self._keep_slots_on_disk)
        self._scheduler.close()
        if self._writer is not None:
            self._writer.close()
        self._forget_prompt()
        with self.pictures.lock:  # a picture still being encoded finishes first
            self._loaded.close()

    def _keep_slots_on_disk(self) -> None:
        cache = self.kv_cache
        assert cache is not None
        for slot in self._scheduler.slots:
            if slot.keys and cache.wants(slot.keys)[1]:
                state = self._scheduler.slots.get_state(slot)
                if state is not None:
                    cache.keep(state, memory=False, disk=True)

    # -- one turn ----------------------------------------------------------------

    def generate(self, turn: Turn) -> Generator[str | Finish, None, None]:
        job = self._submit(turn, logits_only=False)
        control = turn.control
        try:
            while True:
                message = self._receive(job, control)
                if message.kind == "status":
                    control.report(message.value)
                elif message.kind == "piece":
                    yield message.value
                elif message.kind == "finish":
                    finish: Finish = message.value
                    finish.stats.load_s = self._take_load_s()
                    yield finish
                    return
                elif message.kind == "error":
                    raise message.value
                else:  # "cancelled" by the caller's own close(): nothing to say
                    raise TurnCancelledError("the turn was cancelled")
        finally:
            self._let_go(job)

    def next_token_logits(self, turn: Turn) -> Any:
        """Read the conversation and return the logits of the answer's first token.

        A numpy array of the vocabulary's size; for scoring and for tests that need
        to see what the model makes of a picture without sampling.
        """
        job = self._submit(turn, logits_only=True)
        try:
            while True:
                message = self._receive(job, turn.control)
                if message.kind == "logits":
                    return message.value
                if message.kind == "error":
                    raise message.value
                if message.kind == "cancelled":
                    raise TurnCancelledError("the turn was cancelled")
        finally:
            self._let_go(job)

    def prefetch(self, messages: Sequence[Message]) -> threading.Thread:
        """Start reading ``messages`` (a conversation ending with a user message whose
        question is not asked yet, such as a picture just given) in the background; a
        turn that shares its prefix then waits for it and reads only the rest. Returns
        the thread doing it (failures are left for that turn to meet again)."""
        turn = Turn(messages, Options(max_tokens=1), control=TurnControl())

        def read() -> None:
            with contextlib.suppress(LlavaLocalError):
                job = self._submit(turn, logits_only=False, prefetch=True)
                try:
                    while self._receive(job, turn.control).kind not in _LAST:
                        pass
                finally:
                    self._let_go(job)

        thread = threading.Thread(target=read, name="llava-local read ahead", daemon=True)
        thread.start()
        return thread

    def _submit(self, turn: Turn, *, logits_only: bool, prefetch: bool = False) -> Job:
        started = time.perf_counter()
        prompt = self._take_prompt(turn)
        try:
            self._check_fits(prompt)
            opts = turn.options
            seed = opts.seed if opts.seed is not None else self._lib.LLAMA_DEFAULT_SEED
            job = Job(
                prompt,
                opts,
                _grammar(turn.json_schema),
                int(seed),
                turn.control,
                started=started,
                logits_only=logits_only,
                prefetch=prefetch,
            )
        except BaseException:
            prompt.free()
            raise
        for part in prompt.parts:
            if part.kind == "image" and (embd := self.embeddings.get(part.picture)) is not None:
                job.embeddings[part.picture] = embd
        job.stats.images_encoded, job.stats.image_encode_s = 0, 0.0
        self._scheduler.submit(job)
        return job

    def _check_fits(self, prompt: Prompt) -> None:
        """Refuse a prompt that leaves no room to answer, before any of it is read (a
        max_tokens that does not fit is capped: the answer ends with "length")."""
        needed, n_ctx = len(prompt.keys) + 1, self.n_ctx
        if needed <= n_ctx:
            return
        pictures = sum(p.length for p in prompt.parts if p.kind == "image")
        images = sum(p.kind == "image" for p in prompt.parts)
        if pictures >= n_ctx:
            message = (
                f"the {plural(images, 'picture')} alone {plural(images, 'needs')} "
                f"{count(pictures, 'position')} and the context window holds {n_ctx}; "
                f"load the model with a larger context window (n_ctx= at least {needed})"
            )
        else:
            share = f", {pictures} of them for pictures," if pictures else ""
            message = (
                f"this turn's prompt is {count(len(prompt.keys), 'token')}{share} and the "
                f"context window holds {n_ctx}, leaving no room for an answer; shorten the "
                "prompt, send fewer pictures, start a new conversation with reset(), or "
                f"load the model with a larger context window (n_ctx= at least {needed})"
            )
        raise ContextOverflowError(
            message, needed=needed, available=n_ctx, pictures=pictures, setting="n_ctx"
        )

    def _receive(self, job: Job, control: TurnControl) -> Any:
        """The driver's next message for ``job``, encoding its pictures when asked.
        Ctrl-C meanwhile stops the turn and is raised once the driver let go of it."""
        while True:
            with control.c_calls():
                message = job.receive(self._scheduler.wake)
                if message.kind == "encode":
                    self.pictures.encode(self._loaded, job, message.value)
                    self._scheduler.encoded(job)
                    continue
            return message

    def _let_go(self, job: Job) -> None:
        """Wait until the driver let go of ``job`` (stopping it if it still runs), so the
        conversation is left as a finished or stopped turn leaves it, never half."""
        if not job.done.is_set():
            job.abandoned = True
            self._scheduler.wake()
            job.done.wait()
        job.prompt.free()

    def _take_load_s(self) -> float:
        load_s, self._load_s = self._load_s, 0.0
        return load_s

    # -- prompts ---------------------------------------------------------------------

    def context_needed(self, turn: Turn) -> tuple[int, int]:
        prompt = self._prompt_for(turn, keep=True)
        return len(prompt.keys) + (turn.options.max_tokens or 1), self.n_ctx

    def _prompt_key(self, messages: Sequence[Message]) -> tuple[str, tuple[str, ...]]:
        text = self.chat_format.prompt(messages, self._marker)
        return text, tuple(image.sha256 for m in messages for image in m.images)

    def _prompt_for(self, turn: Turn, *, keep: bool) -> Prompt:
        """The tokenized turn; with ``keep`` it stays memoised (the core often asks for
        the same turn twice: its size, then its answer)."""
        key = self._prompt_key(turn.messages)
        with self._memo_lock:
            if self._memo is not None and self._memo[0] == key:
                prompt = self._memo[1]
                if not keep:
                    self._memo = None
                return prompt
        prompt = self._tokenize(turn.messages, key[0])
        if keep:
            with self._memo_lock:
                old, self._memo = self._memo, (key, prompt)
            if old is not None:
                old[1].free()
        return prompt

    def _take_prompt(self, turn: Turn) -> Prompt:
        """The tokenized turn, owned by the caller from now on."""
        return self._prompt_for(turn, keep=False)

    def _forget_prompt(self) -> None:
        with self._memo_lock:
            old, self._memo = self._memo, None
        if old is not None:
            old[1].free()

    def _tokenize(self, messages: Sequence[Message], text: str) -> Prompt:
        images = [image for m in messages for image in m.images]
        return self.pictures.tokenize(self._loaded, text, images)

    # -- kept KV states ------------------------------------------------------------

    def save_state(self, messages: Sequence[Any], path: str | os.PathLike[str]) -> int:
        """Write the KV state that holds most of the conversation ``messages`` to
        ``path`` (atomically); returns how many of its positions it holds, 0 when no
        state holds any (then no file is written and an old one is removed)."""
        target = Path(path)
        prompt = self._tokenize(messages, self._prompt_key(messages)[0])
        keys = list(prompt.keys)
        prompt.free()
        scheduler = self._scheduler

        def best_state() -> kv_cache.KVState | None:
            slot = max(
                scheduler.slots, key=lambda s: kv_cache.common_prefix(s.keys, keys), default=None
            )
            live = kv_cache.common_prefix(slot.keys, keys) if slot is not None else 0
            found = self.kv_cache.best(keys) if self.kv_cache is not None else None
            if found is not None and found.shared > live:
                return found.load()
            if slot is not None and live > 0:
                return scheduler.slots.get_state(slot)
            return None

        state = scheduler.call(best_state)
        if state is None:
            with contextlib.suppress(OSError):
                target.unlink()
            return 0
        kv_cache.write_state(target, self.identity, state)
        return kv_cache.common_prefix(state.keys, keys)

    def load_state(self, path: str | os.PathLike[str]) -> int:
        """Make the KV state in ``path`` (written by :meth:`save_state`) what an idle
        slot holds (or, when every slot is busy, a kept state); what that slot held
        before is kept in the prefix cache. Returns the positions restored, or 0 when
        the file is missing, damaged, not written with this user's key
        (:mod:`.state_key`), beyond this engine's context or vocabulary, or made for
        another model, projector or settings (then nothing changes). Should the next
        turn's reading fail on top of it, the file is removed and the turn read cold."""
        target = Path(path)
        state = kv_cache.read_state(target, self.identity, self._state_limits())
        if state is None or len(state.keys) >= self.n_ctx:
            return 0
        scheduler = self._scheduler

        def restore() -> int:
            slot = scheduler.slots.idle_slot()
            if slot is None:
                if self.kv_cache is not None and self.kv_cache.memory is not None:
                    self.kv_cache.memory.put(state)
                    return len(state.keys)
                return 0
            scheduler.slots.stash(slot)
            if not scheduler.slots.set_state(slot, state):
                return 0
            slot.suspect = lambda: target.unlink(missing_ok=True)
            return len(state.keys)

        return scheduler.call(restore)


def _grammar(schema: dict[str, Any] | None) -> str | None:
    if schema is None:
        return None
    from .grammar import grammar_text  # bounds the converter drops; checked it parses

    return grammar_text(schema)


def _catalog_sampling(model: str | None) -> Sampling | None:
    """The sampling the catalogue recommends for ``model`` (a catalogue name or a file)."""
    entry = catalog.match(model) if model else None
    return entry[0].sampling if entry else None
