"""``make arm64-check``: llava-local on an emulated Raspberry Pi 4 and Pi 5, on this x86 machine.

What it does, caching each step under ``~/.cache/llava-local/arm64`` (``LLAVA_LOCAL_ARM64_CACHE``):

1. Host tools from Debian (``qemu-user-static``, ``binfmt-support``, ``debootstrap``,
   ``g++-aarch64-linux-gnu``, ``cmake``, ``ninja-build``), installed with apt-get when
   missing; ``binfmt_misc`` mounted and ``qemu-aarch64`` enabled, so aarch64 programs run.
2. A Debian bookworm arm64 root (Raspberry Pi OS is bookworm-based) by ``debootstrap``,
   kept in a folder named by a hash of its recipe: a change of recipe makes a new one.
3. One llama-cpp-python ``linux_aarch64`` wheel per board, cross-compiled by
   ``scripts/install-llama-cpp.sh`` with the flags it picks on that board (it reads the
   board's ``/proc/cpuinfo`` and device-tree model from ``scripts/arm64/pi4`` or ``pi5``),
   cached by the script per flag set as on any machine.
4. Per board, a virtualenv inside the root: the wheel, then the project from a clean copy
   of this checkout (its files as they are, nothing git ignores) as a user installs it,
   ``pip install 'llava-local[llama-cpp]'``, plus the tools the chosen tests need.
5. Both boards at once, under ``QEMU_CPU`` (Pi 4: ``cortex-a72``, armv8-a without dotprod;
   Pi 5: ``cortex-a76``, armv8.2-a with dotprod and fp16), each step a process in the root,
   which is shown the board's ``/proc/cpuinfo``, device-tree model and throttle file: the
   demo question, ``doctor``, ``models --device``, and :data:`TESTS` (run against the
   installed package, not the checkout).
6. The Pi 5 build run on the Pi 4 CPU must die with SIGILL (``doctor`` names it): the
   proof that the Pi 4 profile really lacks what a Pi 5 build uses.

It prints a table (board, answer, tests, peak memory, time) and exits 1 if anything
failed. Peak memory is the largest process's peak RSS *under qemu*, the emulator's own
memory included; times are emulated, not a Pi's (``llava-local models --device`` has
estimates of those). Needs root (chroot, mounts; run through sudo otherwise).

``--native-build`` instead runs what a Pi user runs, ``make demo`` in a copy of the
checkout inside the root (Pi 4 profile): ``scripts/install-llama-cpp.sh`` compiling
llama.cpp natively, under emulation. It takes hours, more than a working session, so it
is resumable as on a Pi: the script's wheel cache (``/root/.cache/llava-local/wheels``
in the root, with the sdist, the build's Python and CMake's build folder until the wheel
exists) stays in the cached root between runs, and running ``--native-build`` again
continues the compile where the last run was killed. Each run's output goes to
``logs/native-make-demo-<time>.log``; the build's own log, every run of it, to
``build.log`` in that wheel cache. BENCHMARKS.md has its time.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import tomllib

REPO = Path(__file__).resolve().parents[1]
CACHE = Path(
    os.environ.get("LLAVA_LOCAL_ARM64_CACHE")
    or Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "llava-local" / "arm64"
)
SUITE = "bookworm"
#: What the root gets from Debian: Python as Raspberry Pi OS has it, and ggml-cpu's OpenMP.
ROOT_PACKAGES = ("python3", "python3-venv", "python3-pip", "ca-certificates", "libgomp1")
#: Bumped when the root's recipe changes in a way the lists above do not show.
ROOT_RECIPE = 1
#: Host commands and the Debian packages that bring them.
HOST_TOOLS = {
    "qemu-aarch64-static": "qemu-user-static",
    "update-binfmts": "binfmt-support",
    "debootstrap": "debootstrap",
    "aarch64-linux-gnu-g++": "g++-aarch64-linux-gnu",
    "cmake": "cmake",
    "ninja": "ninja-build",
    "git": "git",
}
#: The test tools beside the project (not its whole dev extra: no Ray, Playwright, mypy).
TEST_TOOLS = (
    "pytest>=8",
    "pytest-timeout>=2.3",
    "hypothesis>=6.100",
    "fastapi>=0.110",
    "uvicorn>=0.29",
    "openai>=1.40",
)
#: The chosen part of the suite: the demo model, pictures, conversation, KV states, serve.
TESTS = (
    "tests/core/test_demo_chat.py",
    "tests/core/test_images.py",
    "tests/backends/llama_cpp/test_llama_cpp_engine.py",
    "tests/backends/llama_cpp/test_kv_cache.py",
    "tests/apps/serve/test_serve.py",
)
QUESTION = "What digit is this?"
#: Inside the root.
OPT = Path("/opt/llava-local")
PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


@dataclass(frozen=True)
class Board:
    """An emulated board: its name, qemu's CPU model and the files it shows the root."""

    name: str
    title: str
    qemu_cpu: str
    files: Path


