"""`doctor`: the Ollama checks against the stand-in daemon, the llama.cpp build probe on this
machine's real install (and on scripted crashes), and the model, memory and disk checks."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

from llava_local import host
from llava_local.apps import doctor, models
from llava_local.apps.doctor import Check, llama_cpp_build, safe_cmake_args

from ..ollama_server import OllamaServer
from ..paths import ROOT


def by_name(checks: list[Check]) -> dict[str, Check]:
    """The checks keyed by name (each name appears once)."""
    named = {check.name: check for check in checks}
    assert len(named) == len(checks)
    return named


def run_doctor_cli(
    args: list[str], prefix: str = "", **env: str
) -> subprocess.CompletedProcess[str]:
    """The doctor command in a fresh interpreter, with ``env`` added (``prefix`` is Python
    run first)."""
    code = prefix + "from llava_local.cli.doctor import doctor; doctor(prog_name='llava-local')"
    return subprocess.run(
        [sys.executable, "-c", code, *args],
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=180,
        check=False,
    )


@pytest.fixture
def no_daemon(closed_port: int) -> str:
    """An Ollama address where nothing listens."""
    return f"127.0.0.1:{closed_port}"


# --- the llama.cpp build -------------------------------------------------------------


def test_the_installed_build_runs_quantized_models() -> None:
    """On this machine's safe build, a Q4_0 model evaluates in the probe subprocess."""
    check = llama_cpp_build()
    assert check.status == "ok", check.detail
    assert "Q4_0 model ran" in check.detail
    assert "AVX2" in check.detail


def test_a_crash_in_the_probe_is_reported_as_the_amx_trap() -> None:
    """A probe killed by SIGSEGV is reported as the AMX trap, with the reinstall command."""
    crash = "import os, signal; os.kill(os.getpid(), signal.SIGSEGV)"
    check = llama_cpp_build(script=crash)
    assert check.status == "fail"
    assert "SIGSEGV" in check.detail
    assert "AMX" in check.detail
    assert check.fix is not None
    assert "install-llama-cpp.sh" in check.fix
    assert "--no-cache-dir" in check.fix
    assert "-DGGML_NATIVE=OFF" in check.fix


def test_an_illegal_instruction_is_a_build_for_another_cpu() -> None:
    """A probe killed by SIGILL is reported as a build for another CPU."""
    check = llama_cpp_build(script="import os, signal; os.kill(os.getpid(), signal.SIGILL)")
    assert check.status == "fail"
    assert "illegal instruction" in check.detail
    assert check.fix is not None
    assert check.fix.startswith("rebuild it on this machine")
    assert "install-llama-cpp.sh" in check.fix


def test_a_failing_probe_shows_its_error() -> None:
    """A probe that exits with an error is a failure quoting the end of its output."""
    check = llama_cpp_build(script="raise SystemExit('cannot load the probe model')")
    assert check.status == "fail"
    assert "exit status 1" in check.detail
    assert "cannot load the probe model" in check.detail


