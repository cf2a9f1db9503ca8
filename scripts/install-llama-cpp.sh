#!/usr/bin/env bash
# Install llama-cpp-python built for this CPU: without the AMX trap on x86-64, and
# without instructions the board lacks on ARM.
#
# pip's default build compiles llama.cpp with -march=native. On CPUs (and cloud VMs)
# that report AMX but forbid it, the first quantized matrix multiply dies with SIGSEGV.
# So on x86-64 we build with GGML_NATIVE=OFF and switch on only the instruction sets
# /proc/cpuinfo lists, never AMX. On aarch64 (Raspberry Pi and other ARM boards) the
# architecture is named from the Features line of /proc/cpuinfo: armv8.2-a with
# +dotprod (asimddp), +fp16 (asimdhp) and +i8mm where listed, plain armv8-a otherwise.
# A Pi 4 (Cortex-A72) gets armv8-a, a Pi 5 (Cortex-A76) armv8.2-a+dotprod+fp16: a Pi 5
# build dies on a Pi 4 with SIGILL at the first quantized product. Without a Features
# line, the board named by /proc/device-tree/model decides. Other machines (Apple)
# keep the native build, which is safe there. The wheel is cached per flag set, because
# pip's own wheel cache ignores CMAKE_ARGS and would silently hand back a wrong build.
#
# The build takes 3 to 10 minutes (longer on a Raspberry Pi); its progress is shown as a line
# per tenth of the compile steps (scripts/build_progress.py), the whole output goes to
# build.log beside the wheel. Later installs with the same flags take the cached wheel
# in seconds.
#
# A killed build (Ctrl-C, an ssh session dropped, a power cut) continues where it stopped
# when the script runs again: until its wheel exists, the cache folder of the flag set
# keeps src/ (the sdist and its tree unpacked at a fixed path, 290 MB), build-env/ (a
# virtualenv with scikit-build-core, and ninja or cmake when the system lacks them, 30 MB:
# pip's isolated build would be a new folder each run, which makes scikit-build-core
# clear CMake's cache) and build/ (CMake's build folder, up to 50 MB on x86-64, and the
# seconds each run took), about 370 MB in all. A second run says "resuming the build: N
# of M steps already compiled" and goes on from that percentage; the last line says
# "built in 2h41m over 3 runs". Once the wheel is built those three folders are deleted:
# the cache keeps the wheel (24 MB on x86-64) and build.log (every run's output). Delete
# build/ to start a build over.
#
# Usage: scripts/install-llama-cpp.sh [PYTHON]      (default: python3)
# Environment:
#   CMAKE_ARGS                your own build flags (no detection)
#   LLAVA_LOCAL_WHEEL_CACHE   the wheel cache (default ~/.cache/llava-local/wheels)
#   LLAVA_LOCAL_BOARD_ROOT    read proc/cpuinfo and proc/device-tree/model under this
#                             folder instead of / (a board's files, for tests and
#                             `make arm64-check`)
#   LLAVA_LOCAL_TARGET=aarch64  cross-compile a linux_aarch64 wheel with
#                             aarch64-linux-gnu-gcc (Debian's g++-aarch64-linux-gnu),
#                             flags chosen as on that board; only builds, installs
#                             nothing, and prints the wheel's path (make arm64-check)
set -euo pipefail
PY=${1:-python3}
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
VERSION=${LLAMA_CPP_PYTHON_VERSION:-0.3.36}
board_root=${LLAVA_LOCAL_BOARD_ROOT:-}
target=${LLAVA_LOCAL_TARGET:-$(uname -m)}
cross=
[ "$target" != "$(uname -m)" ] && cross=$target
if [ -n "$cross" ] && [ "$cross" != aarch64 ]; then
  echo "LLAVA_LOCAL_TARGET=$cross: only aarch64 can be cross-compiled" >&2
  exit 2
fi

