"""Each model's budget on a Raspberry Pi 4 and 5 (llava_local.devices): memory by part
against 4 and 8 GB, speeds estimated from the model's work and published figures, and
`llava-local models --device` showing them as estimates."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from llava_local import catalog, devices, memory
from llava_local.apps import models
from llava_local.catalog import CLIP_L_336, VisionEncoder
from llava_local.cli.models import _budget_row
from llava_local.demo import DEMO_NAME

GiB = 1 << 30


def test_clip_l_336_costs_what_its_shape_says() -> None:
    """CLIP ViT-L/14 at 336 px through 23 blocks: 2*577*(4*1024^2 + 2*1024*4096) per block
    plus 4*577^2*1024 of attention, about 0.36 TFLOP; five tiles cost five times one."""
    per_block = 2 * 577 * (4 * 1024**2 + 2 * 1024 * 4096) + 4 * 577**2 * 1024
    assert CLIP_L_336.flops() == 23 * per_block
    assert 0.35e12 < CLIP_L_336.flops() < 0.38e12
    assert CLIP_L_336.flops(5) == 5 * CLIP_L_336.flops()
    windowed = VisionEncoder(width=8, layers=4, ff=8, patches=100, tokens=25, window=10)
    assert windowed.flops() < windowed.model_copy(update={"window": 0}).flops()


def test_every_catalogue_model_has_a_budget_on_both_pis() -> None:
    """Each entry with files gets memory by part, a verdict for 4 and 8 GB, and both
    estimates; a Pi 5 is faster than a Pi 4 at both."""
    for entry in catalog.CATALOG:
        if entry.name == DEMO_NAME:
            continue
        pi4 = devices.budget(entry, devices.DEVICES["pi4"])
        pi5 = devices.budget(entry, devices.DEVICES["pi5"])
        assert pi4 is not None
        assert pi5 is not None
        assert set(pi4.fits) == {4, 8}
        assert pi4.needed_bytes == (entry.memory_bytes or 0) + devices.EMBEDDING_CACHE
        assert pi4.first_answer_s is not None
        assert pi5.first_answer_s is not None
        assert pi4.tokens_per_s is not None
        assert pi5.tokens_per_s is not None
        assert pi5.first_answer_s < pi4.first_answer_s
        assert pi5.tokens_per_s > pi4.tokens_per_s


def test_what_fits_a_4_and_an_8_gb_pi() -> None:
    """LLaVA-1.5 7B fits 8 GB but not 4, 13B fits neither, SmolVLM-500M both; what an 8 GB
    Pi has left for kept KV states after the 7B is inside the board."""
    pi5 = devices.DEVICES["pi5"]
    seven = devices.budget(catalog.find("llava-1.5-7b"), pi5)
    thirteen = devices.budget(catalog.find("llava-1.5-13b"), pi5)
    small = devices.budget(catalog.find("smolvlm-500m"), pi5)
    assert seven is not None
    assert thirteen is not None
    assert small is not None
    assert seven.fits == {4: False, 8: True}
    assert thirteen.fits == {4: False, 8: False}
    assert small.fits == {4: True, 8: True}
    kept = seven.kept_states_bytes[8]
    margin = memory.margin_bytes(seven.needed_bytes - seven.cache_bytes)
    assert kept > 0
    assert seven.needed_bytes + margin + 2 * kept <= 8 * GiB - devices.OS_RESERVE
    assert seven.kept_states_bytes[4] == 0


def test_a_shorter_context_is_what_a_tighter_board_loads() -> None:
    """As the engine does, a board with room for a shorter context only gets that one
    (1024 text tokens beside the picture), shown as its n_ctx; less room, none at all."""
    phi3 = catalog.find("llava-phi3-mini")
    board = devices.DEVICES["pi5"].model_copy(update={"ram_gib": (4, 5, 6)})
    found = devices.budget(phi3, board)
    assert found is not None
    assert found.context == {4: None, 5: 576 + 1024, 6: 576 + 2048}
    assert found.fits == {4: False, 5: False, 6: True}
    assert 0 < found.kept_states_bytes[5] < found.kept_states_bytes[6]
    assert _budget_row(found)[2:5] == ["[red]no[/]", "[yellow]n_ctx 1600[/]", "[green]yes[/]"]


def test_estimates_follow_the_published_figures() -> None:
    """Generation is the board's bandwidth over the bytes read per token, so the
    reference model's own size gives back the published 3 and 9 tokens/s; and the 7B
    estimate on a Pi 5 is close to what Ollama users measure (2 to 3 tokens/s)."""
    for name, published in (("pi4", 3), ("pi5", 9)):
        device = devices.DEVICES[name]
        assert device.bandwidth / 1.17e9 == pytest.approx(published)
        assert device.quantized_flops > device.f16_flops
    seven = devices.budget(catalog.find("llava-1.5-7b"), devices.DEVICES["pi5"])
    assert seven is not None
    assert seven.tokens_per_s is not None
    assert 2 < seven.tokens_per_s < 3


def test_the_demo_budget_comes_from_its_files() -> None:
    """The bundled demo has no catalogue sizes: its budget reads the files' headers."""
    (demo,) = [b for b in models.device_budgets(devices.DEVICES["pi4"]) if b.model == "demo"]
    assert demo.fits == {4: True, 8: True}
    assert demo.first_answer_s is not None
    assert demo.tokens_per_s is not None
    assert demo.weights_bytes > 0
    assert len(models.device_budgets(devices.DEVICES["pi4"])) == len(catalog.CATALOG)


def test_models_device_shows_the_estimates_and_says_so(closed_port: int, tmp_path: Path) -> None:
    """`llava-local models --device pi4` prints the Pi 4 table with both RAM sizes, marked
    as estimates with their source; --json carries every budget."""
    env = {**os.environ, "HF_HUB_CACHE": str(tmp_path), "COLUMNS": "160"}
    cli = [sys.executable, "-m", "llava_local.cli", "models", "--device", "pi4"]
    cli += ["--host", f"127.0.0.1:{closed_port}", "--timeout", "0.2"]
    done = subprocess.run(cli, env=env, capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 0, done.stderr
    out = done.stdout
    assert "Raspberry Pi 4" in out
    assert "ESTIMATED" in out
    assert "justine.lol/matmul" in out
    assert "4 GB" in out
    assert "8 GB" in out
    assert all(entry.name in out for entry in catalog.CATALOG)
    done = subprocess.run(
        [*cli, "--json"], env=env, capture_output=True, text=True, timeout=120, check=False
    )
    report = json.loads(done.stdout)
    assert report["device"]["name"] == "pi4"
    assert len(report["budgets"]) == len(catalog.CATALOG)
    assert all(b["estimate"] is True for b in report["budgets"])
    bad = subprocess.run(
        [*cli[:5], "pi3"], env=env, capture_output=True, text=True, timeout=120, check=False
    )
    assert bad.returncode == 2
    assert "pi4" in bad.stderr
