"""``llava-local doctor``: what works on this machine, what does not, and what to do.

Each check returns a :class:`Check` (``ok``, ``warn`` or ``fail``, what was found, and
the fix). A check that itself breaks becomes a ``fail`` naming the error, so the
report always completes.

The llama.cpp build is judged by running it: a subprocess loads a tiny Q4_0 model
that ships with the package (``data/probe-q4_0.gguf``, 56 kB, written once by
``scripts/make_probe_model.py``) and evaluates a few tokens. A build compiled with
``-march=native`` on a CPU that reports AMX but forbids it dies there with SIGSEGV,
which would kill this process too, hence the subprocess. Only with ``--no-probe`` (or
the model file missing from a broken install) does the check fall back to reading
``llama_print_system_info()``.
"""

from __future__ import annotations

import os
import platform
import shutil
import signal
import subprocess
import sys
from collections.abc import Callable
from importlib import metadata
from pathlib import Path
from typing import Literal

from pydantic import BaseModel

from .. import catalog, host
from ..demo import DEMO_NAME
from ..errors import LlavaLocalError
from ..memory import human
from ..wording import count
from . import models

__all__ = [
    "Check",
    "board_checks",
    "budget_check",
    "doctor",
    "llama_cpp_build",
    "safe_cmake_args",
]

Status = Literal["ok", "warn", "fail"]

#: The oldest llama-cpp-python with libmtmd bindings this package drives.
MIN_LLAMA_CPP = (0, 3, 36)
#: How long the build probe may take (importing llama_cpp and a few tokens: ~1 s).
PROBE_TIMEOUT_S = 120.0
#: The probe's model: one Q4_0 llama block (see scripts/make_probe_model.py).
PROBE_MODEL = Path(__file__).parent.parent / "data" / "probe-q4_0.gguf"
_GB = 1e9

# Runs in a fresh interpreter: load the model at argv[1], evaluate a prompt, then one
# token (both the batched and the single-token matrix products).
_PROBE = """\
import sys
import llama_cpp
llm = llama_cpp.Llama(model_path=sys.argv[1], n_ctx=128, n_batch=64, verbose=False)
tokens = llm.tokenize(b"does this build run quantized models?", add_bos=True)
llm.eval(tokens)
llm.eval([tokens[-1]])
print("probe ok", llm.n_tokens)
"""


class Check(BaseModel):
    """One finding: its status, what was found, and what to do about it."""

    name: str
    status: Status
    detail: str
    fix: str | None = None


def doctor(
    *,
    host: str | None = None,
    cache_dir: str | os.PathLike[str] | None = None,
    probe: bool = True,
    timeout: float = 1.0,
    root: Path = Path("/"),
) -> list[Check]:
    """Check the engines, the models, and the machine; see the module docstring.
    ``root`` is where ``/proc`` and ``/sys`` are read for the board (tests pass a
    made-up one)."""
    checks: list[Check] = []
    checks += _guarded("board", lambda: board_checks(root))
    status, ollama = models.ollama_models(host, timeout=timeout)
    checks += _guarded("Ollama", lambda: _ollama_checks(status, ollama))
    checks += _guarded("llama.cpp", lambda: _llama_checks(probe))
    checks += _guarded("huggingface_hub", lambda: [_hub_check()])
    checks += _guarded("local models", lambda: [_local_models_check(cache_dir)])
    checks += _guarded("CPU threads", lambda: [_threads_check()])
    checks += _guarded("memory", lambda: [_memory_check()])
    checks += _guarded("memory budget", lambda: [budget_check()])
    checks += _guarded("disk", lambda: [_disk_check(cache_dir)])
    checks.append(_ready_check(checks, ollama))
    return checks


