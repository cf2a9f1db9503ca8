"""The llama.cpp engine's memory budget (`backends/llama_cpp/kv_budget.py`): the context,
the slots and the kept-state memory decided together before loading, against made-up
memory sizes; the engine opening with exactly that; and `doctor` and `models` showing it."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import pytest
from click.testing import CliRunner

from llava_local import devices, host, memory
from llava_local.apps import doctor, models
from llava_local.backends.llama_cpp import LlamaCppBackend, kv_budget
from llava_local.cli.doctor import doctor as doctor_command
from llava_local.cli.models import models as models_command
from llava_local.demo import demo_paths
from llava_local.errors import ModelLoadError

from ...gguf_fixtures import GgufPair

GiB = 1 << 30
#: The tiny pair's contexts: trained 2048 (16 picture tokens + 2048 capped), then 16 + 1024
#: and 16 + 512 text tokens.
FULL, SHORTER, SHORTEST = 2048, 1040, 528


def room(pair: GgufPair, positions: int) -> int:
    """What loading ``pair`` with ``positions`` KV cells needs with the memory check's
    margin, with the budget's own settings (this machine's threads, mapping chosen)."""
    est = memory.estimate(
        pair.lm,
        pair.mmproj,
        n_ctx=positions,
        n_threads=host.physical_cores(),
        use_mmap=memory.maps_weights(pair.lm),
    )
    return est.needed_bytes + memory.margin(est)


def auto(pair: GgufPair, available: int, kv_cache_mb: float | None = None) -> kv_budget.KVBudget:
    """The budget of ``pair`` with ``parallel="auto"`` against ``available`` bytes."""
    return kv_budget.budget(
        pair.lm, pair.mmproj, parallel="auto", available=available, kv_cache_mb=kv_cache_mb
    )


# --- the budget ----------------------------------------------------------------------


def test_fewer_slots_then_a_shorter_context_as_memory_shrinks(tiny_pair: GgufPair) -> None:
    """With less memory the budget keeps the full context and drops slots first, then
    shortens the context; with none to spare it keeps nothing, and below that it does
    not fit."""
    four = math.ceil(room(tiny_pair, 4 * FULL) / kv_budget.AUTO_SHARE)
    sizes = [
        four,
        four - 1,
        math.ceil(room(tiny_pair, 2 * FULL) / kv_budget.AUTO_SHARE),
        room(tiny_pair, FULL),
        room(tiny_pair, FULL) - 1,
        room(tiny_pair, SHORTEST),
    ]
    chosen = [(b.n_ctx, b.parallel) for b in (auto(tiny_pair, size) for size in sizes)]
    assert chosen == [(FULL, 4), (FULL, 3), (FULL, 2), (FULL, 1), (SHORTER, 1), (SHORTEST, 1)]
    starved = auto(tiny_pair, room(tiny_pair, SHORTEST))
    assert starved.fits
    assert starved.kept_bytes == 0
    assert starved.n_ctx_wanted == FULL
    too_small = auto(tiny_pair, room(tiny_pair, SHORTEST) - 1)
    assert not too_small.fits
    assert (too_small.n_ctx, too_small.parallel, too_small.kept_bytes) == (FULL, 1, 0)


def test_the_parts_add_up_to_the_memory_available(tiny_pair: GgufPair) -> None:
    """The slots' KV cache is the estimate's for all of them; weights, projector, KV,
    compute and overhead make what loading needs; with the kept states that is the total,
    and the total and what is left make the memory available; kept states get half of
    what the estimate and its margin leave."""
    available = 2 * GiB
    b = kv_budget.budget(tiny_pair.lm, tiny_pair.mmproj, parallel=3, available=available)
    est = b.estimate
    assert (b.n_ctx, b.parallel, est.n_ctx) == (FULL, 3, 3 * FULL)
    parts = b.weights_bytes + b.projector_bytes + b.kv_bytes + b.compute_bytes + b.overhead_bytes
    assert parts == est.needed_bytes
    assert b.total_bytes == est.needed_bytes + b.kept_bytes
    assert b.total_bytes + b.left_bytes == available
    assert b.kept_bytes == (available - est.needed_bytes - memory.margin(est)) // 2
    assert b.left_bytes - b.kept_bytes - b.margin_bytes in (0, 1)
    one = kv_budget.budget(tiny_pair.lm, tiny_pair.mmproj, parallel=1, available=available)
    assert b.kv_bytes == 3 * one.kv_bytes


def test_kv_cache_mb_sets_the_kept_states_alone(tiny_pair: GgufPair) -> None:
    """kv_cache_mb=0 keeps no state in RAM and kv_cache_mb=1.5 keeps 1.5 MiB, whatever
    the memory; the context and the slots stay as the memory decides them."""
    base = auto(tiny_pair, 2 * GiB)
    off = auto(tiny_pair, 2 * GiB, kv_cache_mb=0)
    small = auto(tiny_pair, 2 * GiB, kv_cache_mb=1.5)
    assert base.kept_bytes > 0
    assert (off.kept_bytes, small.kept_bytes) == (0, int(1.5 * 2**20))
    assert {(b.n_ctx, b.parallel) for b in (base, off, small)} == {(base.n_ctx, base.parallel)}
    assert off.left_bytes > base.left_bytes


def test_a_given_context_or_force_is_never_shortened(tiny_pair: GgufPair) -> None:
    """n_ctx= is kept even when it does not fit (loading is then refused), and force=True
    keeps the default context where the memory would shorten it."""
    tight = room(tiny_pair, SHORTEST)
    given = kv_budget.budget(tiny_pair.lm, tiny_pair.mmproj, n_ctx=FULL, available=tight)
    assert (given.n_ctx, given.fits) == (FULL, False)
    forced = kv_budget.budget(tiny_pair.lm, tiny_pair.mmproj, force=True, available=tight)
    assert forced.n_ctx == FULL


def test_a_swapped_pair_is_refused_before_any_sum(tiny_pair: GgufPair) -> None:
    """The budget reads both headers first: a projector given as the model is the
    library's error, saying to swap them."""
    with pytest.raises(ModelLoadError, match="swap"):
        kv_budget.budget(tiny_pair.mmproj, tiny_pair.lm, available=GiB)