BOARDS = (
    Board("pi4", "Raspberry Pi 4 (Cortex-A72, armv8-a)", "cortex-a72", REPO / "scripts/arm64/pi4"),
    Board(
        "pi5",
        "Raspberry Pi 5 (Cortex-A76, armv8.2-a+dotprod+fp16)",
        "cortex-a76",
        REPO / "scripts/arm64/pi5",
    ),
)


@dataclass
class Ran:
    """One process run in the root: exit status, output, wall time, peak RSS."""

    argv: list[str]
    returncode: int
    output: str
    seconds: float
    peak_bytes: int


@dataclass
class Row:
    """One line of the final table."""

    board: str
    answer: str = ""
    tests: str = ""
    peak_bytes: int = 0
    seconds: float = 0.0
    problems: list[str] = field(default_factory=list)


def say(text: str) -> None:
    print(f"arm64-check: {text}", file=sys.stderr, flush=True)


def sh(argv: list[str], **kwargs: object) -> subprocess.CompletedProcess[str]:
    """A host command that must succeed."""
    return subprocess.run(argv, check=True, text=True, **kwargs)  # type: ignore[call-overload, no-any-return]


# --- the host -------------------------------------------------------------------------


def host_tools() -> None:
    """Install the Debian packages whose commands are missing."""
    missing = sorted({pkg for cmd, pkg in HOST_TOOLS.items() if shutil.which(cmd) is None})
    if not missing:
        return
    say(f"installing Debian's {' '.join(missing)}")
    sh(["apt-get", "update", "-qq"])
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    lock = ["-o", "DPkg::Lock::Timeout=600"]
    sh(["apt-get", "install", "-y", "-qq", *lock, *missing], env=env)


def binfmt() -> None:
    """Let the kernel run aarch64 programs through qemu (also inside a chroot: the
    interpreter is registered with the F flag, opened once)."""
    misc = Path("/proc/sys/fs/binfmt_misc")
    if not (misc / "status").exists():
        sh(["mount", "-t", "binfmt_misc", "binfmt_misc", str(misc)])
    entry = misc / "qemu-aarch64"
    if not entry.exists() or not entry.read_text().startswith("enabled"):
        sh(["update-binfmts", "--enable", "qemu-aarch64"])
    flags = next((line for line in entry.read_text().splitlines() if line.startswith("flags")), "")
    if "F" not in flags:
        raise SystemExit(f"qemu-aarch64 is registered without the F flag ({flags}): chroot fails")


def mirror() -> str:
    """The Debian mirror this machine's apt uses."""
    sources = [Path("/etc/apt/sources.list"), *Path("/etc/apt/sources.list.d").glob("*")]
    for path in sources:
        try:
            words = path.read_text().split()
        except OSError:
            continue
        for word in words:
            if word.startswith("http") and word.rstrip("/").endswith("/debian"):
                return word
    return "http://deb.debian.org/debian"


