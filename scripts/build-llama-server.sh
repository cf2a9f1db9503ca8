#!/usr/bin/env bash
# Build llama.cpp's own llama-server (the peer benchmarks/serve.py measures us against)
# from the llama.cpp sources vendored in the llama-cpp-python sdist we install, with the
# same safe CPU flags as scripts/install-llama-cpp.sh (never AMX, never -march=native).
#
# Usage: scripts/build-llama-server.sh [PYTHON]   prints the binary's path on stdout.
# The build (10 to 25 minutes on 2 cores) is cached in
# ${LLAVA_LOCAL_CACHE:-~/.cache/llava-local}/llama-server/<version>-<flags>/, so a
# second run prints the path at once. Nothing is downloaded but the sdist (PyPI).
set -euo pipefail
PY=${1:-python3}
VERSION=${LLAMA_CPP_PYTHON_VERSION:-0.3.36}
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)

args=$("$here/install-llama-cpp.sh" --print-cmake-args 2>/dev/null || true)
if [ -z "$args" ] && [ "$(uname -m)" = "x86_64" ] && [ -r /proc/cpuinfo ]; then
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
fi
key=$(printf '%s|%s|%s' "$VERSION" "$(uname -m)" "$args" | sha256sum | cut -c1-16)
cache="${LLAVA_LOCAL_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/llava-local}/llama-server/$VERSION-$key"
binary="$cache/build/bin/llama-server"
if [ -x "$binary" ]; then
  echo "$binary"
  exit 0
fi
mkdir -p "$cache"
log="$cache/build.log"
echo "building llama-server from llama-cpp-python $VERSION's llama.cpp, once (10-25 min);" \
  "the output goes to $log" >&2
{
  if [ ! -d "$cache/src/vendor/llama.cpp" ]; then
    rm -rf "$cache/sdist" "$cache/src"
    "$PY" -m pip download --no-deps --no-binary :all: -d "$cache/sdist" \
      "llama-cpp-python==$VERSION"
    mkdir -p "$cache/src"
    tar -xzf "$cache"/sdist/llama_cpp_python-"$VERSION".tar.gz -C "$cache/src" --strip-components=1
  fi
  # shellcheck disable=SC2086 # the flags are words
  cmake -S "$cache/src/vendor/llama.cpp" -B "$cache/build" -DCMAKE_BUILD_TYPE=Release $args \
    -DLLAMA_CURL=OFF -DLLAMA_BUILD_SERVER=ON -DLLAMA_BUILD_TESTS=OFF \
    -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_USE_PREBUILT_UI=OFF -DLLAMA_BUILD_UI=OFF \
    -DLLAMA_OPENSSL=OFF -DBUILD_SHARED_LIBS=OFF
  cmake --build "$cache/build" --target llama-server -j "$(nproc)"
} >"$log" 2>&1 || {
  echo "building llama-server failed; the end of $log:" >&2
  tail -n 30 "$log" >&2
  exit 1
}
echo "$binary"
