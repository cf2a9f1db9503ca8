"""Memory estimates against what llama.cpp reports and what a real process measures.

The expensive evidence comes from subprocesses that load a pair through llava_local
with llama.cpp's log on, run one image turn and report their peak RSS (``VmHWM``;
``ru_maxrss`` would start at the pytest parent's size, which a child inherits across
fork and exec): the log gives each buffer llama.cpp allocated, the RSS the total.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import textwrap
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from llava_local_dev import gguf_writer
from llava_local_dev.gguf_writer import TextConfig

from llava_local import gguf_header, host, memory
from llava_local.errors import InsufficientMemoryError, ModelLoadError
from llava_local.host import physical_cores

from ..gguf_fixtures import GgufPair

MiB = 1 << 20

# Loads a pair through VisionChat, runs one image turn, then (optionally) pages the
# language model's mapping out and runs a text turn, and prints what it measured.
TURN = textwrap.dedent(
    """
    import ctypes, io, json, resource, sys, time
    import llama_cpp
    from PIL import Image
    from llava_local import VisionChat

    def status(key):
        for line in open("/proc/self/status"):
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024

    def mapping_rss(path):
        total, inside = 0, False
        for line in open("/proc/self/smaps"):
            parts = line.split()
            if parts and "-" in parts[0] and not parts[0].endswith(":"):
                inside = parts[-1] == path
            elif inside and parts[0] == "Rss:":
                total += int(parts[1]) * 1024
        return total

    model, mmproj, n_ctx, pageout = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
    use_mmap = {"map": True, "read": False}.get(sys.argv[5])
    buf = io.BytesIO()
    Image.new("RGB", (400, 300), (30, 120, 200)).save(buf, "PNG")
    base = status("VmRSS")
    chat = VisionChat("llama_cpp", model, mmproj=mmproj, n_ctx=n_ctx, verbose=True,
                      use_mmap=use_mmap, max_tokens=2, temperature=0)
    chat.ask("What is in the picture?", image=buf.getvalue())
    # VmHWM, not ru_maxrss: ru_maxrss keeps the parent's RSS at fork across exec, so
    # under a big pytest process it reports the parent's size, not this process's.
    out = {"base": base, "peak": status("VmHWM"),
           "ru_maxrss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}
    if pageout == "pageout":
        libc = ctypes.CDLL(None, use_errno=True)
        libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
        # MADV_PAGEOUT is advice: a large folio it cannot split at that moment (a busy
        # machine) stays, so it is given again, a few times, until little is left.
        for _ in range(5):
            for line in open("/proc/self/maps"):
                if line.rstrip().endswith(model):
                    lo, hi = (int(x, 16) for x in line.split()[0].split("-"))
                    if libc.madvise(lo, hi - lo, 21) != 0:  # MADV_PAGEOUT, Linux 5.4+
                        out["pageout_failed"] = ctypes.get_errno()
            out["mapped_after_pageout"] = mapping_rss(model)
            if out["mapped_after_pageout"] < 16 * 2**20 or "pageout_failed" in out:
                break
            time.sleep(0.2)
        chat.ask("And in one word?")
        out["mapped_after_turn"] = mapping_rss(model)
    print(json.dumps(out))
    """
)

LOG_PATTERNS = {
    "repack": r"CPU_REPACK model buffer size =\s+([\d.]+) MiB",
    "kv": r"CPU KV buffer size =\s+([\d.]+) MiB",
    "lm_compute": r"sched_reserve:\s+CPU compute buffer size =\s+([\d.]+) MiB",
    "projector": r"load_hparams: model size:\s+([\d.]+) MiB",
    "projector_compute": r"reserve_compute_meta:\s+CPU compute buffer size =\s+([\d.]+) MiB",
}


@dataclass
class Run:
    """What one subprocess measured (bytes) and the buffer sizes llama.cpp logged (MiB)."""

    measured: dict[str, int]  # base (VmRSS before loading), peak (VmHWM), ...
    logged: dict[str, float]

    @property
    def growth(self) -> int:
        """Peak RSS less the RSS before loading (Python, numpy, llama_cpp imported)."""
        return self.measured["peak"] - self.measured["base"]


def run_turn(pair: tuple[Path, Path], n_ctx: int, pageout: bool = False, load: str = "map") -> Run:
    """``load``: "map" or "read" the model file, or "auto" (the engine's choice)."""
    proc = subprocess.run(
        [
            sys.executable,
            "-c",
            TURN,
            str(pair[0]),
            str(pair[1]),
            str(n_ctx),
            str(pageout and "pageout"),
            load,
        ],
        capture_output=True,
        text=True,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    logged = {}
    for name, pattern in LOG_PATTERNS.items():
        found = re.search(pattern, proc.stderr)
        if found:
            logged[name] = float(found.group(1))
    return Run(json.loads(proc.stdout.strip().splitlines()[-1]), logged)


def llama_report(
    model: Path, n_ctx: int, n_batch: int, flash_attn: bool = True
) -> dict[str, float]:
    """The buffer sizes llama.cpp logs when it creates a context (no picture involved)."""
    code = (
        "import sys, llama_cpp\n"
        "m, c, b, fa = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4] == '1'\n"
        "llama_cpp.Llama(m, n_ctx=c, n_batch=b, n_ubatch=b, n_threads=1, flash_attn=fa,"
        " verbose=True)\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code, str(model), str(n_ctx), str(n_batch), str(int(flash_attn))],
        capture_output=True,
        text=True,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return {
        name: float(m.group(1))
        for name, pattern in LOG_PATTERNS.items()
        if (m := re.search(pattern, proc.stderr))
    }


def mib(n: int) -> float:
    return n / MiB


@pytest.fixture(scope="module")
def tinyllava(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """The TinyLLaVA-1.1B twin: Q4_0 TinyLlama (22 blocks, 2048 wide) + CLIP ViT-L/14-336."""
    return gguf_writer.write_preset("tinyllava-1.1b", tmp_path_factory.mktemp("tinyllava"))


@pytest.fixture(scope="module")
def tinyllava_run(tinyllava: tuple[Path, Path]) -> Run:
    """One load + image turn of the 1.1B twin at n_ctx 2048, then a text turn after pageout."""
    return run_turn(tinyllava, 2048, pageout=True)


@pytest.fixture(scope="module")
def tinyllava_auto_run(tinyllava: tuple[Path, Path]) -> Run:
    """One load + image turn of the 1.1B twin at n_ctx 2048, the engine choosing how to load."""
    return run_turn(tinyllava, 2048, load="auto")


# ------------------------------------------------------------- against measured RSS


def test_estimate_brackets_peak_rss_of_the_1b_twin(
    tinyllava: tuple[Path, Path], tinyllava_run: Run
) -> None:
    """The 1.1B twin's estimate is within [0.85x, 1.3x] of the RSS a real load and turn adds.

    The estimate counts compute buffers for a full context, which one short turn does
    not fill, hence more room above than below. Leaving out the repacked copy (520 MiB)
    or the projector (567 MiB) would put it near 0.7x and fail.
    """
    est = memory.estimate(*tinyllava, n_ctx=2048, n_threads=physical_cores())
    ratio = est.total_bytes / tinyllava_run.growth
    assert 0.85 <= ratio <= 1.3, (
        f"estimate {mib(est.total_bytes):.0f} MiB, measured {mib(tinyllava_run.growth):.0f} MiB"
    )
    # What must fit leaves out pages the measurement still holds.
    assert est.needed_bytes < tinyllava_run.growth < est.total_bytes + 256 * MiB


def test_a_model_read_instead_of_mapped_holds_its_repacked_weights_once(
    tinyllava: tuple[Path, Path], tinyllava_run: Run, tinyllava_auto_run: Run
) -> None:
    """Where the CPU repacks the twin's Q4_0 matrices, the engine reads the file instead
    of mapping it: the peak drops by about the repacked copy (520 MiB), and the estimate
    for reading brackets it as the mapped one brackets the mapped peak."""
    if memory.maps_weights(tinyllava[0]):
        pytest.skip("this CPU does not repack Q4_0 (no AVX2): the engine maps the file")
    est = memory.estimate(*tinyllava, n_ctx=2048, n_threads=physical_cores(), use_mmap=False)
    ratio = est.total_bytes / tinyllava_auto_run.growth
    assert 0.85 <= ratio <= 1.3, (
        f"estimate {mib(est.total_bytes):.0f} MiB, measured {mib(tinyllava_auto_run.growth):.0f}"
    )
    saved = tinyllava_run.growth - tinyllava_auto_run.growth
    assert 0.8 * est.repack_bytes <= saved <= 1.2 * est.repack_bytes, mib(saved)


def test_parts_match_the_buffers_llama_cpp_allocates(
    tinyllava: tuple[Path, Path], tinyllava_run: Run
) -> None:
    """Repacked copy, KV cache and projector weights match llama.cpp's log; compute within 7%."""
    est = memory.estimate(*tinyllava, n_ctx=2048, n_threads=physical_cores())
    logged = tinyllava_run.logged
    if "AVX2" in memory.cpu_features():
        assert mib(est.repack_bytes) == pytest.approx(logged["repack"], abs=0.01)
    assert mib(est.kv_bytes) == pytest.approx(logged["kv"], abs=0.01)
    assert mib(est.projector_bytes) == pytest.approx(logged["projector"], rel=0.01)
    assert 0.995 <= mib(est.lm_compute_bytes) / logged["lm_compute"] <= 1.07
    # The projector's part also holds the picture's embeddings, which clip.cpp does not log.
    assert 1.0 <= mib(est.projector_compute_bytes) / logged["projector_compute"] <= 1.5


def test_repacked_pages_are_not_read_after_loading(
    tinyllava: tuple[Path, Path], tinyllava_run: Run
) -> None:
    """After the mapping is paged out, a turn reads back only the weights that were not repacked.

    This is why ``needed_bytes`` may leave ``reclaimable_bytes`` out.
    """
    measured = tinyllava_run.measured
    if "pageout_failed" in measured:
        pytest.skip(f"madvise(MADV_PAGEOUT) refused (errno {measured['pageout_failed']})")
    est = memory.estimate(*tinyllava, n_ctx=2048)
    assert est.reclaimable_bytes > 400 * MiB
    assert measured["mapped_after_pageout"] < 32 * MiB
    assert measured["mapped_after_turn"] <= est.weights_bytes - est.reclaimable_bytes + 16 * MiB


def test_estimate_of_the_tiny_pair_is_mostly_engine_overhead(tiny_pair: GgufPair) -> None:
    """For the 0.5 MB tiny pair the estimate is within [0.7x, 1.8x] of the measured growth.

    Here the engine's own overhead (about 20 MiB) dominates: an estimate without it
    (under 10 MiB) would fail.
    """
    run = run_turn((tiny_pair.lm, tiny_pair.mmproj), 512)
    est = memory.estimate(tiny_pair.lm, tiny_pair.mmproj, n_ctx=512, n_threads=physical_cores())
    ratio = est.total_bytes / run.growth
    assert 0.7 <= ratio <= 1.8, (
        f"estimate {mib(est.total_bytes):.1f} MiB, measured {mib(run.growth):.1f} MiB"
    )


# ------------------------------------------------------------ against llama.cpp's log


@pytest.fixture(scope="module")
def big_vocab_lm(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small LM whose 50k vocabulary makes the logits, not attention, the largest buffer."""
    path = tmp_path_factory.mktemp("bigvocab") / "model.gguf"
    cfg = TextConfig(n_embd=128, n_layer=1, n_ff=320, n_head=4, n_head_kv=1)
    return gguf_writer.write_language_model(path, cfg, vocab=gguf_writer.padded_vocab(50000))


@pytest.fixture(scope="module")
def wide_lm(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One block 1024 wide with 16 heads over 2 KV heads: attention, not the logits, sets
    its compute buffer, so flash attention changes it (143 MiB without at n_ctx 4096)."""
    path = tmp_path_factory.mktemp("wide") / "wide.gguf"
    cfg = TextConfig(n_embd=1024, n_layer=1, n_ff=2816, n_head=16, n_head_kv=2)
    return gguf_writer.write_language_model(path, cfg, dtype="f16")


@pytest.mark.parametrize("flash_attn", [True, False], ids=["flash-attn", "no-flash-attn"])
@pytest.mark.parametrize(("n_ctx", "n_batch"), [(512, 512), (2048, 512), (1000, 64), (4096, 256)])
def test_kv_and_compute_match_llama_cpp(
    tiny_pair: GgufPair,
    big_vocab_lm: Path,
    wide_lm: Path,
    *,
    n_ctx: int,
    n_batch: int,
    flash_attn: bool,
) -> None:
    """KV cache bytes equal llama.cpp's; the compute buffer never below llama.cpp's, for
    three shapes, with flash attention (the engine's default: at most 1.3x, these narrow
    shapes reuse part of the feed-forward's buffers) and without (at most 1.07x)."""
    for lm in (tiny_pair.lm, big_vocab_lm, wide_lm):
        logged = llama_report(lm, n_ctx, n_batch, flash_attn)
        est = memory.estimate(
            lm, tiny_pair.mmproj, n_ctx=n_ctx, n_batch=n_batch, flash_attn=flash_attn
        )
        assert mib(est.kv_bytes) == pytest.approx(logged["kv"], abs=0.01)
        high = 1.3 if flash_attn else 1.07
        assert 0.995 <= mib(est.lm_compute_bytes) / logged["lm_compute"] <= high, (lm, logged)


def test_repack_matches_llama_cpp_for_a_q4_model(tiny_pair_q4: GgufPair) -> None:
    """The repacked bytes predicted for this CPU equal the CPU_REPACK buffer llama.cpp makes."""
    logged = llama_report(tiny_pair_q4.lm, 512, 512)
    est = memory.estimate(tiny_pair_q4.lm, tiny_pair_q4.mmproj, n_ctx=512)
    assert mib(est.repack_bytes) == pytest.approx(logged.get("repack", 0.0), abs=0.01)
    if "AVX2" in memory.cpu_features():
        assert est.repack_bytes > 0
        assert est.reclaimable_bytes == est.repack_bytes
    without = memory.estimate(tiny_pair_q4.lm, tiny_pair_q4.mmproj, n_ctx=512, features=frozenset())
    assert without.repack_bytes == without.reclaimable_bytes == 0
    assert without.total_bytes < est.total_bytes or est.repack_bytes == 0


# ------------------------------------------------------------------------- pieces


def test_header_reader_agrees_with_the_gguf_package(
    tiny_pair_q4: GgufPair, big_vocab_lm: Path
) -> None:
    """read_gguf finds the same tensors, shapes, types and sizes as gguf.GGUFReader."""
    from gguf import GGUFReader

    for path in (tiny_pair_q4.lm, tiny_pair_q4.mmproj):
        ours = gguf_header.read_gguf(path)
        theirs = GGUFReader(path)
        assert [(t.name, t.shape, t.ggml_type, t.nbytes) for t in ours.tensors] == [
            (t.name, tuple(int(d) for d in t.shape), int(t.tensor_type), int(t.n_bytes))
            for t in theirs.tensors
        ]
        assert ours.meta["general.architecture"] == theirs.fields["general.architecture"].contents()
    assert gguf_header.read_gguf(tiny_pair_q4.lm).meta["tokenizer.ggml.tokens"] == (
        tiny_pair_q4.vocab.tokens
    )
    tokens = gguf_header.read_gguf(big_vocab_lm).meta["tokenizer.ggml.tokens"]
    assert isinstance(tokens, gguf_header.ArrayLength)  # too long to keep: only its length
    assert tokens == 50000


def test_block_sizes_agree_with_the_gguf_package() -> None:
    """The ggml block table matches gguf's, except Q8_1 where gguf-py says 40 and ggml 36."""
    from gguf import GGML_QUANT_SIZES

    for kind, (block, size) in GGML_QUANT_SIZES.items():
        if int(kind) in gguf_header.GGML_BLOCKS and kind.name != "Q8_1":
            assert gguf_header.GGML_BLOCKS[int(kind)] == (block, size), kind.name


def test_unknown_tensor_type_takes_the_room_to_the_next_tensor(
    tiny_pair_q4: GgufPair, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A ggml type missing from the table is sized from the data offsets, padding included."""
    known = {t.name: t.nbytes for t in gguf_header.read_gguf(tiny_pair_q4.lm).tensors}
    monkeypatch.delitem(gguf_header.GGML_BLOCKS, memory.Q4_0)
    guessed = gguf_header.read_gguf(tiny_pair_q4.lm).tensors
    q4 = [t for t in guessed if t.ggml_type == memory.Q4_0]
    assert q4
    for tensor in q4:
        assert known[tensor.name] <= tensor.nbytes < known[tensor.name] + 32


def test_not_a_gguf_and_truncated_headers_are_refused(tiny_pair: GgufPair, tmp_path: Path) -> None:
    """A file that is not GGUF, or a GGUF cut inside its header, raises ModelLoadError."""
    junk = tmp_path / "junk.gguf"
    junk.write_bytes(b"<html>not a model</html>")
    with pytest.raises(ModelLoadError, match="not a GGUF"):
        gguf_header.read_gguf(junk)
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(tiny_pair.lm.read_bytes()[:2000])
    with pytest.raises(ModelLoadError, match="ends inside its header"):
        gguf_header.read_gguf(cut)


def test_repack_rule_follows_llama_cpp() -> None:
    """Q4_0 is repacked with AVX2 when rows divide by 8, with ARM dotprod by 4; Q8_0 only on ARM."""
    x86 = memory.repack_rule(frozenset({"AVX2", "REPACK"}))
    assert x86(memory.Q4_0, 4096)
    assert not x86(memory.Q4_0, 4092)
    assert not x86(memory.Q8_0, 4096)
    assert not x86(memory.Q6_K, 4096)
    arm = memory.repack_rule(frozenset({"NEON", "DOTPROD", "REPACK"}))
    assert arm(memory.Q4_0, 4092)
    assert arm(memory.Q8_0, 4096)
    assert arm(memory.Q6_K, 4096)
    assert not memory.repack_rule(frozenset({"AVX2"}))(memory.Q4_0, 4096)  # built without


def test_longer_context_costs_its_kv_cache(tiny_pair: GgufPair) -> None:
    """Doubling n_ctx doubles the KV cache, and the error advice to lower n_ctx is real."""
    small = memory.estimate(tiny_pair.lm, tiny_pair.mmproj, n_ctx=1024)
    large = memory.estimate(tiny_pair.lm, tiny_pair.mmproj, n_ctx=2048)
    assert large.kv_bytes == 2 * small.kv_bytes
    assert large.total_bytes > small.total_bytes


# --------------------------------------------------------------- default context

CONTEXTS = (2048, 1040, 528)  # the tiny pair: trained 2048; 16 picture tokens + 1024, + 512


def room(pair: GgufPair, n_ctx: int) -> int:
    """What must be available for ``pair`` at ``n_ctx``: the estimate and check()'s margin."""
    est = memory.estimate(pair.lm, pair.mmproj, n_ctx=n_ctx)
    return est.needed_bytes + memory.margin(est)


def test_default_context_is_the_longest_that_fits(tiny_pair: GgufPair) -> None:
    """With room for it, one picture and 2048 text tokens (capped at the trained 2048); with
    room only for less, 1024 or 512 text tokens, and the warning that says so names both;
    with room for none, the first, which check() then refuses with its numbers."""

    def pick(available: int) -> tuple[int, int]:
        return memory.fitting_context(
            tiny_pair.lm, tiny_pair.mmproj, image_tokens=16, trained=2048, available=available
        )

    assert pick(room(tiny_pair, 2048)) == (2048, 2048)
    assert pick(room(tiny_pair, 528) - 1) == (2048, 2048)
    assert pick(room(tiny_pair, 2048) - 1) == (1040, 2048)
    assert pick(room(tiny_pair, 528)) == (528, 2048)
    warning = memory.shorter_context("model.gguf", 1040, 2048, room(tiny_pair, 2048) - 1)
    assert isinstance(warning, memory.ShorterContextWarning)
    assert re.search("1040 tokens, not 2048", str(warning))
    assert re.search("pass n_ctx=", str(warning))


def test_the_engine_loads_a_shorter_context_when_memory_is_short(
    tiny_pair: GgufPair, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An engine left to its default context on a machine with room for 512 text tokens
    only loads with that, and says so; given n_ctx= it keeps it (and is refused)."""
    from llava_local.backends.llama_cpp import LlamaCppBackend

    monkeypatch.setattr(host, "available_bytes", lambda: room(tiny_pair, 528))
    with pytest.warns(memory.ShorterContextWarning):
        engine = LlamaCppBackend(tiny_pair.lm, tiny_pair.mmproj, kv_cache_mb=0)
    try:
        assert engine.memory_estimate.n_ctx == 528
        assert engine.n_ctx < 1040
    finally:
        engine.close()
    with pytest.raises(InsufficientMemoryError):
        LlamaCppBackend(tiny_pair.lm, tiny_pair.mmproj, n_ctx=2048)


# ------------------------------------------------------------------------- check


@pytest.fixture
def tiny_estimate(tiny_pair: GgufPair) -> memory.MemoryEstimate:
    """The tiny pair's estimate at n_ctx 512."""
    return memory.estimate(tiny_pair.lm, tiny_pair.mmproj, n_ctx=512)


def test_check_refuses_with_both_numbers_and_the_options(
    tiny_estimate: memory.MemoryEstimate,
) -> None:
    """Too little memory raises InsufficientMemoryError naming need, availability and remedies."""
    available = 100 * MiB
    with pytest.raises(InsufficientMemoryError) as info:
        memory.check(tiny_estimate, available=available)
    error = info.value
    assert error.available == available
    assert error.needed == tiny_estimate.needed_bytes + memory.margin(tiny_estimate)
    message = str(error)
    assert memory.human(error.needed) in message
    assert "100 MiB is available" in message
    for option in ("smaller model", "smaller quantization", "n_ctx=", "force=True"):
        assert option in message
    assert isinstance(error, MemoryError)


def test_check_force_loads_anyway(tiny_estimate: memory.MemoryEstimate) -> None:
    """force=True skips the comparison even with nothing available."""
    memory.check(tiny_estimate, available=0, force=True)


def test_check_boundary_is_the_estimate_plus_margin(tiny_estimate: memory.MemoryEstimate) -> None:
    """Exactly estimate + margin passes; one byte less is refused."""
    needed = tiny_estimate.needed_bytes + memory.margin(tiny_estimate)
    memory.check(tiny_estimate, available=needed)
    with pytest.raises(InsufficientMemoryError):
        memory.check(tiny_estimate, available=needed - 1)


def test_check_uses_needed_not_total(tinyllava: tuple[Path, Path]) -> None:
    """A repacking model fits when the dropped pages do not, so the check compares needed_bytes."""
    est = memory.estimate(*tinyllava, n_ctx=2048, features=frozenset({"AVX2", "REPACK"}))
    room = est.needed_bytes + memory.margin(est)
    assert room < est.total_bytes
    memory.check(est, available=room)


def test_explain_names_every_part(tinyllava: tuple[Path, Path]) -> None:
    """explain() lists the weights, repacked copy, projector, KV cache and compute in words."""
    est = memory.estimate(*tinyllava, n_ctx=2048, features=frozenset({"AVX2", "REPACK"}))
    text = est.explain()
    for words in ("weights", "repacked", "projector", "KV cache", "compute", "must fit"):
        assert words in text
    assert memory.human(est.total_bytes) in text


# --------------------------------------------------------------------- availability


def test_available_bytes_is_within_physical_memory() -> None:
    """On Linux the answer is positive and no more than MemTotal."""
    meminfo = Path("/proc/meminfo")
    if not meminfo.exists():
        pytest.skip("not Linux")
    total = int(meminfo.read_text().split("MemTotal:")[1].split()[0]) * 1024
    assert 0 < host.available_bytes() <= total


def test_meminfo_parsing(tmp_path: Path) -> None:
    """MemAvailable is read in kB and returned in bytes; a file without it gives None."""
    path = tmp_path / "meminfo"
    path.write_text("MemTotal:  8000000 kB\nMemFree:  100 kB\nMemAvailable:  5000000 kB\n")
    assert host._meminfo_available(path) == 5000000 * 1024
    path.write_text("MemTotal:  8000000 kB\n")
    assert host._meminfo_available(path) is None


def fake_root(tmp_path: Path, cgroup: str, mountinfo: str, files: dict[str, str]) -> Path:
    """A made-up file system root with /proc/self and cgroup files."""
    (tmp_path / "proc/self").mkdir(parents=True)
    (tmp_path / "proc/self/cgroup").write_text(cgroup)
    (tmp_path / "proc/self/mountinfo").write_text(mountinfo)
    for name, text in files.items():
        path = tmp_path / name.lstrip("/")
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return tmp_path


V2_MOUNT = "30 23 0:26 / /sys/fs/cgroup rw,nosuid - cgroup2 cgroup2 rw,nsdelegate\n"


def test_cgroup_v2_limit_less_usage_with_page_cache_counted_free(tmp_path: Path) -> None:
    """v2: memory.max - (memory.current - inactive_file), the tightest along the path."""
    app = "/sys/fs/cgroup/user.slice/app.scope"
    root = fake_root(
        tmp_path,
        "0::/user.slice/app.scope\n",
        V2_MOUNT,
        {
            f"{app}/memory.max": f"{1024 * MiB}\n",
            f"{app}/memory.current": f"{600 * MiB}\n",
            f"{app}/memory.stat": f"anon 1\ninactive_file {100 * MiB}\nactive_file 5\n",
            "/sys/fs/cgroup/user.slice/memory.max": "max\n",
        },
    )
    assert host._cgroup_available(root) == (1024 - (600 - 100)) * MiB
    # A parent with less room wins.
    (root / "sys/fs/cgroup/user.slice/memory.max").write_text(f"{700 * MiB}\n")
    (root / "sys/fs/cgroup/user.slice/memory.current").write_text(f"{650 * MiB}\n")
    assert host._cgroup_available(root) == 50 * MiB


def test_cgroup_v2_without_limit_is_none(tmp_path: Path) -> None:
    """v2 with memory.max "max" everywhere means no cgroup cap."""
    root = fake_root(
        tmp_path,
        "0::/app\n",
        V2_MOUNT,
        {"/sys/fs/cgroup/app/memory.max": "max\n", "/sys/fs/cgroup/app/memory.current": "5\n"},
    )
    assert host._cgroup_available(root) is None


def test_cgroup_v1_in_a_container(tmp_path: Path) -> None:
    """v1 where the container sees its own cgroup as the mount root."""
    mount = "35 31 0:32 /docker/abc /sys/fs/cgroup/memory rw - cgroup cgroup rw,memory\n"
    root = fake_root(
        tmp_path,
        "5:cpu,cpuacct:/docker/abc\n4:memory:/docker/abc\n",
        mount,
        {
            "/sys/fs/cgroup/memory/memory.limit_in_bytes": f"{2048 * MiB}\n",
            "/sys/fs/cgroup/memory/memory.usage_in_bytes": f"{1536 * MiB}\n",
            "/sys/fs/cgroup/memory/memory.stat": f"cache 9\ntotal_inactive_file {512 * MiB}\n",
        },
    )
    assert host._cgroup_available(root) == 1024 * MiB


def test_cgroup_v1_unlimited_is_none(tmp_path: Path) -> None:
    """v1's "unlimited" (a huge page-rounded number) means no cgroup cap."""
    mount = "35 31 0:32 / /sys/fs/cgroup/memory rw - cgroup cgroup rw,memory\n"
    root = fake_root(
        tmp_path,
        "4:memory:/process_api/x\n",
        mount,
        {
            "/sys/fs/cgroup/memory/process_api/x/memory.limit_in_bytes": "9223372036854771712\n",
            "/sys/fs/cgroup/memory/process_api/x/memory.usage_in_bytes": "4976640\n",
        },
    )
    assert host._cgroup_available(root) is None


def test_estimate_is_a_plain_record(tiny_estimate: memory.MemoryEstimate) -> None:
    """The estimate dumps its parts and sums (for logs and --json output)."""
    dumped: dict[str, Any] = tiny_estimate.model_dump()
    parts = (
        "weights_bytes",
        "repack_bytes",
        "projector_bytes",
        "kv_bytes",
        "compute_bytes",
        "overhead_bytes",
    )
    assert dumped["total_bytes"] == sum(dumped[p] for p in parts)
    assert dumped["needed_bytes"] == dumped["total_bytes"] - dumped["reclaimable_bytes"]


# Opens the engine on a pair with each use_mmap setting in a fresh process (in the test
# process, another engine or runner may map the same file) and prints what it chose and
# whether the file is mapped.
MAPPED = textwrap.dedent(
    """
    import json, sys
    from pathlib import Path
    from llava_local.backends.llama_cpp import LlamaCppBackend

    lm, mmproj, setting = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
    engine = LlamaCppBackend(lm, mmproj, n_ctx=256, use_mmap=setting)
    est = engine.memory_estimate
    mapped = str(Path(lm).resolve()) in Path("/proc/self/maps").read_text()
    print(json.dumps([engine.use_mmap, mapped, est.reclaimable_bytes, est.repack_bytes]))
    engine.close()
    """
)


def test_the_engine_reads_a_model_its_cpu_repacks_instead_of_mapping_it(
    tiny_pair: GgufPair, tiny_pair_q4: GgufPair
) -> None:
    """A model whose weights this CPU mostly repacks (Q4_0 with AVX2) is read, not mapped,
    so each weight is held once; one never repacked (f32) stays mapped; ``use_mmap``
    given is obeyed both ways (before, llama.cpp 0.3.36 mapped every file whatever
    ``use_mmap`` said: the setting had become ``load_mode``)."""
    repacks = not memory.maps_weights(tiny_pair_q4.lm)
    assert repacks == ("AVX2" in memory.cpu_features())
    assert memory.maps_weights(tiny_pair.lm)
    for pair, setting, expected in [
        (tiny_pair_q4, None, not repacks),
        (tiny_pair, None, True),
        (tiny_pair, False, False),
        (tiny_pair_q4, True, True),
    ]:
        args = [str(pair.lm), str(pair.mmproj), json.dumps(setting)]
        proc = subprocess.run(
            [sys.executable, "-c", MAPPED, *args], capture_output=True, text=True, check=False
        )
        assert proc.returncode == 0, proc.stderr[-2000:]
        chose, mapped, reclaimable, repack = json.loads(proc.stdout.strip().splitlines()[-1])
        assert (chose, mapped) == (expected, expected), (pair.lm, setting)
        assert reclaimable == (repack if expected else 0)