def root_fs() -> Path:
    """The arm64 root, made by debootstrap once per recipe."""
    recipe = json.dumps([SUITE, ROOT_PACKAGES, ROOT_RECIPE])
    root = CACHE / f"root-{SUITE}-{hashlib.sha256(recipe.encode()).hexdigest()[:12]}"
    if not (root / ".ready").exists():
        fresh = root.with_name(root.name + ".partial")
        shutil.rmtree(fresh, ignore_errors=True)
        fresh.parent.mkdir(parents=True, exist_ok=True)
        say(f"debootstrap {SUITE} arm64 into {root} (about 10 minutes, once)")
        started = time.monotonic()
        sh(
            [
                "nice",
                "-n",
                "19",
                "debootstrap",
                "--arch=arm64",
                "--variant=minbase",
                f"--include={','.join(ROOT_PACKAGES)}",
                SUITE,
                str(fresh),
                mirror(),
            ]
        )
        (fresh / ".ready").write_text(f"{time.monotonic() - started:.0f} s\n")
        fresh.rename(root)
    # The network may have changed since: name servers and the CA bundle pip trusts.
    shutil.copyfile("/etc/resolv.conf", root / "etc/resolv.conf")
    bundle = Path("/etc/ssl/certs/ca-certificates.crt")
    if bundle.exists():
        shutil.copyfile(bundle, root / "etc/ssl/certs/ca-certificates.crt")
    return root


def wheel(board: Board) -> Path:
    """The board's llama-cpp-python wheel, cross-built by scripts/install-llama-cpp.sh."""
    venv = CACHE / "build-venv"  # the script makes the build's own environment from it
    if not (venv / "bin/python").exists():
        sh([sys.executable, "-m", "venv", str(venv)])
    env = {
        **os.environ,
        "LLAVA_LOCAL_TARGET": "aarch64",
        "LLAVA_LOCAL_BOARD_ROOT": str(board.files),
        "LLAVA_LOCAL_WHEEL_CACHE": str(CACHE / "wheels"),
    }
    env.pop("CMAKE_ARGS", None)
    script = REPO / "scripts/install-llama-cpp.sh"
    done = sh(
        ["nice", "-n", "19", str(script), str(venv / "bin/python")], env=env, stdout=subprocess.PIPE
    )
    return Path(done.stdout.strip().splitlines()[-1])


# --- running inside the root -----------------------------------------------------------

# A private mount namespace: everything mounted here vanishes with the process. The board's
# /proc/cpuinfo, device-tree model and throttle file are laid over the real ones.
_ENTER = r"""
set -e
R=$1; B=$2; shift 2
mount -t proc proc "$R/proc"
mount --bind "$B/proc/cpuinfo" "$R/proc/cpuinfo"
mount --rbind /sys "$R/sys"
for dir in firmware devices/platform; do
  mount -t tmpfs board "$R/sys/$dir"
  cp -r "$B/sys/$dir/." "$R/sys/$dir/"
done
mount --rbind /dev "$R/dev"
exec chroot "$R" "$@"
"""


