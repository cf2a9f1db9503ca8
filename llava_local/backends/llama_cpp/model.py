"""The loaded files: llama.cpp's model and context, and libmtmd's projector.

The context is made for several sequences (``n_seq``) sharing one unified KV cache of
``n_ctx * n_seq`` cells, so that conversations can be answered side by side
(:mod:`.scheduler`) while each keeps a window of ``n_ctx`` positions.
"""

from __future__ import annotations

import ctypes
import threading
from pathlib import Path
from typing import Any

from ...control import TurnControl
from ...errors import ModelLoadError
from ...sampling import Sampling, recommended
from .lib import set_verbose

#: The longest metadata value read (chat templates run to a few KB).
_META_VALUE_BYTES = 1 << 16


class LoadedModel:
    """The language model, its context and the projector, freed together by :meth:`close`.

    Loading holds Ctrl-C until it ends (a 7B model loads for tens of seconds on a small
    CPU, and an interrupt raised in a C log callback would be lost), then raises it with
    both files let go.
    """

    def __init__(
        self,
        lib: Any,
        model_path: Path,
        mmproj_path: Path,
        *,
        n_ctx: int,
        n_seq: int,
        n_batch: int,
        n_threads: int,
        n_gpu_layers: int,
        use_mmap: bool,
        flash_attn: bool,
        verbose: bool,
        clip_callback: Any,
        catalog_sampling: Sampling | None = None,
    ) -> None:
        self.lib = lib
        self.mtmd = lib.mtmd_cpp
        self.model_path, self.mmproj_path = model_path, mmproj_path
        self.n_seq = n_seq
        #: Positions one conversation may use (the context has ``n_ctx * n_seq`` cells).
        self.n_ctx = n_ctx
        self.params: Any = None  # the context's parameters, as llama.cpp was given them
        #: Held around each computation: a decode step (the driver) or a picture's CLIP
        #: (a caller's thread). Each uses every core, and two at once only slow each
        #: other down (ggml's threads spin while they wait): with four clients on two
        #: cores, follow-ups of 13 tokens took two minutes while pictures were encoded.
        self.compute = threading.Lock()
        self.model: Any = None
        self.ctx: Any = None
        self.mctx: Any = None
        set_verbose(lib, verbose)
        loading = TurnControl()
        try:
            with loading.c_calls():
                self.model = self._load_model(n_gpu_layers, use_mmap)
                self.ctx = self._context(n_ctx * n_seq, n_seq, n_batch, n_threads, flash_attn)
                if not loading.cancelled:  # no projector to load for nothing
                    self.mctx = self._projector(n_threads, verbose, clip_callback)
        except BaseException:
            self.close()
            raise
        self.vocab = lib.llama_model_get_vocab(self.model)
        self.n_vocab = int(lib.llama_vocab_n_tokens(self.vocab))
        self.n_embd = int(lib.llama_model_n_embd(self.model))
        self.n_batch = int(lib.llama_n_batch(self.ctx))
        self.n_ubatch = int(lib.llama_n_ubatch(self.ctx))
        self.metadata = self._metadata()
        #: What a turn samples with where its options say nothing: the GGUF's
        #: recommendation, else the catalogue's (``catalog_sampling``), else llama.cpp's.
        self.sampling: Sampling = recommended(self.metadata, catalog_sampling)
        self.marker = self.mtmd.mtmd_default_marker().decode()

    def _load_model(self, n_gpu_layers: int, use_mmap: bool) -> Any:
        lib = self.lib
        params = lib.llama_model_default_params()
        mode = lib.LLAMA_LOAD_MODE_MMAP if use_mmap else lib.LLAMA_LOAD_MODE_NONE
        _set(params, n_gpu_layers=n_gpu_layers, load_mode=mode)
        model = lib.llama_model_load_from_file(str(self.model_path).encode(), params)
        if not model:
            raise ModelLoadError(
                f"llama.cpp could not load the language model {self.model_path}: the file is "
                "not a model this llama.cpp build can read"
            )
        return model

    def _context(
        self, cells: int, n_seq: int, n_batch: int, n_threads: int, flash_attn: bool
    ) -> Any:
        lib = self.lib
        params = lib.llama_context_default_params()
        _set(
            params,
            n_ctx=cells,
            n_batch=min(n_batch, cells),
            n_ubatch=min(n_batch, cells),
            n_seq_max=n_seq,
            kv_unified=True,  # one pool of cells, used by whichever sequence needs it
            # Auto: on wherever the device has the kernel (every CPU), as llama-server.
            # A first look on the 1.1B twin reads its picture's 576 positions in 6.2 s
            # instead of 7.4 (2 cores), and the compute buffer does not grow with n_ctx.
            flash_attn_type=(
                lib.LLAMA_FLASH_ATTN_TYPE_AUTO if flash_attn else lib.LLAMA_FLASH_ATTN_TYPE_DISABLED
            ),
            n_threads=n_threads,
            n_threads_batch=n_threads,
            no_perf=True,
        )
        self.params = params
        ctx = lib.llama_init_from_model(self.model, params)
        if not ctx:
            raise ModelLoadError(
                f"llama.cpp could not make a context of {cells} positions for "
                f"{self.model_path.name}; lower n_ctx"
            )
        return ctx

    def _projector(self, n_threads: int, verbose: bool, clip_callback: Any) -> Any:
        mtmd = self.mtmd
        params = mtmd.mtmd_context_params_default()
        _set(
            params,
            use_gpu=False,
            print_timings=verbose,
            n_threads=n_threads,
            warmup=False,
            cb_eval=clip_callback,  # lets a stop request end a picture's encoding
            cb_eval_user_data=None,
        )
        mctx = mtmd.mtmd_init_from_file(str(self.mmproj_path).encode(), self.model, params)
        if not mctx:
            raise ModelLoadError(
                f"libmtmd could not load the projector {self.mmproj_path} for "
                f"{self.model_path.name}; check that it is the mmproj made for this model"
            )
        if not mtmd.mtmd_support_vision(mctx):
            mtmd.mtmd_free(mctx)
            raise ModelLoadError(f"the projector {self.mmproj_path} has no vision encoder")
        return mctx

    def _metadata(self) -> dict[str, str]:
        lib, model = self.lib, self.model
        buf = ctypes.create_string_buffer(_META_VALUE_BYTES)
        meta = {}
        for i in range(int(lib.llama_model_meta_count(model))):
            n = lib.llama_model_meta_key_by_index(model, i, buf, _META_VALUE_BYTES)
            if n < 0:
                continue
            key = buf.value.decode("utf-8", "replace")
            n = lib.llama_model_meta_val_str_by_index(model, i, buf, _META_VALUE_BYTES)
            if 0 <= n < _META_VALUE_BYTES:
                meta[key] = buf.value.decode("utf-8", "replace")
        return meta

    # -- tokens ---------------------------------------------------------------------

    def piece(self, token: int, *, special: bool = False) -> bytes:
        """The bytes of one token."""
        buf = ctypes.create_string_buffer(64)
        n = self.lib.llama_token_to_piece(self.vocab, token, buf, 64, 0, special)
        if n < 0:
            buf = ctypes.create_string_buffer(-n)
            n = self.lib.llama_token_to_piece(self.vocab, token, buf, -n, 0, special)
        return buf.raw[: max(n, 0)]

    def is_eog(self, token: int) -> bool:
        return bool(self.lib.llama_vocab_is_eog(self.vocab, token))

    @property
    def bos(self) -> int:
        return int(self.lib.llama_vocab_bos(self.vocab))

    @property
    def eos(self) -> int:
        return int(self.lib.llama_vocab_eos(self.vocab))

    def n_ctx_train(self) -> int:
        return int(self.lib.llama_model_n_ctx_train(self.model))

    @property
    def memory(self) -> Any:
        return self.lib.llama_get_memory(self.ctx)

    def close(self) -> None:
        """Free the projector, the context and the model (each once)."""
        lib = self.lib
        if self.mctx:
            self.mtmd.mtmd_free(self.mctx)
            self.mctx = None
        if self.ctx:
            lib.llama_free(self.ctx)
            self.ctx = None
        if self.model:
            lib.llama_model_free(self.model)
            self.model = None


def _set(params: ctypes.Structure, **values: Any) -> None:
    """Set fields of a llama.cpp parameter struct, refusing a name the struct lacks:
    ctypes would keep it as a plain attribute that llama.cpp never sees (0.3.36 replaced
    ``use_mmap`` with ``load_mode``, and a ``use_mmap=False`` was ignored that way)."""
    fields = {name for name, *_ in type(params)._fields_}
    for name, value in values.items():
        if name not in fields:
            raise ModelLoadError(
                f"this llama-cpp-python has no {type(params).__name__}.{name}; install the "
                "version pyproject.toml names (scripts/install-llama-cpp.sh)"
            )
        setattr(params, name, value)