# The -march an ARM board's llama.cpp is built for, from its /proc/cpuinfo Features
# (and its device-tree model when the kernel lists none).
arm_arch() {
  local features model
  features=$(grep -m1 '^Features' "$board_root/proc/cpuinfo" 2>/dev/null | cut -d: -f2 || true)
  model=$( { tr -d '\0' < "$board_root/proc/device-tree/model"; } 2>/dev/null || true)
  if [ -z "$features" ]; then
    case "$model" in
      "Raspberry Pi 5"* | "Raspberry Pi Compute Module 5"* | "Raspberry Pi 500"*)
        features="asimd asimddp asimdhp fphp" ;;
      *) features="asimd" ;;  # Pi 4, 400, CM4, 3, Zero 2 W, or unknown: the safe base
    esac
  fi
  local has arch ext=""
  has() { [[ " $features " == *" $1 "* ]]; }
  has asimddp && ext+="+dotprod"
  has asimdhp && has fphp && ext+="+fp16"
  has i8mm && ext+="+i8mm"
  arch=armv8-a
  [ -n "$ext" ] && arch=armv8.2-a
  echo "${model:-an ARM board}: /proc/cpuinfo Features${features:+:$features}" >&2
  echo "$arch$ext"
}

if [ -z "${CMAKE_ARGS:-}" ] && [ "$target" = "x86_64" ] && [ -r "$board_root/proc/cpuinfo" ]; then
  flags=$(grep -m1 '^flags' "$board_root/proc/cpuinfo" || true)
  has() { [[ " $flags " == *" $1 "* ]]; }
  args="-DGGML_NATIVE=OFF"
  has avx && args+=" -DGGML_AVX=ON"
  has avx2 && args+=" -DGGML_AVX2=ON"
  has fma && args+=" -DGGML_FMA=ON"
  has f16c && args+=" -DGGML_F16C=ON"
  has bmi2 && args+=" -DGGML_BMI2=ON"
  has avx512f && args+=" -DGGML_AVX512=ON"
  has avx512_vnni && args+=" -DGGML_AVX512_VNNI=ON"
  has avx512_bf16 && args+=" -DGGML_AVX512_BF16=ON"
  export CMAKE_ARGS="$args"
elif [ -z "${CMAKE_ARGS:-}" ] && [ "$target" = "aarch64" ]; then
  export CMAKE_ARGS="-DGGML_NATIVE=OFF -DGGML_CPU_ARM_ARCH=$(arm_arch)"
fi

pyver=$("$PY" -c 'import sys; print(f"{sys.version_info[0]}{sys.version_info[1]}")')
recipe="${CMAKE_ARGS:-native}"
if [ -n "$cross" ]; then
  # The toolchain file is written beside the wheel; its text is part of the cache key,
  # so a change of the cross recipe builds again.
  toolchain=$(cat <<'CMAKE'
set(CMAKE_SYSTEM_NAME Linux)
set(CMAKE_SYSTEM_PROCESSOR aarch64)
set(CMAKE_C_COMPILER aarch64-linux-gnu-gcc)
set(CMAKE_CXX_COMPILER aarch64-linux-gnu-g++)
set(CMAKE_FIND_ROOT_PATH /usr/aarch64-linux-gnu)
set(CMAKE_FIND_ROOT_PATH_MODE_PROGRAM NEVER)
set(CMAKE_FIND_ROOT_PATH_MODE_LIBRARY ONLY)
set(CMAKE_FIND_ROOT_PATH_MODE_INCLUDE ONLY)
set(CMAKE_FIND_ROOT_PATH_MODE_PACKAGE ONLY)
CMAKE
)
  command -v aarch64-linux-gnu-g++ >/dev/null || {
    echo "cross-compiling needs aarch64-linux-gnu-g++: apt-get install g++-aarch64-linux-gnu" >&2
    exit 1
  }
  recipe+="|cross $(aarch64-linux-gnu-gcc -dumpfullversion)|$toolchain"
