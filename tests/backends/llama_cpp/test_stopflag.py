"""The stop request llama.cpp reads after every graph node without calling Python
(``backends/llama_cpp/stopflag.py``): raised, it cuts a decode short; lowered, it never
does; and a raise meant for one computation does not reach the next."""

from __future__ import annotations

import ctypes
from collections.abc import Iterator

import pytest

from llava_local.backends.llama_cpp.lib import import_llama_cpp
from llava_local.backends.llama_cpp.model import LoadedModel
from llava_local.backends.llama_cpp.stopflag import StopFlag

from ...gguf_fixtures import GgufPair

#: llama_decode's "aborted" (its processed micro-batches stay in the KV cache).
ABORTED = 2


@pytest.fixture(scope="module")
def model(tiny_pair: GgufPair) -> Iterator[LoadedModel]:
    """The tiny pair loaded, for reads of up to 64 tokens."""
    lib = import_llama_cpp()
    loaded = LoadedModel(
        lib,
        tiny_pair.lm,
        tiny_pair.mmproj,
        n_ctx=256,
        n_seq=1,
        n_batch=64,
        n_threads=1,
        n_gpu_layers=0,
        use_mmap=True,
        flash_attn=True,
        verbose=False,
        clip_callback=ctypes.cast(0, lib.ggml_backend_sched_eval_callback),
    )
    yield loaded
    loaded.close()


def _decode(model: LoadedModel, n: int) -> int:
    lib = model.lib
    lib.llama_memory_clear(model.memory, True)
    tokens = (lib.llama_token * n)(*[65 + i % 26 for i in range(n)])
    return int(lib.llama_decode(model.ctx, lib.llama_batch_get_one(tokens, n)))


def test_a_raised_flag_stops_a_decode_and_a_lowered_one_never_does(model: LoadedModel) -> None:
    """With the flag as llama.cpp's abort callback, a decode armed for stopped turns
    returns "aborted" with none of its positions kept; armed for running turns it reads
    the whole prompt."""
    lib = model.lib
    flag = StopFlag(lib.ggml_abort_callback)
    lib.llama_set_abort_callback(model.ctx, flag.callback, flag.data)
    try:
        flag.arm(lambda: False)
        assert not flag.raised
        assert _decode(model, 64) == 0
        assert int(lib.llama_memory_seq_pos_max(model.memory, 0)) == 63
        flag.disarm()

        flag.arm(lambda: True)
        assert flag.raised
        assert _decode(model, 64) == ABORTED
        assert int(lib.llama_memory_seq_pos_max(model.memory, 0)) < 63
        flag.disarm()
        assert not flag.raised
    finally:
        lib.llama_set_abort_callback(model.ctx, ctypes.cast(0, lib.ggml_abort_callback), None)


def test_check_raises_only_for_the_computation_armed() -> None:
    """check() raises the flag when the armed computation's turns are all stopped, and
    does nothing once it is disarmed (a late stop must not cut the next one short)."""
    lib = import_llama_cpp()
    flag = StopFlag(lib.ggml_abort_callback)
    stopped = [False]
    flag.arm(lambda: stopped[0])
    flag.check()
    assert not flag.raised
    stopped[0] = True
    flag.check()
    assert flag.raised
    flag.disarm()
    flag.check()
    assert not flag.raised
