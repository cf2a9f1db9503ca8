"""In-process llama.cpp: a GGUF language model plus its mmproj, driven through libmtmd.

Why drive libmtmd ourselves instead of llama-cpp-python's chat handlers: every
handler call clears the KV cache and encodes every picture again, so on a CPU a
follow-up question costs as much as the first (llama-cpp-python issue 2222).
This backend remembers what its KV cache holds, position by position (text
tokens, and picture positions named by the picture's content hash), and each
turn evaluates only what differs from it: a picture is encoded once per
conversation. Copies of earlier KV states (:mod:`.kv_cache`, in memory and
optionally on disk) let another conversation, a loaded one or a new process
restore the longest prefix they share instead of reading it again.
"""

from __future__ import annotations

import codecs
import contextlib
import ctypes
import os
import sys
import threading
import time
from collections.abc import Callable, Generator, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .. import host, memory
from ..chat_formats import ChatFormat, choose_format
from ..control import (
    STATUS_ANSWERING,
    STATUS_ENCODING,
    STATUS_READING_PICTURE,
    STATUS_READING_PROMPT,
    TurnControl,
)
from ..demo import DEMO_NAME, demo_paths, is_demo
from ..errors import (
    BackendError,
    ContextOverflowError,
    ImageError,
    InvalidRequestError,
    MissingDependencyError,
    ModelLoadError,
    ModelNotFoundError,
)
from ..resolve import find_mmproj, pulled_pair
from ..types import Options, Stats
from ..wording import count, plural
from . import gguf_meta, kv_cache, kv_payload
from .base import Backend, Finish, Turn
from .embedding_cache import EmbeddingCache
from .kv_cache import Key, KVState
from .registry import Capabilities, EngineConfig, EngineSpec, register

if TYPE_CHECKING:
    from llama_cpp import Llama

# Text budget added to the pictures' tokens when n_ctx is not given.
TEXT_BUDGET = 2048

# A live KV state about to be overwritten is kept (see _stash) when what is lost holds a
# picture or at least this many tokens; a follow-up that re-tokenizes the last answer
# loses a token or two, which is not worth copying the whole state for.
STASH_MIN_TOKENS = 64

# How often a turn waiting for another conversation's turn on this engine looks at its
# own stop flag.
_WAIT_POLL_S = 0.05

# CLIP's graph is computed in pieces of this many nodes, so that a stop request is seen
# between pieces (a ViT-L at 336 px has about 700 nodes: ~45 pieces, no measurable cost).
CLIP_NODES_PER_CHECK = 16


class _Stopped(Exception):
    """C code stopped at the turn's request; TurnControl turns it into the right error."""


def _import_llama_cpp() -> Any:
    try:
        import llama_cpp
        import llama_cpp.mtmd_cpp
    except ImportError as exc:  # pragma: no cover - exercised only without the extra
        raise MissingDependencyError(
            "the llama.cpp engine needs llama-cpp-python: pip install 'llava-local[llama-cpp]' "
            "(see the README for build flags on CPUs with AMX)"
        ) from exc
    _quiet_null_files()
    return llama_cpp


def _quiet_null_files() -> None:
    """llama-cpp-python opens ``/dev/null`` twice at import (``llama_cpp._utils``, where
    it sends C's output while loading) and never closes it, so every process that used
    the engine ended with ``ResourceWarning: unclosed file '/dev/null'`` under ``-W``.
    Those files must outlive every model (a model freed at exit still uses them), so
    they are swapped for ones over a descriptor left to the process's end on purpose,
    which Python does not warn about, and the originals are closed."""
    from llama_cpp import _utils

    for name in ("outnull_file", "errnull_file"):
        original = getattr(_utils, name, None)
        raw = getattr(getattr(original, "buffer", None), "raw", None)
        if original is None or not getattr(raw, "closefd", False):
            continue  # another llama-cpp-python, or swapped already
        descriptor = os.open(os.devnull, os.O_WRONLY)
        setattr(_utils, name, open(descriptor, "w", closefd=False))  # noqa: SIM115
        original.close()


_log_state: dict[str, Any] = {"verbose": False, "callback": None}


def _quiet_mtmd(lib: Any, verbose: bool) -> None:
    """Send libmtmd's log to stderr only for errors, unless verbose: it narrates every turn."""
    _log_state["verbose"] = verbose
    if _log_state["callback"] is None:

        @lib.llama_log_callback  # type: ignore[untyped-decorator]
        def callback(level: int, text: bytes, _user: Any) -> None:
            if _log_state["verbose"] or level == 3:  # GGML_LOG_LEVEL_ERROR
                sys.stderr.write(text.decode("utf-8", "replace"))

        _log_state["callback"] = callback  # keep it alive: C holds only the pointer
        lib.mtmd_cpp.mtmd_log_set(callback, None)
        lib.mtmd_cpp.mtmd_helper_log_set(callback, None)


@dataclass
class _Prompt:
    """A tokenized turn: the mtmd chunks plus the KV key of every position."""

    chunks: Any
    keys: list[Key] = field(default_factory=list)
    # (kind, chunk pointer, first position) per chunk, kind "text" or "image".
    parts: list[tuple[str, Any, int]] = field(default_factory=list)