def _guarded(name: str, run: Callable[[], list[Check]]) -> list[Check]:
    """Run checks; if the checking itself breaks, report that instead of crashing."""
    try:
        return run()
    except (LlavaLocalError, OSError, ValueError, RuntimeError, ImportError) as exc:
        return [
            Check(
                name=name,
                status="fail",
                detail=f"the check itself failed: {type(exc).__name__}: {exc}",
                fix="report this with the output of `llava-local doctor --json`",
            )
        ]


# --- Ollama --------------------------------------------------------------------------


def _ollama_checks(status: models.OllamaStatus, found: list[models.InstalledModel]) -> list[Check]:
    if not status.reachable:
        return [
            Check(
                name="Ollama daemon",
                status="warn",
                detail=f"no Ollama daemon answers at {status.host} ({status.error})",
                fix="start it with `ollama serve` (install it from ollama.com), or set "
                "OLLAMA_HOST to where it runs; the llama.cpp engine works without it",
            )
        ]
    checks = [
        Check(
            name="Ollama daemon",
            status="ok",
            detail=f"Ollama {status.version} answers at {status.host}",
        )
    ]
    if status.error:
        checks.append(Check(name="Ollama models", status="warn", detail=status.error))
        return checks
    vision = [m.name for m in found if m.vision]
    unknown = [m.name for m in found if m.vision is None]
    if vision:
        detail = f"{count(len(found), 'model')}; with vision: {', '.join(vision)}"
        checks.append(Check(name="Ollama models", status="ok", detail=detail))
    elif found:
        names = ", ".join(m.name for m in found)
        checks.append(
            Check(
                name="Ollama models",
                status="warn",
                detail=f"no model that can see pictures among: {names}"
                + (" (this daemon does not report capabilities)" if unknown else ""),
                fix="pull one: `llava-local pull llava-phi3` (or `ollama pull moondream`)",
            )
        )
    else:
        checks.append(
            Check(
                name="Ollama models",
                status="warn",
                detail="the daemon has no models",
                fix="pull a vision model: `llava-local pull llava-phi3`",
            )
        )
    return checks


# --- llama.cpp -----------------------------------------------------------------------


def _llama_checks(probe: bool) -> list[Check]:
    try:
        version = metadata.version("llama-cpp-python")
    except metadata.PackageNotFoundError:
        return [
            Check(
                name="llama-cpp-python",
                status="warn",
                detail="not installed: the in-process engine is unavailable",
                fix="install it with scripts/install-llama-cpp.sh from the llava-local "
                "repository (x86-64), or `pip install 'llava-local[llama-cpp]'`",
            )
        ]
    checks = []
    numbers = tuple(int(p) for p in version.split(".")[:3] if p.isdigit())
    if numbers < MIN_LLAMA_CPP:
        wanted = ".".join(map(str, MIN_LLAMA_CPP))
        checks.append(
            Check(
                name="llama-cpp-python",
                status="fail",
                detail=f"version {version} is older than {wanted}, which brings libmtmd",
                fix=f"upgrade: `pip install --no-cache-dir 'llama-cpp-python>={wanted}'`",
            )
        )
    else:
        checks.append(Check(name="llama-cpp-python", status="ok", detail=f"version {version}"))
    checks.append(llama_cpp_build(probe=probe))
    return checks


