"""scripts/install-llama-cpp.sh and its progress filter, scripts/build_progress.py: the
llama.cpp build says how long it takes, shows progress, and where the cached wheel is.

Nothing is compiled here: the filter reads build output shaped like pip's ``-v`` output
of a llama-cpp-python build (scikit-build-core's ``***`` lines, then ninja's ``[i/N]`` or
make's ``[ p%]`` compile steps), and the script runs with a stand-in Python whose
``-m pip`` downloads a small sdist, prints such output and writes an empty wheel. The
real build, killed at 30% and resumed, was run by hand (the commit that made it resumable
has the lines it printed).
"""

from __future__ import annotations

import importlib.util
import os
import re
import shutil
import signal
import stat
import subprocess
import sys
import tarfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

import pytest

from ..paths import ROOT

SCRIPTS = ROOT / "scripts"
INSTALL = SCRIPTS / "install-llama-cpp.sh"
BOARDS = SCRIPTS / "arm64"
FILTER = SCRIPTS / "build_progress.py"
SRC = "/tmp/pip-install-x1/llama-cpp-python_71ad/vendor/llama.cpp"


def ninja_output(steps: int = 143) -> str:
    """What ``pip wheel -v llama-cpp-python`` prints when cmake drives ninja."""
    head = [
        "Using pip 25.3 from /venv/lib/python3.11/site-packages/pip (python 3.11)",
        "Collecting llama-cpp-python==0.3.36",
        "  Downloading llama_cpp_python-0.3.36.tar.gz (77.6 MB)",
        "  Running command pip subprocess to install build dependencies",
        "  Running command Building wheel for llama-cpp-python (pyproject.toml)",
        "  *** scikit-build-core 0.11.6 using CMake 3.31.6 (wheel)",
        "  *** Configuring CMake...",
        "  -- The C compiler identification is GNU 12.2.0",
        "  -- Build files have been written to: /tmp/tmpabc/build",
        "  *** Building project with Ninja...",
    ]
    compile_lines = [
        f"  [{i}/{steps}] /usr/bin/gcc -DGGML_BUILD -O3 -DNDEBUG -fPIC -MD -MT "
        f"vendor/llama.cpp/ggml/src/CMakeFiles/ggml-base.dir/f{i}.c.o -c {SRC}/ggml/src/f{i}.c"
        for i in range(1, steps + 1)
    ]
    tail = [
        "  *** Installing project into wheel...",
        "  -- Install configuration: Release",
        "  *** Making wheel...",
        "  *** Created llama_cpp_python-0.3.36-py3-none-linux_x86_64.whl",
        "  Building wheel for llama-cpp-python (pyproject.toml) ... done",
    ]
    return "\n".join(head + compile_lines + tail) + "\n"


def make_output() -> str:
    """The compile steps as cmake's Makefile generator prints them."""
    steps = [
        f"  [{p:3d}%] Building CXX object vendor/llama.cpp/src/CMakeFiles/llama.dir/f{p}.cpp.o"
        for p in range(0, 100, 3)
    ]
    steps.append("  [100%] Built target llama")
    return "\n".join(["  *** Building project with Unix Makefiles...", *steps]) + "\n"