class LlamaCppConfig(EngineConfig):
    """Settings of the in-process engine. ``model`` is a GGUF path, the name of a pulled
    catalogue model, or ``"demo"``/None for the bundled demo; catalogue models and the
    demo are recorded by name, so a config also works where paths differ."""

    mmproj: str | None = None
    n_ctx: int | None = None
    n_threads: int | None = None
    chat_format: str | None = None
    n_gpu_layers: int = 0
    n_batch: int = 512
    use_mmap: bool = True
    verbose: bool = False
    embedding_cache_mb: float = 256
    #: KV states kept in memory, in MB: None sizes it from the memory available after
    #: loading (half of what the memory preflight's margin leaves); 0 keeps none.
    kv_cache_mb: float | None = None
    #: A folder for KV states on disk (shared by processes), and its size bound in GB.
    kv_cache_dir: str | None = None
    kv_cache_dir_gb: float = 8.0
    force: bool = False

    @classmethod
    def conversation_names(cls) -> frozenset[str]:
        # mmproj is recorded beside the model; the rest (threads, memory, folders,
        # force) is this machine's business, never a file's.
        return frozenset({"chat_format", "n_ctx"})


class LlamaCppBackend(Backend):
    """llama.cpp in this process, CPU by default, model memory-mapped."""

    name = "llama_cpp"

    def __init__(
        self,
        model: str | os.PathLike[str],
        mmproj: str | os.PathLike[str],
        *,
        n_ctx: int | None = None,
        n_threads: int | None = None,
        chat_format: str | None = None,
        n_gpu_layers: int = 0,
        n_batch: int = 512,
        use_mmap: bool = True,
        verbose: bool = False,
        embedding_cache_mb: float = 256,
        kv_cache_mb: float | None = None,
        kv_cache_dir: str | os.PathLike[str] | None = None,
        kv_cache_dir_gb: float = 8.0,
        force: bool = False,
        catalog_name: str | None = None,
    ) -> None:
        self._llama_cpp = _import_llama_cpp()
        # The running turn's control, polled by the C callbacks below (kept alive here:
        # C holds only the pointers).
        self._control: TurnControl | None = None
        self._clip_nodes = 0
        self._abort_cb = self._llama_cpp.ggml_abort_callback(self._abort_requested)
        self._no_abort = ctypes.cast(0, self._llama_cpp.ggml_abort_callback)
        self._clip_cb = self._llama_cpp.ggml_backend_sched_eval_callback(self._clip_eval)
        #: Projected embeddings of pictures seen before, by content hash.
        self.embeddings = EmbeddingCache(int(embedding_cache_mb * 2**20))
        self._mtmd = self._llama_cpp.mtmd_cpp
        self.model_path = _existing_file(model, "language model")
        self.mmproj_path = _existing_file(mmproj, "projector (mmproj)")
        self.model = self.model_path.name
        if is_demo(self.model_path):
            catalog_name = DEMO_NAME
        #: These settings, as :meth:`VisionChat.from_config` rebuilds them; the demo and
        #: pulled catalogue models (``catalog_name``) by name, other files by path.
        self.config = LlamaCppConfig(
            model=catalog_name or str(self.model_path.resolve()),
            mmproj=None if catalog_name else str(self.mmproj_path.resolve()),
            n_ctx=n_ctx,
            n_threads=n_threads,
            chat_format=chat_format,
            n_gpu_layers=n_gpu_layers,
            n_batch=n_batch,
            use_mmap=use_mmap,
            verbose=verbose,
            embedding_cache_mb=embedding_cache_mb,
            kv_cache_mb=kv_cache_mb,
            kv_cache_dir=None if kv_cache_dir is None else str(Path(kv_cache_dir).expanduser()),
            kv_cache_dir_gb=kv_cache_dir_gb,
            force=force,
        )
        lm_meta, mm_meta = gguf_meta.check_pair(self.model_path, self.mmproj_path)
        self._image_tokens = gguf_meta.image_tokens(mm_meta)
        self._image_size = gguf_meta.image_size(mm_meta)
        self.n_threads = n_threads or host.physical_cores()
        if n_ctx is None:
            trained = int(lm_meta.get("context_length") or 4096)
            n_ctx = min(trained, (self._image_tokens or 576) + TEXT_BUDGET)
        #: What loading is expected to take; checked against free memory first, because
        #: the kernel's answer to a model that does not fit is to kill the process.
        self.memory_estimate = memory.estimate(
            self.model_path,
            self.mmproj_path,
            n_ctx=n_ctx,
            n_batch=n_batch,
            n_threads=self.n_threads,
            use_mmap=use_mmap,
        )
        if n_gpu_layers == 0:  # with GPU offload the host holds less than this
            memory.check(self.memory_estimate, force=force)
        start = time.perf_counter()
        self._load(n_ctx, n_gpu_layers, n_batch, use_mmap, verbose)
        self._load_s = time.perf_counter() - start
        self._marker = self._mtmd.mtmd_default_marker().decode()
        bos = self._piece(self._llama.token_bos())
        eos = self._piece(self._llama.token_eos())
        self.chat_format: ChatFormat = choose_format(
            chat_format, self._llama.metadata, bos=bos, eos=eos
        )
        self._keys: list[Key] = []  # what the KV cache holds, one entry per position
        # Forgets the kept state the live KV cache was last restored from, should the
        # next turn's reading fail on top of it (a state that passed every check but
        # still breaks decoding is then never offered again).
        self._suspect: Callable[[], None] | None = None
        self._memo: tuple[tuple[str, tuple[str, ...]], _Prompt] | None = None
        # One turn at a time on this engine, whichever chat asks (chats sharing an
        # engine, as a server's do); a thread in a turn owns it.
        # A plain lock: a turn may be read piece by piece by several threads, and the
        # last one lets go of it.
        self._lock = threading.Lock()
        self._n_gpu_layers = n_gpu_layers
        self._owner: threading.Thread | None = None
        #: What a KV state is valid for; states made for anything else are never used.
        self.identity = kv_cache.identity(
            self.model_path,
            self.mmproj_path,
            settings=self._state_settings(),
            llama_cpp_version=str(getattr(self._llama_cpp, "__version__", "?")),
        )
        #: Earlier KV states, restored when a prompt shares a longer prefix with one of
        #: them than with the live KV cache (see :mod:`.kv_cache`).
        self.kv_cache = self._open_kv_cache(kv_cache_mb, kv_cache_dir, kv_cache_dir_gb)

    # -- loading ---------------------------------------------------------------

    def _state_settings(self) -> dict[str, Any]:
        """The settings a KV state depends on besides the two files."""
        params = self._llama.context_params
        fields = ["n_ctx", "n_batch", "n_ubatch", "type_k", "type_v", "flash_attn_type"]
        fields += ["rope_freq_base", "rope_freq_scale", "swa_full"]
        settings = {name: getattr(params, name, None) for name in fields}
        settings["n_gpu_layers"] = self._n_gpu_layers
        settings["chat_format"] = self.chat_format.name
        settings["image_tokens"] = self._image_tokens
        return settings

    def _state_limits(self) -> kv_cache.Limits:
        """What a state read from a file may hold: fewer positions than the context,
        token ids of this vocabulary, and at most twice the KV cache's estimated size."""
        n_ctx = self.n_ctx
        return kv_cache.Limits(
            max_keys=n_ctx - 1,
            n_vocab=int(self._llama.n_vocab()),
            max_state_bytes=2 * self.memory_estimate.kv_bytes + 64 * n_ctx + (1 << 20),
        )

    def _open_kv_cache(
        self,
        memory_mb: float | None,
        directory: str | os.PathLike[str] | None,
        directory_gb: float,
    ) -> kv_cache.PrefixCache | None:
        reserve = memory.margin(self.memory_estimate)
        if memory_mb is None:
            budget = kv_cache.default_memory_bytes(reserve)
        else:
            budget = max(0, int(memory_mb * 2**20))
        tier = kv_cache.MemoryTier(budget, reserve) if budget > 0 else None
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

    def _load(
        self, n_ctx: int, n_gpu_layers: int, n_batch: int, use_mmap: bool, verbose: bool
    ) -> None:
        """Load the language model and the projector. A Ctrl-C meanwhile would be raised
        in a C log callback and lost (a 7B model loads for tens of seconds on a small
        CPU), so it is held until loading ends, then raised with both files let go."""
        loading = TurnControl()
        self._ctx = None
        try:
            with loading.c_calls():
                self._llama = self._load_llama(n_ctx, n_gpu_layers, n_batch, use_mmap, verbose)
                if not loading.cancelled:  # no projector to load for nothing
                    self._ctx = self._init_mtmd(verbose)
        except BaseException:
            if self._ctx:
                self._mtmd.mtmd_free(self._ctx)
                self._ctx = None
            if getattr(self, "_llama", None) is not None:
                self._llama.close()
            raise

    def _load_llama(
        self, n_ctx: int, n_gpu_layers: int, n_batch: int, use_mmap: bool, verbose: bool
    ) -> Llama:
        try:
            return self._llama_cpp.Llama(  # type: ignore[no-any-return]
                model_path=str(self.model_path),
                n_ctx=n_ctx,
                n_batch=min(n_batch, n_ctx),
                n_ubatch=min(n_batch, n_ctx),
                n_threads=self.n_threads,
                n_threads_batch=self.n_threads,
                n_gpu_layers=n_gpu_layers,
                use_mmap=use_mmap,
                verbose=verbose,
            )
        except (ValueError, RuntimeError, OSError) as exc:
            raise ModelLoadError(
                f"llama.cpp could not load the language model {self.model_path}: {exc}"
            ) from exc

    def _init_mtmd(self, verbose: bool) -> Any:
        _quiet_mtmd(self._llama_cpp, verbose)
        params = self._mtmd.mtmd_context_params_default()
        params.use_gpu = False
        params.print_timings = verbose
        params.n_threads = self.n_threads
        params.warmup = False
        params.cb_eval = self._clip_cb  # lets a stop request end a picture's encoding
        params.cb_eval_user_data = None
        ctx = self._mtmd.mtmd_init_from_file(
            str(self.mmproj_path).encode(), self._llama.model, params
        )
        if not ctx:
            self._llama.close()
            raise ModelLoadError(
                f"libmtmd could not load the projector {self.mmproj_path} for "
                f"{self.model_path.name}; check that it is the mmproj made for this model"
            )
        if not self._mtmd.mtmd_support_vision(ctx):
            self._mtmd.mtmd_free(ctx)
            self._llama.close()
            raise ModelLoadError(f"the projector {self.mmproj_path} has no vision encoder")
        return ctx

    @property
    def max_image_side(self) -> int:
        # A fixed-size encoder (LLaVA-1.5: 336 px) resizes anything larger itself;
        # sending it twice that keeps detail for its own resampling and no more.
        if self._image_size:
            return max(self._image_size * 2, 64)
        return self.default_max_image_side

    @property
    def n_ctx(self) -> int:
        """The context window, in tokens (positions): the one asked for. llama.cpp pads
        its own up (to a multiple of 256), but llama-cpp-python keeps the tokens read in
        an array of the size asked for, so the padding cannot be used."""
        return min(int(self._llama.n_ctx()), len(self._llama.input_ids))

    def close(self) -> None:
        with self._lock:
            if self.kv_cache is not None and self.kv_cache.disk is not None and self._ctx:
                # the live state is what a later process most likely asks about
                self._stash(memory_tier=False)
        self._forget_prompt()
        if self._ctx:
            self._mtmd.mtmd_free(self._ctx)
            self._ctx = None
        self._llama.close()
        self._keys = []

    # -- one turn ----------------------------------------------------------------

    def generate(self, turn: Turn) -> Generator[str | Finish, None, None]:
        started = time.perf_counter()
        control = turn.control
        with self._turn(control):
            self._control = control
            try:
                with control.c_calls():
                    self._set_abort(True)
                    try:
                        stats = self._read_prompt(turn)
                    finally:
                        self._set_abort(False)
                yield from self._decode(turn, stats, started)
            finally:
                self._control = None

    @contextlib.contextmanager
    def _turn(self, control: TurnControl) -> Iterator[None]:
        """Hold the engine for one turn, waiting (stoppably) for another chat's turn."""
        if self._owner is threading.current_thread():
            raise InvalidRequestError(
                "this thread is already reading a turn on this engine (through another "
                "chat sharing it); finish or close that stream first"
            )
        while not self._lock.acquire(timeout=_WAIT_POLL_S):
            control.check()
        self._owner = threading.current_thread()
        try:
            yield
        finally:
            self._owner = None
            self._lock.release()

    # -- stopping a turn whose work is in C ----------------------------------------

    def _abort_requested(self, _data: Any = None) -> bool:
        control = self._control
        return control is not None and control.cancelled

    def _clip_eval(self, _tensor: Any, ask: bool, _data: Any) -> bool:
        """ggml's scheduler asks, node by node, whether we want to look at a result
        (then it computes up to there and calls again); saying yes every few nodes
        gives us a moment to say stop, returning False on the second call."""
        if ask:
            self._clip_nodes += 1
            return self._clip_nodes % CLIP_NODES_PER_CHECK == 0 or self._abort_requested()
        return not self._abort_requested()

    def _set_abort(self, on: bool) -> None:
        """llama.cpp calls the abort callback after every graph node: on while the
        prompt is read (seconds of work), off while decoding (one token at a time, and
        Python runs between tokens)."""
        callback = self._abort_cb if on else self._no_abort
        self._llama_cpp.llama_set_abort_callback(self._llama.ctx, callback, None)

    def _stop_point(self) -> None:
        if self._abort_requested():
            raise _Stopped

    def next_token_logits(self, turn: Turn) -> Any:
        """Read the conversation and return the logits of the answer's first token.

        A numpy array of the vocabulary's size; for scoring and for tests that need
        to see what the model makes of a picture without sampling.
        """
        import numpy as np

        with self._turn(turn.control):
            self._read_prompt(turn)
        ptr = self._llama_cpp.llama_get_logits_ith(self._llama.ctx, -1)
        return np.ctypeslib.as_array(ptr, shape=(self._llama.n_vocab(),)).copy()

    def context_needed(self, turn: Turn) -> tuple[int, int]:
        with self._turn(turn.control):  # the tokenized prompt is shared with the turn
            prompt = self._prompt_for(turn)
            return len(prompt.keys) + (turn.options.max_tokens or 1), self.n_ctx

    def _prompt_for(self, turn: Turn) -> _Prompt:
        """The tokenized turn; the last one is kept, as the core often asks twice."""
        images = [image for message in turn.messages for image in message.images]
        text = self.chat_format.prompt(turn.messages, self._marker)
        key = (text, tuple(image.sha256 for image in images))
        if self._memo is not None and self._memo[0] == key:
            return self._memo[1]
        prompt = self._tokenize(text, images)
        self._forget_prompt()
        self._memo = (key, prompt)
        return prompt

    def _forget_prompt(self) -> None:
        if self._memo is not None:
            self._mtmd.mtmd_input_chunks_free(self._memo[1].chunks)
            self._memo = None

    def _read_prompt(self, turn: Turn) -> Stats:
        """Tokenize the conversation and evaluate what the KV cache does not hold yet."""
        started = time.perf_counter()
        prompt = self._prompt_for(turn)
        try:
            self._check_fits(prompt)
            stats = Stats(load_s=self._load_s)
            self._load_s = 0.0
            self._evaluate(prompt, stats, turn.control)
        finally:
            self._forget_prompt()
        stats.prompt_s = time.perf_counter() - started
        return stats

    def _check_fits(self, prompt: _Prompt) -> None:
        """Refuse a prompt that leaves no room to answer, before any of it is read (a
        max_tokens that does not fit is capped: the answer ends with "length")."""
        needed, n_ctx = len(prompt.keys) + 1, self.n_ctx
        if needed <= n_ctx:
            return
        pictures = sum(self._chunk_len(k, c) for k, c, _ in prompt.parts if k == "image")
        images = sum(kind == "image" for kind, _, _ in prompt.parts)
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

    def _piece(self, token: int) -> str:
        return bytes(self._llama.detokenize([token], special=True)).decode("utf-8", "replace")

    def _tokenize(self, text: str, images: Sequence[Any]) -> _Prompt:
        mtmd = self._mtmd
        bitmaps = []
        try:
            for image in images:
                buf = (ctypes.c_uint8 * len(image.data)).from_buffer_copy(image.data)
                bitmap = mtmd.mtmd_helper_bitmap_init_from_buf(
                    self._ctx, buf, len(image.data), False
                )
                if not bitmap:
                    raise ImageError(image.source, "llama.cpp could not decode the picture")
                mtmd.mtmd_bitmap_set_id(bitmap, image.sha256.encode())
                bitmaps.append(bitmap)
            chunks = mtmd.mtmd_input_chunks_init()
            data = text.encode()
            inp = mtmd.mtmd_input_text()
            inp.text, inp.text_len = data, len(data)
            inp.add_special, inp.parse_special = True, True
            array = (mtmd.mtmd_bitmap_p_ctypes * max(1, len(bitmaps)))(*bitmaps)
            code = mtmd.mtmd_tokenize(self._ctx, chunks, ctypes.byref(inp), array, len(bitmaps))
            if code != 0:
                mtmd.mtmd_input_chunks_free(chunks)
                raise BackendError(
                    f"libmtmd could not tokenize the prompt (code {code}): "
                    + ("picture and marker counts differ" if code == 1 else "preprocessing failed")
                )
        finally:
            for bitmap in bitmaps:
                mtmd.mtmd_bitmap_free(bitmap)
        return self._index(chunks)

    def _index(self, chunks: Any) -> _Prompt:
        mtmd = self._mtmd
        prompt = _Prompt(chunks)
        for i in range(mtmd.mtmd_input_chunks_size(chunks)):
            chunk = mtmd.mtmd_input_chunks_get(chunks, i)
            start = len(prompt.keys)
            if mtmd.mtmd_input_chunk_get_type(chunk) == mtmd.MTMD_INPUT_CHUNK_TYPE_TEXT:
                n = ctypes.c_size_t()
                ptr = mtmd.mtmd_input_chunk_get_tokens_text(chunk, ctypes.byref(n))
                prompt.keys.extend(int(ptr[j]) for j in range(n.value))
                prompt.parts.append(("text", chunk, start))
            else:
                ident = (mtmd.mtmd_input_chunk_get_id(chunk) or b"").decode()
                n_pos = int(mtmd.mtmd_input_chunk_get_n_pos(chunk))
                prompt.keys.extend((ident, j) for j in range(n_pos))
                prompt.parts.append(("image", chunk, start))
        return prompt

    def _reusable_prefix(self, keys: Sequence[Key]) -> int:
        """How many leading positions of ``keys`` the KV cache already holds."""
        return _usable(keys, kv_cache.common_prefix(self._keys, keys))

    def _evaluate(self, prompt: _Prompt, stats: Stats, control: TurnControl) -> None:
        """Read what the KV cache does not hold yet. Should reading fail on top of a
        restored state, that state is dropped and the prompt read from the start; any
        failure empties the KV cache, so that nothing left in it fails later turns."""
        try:
            self._evaluate_from(prompt, stats, control, restore=True)
        except BackendError:
            suspect, self._suspect = self._suspect, None
            self._forget_all()
            if suspect is None:
                raise
            with contextlib.suppress(OSError):
                suspect()
            self._evaluate_from(prompt, stats, control, restore=False)
        self._suspect = None

    def _evaluate_from(
        self, prompt: _Prompt, stats: Stats, control: TurnControl, *, restore: bool
    ) -> None:
        llama = self._llama
        keep = self._reusable_prefix(prompt.keys)
        if self.kv_cache is not None and restore:
            keep = self._restore_prefix(prompt.keys, keep)
        llama._ctx.kv_cache_seq_rm(-1, keep, -1)
        llama.n_tokens = keep
        self._keys = self._keys[:keep]
        stats.cached_tokens = keep
        encoded, encode_s = 0, 0.0
        for kind, chunk, start in prompt.parts:
            end = start + self._chunk_len(kind, chunk)
            if end <= keep:
                continue
            if kind == "text":
                control.report(STATUS_READING_PROMPT)
                tokens = prompt.keys[max(start, keep) : end]
                self._eval_text([int(t) for t in tokens if isinstance(t, int)])
            else:
                took = self._eval_image(chunk, control)
                if took is not None:
                    encode_s += took
                    encoded += 1
            self._keys.extend(prompt.keys[len(self._keys) : llama.n_tokens])
        stats.prompt_tokens = len(prompt.keys) - keep
        stats.images_encoded = encoded
        stats.image_encode_s = encode_s

    # -- kept KV states ------------------------------------------------------------

    def _restore_prefix(self, keys: Sequence[Key], live: int) -> int:
        """Restore the kept state that shares more of ``keys`` than the live KV cache,
        if there is one; keep the live state first when it would be lost. Returns how
        many positions of ``keys`` the KV cache now holds."""
        assert self.kv_cache is not None
        found = self.kv_cache.best(keys)
        shared = _usable(keys, found.shared) if found is not None else 0
        if found is None or shared <= live:
            lost = self._keys[live:]
            if len(lost) >= STASH_MIN_TOKENS or any(isinstance(k, tuple) for k in lost):
                self._stash()
            return live
        self._stash()
        state = found.load()
        if state is None or not self._set_state(state):
            if state is not None:
                found.drop()  # llama.cpp refused it: never offered again
            return self._reusable_prefix(keys)  # a damaged file: read it again
        self._suspect = found.drop
        return shared

    def _stash(self, *, memory_tier: bool = True) -> None:
        """Keep a copy of the live KV state, unless a kept state already holds it."""
        assert self.kv_cache is not None
        keys = tuple(self._keys)
        if not keys:
            return
        to_memory, to_disk = self.kv_cache.wants(keys)
        if not (to_memory and memory_tier) and not to_disk:
            return
        state = self._get_state()
        if state is not None:
            self.kv_cache.keep(state, memory=memory_tier, disk=True)

    def _get_state(self) -> KVState | None:
        """The live KV state of sequence 0 with the key of each position it holds."""
        lib, ctx = self._llama_cpp, self._llama.ctx
        # positions past what _keys records (a turn stopped mid-batch) are not kept
        self._llama._ctx.kv_cache_seq_rm(0, len(self._keys), -1)
        size = int(lib.llama_state_seq_get_size(ctx, 0))
        if size <= 0:
            return None
        try:
            data = (ctypes.c_uint8 * size)()
        except MemoryError:
            return None
        written = int(lib.llama_state_seq_get_data(ctx, data, size, 0))
        if written != size:
            return None
        return KVState(tuple(self._keys), data)

    def _set_state(self, state: KVState) -> bool:
        """Make ``state`` the live KV cache. A state whose layout, sizes or positions do
        not check out (:mod:`.kv_payload`) is never handed to llama.cpp; on any failure
        the KV cache is emptied whole (never half a state, nor a cell left at a position
        no removal reaches) and False returned: the prompt is then read from the start."""
        lib, llama = self._llama_cpp, self._llama
        n = len(state.keys)
        if kv_payload.problem(state.data, n, self.n_ctx) is not None:
            self._forget_all()
            return False
        llama._ctx.kv_cache_seq_rm(0, 0, -1)
        read = int(lib.llama_state_seq_set_data(llama.ctx, state.data, len(state.data), 0))
        mem = lib.llama_get_memory(llama.ctx)
        if (
            read != len(state.data)
            or int(lib.llama_memory_seq_pos_min(mem, 0)) != 0
            or int(lib.llama_memory_seq_pos_max(mem, 0)) != n - 1
        ):
            self._forget_all()
            return False
        self._keys = list(state.keys)
        llama.n_tokens = n
        for i, key in enumerate(state.keys):  # as llama.eval would have left them
            if isinstance(key, int):
                llama.input_ids[i] = key
        return True

    def _forget_all(self) -> None:
        """Empty the KV cache whole: every cell, at whatever position."""
        lib = self._llama_cpp
        lib.llama_memory_clear(lib.llama_get_memory(self._llama.ctx), True)
        self._keys = []
        self._llama.n_tokens = 0

    def save_state(self, messages: Sequence[Any], path: str | os.PathLike[str]) -> int:
        """Write the KV state that holds most of the conversation ``messages`` to
        ``path`` (atomically); returns how many of its positions it holds, 0 when no
        state holds any (then no file is written and an old one is removed)."""
        target = Path(path)
        if self._owner is threading.current_thread():
            return 0  # asked from inside a turn: the live state is half-written
        with self._lock:
            text = self.chat_format.prompt(messages, self._marker)
            images = [image for m in messages for image in m.images]
            prompt = self._tokenize(text, images)
            try:
                keys = list(prompt.keys)
            finally:
                self._mtmd.mtmd_input_chunks_free(prompt.chunks)
            live = kv_cache.common_prefix(self._keys, keys)
            found = self.kv_cache.best(keys) if self.kv_cache is not None else None
            state = None
            if found is not None and found.shared > live:
                state = found.load()
            elif live > 0:
                state = self._get_state()
            if state is None:
                with contextlib.suppress(OSError):
                    target.unlink()
                return 0
            kv_cache.write_state(target, self.identity, state)
            return kv_cache.common_prefix(state.keys, keys)

    def load_state(self, path: str | os.PathLike[str]) -> int:
        """Make the KV state in ``path`` (written by :meth:`save_state`) the live one;
        the live state before it is kept in the prefix cache. Returns the positions
        restored, or 0 when the file is missing, damaged, not written with this user's
        key (:mod:`.state_key`), beyond this engine's context or vocabulary, or made for
        another model, projector or settings (then nothing changes). Should the next
        turn's reading fail on top of it, the file is removed and the turn read cold."""
        target = Path(path)
        state = kv_cache.read_state(target, self.identity, self._state_limits())
        if state is None or len(state.keys) >= self.n_ctx:
            return 0
        if self._owner is threading.current_thread():
            return 0
        with self._lock:
            if self.kv_cache is not None:
                self._stash()
            if not self._set_state(state):
                return 0
            self._suspect = lambda: target.unlink(missing_ok=True)
            return len(state.keys)

    def _chunk_len(self, kind: str, chunk: Any) -> int:
        mtmd = self._mtmd
        if kind == "text":
            n = ctypes.c_size_t()
            mtmd.mtmd_input_chunk_get_tokens_text(chunk, ctypes.byref(n))
            return int(n.value)
        return int(mtmd.mtmd_input_chunk_get_n_pos(chunk))

    def _eval_text(self, tokens: list[int]) -> None:
        try:
            self._llama.eval(tokens)
        except RuntimeError as exc:
            self._stop_point()  # llama_decode returns 2 when aborted
            raise BackendError(f"llama.cpp failed to evaluate the prompt: {exc}") from exc

    def _eval_image(self, chunk: Any, control: TurnControl) -> float | None:
        """Read a picture's embeddings into the KV cache, encoding it with CLIP if needed.

        Returns the encode time, or None when the embeddings came from the cache: the
        two steps are split so the stats can tell them apart.
        """
        import numpy as np

        llama, mtmd, lib = self._llama, self._mtmd, self._llama_cpp
        key = (mtmd.mtmd_input_chunk_get_id(chunk) or b"").decode()
        embd = self.embeddings.get(key) if key else None
        encode_s = None
        if embd is None:
            control.report(STATUS_ENCODING)
            t0 = time.perf_counter()
            self._clip_nodes = 0
            code = mtmd.mtmd_encode_chunk(self._ctx, chunk)
            self._stop_point()  # a stopped encode returns half-computed embeddings
            if code != 0:
                raise BackendError("libmtmd failed to encode a picture")
            size = int(mtmd.mtmd_input_chunk_get_n_tokens(chunk)) * int(llama.n_embd())
            out = mtmd.mtmd_get_output_embd(self._ctx)
            embd = np.ctypeslib.as_array(out, shape=(size,)).copy()
            encode_s = time.perf_counter() - t0
            if key:
                self.embeddings.put(key, embd)
        control.report(STATUS_READING_PICTURE)
        new_n_past = lib.llama_pos(0)
        code = mtmd.mtmd_helper_decode_image_chunk(
            self._ctx,
            llama._ctx.ctx,
            chunk,
            embd.ctypes.data_as(ctypes.POINTER(ctypes.c_float)),
            lib.llama_pos(llama.n_tokens),
            lib.llama_seq_id(0),
            llama.n_batch,
            ctypes.byref(new_n_past),
            mtmd.mtmd_helper_post_decode_callback(),
            None,
        )
        if code != 0:
            self._stop_point()
            raise BackendError(f"llama.cpp failed to read a picture's embeddings (code {code})")
        llama.n_tokens = int(new_n_past.value)
        return encode_s

    def _decode(self, turn: Turn, stats: Stats, started: float) -> Iterator[str | Finish]:
        llama, opts = self._llama, turn.options
        grammar = _grammar(turn.json_schema)
        llama.set_seed(opts.seed if opts.seed is not None else self._llama_cpp.LLAMA_DEFAULT_SEED)
        first_pos = llama.n_tokens
        stopper = _StopScanner(opts.stop or ())
        utf8 = codecs.getincrementaldecoder("utf-8")("replace")
        limit = opts.max_tokens
        reason: str = "stop"
        count = 0
        t_decode = time.perf_counter()
        leading = True
        control = turn.control
        control.report(STATUS_ANSWERING)
        tokens = llama.generate([], reset=False, **_sampling(opts), grammar=grammar)
        try:
            while True:
                with control.c_calls():  # one token: Ctrl-C lands after it, never inside
                    token = next(tokens, None)
                if token is None:
                    break
                if self._llama_cpp.llama_vocab_is_eog(llama._model.vocab, token):
                    break
                count += 1
                piece = utf8.decode(bytes(llama.detokenize([token])))
                if leading:
                    piece = piece.lstrip()
                    leading = not piece
                out, hit = stopper.feed(piece)
                if out:
                    if stats.first_token_s is None:
                        stats.first_token_s = time.perf_counter() - started
                    yield out
                if hit:
                    break
                if (limit is not None and count >= limit) or llama.n_tokens + 1 >= self.n_ctx:
                    reason = "length"
                    break
            tail = stopper.flush(utf8.decode(b"", final=True))
            if tail:
                yield tail
        finally:
            tokens.close()
            # Whatever was decoded into the KV cache is recorded, even on Ctrl-C.
            ids = llama.input_ids[first_pos : llama.n_tokens]
            self._keys = self._keys[:first_pos] + [int(t) for t in ids]
        now = time.perf_counter()
        stats.completion_tokens = count
        stats.decode_s = now - t_decode
        stats.total_s = now - started
        yield Finish("length" if reason == "length" else "stop", stats)