fi
key=$(printf '%s|%s|%s|%s' "$VERSION" "$pyver" "$target" "$recipe" | sha256sum | cut -c1-16)
wheels="${LLAVA_LOCAL_WHEEL_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/llava-local/wheels}/$key"
mkdir -p "$wheels"
host=()
if [ -n "$cross" ]; then
  printf '%s\n' "$toolchain" > "$wheels/aarch64-linux-gnu.cmake"
  export CMAKE_ARGS="$CMAKE_ARGS -DCMAKE_TOOLCHAIN_FILE=$wheels/aarch64-linux-gnu.cmake"
  # The wheel's platform tag: scikit-build-core asks sysconfig, which reads this (set
  # for the build only: the build environment's own tools are this machine's).
  host=(_PYTHON_HOST_PLATFORM=linux-aarch64)
fi

src="$wheels/src"
tree="$src/llama-cpp-python-$VERSION"
build_env="$wheels/build-env"
build="$wheels/build"
log="$wheels/build.log"
progress=("$PY" "$here/build_progress.py")

# Stop with what failed and the end of the build's log.
fail() {
  echo "$1; the end of $log:" >&2
  tail -n 40 "$log" >&2
  exit 1
}

# The seconds the runs of this build took, from the records the progress filter writes.
seconds_so_far() {
  find "$build/runs" -type f ! -name '*.new' -exec cat {} + | awk '{s += $1} END {printf "%d", s}'
}

# "2h41m", or "3m12s" under an hour.
span() {
  local s=${1%.*}
  if [ "$s" -ge 3600 ]; then
    printf '%dh%02dm' $((s / 3600)) $((s % 3600 / 60))
  else
    printf '%dm%02ds' $((s / 60)) $((s % 60))
  fi
}