def run_filter(text: str) -> list[str]:
    """The filter's output lines for ``text`` on its stdin."""
    done = subprocess.run(
        [sys.executable, str(FILTER)],
        input=text,
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    return done.stdout.splitlines()


def percents(lines: list[str]) -> list[int]:
    """The percentages of the ``compiling llama.cpp: NN%`` lines."""
    return [int(m[1]) for line in lines if (m := re.search(r"compiling llama\.cpp: +(\d+)%", line))]


def load_filter() -> ModuleType:
    """scripts/build_progress.py as a module."""
    spec = importlib.util.spec_from_file_location("build_progress", FILTER)
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# --- the filter ----------------------------------------------------------------------


def test_ninja_steps_become_a_line_per_tenth() -> None:
    """143 ninja steps become one line per tenth done (ending at 100%), no compiler lines."""
    lines = run_filter(ninja_output())
    shown = percents(lines)
    assert [p // 10 for p in shown] == list(range(11))
    assert shown[-1] == 100
    assert all(re.search(r"\(\d+:\d\d\)$", line) for line in lines if "%" in line)
    assert not any("gcc" in line or "-DGGML" in line for line in lines)
    assert lines[0] == "  downloading llama_cpp_python-0.3.36.tar.gz (77.6 MB)"
    assert any(line.startswith("  configuring the build (cmake)") for line in lines)
    assert lines[-1].startswith("  packing the wheel")
    assert len(lines) <= 16


def test_make_percentages_are_read_as_they_are() -> None:
    """Make's ``[ 42%]`` steps are reported by tenths too, with their own percentages."""
    shown = percents(run_filter(make_output()))
    assert shown == [0, 12, 21, 30, 42, 51, 60, 72, 81, 90, 100]


def test_a_quiet_minute_still_gets_a_line() -> None:
    """A minute without output during the compile prints a 'still compiling' line."""
    build = load_filter()
    now = [0.0]

    def timed(events: list[tuple[float, str | None]]) -> Iterator[str | None]:
        for at, item in events:
            now[0] = at
            yield item

    # None is a tick: a moment when the filter woke up without new output.
    events = [(1.0, "  [1/10] gcc a.c"), (30.0, None), (95.0, None), (96.0, "  [2/10] gcc b.c")]
    assert list(build.progress(timed(events), clock=lambda: now[0])) == [
        "  compiling llama.cpp:  10% (0:01)",
        "  still compiling llama.cpp:  10% (1:35)",
        "  compiling llama.cpp:  20% (1:36)",
    ]


def test_a_resumed_build_counts_the_steps_compiled_before() -> None:
    """When ninja has fewer steps left than the whole build had, the filter says how many
    were compiled before and shows percentages of the whole build; a build from nothing
    hands its step count on."""
    build = load_filter()
    rest = [f"  [{i}/20] gcc f{i}.c" for i in range(1, 21)]
    resumed = list(build.progress(rest, clock=lambda: 0.0, steps=40))
    assert resumed[0] == "  resuming the build: 20 of 40 steps already compiled"
    assert percents(resumed) == [52, 60, 70, 80, 90, 100]
    told: list[int] = []
    fresh = list(build.progress(rest, clock=lambda: 0.0, on_steps=told.append))
    assert told == [20]
    assert not any("resuming" in line for line in fresh)
    assert percents(fresh)[0] == 5


def test_each_run_records_its_seconds_as_it_goes(tmp_path: Path) -> None:
    """The time record of a run holds its seconds so far while the output passes (at most
    a write a second, so a killed run keeps what it took) and its whole time at the end."""
    build = load_filter()
    # The clock at the start, at each of the four items, and at the end.
    times = iter([100.0, 100.0, 130.0, 130.5, 190.0, 191.0])
    record = tmp_path / "1"
    lines = build.recorded(["a", None, "b", "c"], record, clock=lambda: next(times))
    seen = [(item, record.read_text()) for item in lines]
    assert seen == [("a", "0.0\n"), (None, "30.0\n"), ("b", "30.0\n"), ("c", "90.0\n")]
    assert record.read_text() == "91.0\n"
    assert [p.name for p in tmp_path.iterdir()] == ["1"]  # no half-written file left


# --- the script, with a stand-in Python ----------------------------------------------


SDIST_PYPROJECT = """\
[build-system]
requires = ["scikit-build-core[pyproject]>=0.9.2"]
build-backend = "scikit_build_core.build"
"""


@pytest.fixture
def fake_python(tmp_path: Path) -> Path:
    """A Python standing in for pip and the build. ``-m venv DIR`` copies it to
    DIR/bin/python; ``-m pip download ... -d DIR`` saves a small llama-cpp-python sdist
    there; ``-m pip wheel`` prints a recorded-style build ($OUTPUT, 40 ninja steps by
    default) and writes a wheel, fails when FAIL is set, and prints only the first
    HANG_AFTER lines and hangs when that is set; other ``-m pip`` calls do nothing.
    Otherwise it is the real interpreter, with a stand-in scikit-build-core backend that
    asks for ninja. Every pip call is appended to $CALLS."""
    (tmp_path / "build.txt").write_text(ninja_output(40))
    tree = tmp_path / "sdist" / "llama_cpp_python-0.3.36"
    tree.mkdir(parents=True)
    (tree / "pyproject.toml").write_text(SDIST_PYPROJECT)
    with tarfile.open(tmp_path / "llama_cpp_python-0.3.36.tar.gz", "w:gz") as sdist:
        sdist.add(tree, arcname=tree.name)
    backend = tmp_path / "backend" / "scikit_build_core"
    backend.mkdir(parents=True)
    (backend / "__init__.py").write_text("")
    (backend / "build.py").write_text(
        "def get_requires_for_build_wheel(config_settings=None):\n    return ['ninja>=1.5']\n"
    )
    script = tmp_path / "python"
    script.write_text(
        "#!/usr/bin/env bash\n"
        'if [ "$1" = -m ] && [ "$2" = venv ]; then\n'
        '  mkdir -p "$3/bin" && cp "$0" "$3/bin/python"; exit 0\n'
        "fi\n"
        'if [ "$1" = -m ] && [ "$2" = pip ]; then\n'
        '  printf "%s\\t%s\\t%s\\n" "$0" "${*:3}" "${_PYTHON_HOST_PLATFORM:-}" >> "$CALLS"\n'
        "  while [ $# -gt 0 ]; do\n"
        '    case "$1" in -d | -w) dir=$2 ;; download | wheel) what=$1 ;; esac; shift\n'
        "  done\n"
        '  if [ "${what:-}" = download ]; then\n'
        '    echo "Collecting llama-cpp-python==0.3.36"\n'
        '    echo "  Downloading llama_cpp_python-0.3.36.tar.gz (77.6 MB)"\n'
        f'    mkdir -p "$dir" && cp "{tmp_path / "llama_cpp_python-0.3.36.tar.gz"}" "$dir/"\n'
        '  elif [ "${what:-}" = wheel ]; then\n'
        '    if [ -n "${FAIL:-}" ]; then\n'
        '      echo "  [3/40] gcc x.c"; echo "error: cc1 died"; exit 1\n'
        "    fi\n"
        f"    output=${{OUTPUT:-{tmp_path / 'build.txt'}}}\n"
        '    if [ -n "${HANG_AFTER:-}" ]; then\n'
        '      head -n "$HANG_AFTER" "$output"; exec sleep 120\n'
        "    fi\n"
        '    cat "$output"\n'
        '    touch "$dir/llama_cpp_python-0.3.36-py3-none-linux_x86_64.whl"\n'
        "  fi\n"
        "  exit 0\n"
        "fi\n"
        f'PYTHONPATH="{tmp_path / "backend"}" exec "{sys.executable}" "$@"\n'
    )
    script.chmod(script.stat().st_mode | stat.S_IXUSR)
    return script


@dataclass(frozen=True)
class PipCall:
    """One ``-m pip`` call of the stand-in: which Python, its arguments after ``pip``, and
    the platform the build was told (``_PYTHON_HOST_PLATFORM``)."""

    python: str
    args: list[str]
    platform: str


def pip_calls(tmp_path: Path) -> list[PipCall]:
    """The stand-in's pip calls so far."""
    lines = (tmp_path / "calls").read_text().splitlines()
    return [PipCall(p, a.split(), f) for p, a, f in (line.split("\t") for line in lines)]


def run_install(python: Path, tmp_path: Path, **env: str) -> subprocess.CompletedProcess[str]:
    """scripts/install-llama-cpp.sh with ``python``, its wheel cache under ``tmp_path``."""
    return subprocess.run(
        [str(INSTALL), str(python)],
        env={
            **os.environ,
            "LLAVA_LOCAL_WHEEL_CACHE": str(tmp_path / "wheels"),
            "CALLS": str(tmp_path / "calls"),
            "CMAKE_ARGS": "-DGGML_NATIVE=OFF -DGGML_AVX2=ON",
            **env,
        },
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def test_the_build_says_how_long_shows_progress_and_where_the_wheel_is(
    fake_python: Path, tmp_path: Path
) -> None:
    """A first install announces the minutes it takes, shows compile percentages, says
    how long it took and names the cached wheel, then deletes the source, build folder and
    build environment; a second one builds nothing and names the same wheel."""
    first = run_install(fake_python, tmp_path)
    assert first.returncode == 0, first.stderr
    err = first.stderr
    assert "3 to 10 minutes" in err
    assert "resuming" not in err
    assert percents(err.splitlines())[-1] == 100
    assert re.search(r"^built in \d+m\d\ds$", err, re.MULTILINE), err
    assert "gcc" not in err  # the compiler lines go to the log only
    (wheel,) = (tmp_path / "wheels").glob("*/llama_cpp_python-0.3.36-*.whl")
    assert f"cached at {wheel}" in err
    assert "takes seconds" in err
    log = wheel.with_name("build.log")
    assert "gcc" in log.read_text()
    assert not [p.name for p in wheel.parent.iterdir() if p.is_dir()]

    again = run_install(fake_python, tmp_path)
    assert again.returncode == 0, again.stderr
    assert "minutes" not in again.stderr
    assert f"cached at {wheel}" in again.stderr
    calls = pip_calls(tmp_path)
    assert [c.args[0] for c in calls] == [
        "download",
        "install",
        "install",
        "wheel",
        "install",
        "install",
    ]
    download, tools, asked, build = calls[:4]
    assert download.python == calls[-1].python == str(fake_python)
    build_env = str(wheel.parent / "build-env/bin/python")
    assert tools.python == asked.python == build.python == build_env
    assert "scikit-build-core[pyproject]>=0.9.2" in tools.args  # the sdist's build-system
    assert "ninja>=1.5" in asked.args  # what its backend asked for
    assert {"-v", "--no-build-isolation"} <= set(build.args)
    # The long form: pip 22.1-23.0 (Debian bookworm's python3-venv has 23.0.1) lack -C.
    settings = build.args.index("--config-settings")
    assert build.args[settings + 1] == f"build-dir={wheel.parent / 'build/cmake'}"


def test_a_failed_build_shows_the_end_of_its_log(fake_python: Path, tmp_path: Path) -> None:
    """When the compile fails, the script exits 1, prints the end of the build log, and
    keeps the build folder for the next run."""
    result = run_install(fake_python, tmp_path, FAIL="1")
    assert result.returncode == 1
    assert "building llama-cpp-python failed" in result.stderr
    assert "error: cc1 died" in result.stderr
    assert "build.log" in result.stderr
    assert "running the script again continues this build" in result.stderr
    assert not list((tmp_path / "wheels").glob("*/*.whl"))
    assert list((tmp_path / "wheels").glob("*/build/runs/1"))


def test_a_killed_build_resumes_where_it_stopped(fake_python: Path, tmp_path: Path) -> None:
    """A build killed halfway (its whole process group, as a power cut or a dropped ssh
    session does) continues in the next run: the source is downloaded once, both runs
    build the same source folder in the same build folder, the second says how many steps
    were compiled before and starts at the killed percentage, and the last line adds up
    the time both runs recorded."""
    env = {
        **os.environ,
        "LLAVA_LOCAL_WHEEL_CACHE": str(tmp_path / "wheels"),
        "CALLS": str(tmp_path / "calls"),
        "CMAKE_ARGS": "-DGGML_NATIVE=OFF -DGGML_AVX2=ON",
        "HANG_AFTER": str(10 + 20),  # the ten lines before the steps, then 20 of 40 steps
    }
    said = []
    with subprocess.Popen(
        [str(INSTALL), str(fake_python)],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    ) as killed:
        try:
            assert killed.stderr is not None
            for line in killed.stderr:
                said.append(line)
                if "compiling llama.cpp:  50%" in line:
                    break
        finally:
            os.killpg(killed.pid, signal.SIGKILL)
    assert "compiling llama.cpp:  50%" in said[-1], said
    (folder,) = (tmp_path / "wheels").glob("*/build")
    assert (folder / "steps").read_text() == "40\n"
    (record,) = (folder / "runs").iterdir()
    float(record.read_text())  # written while the killed run went on
    record.write_text("5000.0\n")  # as if that run had compiled for 1h23m20s

    rest = tmp_path / "rest.txt"
    rest.write_text(ninja_output(20))
    resumed = run_install(fake_python, tmp_path, OUTPUT=str(rest))
    assert resumed.returncode == 0, resumed.stderr
    err = resumed.stderr
    assert "(1 run so far, 1h23m)" in err
    assert "resuming the build: 20 of 40 steps already compiled" in err
    shown = percents(err.splitlines())
    assert shown[0] >= 50
    assert shown[-1] == 100
    assert re.search(r"^built in 1h2\dm over 2 runs$", err, re.MULTILINE), err
    calls = pip_calls(tmp_path)
    assert [c.args[0] for c in calls].count("download") == 1
    first, second = (c.args for c in calls if c.args[0] == "wheel")
    assert f"build-dir={folder / 'cmake'}" in first
    assert first == second  # the same source folder, build folder and flags
    assert first[-1] == str(folder.parent / "src/llama-cpp-python-0.3.36")
    assert not folder.exists()
    log = (folder.parent / "build.log").read_text()
    assert "=== run 1 of the build" in log
    assert "=== run 2 of the build" in log


# --- ARM boards: the flags per board, and the cross-compiled wheel of make arm64-check ---


def stand_in(folder: Path, name: str, body: str) -> None:
    """An executable ``name`` in ``folder`` running ``body``."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    path.write_text("#!/usr/bin/env bash\n" + body)
    path.chmod(path.stat().st_mode | stat.S_IXUSR)


@pytest.fixture
def arm_machine(tmp_path: Path) -> Path:
    """A folder for PATH whose ``uname -m`` says aarch64."""
    folder = tmp_path / "arm-bin"
    stand_in(folder, "uname", '[ "$1" = -m ] && { echo aarch64; exit 0; }; exec /bin/uname "$@"\n')
    return folder


def arm_args(result: subprocess.CompletedProcess[str]) -> str:
    """The CMAKE_ARGS the script announced."""
    found = re.search(r"CMAKE_ARGS='([^']*)'", result.stderr)
    assert found is not None, result.stderr
    return found[1]


@pytest.mark.parametrize(("board", "arch"), [("pi4", "armv8-a"), ("pi5", "armv8.2-a+dotprod+fp16")])
def test_each_pi_gets_its_own_flags_and_cache(
    fake_python: Path, arm_machine: Path, tmp_path: Path, board: str, arch: str
) -> None:
    """On aarch64 the Features of /proc/cpuinfo pick -march: a Pi 4 (no asimddp) gets
    armv8-a, never dotprod; a Pi 5 armv8.2-a with dotprod and fp16; the board's name is
    printed, and each flag set has its own cached wheel."""
    result = run_install(
        fake_python,
        tmp_path,
        CMAKE_ARGS="",
        LLAVA_LOCAL_BOARD_ROOT=str(BOARDS / board),
        PATH=f"{arm_machine}:{os.environ['PATH']}",
    )
    assert result.returncode == 0, result.stderr
    assert arm_args(result) == f"-DGGML_NATIVE=OFF -DGGML_CPU_ARM_ARCH={arch}"
    assert f"Raspberry Pi {board[-1]} Model B" in result.stderr
    other = "pi5" if board == "pi4" else "pi4"
    again = run_install(
        fake_python,
        tmp_path,
        CMAKE_ARGS="",
        LLAVA_LOCAL_BOARD_ROOT=str(BOARDS / other),
        PATH=f"{arm_machine}:{os.environ['PATH']}",
    )
    assert again.returncode == 0, again.stderr
    assert "minutes" in again.stderr  # another flag set: built, not taken from the cache
    assert len(list((tmp_path / "wheels").glob("*/*.whl"))) == 2


def test_without_features_the_device_tree_model_decides(
    fake_python: Path, arm_machine: Path, tmp_path: Path
) -> None:
    """A kernel that lists no Features: a Pi 5 by its model still gets dotprod, an unknown
    board the safe armv8-a."""
    root = tmp_path / "board"
    shutil.copytree(BOARDS / "pi5", root, symlinks=True)
    (root / "proc/cpuinfo").write_text("processor\t: 0\nBogoMIPS\t: 108.00\n")
    path = f"{arm_machine}:{os.environ['PATH']}"
    env = {"CMAKE_ARGS": "", "LLAVA_LOCAL_BOARD_ROOT": str(root), "PATH": path}
    pi5 = run_install(fake_python, tmp_path, **env)
    assert arm_args(pi5).endswith("=armv8.2-a+dotprod+fp16"), pi5.stderr
    (root / "sys/firmware/devicetree/base/model").write_bytes(b"Some ARM board\0")
    other = run_install(fake_python, tmp_path, **env)
    assert arm_args(other).endswith("=armv8-a"), other.stderr


def test_the_cross_build_for_arm64_check(fake_python: Path, tmp_path: Path) -> None:
    """LLAVA_LOCAL_TARGET=aarch64 on x86-64: the board's flags, a toolchain file for
    aarch64-linux-gnu in the cache folder (named in CMAKE_ARGS), the wheel tagged for
    linux-aarch64 by pip wheel without build isolation, its path on stdout, and nothing
    installed."""
    if os.uname().machine != "x86_64":
        pytest.skip("cross-compiling is from x86-64")
    tools = tmp_path / "cross-bin"
    stand_in(tools, "aarch64-linux-gnu-gcc", "echo 12.2.0\n")
    stand_in(tools, "aarch64-linux-gnu-g++", "echo 12.2.0\n")
    result = run_install(
        fake_python,
        tmp_path,
        CMAKE_ARGS="",
        LLAVA_LOCAL_TARGET="aarch64",
        LLAVA_LOCAL_BOARD_ROOT=str(BOARDS / "pi4"),
        PATH=f"{tools}:{os.environ['PATH']}",
    )
    assert result.returncode == 0, result.stderr
    (wheel,) = (tmp_path / "wheels").glob("*/*.whl")
    assert result.stdout.strip() == str(wheel)
    toolchain = wheel.parent / "aarch64-linux-gnu.cmake"
    assert "CMAKE_SYSTEM_PROCESSOR aarch64" in toolchain.read_text()
    args = arm_args(result)
    assert args.startswith("-DGGML_NATIVE=OFF -DGGML_CPU_ARM_ARCH=armv8-a ")
    assert f"-DCMAKE_TOOLCHAIN_FILE={toolchain}" in args
    calls = pip_calls(tmp_path)
    (build,) = (c for c in calls if c.args[0] == "wheel")
    assert "--no-build-isolation" in build.args
    assert build.platform == "linux-aarch64"
    assert {c.platform for c in calls if c is not build} == {""}  # the tools are x86's
    assert "install" not in [c.args[0] for c in calls if c.python == str(fake_python)]