def open_engine(config: LlamaCppConfig) -> LlamaCppBackend:
    """The engine for ``config``: the demo, a pulled catalogue model (with its prompt
    format), or a GGUF path with its projector (found beside it when there is one)."""
    settings = config.model_dump(exclude={"model", "mmproj"})
    model, mmproj = config.model, config.mmproj
    catalog_name = None
    if model in (None, DEMO_NAME):
        if mmproj is not None:
            raise InvalidRequestError("the demo model comes with its own projector; drop mmproj=")
        model_path, mmproj_path = demo_paths()
    elif (pulled := None if mmproj else pulled_pair(str(model))) is not None:
        entry, model_path, mmproj_path = pulled
        catalog_name = entry.name
        if settings["chat_format"] is None:
            settings["chat_format"] = entry.chat_format
    else:
        model_path = Path(str(model)).expanduser()
        mmproj_path = Path(mmproj).expanduser() if mmproj else find_mmproj(model_path)
    return LlamaCppBackend(model_path, mmproj_path, catalog_name=catalog_name, **settings)


register(
    EngineSpec(
        name="llama_cpp",
        aliases=("llamacpp", "llama", "llama.cpp"),
        config=LlamaCppConfig,
        open=open_engine,
        capabilities=Capabilities(reuses_turns=True, pulls_models=True),
        description="llama.cpp in this process (a GGUF model and its mmproj)",
    )
)