def test_without_running_amx_in_the_build_but_not_the_cpu_fails(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Without the probe, AMX compiled in but hidden by the kernel is the trap's signature."""
    monkeypatch.setattr(doctor, "_system_info", lambda: {"AVX2": "1", "AMX_INT8": "1"})
    monkeypatch.setattr(host, "cpu_flags", lambda: frozenset({"avx2", "fma"}))
    check = llama_cpp_build(probe=False)
    assert check.status == "fail"
    assert "AMX is compiled in" in check.detail


def test_the_probe_runs_without_the_gguf_package(tmp_path: Path, no_daemon: str) -> None:
    """In an install without the dev-only gguf package (`make demo`'s), the probe still runs."""
    block_gguf = "import sys; sys.modules['gguf'] = None; "  # any import of gguf now fails
    env = {"OLLAMA_HOST": no_daemon, "HF_HUB_CACHE": str(tmp_path)}
    result = run_doctor_cli(["--json"], prefix=block_gguf, **env)
    checks = {c["name"]: c for c in json.loads(result.stdout)}
    build = checks["llama.cpp build"]
    assert build["status"] == "ok", build["detail"]
    assert "Q4_0 model ran" in build["detail"]


def test_the_shipped_probe_model_is_what_the_script_writes(tmp_path: Path) -> None:
    """The probe model in the package is byte for byte what scripts/make_probe_model.py makes."""
    script = ROOT / "scripts" / "make_probe_model.py"
    out = tmp_path / "probe.gguf"
    subprocess.run([sys.executable, str(script), str(out)], check=True, capture_output=True)
    assert doctor.PROBE_MODEL.is_file()
    assert doctor.PROBE_MODEL.read_bytes() == out.read_bytes()
    assert doctor.PROBE_MODEL.stat().st_size < 100_000


def test_a_missing_probe_model_skips_the_probe_and_says_why(tmp_path: Path) -> None:
    """Without its model file (a broken install) the probe is skipped with a warning saying so."""
    gone = tmp_path / "probe-q4_0.gguf"
    check = llama_cpp_build(model=gone)
    assert check.status == "warn"
    assert str(gone) in check.detail
    assert "reinstall llava-local" in (check.fix or "")


def test_safe_cmake_args_follow_the_cpu_and_leave_out_amx() -> None:
    """The suggested CMAKE_ARGS switch off native tuning and enable only listed features."""
    args = safe_cmake_args({"avx", "avx2", "fma", "f16c", "amx_tile", "amx_int8"})
    assert args.startswith("-DGGML_NATIVE=OFF")
    assert "-DGGML_AVX2=ON" in args
    assert "AVX512" not in args
    assert "AMX" not in args


def test_safe_cmake_args_on_a_pi_name_its_architecture() -> None:
    """On aarch64 the suggestion is the install script's: a Pi 4's Features give armv8-a
    (no dotprod), a Pi 5's armv8.2-a with dotprod and fp16."""
    pi4 = {"fp", "asimd", "evtstrm", "crc32", "cpuid"}
    pi5 = pi4 | {"aes", "pmull", "sha1", "sha2", "atomics", "fphp", "asimdhp", "asimddp"}
    assert safe_cmake_args(pi4, "aarch64") == "-DGGML_NATIVE=OFF -DGGML_CPU_ARM_ARCH=armv8-a"
    assert safe_cmake_args(pi5, "aarch64").endswith("=armv8.2-a+dotprod+fp16")


# --- Ollama --------------------------------------------------------------------------


def test_a_daemon_with_a_vision_model_is_ready(ollama_server: OllamaServer, tmp_path: Path) -> None:
    """With the daemon and its llava model, the Ollama checks pass and pictures can be asked."""
    checks = by_name(doctor.doctor(host=ollama_server.url, cache_dir=tmp_path, probe=False))
    assert checks["Ollama daemon"].status == "ok"
    assert ollama_server.version in checks["Ollama daemon"].detail
    assert checks["Ollama models"].status == "ok"
    assert "llava" in checks["Ollama models"].detail
    assert checks["ready"].status == "ok"
    assert "Ollama" in checks["ready"].detail


def test_no_daemon_is_a_warning_saying_how_to_start_it(no_daemon: str, tmp_path: Path) -> None:
    """No daemon is a warning (llama.cpp works without it) whose fix is `ollama serve`."""
    check = by_name(doctor.doctor(host=no_daemon, cache_dir=tmp_path, probe=False))
    assert check["Ollama daemon"].status == "warn"
    assert "ollama serve" in (check["Ollama daemon"].fix or "")
    assert "Ollama models" not in check


def test_a_daemon_without_vision_models_says_what_to_pull(
    ollama_server: OllamaServer, tmp_path: Path
) -> None:
    """Only text models on the daemon: a warning naming them, and a model to pull."""
    ollama_server.remove_model("llava")
    ollama_server.add_model("llama3.2", capabilities=["completion"])
    checks = by_name(doctor.doctor(host=ollama_server.url, cache_dir=tmp_path, probe=False))
    assert checks["Ollama models"].status == "warn"
    assert "llama3.2" in checks["Ollama models"].detail
    assert "pull" in (checks["Ollama models"].fix or "")


# --- models, memory, disk ------------------------------------------------------------


def test_a_missing_environment_pair_fails(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, no_daemon: str
) -> None:
    """LLAVA_LOCAL_MODEL naming a missing file is a failure saying to fix or unset it."""
    monkeypatch.setenv("LLAVA_LOCAL_MODEL", str(tmp_path / "gone.gguf"))
    monkeypatch.setenv("LLAVA_LOCAL_MMPROJ", str(tmp_path / "gone-mmproj.gguf"))
    checks = by_name(doctor.doctor(host=no_daemon, cache_dir=tmp_path, probe=False))
    assert checks["local models"].status == "fail"
    assert "gone.gguf" in checks["local models"].detail


def test_an_environment_pair_is_a_local_model(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, no_daemon: str
) -> None:
    """An existing LLAVA_LOCAL_MODEL pair counts, so llama.cpp is ready with it."""
    for name in ("m.gguf", "mm.gguf"):
        (tmp_path / name).write_bytes(b"GGUF")
    monkeypatch.setenv("LLAVA_LOCAL_MODEL", str(tmp_path / "m.gguf"))
    monkeypatch.setenv("LLAVA_LOCAL_MMPROJ", str(tmp_path / "mm.gguf"))
    checks = by_name(doctor.doctor(host=no_daemon, cache_dir=tmp_path, probe=False))
    assert checks["local models"].status == "ok"
    assert "m.gguf" in checks["local models"].detail


def test_memory_check_names_what_fits(monkeypatch: pytest.MonkeyPatch) -> None:
    """The memory check says which catalogue models fit, or warns when none does."""
    monkeypatch.setattr(models, "available_memory", lambda: 8_000_000_000)
    roomy = doctor._memory_check()
    assert roomy.status == "ok"
    assert "llava-1.5-13b" in roomy.detail  # too big
    monkeypatch.setattr(models, "available_memory", lambda: 100_000_000)
    tight = doctor._memory_check()
    assert tight.status == "warn"
    assert "no catalogue model fits" in tight.detail


def test_disk_check_warns_and_fails_on_little_space(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """Little free space for the Hugging Face cache warns; none for any model fails."""

    def free(nbytes: int) -> SimpleNamespace:
        return SimpleNamespace(disk_usage=lambda _path: SimpleNamespace(free=nbytes))

    monkeypatch.setattr(doctor, "shutil", free(100 * 10**9))
    assert doctor._disk_check(tmp_path / "cache").status == "ok"
    monkeypatch.setattr(doctor, "shutil", free(2 * 10**9))
    assert doctor._disk_check(tmp_path / "cache").status == "warn"
    monkeypatch.setattr(doctor, "shutil", free(10**6))
    low = doctor._disk_check(tmp_path / "cache")
    assert low.status == "fail"
    assert "HF_HUB_CACHE" in (low.fix or "")


def test_a_check_that_breaks_is_reported_not_raised(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, no_daemon: str
) -> None:
    """An error inside one check becomes a failed check; the report still completes."""

    def broken() -> int:
        raise OSError("cannot read /proc/meminfo")

    monkeypatch.setattr(models, "available_memory", broken)
    checks = by_name(doctor.doctor(host=no_daemon, cache_dir=tmp_path, probe=False))
    assert checks["memory"].status == "fail"
    assert "cannot read /proc/meminfo" in checks["memory"].detail
    assert "disk" in checks


def test_threads_are_the_physical_cores() -> None:
    """The thread check reports the physical cores llama.cpp will use."""
    from llava_local.host import physical_cores

    check = doctor._threads_check()
    assert check.status == "ok"
    assert f"uses {physical_cores()} threads" in check.detail


# --- the command ---------------------------------------------------------------------


def test_cli_doctor_exits_0_when_nothing_fails(ollama_server: OllamaServer, tmp_path: Path) -> None:
    """`doctor --json` with a daemon and its vision model prints checks and exits 0."""
    result = run_doctor_cli(["--json"], OLLAMA_HOST=ollama_server.host, HF_HUB_CACHE=str(tmp_path))
    assert result.returncode == 0, result.stdout + result.stderr
    checks = {c["name"]: c for c in json.loads(result.stdout)}
    assert checks["llama.cpp build"]["status"] == "ok"
    assert checks["ready"]["status"] == "ok"


def test_cli_doctor_exits_1_on_a_failure(tmp_path: Path, no_daemon: str) -> None:
    """A failed check makes `doctor` exit 1 and show the fix in its table."""
    result = run_doctor_cli(
        ["--no-probe"],
        OLLAMA_HOST=no_daemon,
        HF_HUB_CACHE=str(tmp_path),
        LLAVA_LOCAL_MODEL=str(tmp_path / "gone.gguf"),
        COLUMNS="200",
    )
    assert result.returncode == 1, result.stdout + result.stderr
    assert "FAIL" in result.stdout
    assert "unset them" in result.stdout


def test_cli_doctor_takes_a_timeout_for_ollama(tmp_path: Path, no_daemon: str) -> None:
    """`doctor --timeout` is accepted, like `models --timeout`, and the report completes."""
    result = run_doctor_cli(
        ["--no-probe", "--json", "--timeout", "0.5", "--host", no_daemon],
        HF_HUB_CACHE=str(tmp_path),
    )
    assert result.returncode in (0, 1), result.stderr
    checks = {c["name"]: c for c in json.loads(result.stdout)}
    assert checks["Ollama daemon"]["status"] == "warn"
    assert no_daemon in checks["Ollama daemon"]["detail"]