def run(
    root: Path,
    board: Board,
    command: str,
    *,
    cpu: str | None = None,
    timeout: float = 3600,
    log: Path | None = None,
) -> Ran:
    """``command`` (a shell line) in the root as ``board``, with a clean environment;
    its peak RSS from wait4 (the largest process of its tree)."""
    env = [
        "env",
        "-i",
        f"PATH={PATH}",
        "HOME=/root",
        "LANG=C.UTF-8",
        f"QEMU_CPU={cpu or board.qemu_cpu}",
        "PYTHONDONTWRITEBYTECODE=1",
    ]
    argv = [
        "nice",
        "-n",
        "19",
        "unshare",
        "--mount",
        "--propagation",
        "private",
        "sh",
        "-c",
        _ENTER,
        "enter",
        str(root),
        str(board.files),
        *env,
        "/bin/sh",
        "-c",
        command,
    ]
    log = log or CACHE / "logs" / f"{board.name}-last.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    with log.open("w") as out:
        proc = subprocess.Popen(
            argv,
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
        while True:
            pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
            if pid:
                break
            if time.monotonic() - started > timeout:
                os.killpg(proc.pid, signal.SIGKILL)
            time.sleep(0.2)
    proc.returncode = os.waitstatus_to_exitcode(status)
    output = log.read_text(errors="replace")
    return Ran(
        argv=[command],
        returncode=proc.returncode,
        output=output,
        seconds=time.monotonic() - started,
        peak_bytes=usage.ru_maxrss * 1024,
    )


def checked(ran: Ran, what: str) -> Ran:
    if ran.returncode != 0:
        tail = "\n".join(ran.output.splitlines()[-30:])
        raise SystemExit(f"{what} failed (exit {ran.returncode}):\n{tail}")
    return ran


def source_copy(root: Path) -> None:
    """The checkout's files (tracked or not, as they are in the working tree; nothing git
    ignores, so no virtualenv or build output) into ``OPT/src``, and again without the
    packages (``llava_local/``, ``dev/``) into ``OPT/run``, where the tests run: they
    import the installed package and find the example pictures."""
    listed = [
        "git",
        "-C",
        str(REPO),
        "ls-files",
        "-z",
        "--cached",
        "--others",
        "--exclude-standard",
    ]
    files = sh(listed, stdout=subprocess.PIPE).stdout
    src, run_dir = root / OPT.relative_to("/") / "src", root / OPT.relative_to("/") / "run"
    for folder in (src, run_dir):
        shutil.rmtree(folder, ignore_errors=True)
    for name in filter(None, files.split("\0")):
        path = REPO / name
        if not path.is_file():
            continue  # deleted in the working tree
        package = name.startswith(("llava_local/", "dev/"))
        for folder, wanted in ((src, True), (run_dir, not package)):
            if wanted:
                (folder / name).parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(path, folder / name)


def requirements() -> str:
    """What the virtualenvs install besides the project: the dependencies the project's
    and the development package's pyproject.toml name (not the rest of those files)."""
    found = []
    for name in ("pyproject.toml", "dev/pyproject.toml"):
        project = tomllib.loads((REPO / name).read_text())["project"]
        found.append([project.get("dependencies", []), project.get("optional-dependencies", {})])
    return json.dumps(found, sort_keys=True)


def venv(root: Path, board: Board, built: Path) -> Path:
    """The board's virtualenv in the root, made again when the wheel or the project's
    requirements change; the project itself is installed afresh every run."""
    inside = OPT / board.name
    wheels = root / OPT.relative_to("/") / "wheels" / board.name
    shutil.rmtree(wheels, ignore_errors=True)
    wheels.mkdir(parents=True)
    shutil.copy2(built, wheels / built.name)
    key = hashlib.sha256(f"{built}|{requirements()}|{TEST_TOOLS}".encode()).hexdigest()
    stamp = root / inside.relative_to("/") / ".key"
    pip = f"{inside}/bin/python -m pip install --find-links {OPT}/wheels/{board.name}"
    if not stamp.exists() or stamp.read_text() != key:
        say(f"{board.name}: a virtualenv with the wheel, the project's and the tests' requirements")
        shutil.rmtree(root / inside.relative_to("/"), ignore_errors=True)
        tools = " ".join(shlex.quote(t) for t in TEST_TOOLS)
        checked(
            run(
                root,
                board,
                f"python3 -m venv {inside} && {pip} {OPT}/wheels/{board.name}/"
                f"{built.name} && {pip} '{OPT}/src[llama-cpp]' {OPT}/src/dev {tools}",
                log=CACHE / "logs" / f"{board.name}-venv.log",
            ),
            f"{board.name}'s virtualenv",
        )
        stamp.write_text(key)
    say(f"{board.name}: installing the project from the copy of the checkout")
    checked(
        run(
            root,
            board,
            f"{pip} --no-deps --force-reinstall '{OPT}/src' {OPT}/src/dev",
            log=CACHE / "logs" / f"{board.name}-install.log",
        ),
        f"{board.name}'s install",
    )
    return inside


# --- the checks -------------------------------------------------------------------------


def check_board(root: Path, board: Board, inside: Path) -> Row:
    row = Row(board=board.title)
    logs = CACHE / "logs"
    ask = run(
        root,
        board,
        f"cd /tmp && {inside}/bin/llava-local ask --backend llama_cpp "
        f"{OPT}/src/examples/digit.png {shlex.quote(QUESTION)}",
        log=logs / f"{board.name}-ask.log",
    )
    row.answer = ask.output.strip().splitlines()[-1] if ask.output.strip() else ""
    if ask.returncode != 0 or "7" not in row.answer:
        row.problems.append(f"the demo answered {row.answer!r} (exit {ask.returncode})")
    doctor = run(
        root,
        board,
        f"{inside}/bin/llava-local doctor --json --timeout 0.2",
        log=logs / f"{board.name}-doctor.log",
    )
    found = _json_list(doctor.output)
    said = next((str(c["detail"]) for c in found if c.get("name") == "board"), "")
    if doctor.returncode != 0 or f"Raspberry Pi {board.name[-1]}" not in said:
        row.problems.append(f"doctor (exit {doctor.returncode}) did not pass or name the board")
    models = run(
        root,
        board,
        f"{inside}/bin/llava-local models --device {board.name} --timeout 0.2",
        log=logs / f"{board.name}-models.log",
    )
    if models.returncode != 0 or "ESTIMATED" not in models.output:
        row.problems.append(f"models --device {board.name} failed (exit {models.returncode})")
    junit, tests = f"{OPT}/run/junit-{board.name}.xml", " ".join(TESTS)
    tested = run(
        root,
        board,
        f"cd {OPT}/run && {inside}/bin/python -m pytest -q -p no:cacheprovider "
        f"--basetemp=/tmp/pytest-{board.name} --timeout=3600 --junitxml={junit} {tests}",
        log=logs / f"{board.name}-tests.log",
        timeout=4 * 3600,
    )
    row.tests, ok = _junit(root / junit.lstrip("/"))
    if tested.returncode != 0 or not ok:
        row.problems.append(
            f"tests: {row.tests} (exit {tested.returncode}; {logs / board.name}-tests.log)"
        )
    runs = (ask, doctor, models, tested)
    row.peak_bytes = max(r.peak_bytes for r in runs)
    row.seconds = sum(r.seconds for r in runs)
    return row


def check_sigill(root: Path, pi4: Board, pi5_env: Path) -> Row:
    """The Pi 5 build on the Pi 4 CPU: doctor's probe must die of SIGILL."""
    row = Row(board="Pi 5 build on the Pi 4 CPU (must fail)")
    doctor = run(
        root,
        pi4,
        f"{pi5_env}/bin/llava-local doctor --json --timeout 0.2",
        log=CACHE / "logs" / "pi5-on-pi4-doctor.log",
    )
    build = next((c for c in _json_list(doctor.output) if c.get("name") == "llama.cpp build"), {})
    detail = str(build.get("detail", ""))
    row.answer = "SIGILL, as on a Pi 4" if "SIGILL" in detail else f"no SIGILL: {detail[:80]!r}"
    if "SIGILL" not in detail:
        row.problems.append("the Pi 5 build ran on the Pi 4 CPU: the profile has dotprod")
    row.peak_bytes, row.seconds = doctor.peak_bytes, doctor.seconds
    return row


def _json_list(text: str) -> list[dict[str, object]]:
    start = text.find("[")
    try:
        found = json.loads(text[start:]) if start >= 0 else []
    except json.JSONDecodeError:
        return []
    return [c for c in found if isinstance(c, dict)]


def _junit(path: Path) -> tuple[str, bool]:
    """``"N/M passed"`` (and the skipped), and whether all ran and passed."""
    try:
        suite = ET.parse(path).getroot()
    except (OSError, ET.ParseError):
        return "no report", False
    suite = suite if suite.tag == "testsuite" else suite[0]
    total, failed = int(suite.get("tests", 0)), int(suite.get("failures", 0))
    errors, skipped = int(suite.get("errors", 0)), int(suite.get("skipped", 0))
    passed = total - failed - errors - skipped
    text = f"{passed}/{total} passed" + (f", {skipped} skipped" if skipped else "")
    return text, passed == total and total > 0


def table(rows: list[Row]) -> str:
    head = ("board", "answer", "tests", "peak memory", "time")
    lines = [
        (
            r.board,
            r.answer[:40],
            r.tests,
            f"{r.peak_bytes / 2**20:.0f} MiB" if r.peak_bytes else "",
            f"{r.seconds / 60:.1f} min" if r.seconds else "",
        )
        for r in rows
    ]
    widths = [max(len(str(x)) for x in col) for col in zip(head, *lines, strict=True)]
    out = [" | ".join(h.ljust(w) for h, w in zip(head, widths, strict=True))]
    out.append("-+-".join("-" * w for w in widths))
    out += [
        " | ".join(str(x).ljust(w) for x, w in zip(line, widths, strict=True)) for line in lines
    ]
    return "\n".join(out)


def native_build(root: Path, board: Board) -> int:
    """``make demo`` in the root as a Pi user runs it: llama.cpp compiled under emulation,
    continuing a build an earlier run left (the wheel cache is in the root's /root)."""
    say("native build: installing cmake, g++ and make in the root")
    checked(
        run(
            root,
            board,
            "apt-get update -qq && DEBIAN_FRONTEND=noninteractive "
            "apt-get install -y -qq cmake g++ make",
            log=CACHE / "logs" / "native-apt.log",
        ),
        "apt-get in the root",
    )
    source_copy(root)
    folder = OPT / "native"
    shutil.rmtree(root / folder.relative_to("/"), ignore_errors=True)
    shutil.copytree(root / OPT.relative_to("/") / "src", root / folder.relative_to("/"))
    log = CACHE / "logs" / f"native-make-demo-{time.strftime('%Y%m%d-%H%M%S')}.log"
    say(f"native build: `make demo` in {folder} under QEMU_CPU={board.qemu_cpu}; takes hours")
    say(f"native build: its output goes to {log}")
    ran = run(root, board, f"cd {folder} && nice -n 19 make demo", timeout=12 * 3600, log=log)
    print(ran.output[-3000:])
    say(
        f"native build: exit {ran.returncode} after {ran.seconds / 60:.0f} min, peak "
        f"{ran.peak_bytes / 2**20:.0f} MiB; the log: {log}"
    )
    return 0 if ran.returncode == 0 else 1


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--native-build",
        action="store_true",
        help="run `make demo` inside the root as a Pi 4 (hours)",
    )
    args = parser.parse_args()
    if os.geteuid() != 0:
        raise SystemExit("arm64-check needs root (debootstrap, mounts, chroot): run it with sudo")
    started = time.monotonic()
    host_tools()
    binfmt()
    root = root_fs()
    if args.native_build:
        return native_build(root, BOARDS[0])
    built = {board.name: wheel(board) for board in BOARDS}
    source_copy(root)
    envs = {board.name: venv(root, board, built[board.name]) for board in BOARDS}
    say(
        f"both boards at once: the demo question, doctor, models and {len(TESTS)} test files "
        f"(logs in {CACHE / 'logs'})"
    )
    with ThreadPoolExecutor(len(BOARDS)) as pool:  # qemu runs each on a core of its own
        rows = list(pool.map(lambda board: check_board(root, board, envs[board.name]), BOARDS))
    rows.append(check_sigill(root, BOARDS[0], envs["pi5"]))
    print(table(rows))
    problems = [f"{row.board}: {p}" for row in rows for p in row.problems]
    for problem in problems:
        print(f"FAILED {problem}")
    print(
        f"arm64-check {'failed' if problems else 'passed'} in "
        f"{(time.monotonic() - started) / 60:.0f} min"
    )
    return 1 if problems else 0


if __name__ == "__main__":
    raise SystemExit(main())
