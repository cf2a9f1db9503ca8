#!/usr/bin/env bash
# Install llama-cpp-python built for this CPU without the AMX trap.
#
# pip's default build compiles llama.cpp with -march=native. On CPUs (and cloud VMs)
# that report AMX but forbid it, the first quantized matrix multiply dies with SIGSEGV.
# So on x86-64 we build with GGML_NATIVE=OFF and switch on only the instruction sets
# /proc/cpuinfo lists, never AMX. Other machines (Raspberry Pi, Apple) keep the native
# build, which is safe there. The wheel is cached per flag set, because pip's own wheel
# cache ignores CMAKE_ARGS and would silently hand back a crashing build.
#
# The build takes 3 to 10 minutes; its progress is shown as a line per tenth of the
# compile steps (scripts/build_progress.py), the whole output goes to build.log beside
# the wheel. Later installs with the same flags take the cached wheel in seconds.
#
# Usage: scripts/install-llama-cpp.sh [PYTHON]      (default: python3)
set -euo pipefail
PY=${1:-python3}
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
VERSION=${LLAMA_CPP_PYTHON_VERSION:-0.3.36}

if [ -z "${CMAKE_ARGS:-}" ] && [ "$(uname -m)" = "x86_64" ] && [ -r /proc/cpuinfo ]; then
  flags=$(grep -m1 '^flags' /proc/cpuinfo)
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
fi

pyver=$("$PY" -c 'import sys; print(f"{sys.version_info[0]}{sys.version_info[1]}")')
key=$(printf '%s|%s|%s|%s' "$VERSION" "$pyver" "$(uname -m)" "${CMAKE_ARGS:-native}" | sha256sum | cut -c1-16)
wheels="${LLAVA_LOCAL_WHEEL_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/llava-local/wheels}/$key"
mkdir -p "$wheels"

if ! ls "$wheels"/llama_cpp_python-"$VERSION"-*.whl >/dev/null 2>&1; then
  log="$wheels/build.log"
  {
    echo "building llama-cpp-python $VERSION from source, once: compiling llama.cpp takes"
    echo "3 to 10 minutes on 2 cores (a line per tenth done, and one a minute at least)"
    echo "  CMAKE_ARGS='${CMAKE_ARGS:-}'"
    echo "  the whole output goes to $log"
  } >&2
  start=$SECONDS
  if ! "$PY" -m pip wheel -v --no-cache-dir --no-deps -w "$wheels" "llama-cpp-python==$VERSION" \
      2>&1 | tee "$log" | "$PY" "$here/build_progress.py" >&2; then
    echo "building llama-cpp-python failed; the end of $log:" >&2
    tail -n 40 "$log" >&2
    exit 1
  fi
  took=$((SECONDS - start))
  printf 'built in %dm%02ds\n' $((took / 60)) $((took % 60)) >&2
fi
"$PY" -m pip install --find-links "$wheels" "llama-cpp-python==$VERSION"
wheel=$(ls "$wheels"/llama_cpp_python-"$VERSION"-*.whl | head -n 1)
echo "llama-cpp-python $VERSION is installed from the wheel cached at $wheel:" >&2
echo "installing it again (same flags) takes seconds; delete that file to rebuild" >&2
