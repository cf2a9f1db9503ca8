"""A Raspberry Pi as the library sees it: the board, its swap, its throttling and its big
cores read from made-up ``/proc`` and ``/sys`` roots (the board files ``make
arm64-check`` shows its emulated Pis, in scripts/arm64/), and what ``doctor`` says."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from llava_local import host
from llava_local.apps import doctor

from ..paths import ROOT

BOARDS = ROOT / "scripts" / "arm64"
FIRMWARE = "sys/devices/platform/soc/soc:firmware/get_throttled"


def pi_root(tmp_path: Path, board: str, *, throttled: str | None = "0", swap_kb: int = 0) -> Path:
    """A copy of a board's files with a /proc/meminfo (7.6 GiB, ``swap_kb`` of swap) and
    the firmware's get_throttled word as it prints it (hex, no 0x), or no such file."""
    root = tmp_path / board
    shutil.copytree(BOARDS / board, root, symlinks=True)
    (root / "proc/meminfo").write_text(
        f"MemTotal:        7968568 kB\nMemFree:         7000000 kB\n"
        f"MemAvailable:    7500000 kB\nSwapTotal:       {swap_kb} kB\n"
        f"SwapFree:        {swap_kb // 2} kB\n"
    )
    if throttled is None:
        (root / FIRMWARE).unlink()
    else:
        (root / FIRMWARE).write_text(f"{throttled}\n")
    return root


# --- host ----------------------------------------------------------------------------


@pytest.mark.parametrize(("board", "device"), [("pi4", "pi4"), ("pi5", "pi5")])
def test_the_board_is_named_by_its_device_tree(tmp_path: Path, board: str, device: str) -> None:
    """The device-tree model (NUL-terminated, through /proc's link) names the board."""
    found = host.board(pi_root(tmp_path, board))
    assert found is not None
    assert found.model.startswith(f"Raspberry Pi {board[-1]} Model B")
    assert "\0" not in found.model
    assert found.device == device


def test_other_boards_and_pcs(tmp_path: Path) -> None:
    """A Pi 400 is a Pi 4, a Compute Module 5 a Pi 5, another board has no device, and a
    machine without a device tree is no board."""
    model = tmp_path / "sys/firmware/devicetree/base/model"
    model.parent.mkdir(parents=True)
    for text, device in [
        ("Raspberry Pi 400 Rev 1.0", "pi4"),
        ("Raspberry Pi Compute Module 5 Rev 1.0", "pi5"),
        ("Radxa ROCK 5B", None),
    ]:
        model.write_bytes(text.encode() + b"\0")
        found = host.board(tmp_path)
        assert found is not None
        assert (found.model, found.device) == (text, device)
    assert host.board(tmp_path / "nothing") is None


def test_throttled_word_from_the_firmware_file(tmp_path: Path) -> None:
    """get_throttled is read as hex; bits 0-3 are now, 16-19 since boot; no file and no
    vcgencmd (a made-up root never runs it) is None."""
    root = pi_root(tmp_path, "pi5", throttled="50005")
    word = host.throttled(root)
    assert word == 0x50005
    assert host.throttled_reasons(word) == (
        ["under-voltage", "throttled"],
        ["under-voltage", "throttled"],
    )
    assert host.throttled(pi_root(tmp_path / "b", "pi5", throttled=None)) is None


def test_swap_and_total_memory_from_meminfo(tmp_path: Path) -> None:
    """SwapTotal and SwapFree, MemTotal, in bytes; a root without meminfo says nothing."""
    root = pi_root(tmp_path, "pi4", swap_kb=524288)
    assert host.swap_bytes(root) == (512 << 20, 256 << 20)
    assert host.total_bytes(root) == 7968568 * 1024
    assert host.swap_bytes(tmp_path / "none") is None
    assert host.total_bytes(tmp_path / "none") is None


def test_threads_are_the_big_cores_of_a_big_little_cpu(tmp_path: Path) -> None:
    """With CPUs of two capacities, only the biggest count; equal capacities (a Pi) or no
    capacity files fall back to the physical cores."""
    allowed = sorted(os.sched_getaffinity(0))
    if len(allowed) < 2:
        pytest.skip("needs two CPUs this process may use")
    cpus = tmp_path / "sys/devices/system/cpu"
    for n, cpu in enumerate(allowed):
        (cpus / f"cpu{cpu}").mkdir(parents=True)
        (cpus / f"cpu{cpu}/cpu_capacity").write_text("1024\n" if n == 0 else "414\n")
    assert host.physical_cores(tmp_path) == 1
    for cpu in allowed:
        (cpus / f"cpu{cpu}/cpu_capacity").write_text("1024\n")
    assert host.physical_cores(tmp_path) == len(allowed)


# --- doctor --------------------------------------------------------------------------


def test_doctor_names_the_board_memory_swap_and_no_throttling(tmp_path: Path) -> None:
    """On a Pi 5 that was never throttled: ok, with the board, memory, swap, and where its
    estimates are."""
    (check,) = doctor.board_checks(pi_root(tmp_path, "pi5", swap_kb=524288))
    assert check.status == "ok"
    assert check.detail.startswith("Raspberry Pi 5 Model B Rev 1.0: 7.6 GiB of memory")
    assert "swap 0.5 GiB (0.2 free)" in check.detail
    assert "not throttled (0x0)" in check.detail
    assert "llava-local models --device pi5" in check.detail


def test_doctor_warns_of_under_voltage_and_says_which_supply(tmp_path: Path) -> None:
    """Under-voltage since boot is a warning naming the condition and the power supply."""
    (check,) = doctor.board_checks(pi_root(tmp_path, "pi4", throttled="50000"))
    assert check.status == "warn"
    assert "since boot: under-voltage, throttled" in check.detail
    assert "now:" not in check.detail
    assert check.fix is not None
    assert "power supply" in check.fix


def test_doctor_warns_of_heat(tmp_path: Path) -> None:
    """A soft temperature limit now (bit 3) asks for cooling."""
    (check,) = doctor.board_checks(pi_root(tmp_path, "pi5", throttled="8"))
    assert check.status == "warn"
    assert "now: soft temperature limit" in check.detail
    assert check.fix is not None
    assert "fan" in check.fix


def test_doctor_without_throttle_information_and_on_a_pc(tmp_path: Path) -> None:
    """No get_throttled: the board is reported and throttling called unknown. A PC has no
    board check at all."""
    (check,) = doctor.board_checks(pi_root(tmp_path, "pi4", throttled=None))
    assert check.status == "ok"
    assert "throttling unknown" in check.detail
    assert doctor.board_checks(tmp_path / "pc") == []
    checks = doctor.doctor(probe=False, timeout=0.1, root=pi_root(tmp_path / "d", "pi5"))
    assert [c.name for c in checks].count("board") == 1
