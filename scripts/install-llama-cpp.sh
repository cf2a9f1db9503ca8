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
#                             nothing, and prints the wheel's path (make arm64-check;
#                             PYTHON needs scikit-build-core: no build isolation)
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
isolation=()
if [ -n "$cross" ]; then
  printf '%s\n' "$toolchain" > "$wheels/aarch64-linux-gnu.cmake"
  export CMAKE_ARGS="$CMAKE_ARGS -DCMAKE_TOOLCHAIN_FILE=$wheels/aarch64-linux-gnu.cmake"
  # The wheel's platform tag: scikit-build-core asks sysconfig, which reads this. pip
  # would read it too and fetch aarch64 build tools, hence no build isolation: PYTHON
  # must have scikit-build-core, and cmake and ninja come from the system.
  export _PYTHON_HOST_PLATFORM=linux-aarch64
  isolation=(--no-build-isolation)
fi

if ! ls "$wheels"/llama_cpp_python-"$VERSION"-*.whl >/dev/null 2>&1; then
  log="$wheels/build.log"
  {
    echo "building llama-cpp-python $VERSION${cross:+ for $cross} from source, once: compiling"
    echo "llama.cpp takes 3 to 10 minutes on 2 cores, longer on a Raspberry Pi"
    echo "(a line per tenth done, and one a minute at least)"
    echo "  CMAKE_ARGS='${CMAKE_ARGS:-}'"
    echo "  the whole output goes to $log"
  } >&2
  start=$SECONDS
  if ! "$PY" -m pip wheel -v --no-cache-dir --no-deps "${isolation[@]}" -w "$wheels" \
      "llama-cpp-python==$VERSION" \
      2>&1 | tee "$log" | "$PY" "$here/build_progress.py" >&2; then
    echo "building llama-cpp-python failed; the end of $log:" >&2
    tail -n 40 "$log" >&2
    exit 1
  fi
  took=$((SECONDS - start))
  printf 'built in %dm%02ds\n' $((took / 60)) $((took % 60)) >&2
fi
wheel=$(ls "$wheels"/llama_cpp_python-"$VERSION"-*.whl | head -n 1)
if [ -n "$cross" ]; then
  echo "$wheel"
  exit 0
fi
"$PY" -m pip install --find-links "$wheels" "llama-cpp-python==$VERSION"
echo "llama-cpp-python $VERSION is installed from the wheel cached at $wheel:" >&2
echo "installing it again (same flags) takes seconds; delete that file to rebuild" >&2