def llama_cpp_build(
    *,
    probe: bool = True,
    python: str = sys.executable,
    script: str = _PROBE,
    model: Path = PROBE_MODEL,
) -> Check:
    """Whether the installed llama.cpp build runs quantized models here.

    Reads the build's CPU features, then (with ``probe``) runs ``script`` in ``python``
    on ``model``, the tiny Q4_0 model shipped with the package; a death by signal is
    reported as the AMX trap (SIGSEGV) or a foreign build (SIGILL), with the reinstall
    command that avoids it.
    """
    features = _system_info()
    built_amx = features.get("AMX_INT8") == "1"
    cpu_amx = "amx_tile" in set(host.cpu_flags())
    listed = ", ".join(k for k, v in features.items() if v == "1") or "none reported"
    summary = f"built for: {listed}"
    if not probe:
        return _static_verdict(
            summary,
            built_amx,
            cpu_amx,
            "the probe was skipped",
            "run `llava-local doctor` without --no-probe to test the build",
        )
    if not model.is_file():
        why = f"the probe model {model} is missing from this install"
        fix = "reinstall llava-local, then run `llava-local doctor` again to test the build"
        return _static_verdict(summary, built_amx, cpu_amx, why, fix)
    try:
        done = subprocess.run(
            [python, "-c", script, str(model)],
            capture_output=True,
            text=True,
            timeout=PROBE_TIMEOUT_S,
            check=False,
        )
    except subprocess.TimeoutExpired:
        return Check(
            name="llama.cpp build",
            status="warn",
            detail=f"{summary}; the probe did not finish in {PROBE_TIMEOUT_S:.0f} s",
            fix="run `llava-local doctor` again on an idle machine",
        )
    return _probe_verdict(summary, done)


def _probe_verdict(summary: str, done: subprocess.CompletedProcess[str]) -> Check:
    code = done.returncode
    if code == 0:
        return Check(
            name="llama.cpp build",
            status="ok",
            detail=f"{summary}; a Q4_0 model ran in a separate process",
        )
    tail = " ".join((done.stderr or done.stdout).strip().splitlines()[-3:])[-300:]
    if code < 0:
        name = _signal_name(-code)
        fix = _reinstall_fix()
        if -code == signal.SIGILL:
            cause = (
                "illegal instruction: this build uses CPU instructions this machine lacks "
                "(built on another machine, such as a Pi 5's build on a Pi 4?)"
            )
            fix = _reinstall_fix("rebuild it on this machine, for its CPU")
        else:
            cause = (
                "the AMX trap: llama-cpp-python was built with -march=native on a CPU "
                "that reports AMX but forbids it, and the first quantized matrix "
                "product kills the process"
            )
        return Check(
            name="llama.cpp build",
            status="fail",
            detail=f"{summary}; evaluating a Q4_0 model killed the process ({name}): {cause}",
            fix=fix,
        )
    return Check(
        name="llama.cpp build",
        status="fail",
        detail=f"{summary}; the probe failed with exit status {code}: {tail}",
        fix="reinstall llama-cpp-python: " + _reinstall_fix(),
    )


def _static_verdict(summary: str, built_amx: bool, cpu_amx: bool, why: str, fix: str) -> Check:
    """Without running the build: AMX compiled in but not offered by the kernel is the
    trap's signature (``-march=native`` saw AMX in CPUID; /proc/cpuinfo hides it)."""
    if built_amx and not cpu_amx:
        return Check(
            name="llama.cpp build",
            status="fail",
            detail=f"{summary}; AMX is compiled in but this CPU does not offer it, the "
            f"signature of the AMX trap (quantized models crash); {why}",
            fix=_reinstall_fix(),
        )
    return Check(
        name="llama.cpp build",
        status="warn",
        detail=f"{summary}; not run: {why}",
        fix=fix,
    )


def _system_info() -> dict[str, str]:
    """``llama_print_system_info()`` as a dict: ``{"AVX2": "1", ...}``."""
    import llama_cpp

    raw = llama_cpp.llama_print_system_info()
    text = raw.decode(errors="replace") if isinstance(raw, bytes) else str(raw)
    features: dict[str, str] = {}
    for part in text.replace("CPU :", "|").split("|"):
        key, sep, value = part.partition("=")
        if sep:
            features[key.strip()] = value.strip()
    return features