def _inside_picture(key: Key) -> bool:
    return isinstance(key, tuple) and key[1] != 0


def _usable(keys: Sequence[Key], shared: int) -> int:
    """Of ``shared`` leading positions held for ``keys``, how many a turn may keep:
    never all (the last position must be read again to yield logits) and never half
    a picture."""
    p = min(shared, len(keys))
    if p == len(keys):
        p -= 1
    while 0 < p < len(keys) and _inside_picture(keys[p]):
        p -= 1
    return max(p, 0)


def _existing_file(path: str | os.PathLike[str], what: str) -> Path:
    p = Path(path).expanduser()
    if not p.exists():
        raise ModelNotFoundError(f"no {what} file at {p}; check the path or download it first")
    if not p.is_file():
        raise ModelNotFoundError(f"the {what} path {p} is not a file")
    return p


def _sampling(opts: Options) -> dict[str, Any]:
    """llama.cpp's own defaults where an option is unset."""
    return {
        "temp": 0.8 if opts.temperature is None else opts.temperature,
        "top_k": 40 if opts.top_k is None else opts.top_k,
        "top_p": 0.95 if opts.top_p is None else opts.top_p,
        "min_p": 0.05,
        "repeat_penalty": 1.0 if opts.repeat_penalty is None else opts.repeat_penalty,
    }