# The sdist, downloaded once (a file already in src/ is used), unpacked at a fixed path:
# scikit-build-core reuses a build folder only for the same source folder.
source_tree() {
  [ -f "$tree/.unpacked" ] && return 0
  local sdist
  sdist=$(ls "$src"/llama[_-]cpp[_-]python-"$VERSION".tar.gz 2>/dev/null | head -n 1 || true)
  if [ -z "$sdist" ]; then
    rm -rf "$src/download"
    "$PY" -m pip download --no-deps --no-binary llama-cpp-python -d "$src/download" \
      "llama-cpp-python==$VERSION" 2>&1 | tee -a "$log" | "${progress[@]}" >&2 ||
      fail "downloading the source of llama-cpp-python $VERSION failed"
    sdist=$(ls "$src"/download/*.tar.gz 2>/dev/null | head -n 1) ||
      fail "pip downloaded no source archive of llama-cpp-python $VERSION"
    mv "$sdist" "$src/"
    sdist="$src/$(basename "$sdist")"
    rm -rf "$src/download"
  fi
  rm -rf "$tree" "$src/unpacking"
  mkdir -p "$src/unpacking"
  if ! tar -xzf "$sdist" -C "$src/unpacking"; then
    rm -f "$sdist"
    echo "$sdist was damaged and is deleted: run the script again to download it" >&2
    exit 1
  fi
  mv "$src"/unpacking/*/ "$tree"
  rmdir "$src/unpacking"
  touch "$tree/.unpacked"
}

# The build's own Python, kept between runs: what pip's isolated build would install
# (scripts/build_requires.py), at paths that stay the same.
build_python() {
  [ -f "$build_env/.ready" ] && return 0
  echo "  preparing the build's Python (scikit-build-core and the tools it asks for)" >&2
  rm -rf "$build_env"
  if ! "$PY" -m venv "$build_env" >>"$log" 2>&1; then
    echo "$PY cannot make a virtualenv (on Debian: apt-get install python3-venv)" >&2
    exit 1
  fi
  local bpy="$build_env/bin/python" needs
  needs=$("$bpy" "$here/build_requires.py" "$tree" 2>>"$log") ||
    fail "reading the build requirements of $tree failed"
  # pip 22.1 is the first whose wheel command passes --config-settings to the backend.
  # shellcheck disable=SC2086 # one requirement a line, none with spaces
  "$bpy" -m pip install 'pip>=22.1' $needs >>"$log" 2>&1 ||
    fail "installing the build's tools ($needs) failed"
  needs=$("$bpy" "$here/build_requires.py" --backend "$tree" 2>>"$log") ||
    fail "asking the build backend what else it needs failed"
  # shellcheck disable=SC2086
  [ -z "$needs" ] || "$bpy" -m pip install $needs >>"$log" 2>&1 ||
    fail "installing the build's tools ($needs) failed"
  touch "$build_env/.ready"
}

# One build per flag set at a time: a second waits (where flock exists; not on macOS).
if command -v flock >/dev/null; then
  exec 9>"$wheels/.lock"
  if ! flock -n 9; then
    echo "another build of these flags is running; waiting for it ($wheels)" >&2
    flock 9
  fi
fi

if ! ls "$wheels"/llama_cpp_python-"$VERSION"-*.whl >/dev/null 2>&1; then
  mkdir -p "$src" "$build/runs"
  runs=$(find "$build/runs" -type f ! -name '*.new' | wc -l)
  [ "$runs" -eq 0 ] && [ ! -e "$src/download" ] && [ -z "$(ls "$src")" ] && : >"$log"
  {
    echo "building llama-cpp-python $VERSION${cross:+ for $cross} from source, once: compiling"
    echo "llama.cpp takes 3 to 10 minutes on 2 cores, longer on a Raspberry Pi"
    echo "(a line per tenth done, and one a minute at least; if it is stopped, running"
    echo "this script again continues where it stopped)"
    echo "  CMAKE_ARGS='${CMAKE_ARGS:-}'"
    echo "  the whole output goes to $log"
  } >&2
  if [ "$runs" -gt 0 ]; then
    times=runs
    [ "$runs" -eq 1 ] && times=run
    echo "  resuming the build in $build ($runs $times so far, $(span "$(seconds_so_far)"))" >&2
  fi
  source_tree
  build_python
  run=$((runs + 1))
  printf '\n=== run %d of the build, %s ===\n' "$run" "$(date -u '+%Y-%m-%d %H:%M UTC')" >>"$log"
  # Unbuffered: scikit-build-core's "*** Configuring CMake..." comes when it happens.
  if ! env PYTHONUNBUFFERED=1 "${host[@]}" "$build_env/bin/python" -m pip wheel -v \
      --no-cache-dir --no-deps --no-build-isolation \
      --config-settings "build-dir=$build/cmake" -w "$wheels" "$tree" 2>&1 | tee -a "$log" \
      | "${progress[@]}" --steps "$build/steps" --record "$build/runs/$run" >&2; then
    echo "building llama-cpp-python failed; the end of $log:" >&2
    tail -n 40 "$log" >&2
    echo "running the script again continues this build ($build is kept; delete it to" >&2
    echo "start over, for instance after changing the compiler)" >&2
    exit 1
  fi
  took=$(seconds_so_far)
  over=""
  [ "$run" -gt 1 ] && over=" over $run runs"
  echo "built in $(span "$took")$over" | tee -a "$log" >&2
  rm -rf "$src" "$build_env" "$build"
fi
wheel=$(ls "$wheels"/llama_cpp_python-"$VERSION"-*.whl | head -n 1)
if [ -n "$cross" ]; then
  echo "$wheel"
  exit 0
fi
"$PY" -m pip install --find-links "$wheels" "llama-cpp-python==$VERSION"
echo "llama-cpp-python $VERSION is installed from the wheel cached at $wheel:" >&2
echo "installing it again (same flags) takes seconds; delete that file to rebuild" >&2