def safe_cmake_args(flags: set[str] | None = None, machine: str | None = None) -> str:
    """CMAKE_ARGS for a build without ``-march=native`` that uses only what /proc/cpuinfo
    lists (the same rule as scripts/install-llama-cpp.sh): on x86-64 its instruction sets
    but never AMX; on aarch64 the architecture its Features name (a Pi 4: armv8-a, no
    dotprod; a Pi 5: armv8.2-a+dotprod+fp16)."""
    flags = set(host.cpu_flags()) if flags is None else flags
    if (machine or platform.machine()).lower() in ("aarch64", "arm64"):
        ext = "+dotprod" if "asimddp" in flags else ""
        ext += "+fp16" if {"asimdhp", "fphp"} <= flags else ""
        ext += "+i8mm" if "i8mm" in flags else ""
        return f"-DGGML_NATIVE=OFF -DGGML_CPU_ARM_ARCH={'armv8.2-a' if ext else 'armv8-a'}{ext}"
    wanted = [
        ("avx", "AVX"),
        ("avx2", "AVX2"),
        ("fma", "FMA"),
        ("f16c", "F16C"),
        ("bmi2", "BMI2"),
        ("avx512f", "AVX512"),
        ("avx512_vnni", "AVX512_VNNI"),
        ("avx512_bf16", "AVX512_BF16"),
    ]
    args = ["-DGGML_NATIVE=OFF"] + [f"-DGGML_{name}=ON" for flag, name in wanted if flag in flags]
    return " ".join(args)


def _reinstall_fix(why: str = "rebuild without -march=native") -> str:
    try:
        version = metadata.version("llama-cpp-python")
    except metadata.PackageNotFoundError:
        version = ".".join(map(str, MIN_LLAMA_CPP))
    return (
        f"{why}: run scripts/install-llama-cpp.sh from the "
        f'llava-local repository, or CMAKE_ARGS="{safe_cmake_args()}" pip install '
        f"--force-reinstall --no-cache-dir llama-cpp-python=={version} "
        "(--no-cache-dir matters: pip's wheel cache ignores CMAKE_ARGS)"
    )


def _signal_name(number: int) -> str:
    try:
        return signal.Signals(number).name
    except ValueError:
        return f"signal {number}"


# --- models, the Hub, the machine ----------------------------------------------------


def _hub_check() -> Check:
    try:
        version = metadata.version("huggingface_hub")
    except metadata.PackageNotFoundError:
        return Check(
            name="huggingface_hub",
            status="warn",
            detail="not installed: `llava-local pull` cannot download GGUF files",
            fix="pip install huggingface_hub",
        )
    from huggingface_hub import constants

    where = constants.ENDPOINT
    offline = "; offline (HF_HUB_OFFLINE): only cached files" if constants.HF_HUB_OFFLINE else ""
    return Check(
        name="huggingface_hub", status="ok", detail=f"version {version}, Hub {where}{offline}"
    )


def _local_models_check(cache_dir: str | os.PathLike[str] | None) -> Check:
    try:
        pairs = models.cached_pairs(cache_dir)
    except LlavaLocalError:
        pairs = []
    env = models.env_pair()
    gone = [p for p in (env.model_path, env.mmproj_path) if p and not p.is_file()] if env else []
    if gone:
        return Check(
            name="local models",
            status="fail",
            detail="LLAVA_LOCAL_MODEL / LLAVA_LOCAL_MMPROJ name missing files: "
            + ", ".join(map(str, gone)),
            fix="point them at an existing GGUF pair, or unset them",
        )
    complete = [p.name for p in pairs if not p.note]
    complete += [f"{env.name} (LLAVA_LOCAL_MODEL)"] if env else []
    incomplete = [p.name for p in pairs if p.note]
    if incomplete:
        return Check(
            name="local models",
            status="warn",
            detail=f"half-downloaded: {', '.join(incomplete)}"
            + (f"; complete: {', '.join(complete)}" if complete else ""),
            fix=f"finish it: `llava-local pull {incomplete[0]}`",
        )
    if complete:
        return Check(name="local models", status="ok", detail=f"GGUF pairs: {', '.join(complete)}")
    demo = models.demo_model() is not None
    return Check(
        name="local models",
        status="warn",
        detail="only the bundled demo model (digits, shapes and colours)"
        if demo
        else "no GGUF pair for llama.cpp",
        fix="download a small one: `llava-local pull smolvlm-500m` "
        "(see `llava-local models` for what fits)",
    )