def _grammar(schema: dict[str, Any] | None) -> Any:
    if schema is None:
        return None
    from .grammar import llama_grammar  # bounds the converter drops; checked it parses

    return llama_grammar(schema)


class _StopScanner:
    """Cuts streamed text at the first stop string, holding back possible prefixes."""

    def __init__(self, stops: Sequence[str]) -> None:
        self.stops = [s for s in stops if s]
        self.pending = ""

    def feed(self, piece: str) -> tuple[str, bool]:
        text = self.pending + piece
        if not self.stops:
            self.pending = ""
            return text, False
        cut = min((i for i in (text.find(s) for s in self.stops) if i >= 0), default=-1)
        if cut >= 0:
            self.pending = ""
            return text[:cut], True
        hold = max((_overlap(text, s) for s in self.stops), default=0)
        self.pending = text[len(text) - hold :] if hold else ""
        return text[: len(text) - hold], False

    def flush(self, piece: str) -> str:
        out, _ = self.feed(piece)
        rest, self.pending = self.pending, ""
        return out + rest


def _overlap(text: str, stop: str) -> int:
    """Length of the longest end of ``text`` that is a start of ``stop``."""
    for n in range(min(len(text), len(stop) - 1), 0, -1):
        if text.endswith(stop[:n]):
            return n
    return 0