# --- the engine opens with it --------------------------------------------------------


def test_the_engine_opens_with_the_budget_it_predicts(
    tiny_pair: GgufPair, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An engine opened with the defaults and parallel="auto" on a machine with room for
    two slots has the context, slots, estimate and kept-state memory the budget predicted
    for the same memory."""
    available = math.ceil(room(tiny_pair, 2 * FULL) / kv_budget.AUTO_SHARE)
    predicted = auto(tiny_pair, available)
    assert (predicted.n_ctx, predicted.parallel) == (FULL, 2)
    monkeypatch.setattr(host, "available_bytes", lambda: available)
    engine = LlamaCppBackend(tiny_pair.lm, tiny_pair.mmproj, parallel="auto")
    try:
        assert (engine.n_ctx, engine.parallel) == (predicted.n_ctx, predicted.parallel)
        assert engine.memory_estimate == predicted.estimate
        assert engine.kv_cache is not None
        assert engine.kv_cache.memory is not None
        assert engine.kv_cache.memory.max_bytes == predicted.kept_bytes
        assert engine.kv_cache.memory.reserve == predicted.margin_bytes
        assert engine.memory_budget == predicted
        assert engine.describe().kept_bytes == predicted.kept_bytes
    finally:
        engine.close()


# --- doctor --------------------------------------------------------------------------


def test_doctor_shows_the_default_models_budget_in_one_line(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Without LLAVA_LOCAL_MODEL, doctor's budget check sizes the demo as serve opens it:
    conversations at once, positions, KV, kept states and what is left."""
    monkeypatch.delenv("LLAVA_LOCAL_MODEL", raising=False)
    check = doctor.budget_check(available=8 * GiB)
    expected = models.llama_budget(None, available=8 * GiB)
    assert check.status == "ok"
    assert check.detail == expected.summary("demo")
    assert re.fullmatch(
        r"demo: 4 conversations at once x \d+ positions, KV [\d.]+ MiB; kept states up to "
        r"[\d.]+ GiB in RAM; [\d.]+ GiB left",
        check.detail,
    ), check.detail


def test_doctor_warns_when_one_conversation_fits_and_states_get_nothing(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """With memory for the demo's one conversation and nothing more, the check warns that
    serve answers one at a time and kept states get nothing; with a byte less, that the
    context is shorter; below the memory check's margin, that it does not fit."""
    monkeypatch.delenv("LLAVA_LOCAL_MODEL", raising=False)
    one = kv_budget.budget(*demo_paths(), available=8 * GiB)
    exact = one.estimate.needed_bytes + one.margin_bytes
    tight = doctor.budget_check(available=exact)
    assert tight.status == "warn"
    assert "one conversation at a time" in tight.detail
    assert "only one conversation fits at once" in tight.detail
    assert "kept states get nothing" in tight.detail
    shorter = doctor.budget_check(available=exact - 1)
    assert shorter.status == "warn"
    shortened = rf"the context is shortened to \d+ positions of {one.n_ctx}"
    assert re.search(shortened, shorter.detail), shorter.detail
    too_small = doctor.budget_check(available=100 * 2**20)
    assert too_small.status == "warn"
    assert "does not fit" in too_small.detail


def test_doctor_sizes_the_environment_pair(
    monkeypatch: pytest.MonkeyPatch, tiny_pair: GgufPair
) -> None:
    """With LLAVA_LOCAL_MODEL set, the check sizes that pair, by its file name."""
    monkeypatch.setenv("LLAVA_LOCAL_MODEL", str(tiny_pair.lm))
    monkeypatch.setenv("LLAVA_LOCAL_MMPROJ", str(tiny_pair.mmproj))
    check = doctor.budget_check(available=2 * GiB)
    expected = models.llama_budget(tiny_pair.lm, tiny_pair.mmproj, available=2 * GiB)
    assert check.detail == expected.summary(f"{tiny_pair.lm.name} (LLAVA_LOCAL_MODEL)")


def test_cli_doctor_prints_the_budget(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, closed_port: int
) -> None:
    """`doctor --json` carries the memory budget check with the demo's line."""
    monkeypatch.delenv("LLAVA_LOCAL_MODEL", raising=False)
    result = CliRunner().invoke(
        doctor_command,
        ["--no-probe", "--json", "--host", f"127.0.0.1:{closed_port}"],
        env={"HF_HUB_CACHE": str(tmp_path)},
    )
    checks = {c["name"]: c for c in json.loads(result.output)}
    line = checks["memory budget"]["detail"]
    assert re.match(r"demo: (\d+ conversations at once|one conversation at a time) x \d+ ", line)
    assert "kept states" in line


# --- models --------------------------------------------------------------------------


@pytest.fixture
def env_pair(monkeypatch: pytest.MonkeyPatch, tiny_pair: GgufPair) -> GgufPair:
    """The tiny pair named by LLAVA_LOCAL_MODEL / LLAVA_LOCAL_MMPROJ."""
    monkeypatch.setenv("LLAVA_LOCAL_MODEL", str(tiny_pair.lm))
    monkeypatch.setenv("LLAVA_LOCAL_MMPROJ", str(tiny_pair.mmproj))
    return tiny_pair


def test_models_gives_each_local_pair_its_budget_here(
    env_pair: GgufPair, tmp_path: Path, closed_port: int
) -> None:
    """Every local GGUF pair (the environment's, the demo) is listed with the budget the
    engine would open it with on the memory the report measured; Ollama's have none."""
    report = models.list_models(host=f"127.0.0.1:{closed_port}", cache_dir=tmp_path)
    by_source = {m.source: m for m in report.installed}
    available = report.available_memory_bytes
    assert by_source["env"].budget == models.llama_budget(
        env_pair.lm, env_pair.mmproj, available=available
    )
    assert by_source["demo"].budget == models.llama_budget(None, available=available)
    assert report.pairs_on_device == []


def test_models_on_a_pi_sizes_each_pair_for_its_memory(
    env_pair: GgufPair, tmp_path: Path, closed_port: int
) -> None:
    """With --device, each local pair gets a budget per board RAM size, made against what
    that board leaves for a model with four threads: more kept states on 8 GB than on 4."""
    report = models.list_models(host=f"127.0.0.1:{closed_port}", cache_dir=tmp_path, device="pi4")
    pairs = {p.name: p for p in report.pairs_on_device}
    assert set(pairs) == {env_pair.lm.name, "demo"}
    for pair in pairs.values():
        assert set(pair.budgets) == {4, 8}
        for gib, one in pair.budgets.items():
            assert one == models.llama_budget(
                None if pair.name == "demo" else env_pair.lm,
                None if pair.name == "demo" else env_pair.mmproj,
                available=devices.available_bytes(gib),
                n_threads=devices.CORES,
            )
        assert pair.budgets[8].kept_bytes > pair.budgets[4].kept_bytes


def test_cli_models_shows_conversations_at_once_and_kept_states(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, closed_port: int
) -> None:
    """The installed table has an "at once" and a "kept" column filled for the demo, the
    board's table a cell per RAM size, and --json the whole budget."""
    monkeypatch.delenv("LLAVA_LOCAL_MODEL", raising=False)
    args = ["--host", f"127.0.0.1:{closed_port}", "--device", "pi5"]
    env = {"HF_HUB_CACHE": str(tmp_path), "COLUMNS": "160"}
    table = CliRunner().invoke(models_command, args, env=env)
    assert table.exit_code == 0, table.output
    data = json.loads(CliRunner().invoke(models_command, [*args, "--json"], env=env).output)
    (demo,) = [m for m in data["installed"] if m["source"] == "demo"]
    budget = demo["budget"]
    assert {"n_ctx", "parallel", "kv_bytes", "kept_bytes", "left_bytes"} <= set(budget)
    assert "at once" in table.output
    assert "kept" in table.output
    row = next(line for line in table.output.splitlines() if line.startswith("│ demo "))
    cells = [cell.strip() for cell in row.split("│")]
    header = next(line for line in table.output.splitlines() if "at once" in line)
    names = [cell.strip() for cell in header.split("┃")]
    # the two runs measured the memory apart: the slots agree, the kept bytes may not
    assert cells[names.index("at once")] == str(budget["parallel"])
    assert re.fullmatch(r"[\d.]+ [GM]iB", cells[names.index("kept")])
    (on_pi,) = [p for p in data["pairs_on_device"] if p["name"] == "demo"]
    eight = on_pi["budgets"]["8"]
    cell = f"{eight['parallel']} x {eight['n_ctx']}, kept {memory.human(eight['kept_bytes'])}"
    assert "Raspberry Pi 5" in table.output
    assert cell in table.output