def board_checks(root: Path = Path("/")) -> list[Check]:
    """On a single-board computer: which board, its memory and swap, and (on a
    Raspberry Pi) whether the CPU is throttled now or was since boot. Nothing on a PC."""
    found = host.board(root)
    if found is None:
        return []
    total, swap = host.total_bytes(root), host.swap_bytes(root)
    memory = f"{total / 2**30:.1f} GiB of memory" if total else "memory unknown"
    swapped = "no swap"
    if swap and swap[0]:
        swapped = f"swap {swap[0] / 2**30:.1f} GiB ({swap[1] / 2**30:.1f} free)"
    detail = f"{found.model}: {memory}, {swapped}"
    if found.device:
        detail += f"; estimates for it: `llava-local models --device {found.device}`"
    word = host.throttled(root)
    if word is None:
        if found.device is None:
            return [Check(name="board", status="ok", detail=detail)]
        return [
            Check(
                name="board",
                status="ok",
                detail=f"{detail}; throttling unknown (no get_throttled file, no vcgencmd)",
            )
        ]
    now, since = host.throttled_reasons(word)
    if not now and not since:
        return [Check(name="board", status="ok", detail=f"{detail}; not throttled (0x{word:x})")]
    said = "; ".join(
        part
        for part in (
            f"now: {', '.join(now)}" if now else "",
            f"since boot: {', '.join(since)}" if since else "",
        )
        if part
    )
    power = "under-voltage" in now + since
    fix = (
        "use the official power supply (5 V 3 A for a Pi 4, 5 V 5 A for a Pi 5) and a short cable"
        if power
        else "add a heatsink or fan: a throttled CPU answers slower"
    )
    return [
        Check(
            name="board",
            status="warn",
            detail=f"{detail}; the CPU is throttled (0x{word:x}) {said}",
            fix=fix,
        )
    ]


def _threads_check() -> Check:

    cores = host.physical_cores()
    logical = os.cpu_count() or cores
    return Check(
        name="CPU threads",
        status="ok",
        detail=f"{count(cores, 'physical core')}, {logical} logical: llama.cpp uses "
        f"{count(cores, 'thread')} (hyper-threads slow it down)",
    )


def _memory_check() -> Check:
    available = models.available_memory()
    if available is None:
        return Check(name="memory", status="warn", detail="available memory is unknown")
    sized = sorted((e.memory_bytes, e.name) for e in catalog.CATALOG if e.memory_bytes is not None)
    fitting = [name for need, name in sized if need <= available]
    too_big = [name for need, name in sized if need > available]
    detail = f"{available / _GB:.1f} GB available"
    if not fitting:
        return Check(
            name="memory",
            status="warn",
            detail=f"{detail}: no catalogue model fits, only the demo",
            fix="close other programs, or use a machine with more memory (2 GB runs "
            "SmolVLM-500M, 8 GB LLaVA-1.5 7B)",
        )
    largest = fitting[-1]
    more = f"; too big: {', '.join(too_big)}" if too_big else ""
    return Check(name="memory", status="ok", detail=f"{detail}: models up to {largest} fit{more}")


def budget_check(available: int | None = None) -> Check:
    """The llama.cpp engine's memory for the model it loads by default (the
    ``LLAVA_LOCAL_MODEL`` pair, else the demo) as ``serve`` opens it: conversations at
    once, their context and KV cache, the memory for kept KV states, and what is left of
    ``available`` bytes (default: this machine's now). Warns when the model does not fit,
    when only one conversation fits at once, or when kept states get nothing."""
    env = models.env_pair()
    if env is not None:
        name, files = f"{env.name} (LLAVA_LOCAL_MODEL)", (env.model_path, env.mmproj_path)
    elif models.demo_model() is not None:
        name, files = DEMO_NAME, (None, None)
    else:
        return Check(
            name="memory budget",
            status="warn",
            detail="no default model to size: LLAVA_LOCAL_MODEL is unset and the demo is missing",
            fix="set LLAVA_LOCAL_MODEL (and LLAVA_LOCAL_MMPROJ) to a GGUF pair",
        )
    try:
        budget = models.llama_budget(*files, available=available)
    except LlavaLocalError as exc:
        return Check(
            name="memory budget",
            status="warn",
            detail=f"cannot size {name} for llama.cpp: {exc}",
            fix="point LLAVA_LOCAL_MODEL / LLAVA_LOCAL_MMPROJ at a GGUF pair",
        )
    detail = budget.summary(name)
    if not budget.fits:
        return Check(
            name="memory budget",
            status="warn",
            detail=f"{detail}: it needs {human(budget.estimate.needed_bytes + budget.margin_bytes)}"
            f" with the margin, {human(budget.available_bytes)} is available",
            fix="close other programs, or use a smaller model or quantization (or a shorter "
            "--n-ctx)",
        )
    short = budget.n_ctx < budget.n_ctx_wanted
    if budget.parallel == 1 or budget.kept_bytes == 0 or short:
        why = []
        if short:
            shortened = count(budget.n_ctx, "position")
            why.append(f"the context is shortened to {shortened} of {budget.n_ctx_wanted}")
        if budget.parallel == 1:
            why.append("only one conversation fits at once: `serve` answers one at a time")
        if budget.kept_bytes == 0:
            why.append(
                "kept states get nothing: a conversation that loses its slot reads its "
                "picture again"
            )
        return Check(
            name="memory budget",
            status="warn",
            detail=f"{detail}; {'; '.join(why)}",
            fix="close other programs, or use a smaller model or quantization",
        )
    return Check(name="memory budget", status="ok", detail=detail)


def _disk_check(cache_dir: str | os.PathLike[str] | None) -> Check:
    try:
        cache = models.hf_cache_dir(cache_dir)
    except LlavaLocalError:
        cache = Path.home() / ".cache" / "huggingface" / "hub"
    existing = cache
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    free = shutil.disk_usage(existing).free
    sizes = [e.download_bytes for e in catalog.CATALOG if e.download_bytes]
    smallest, typical = min(sizes), 5 * _GB
    detail = f"{free / _GB:.1f} GB free for the Hugging Face cache at {cache}"
    if free < smallest:
        return Check(
            name="disk",
            status="fail",
            detail=f"{detail}: not enough for any catalogue model",
            fix="free disk space, or point HF_HUB_CACHE at a larger disk",
        )
    if free < typical:
        return Check(
            name="disk",
            status="warn",
            detail=f"{detail}: enough for small models only (a 7B pair needs ~5 GB)",
            fix="free disk space, or point HF_HUB_CACHE at a larger disk",
        )
    return Check(name="disk", status="ok", detail=detail)


def _ready_check(checks: list[Check], ollama: list[models.InstalledModel]) -> Check:
    """Can anything answer a question about a picture right now?"""
    by_name = {c.name: c for c in checks}
    ways = []
    if any(m.vision for m in ollama):
        ways.append("Ollama")
    build = by_name.get("llama.cpp build")
    local = by_name.get("local models")
    llama_ok = build is not None and build.status != "fail"
    has_pair = local is not None and (
        local.status == "ok" or "complete:" in local.detail or "demo" in local.detail
    )
    if llama_ok and has_pair:
        ways.append("llama.cpp")
    if ways:
        return Check(
            name="ready",
            status="ok",
            detail=f"pictures can be asked about via {' and '.join(ways)}",
        )
    return Check(
        name="ready",
        status="fail",
        detail="no engine can answer yet: no Ollama vision model, and no working "
        "llama.cpp with a GGUF pair",
        fix="follow the fixes above; the quickest: `llava-local pull smolvlm-500m`",
    )
