#!/usr/bin/env bash
# Build llama.cpp's own `llama-imatrix` from the llama.cpp sources vendored in the llama-cpp-python 0.3.36
# source distribution (the version m1 pins for GGUF), as a peer to validate `m1 verify imatrix` against
# (tests/test_imatrix.py runs it when the binary is there), and `llama-quantize` beside it (seconds more: the
# same libraries), which tests that llama.cpp quantizes with our imatrix file exactly as m1's ggml schemes do.
# Only these targets and the libraries they link are built: cmake, GGML_NATIVE=OFF (as the Makefile builds
# the llama-cpp-python wheel), static libraries, no tests, examples, server, curl or openssl.
#
#   bench/build_llama_imatrix.sh [OUT_DIR]        # default build/llama-imatrix; prints the binary's path
#
# The sdist comes from $LLAMA_CPP_SDIST (its folder or .tar.gz) when set, else from
# `pip download --no-deps --no-binary :all: llama-cpp-python==0.3.36` (pip's cache first). JOBS sets the
# parallel compile jobs (default: the CPU count). The binaries end up at OUT_DIR/llama-imatrix and
# OUT_DIR/llama-quantize; the tests find them there under build/llama-imatrix, or wherever $M1_LLAMA_IMATRIX
# (and $M1_LLAMA_QUANTIZE) point. About 745 CPU-seconds (6-7 minutes on 2 free cores).
set -euo pipefail

VERSION=0.3.36
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
OUT="${1:-$ROOT/build/llama-imatrix}"
JOBS="${JOBS:-$(nproc 2>/dev/null || echo 2)}"
PYTHON="${PYTHON:-$ROOT/.venv/bin/python}"
[ -x "$PYTHON" ] || PYTHON=python3
mkdir -p "$OUT"
OUT="$(cd "$OUT" && pwd)"
start=$(date +%s)

src=""
sdist="${LLAMA_CPP_SDIST:-}"
if [ -z "$sdist" ]; then
    if ! ls "$OUT"/sdist/llama_cpp_python-$VERSION.tar.gz >/dev/null 2>&1; then
        echo "downloading the llama-cpp-python $VERSION sdist (pip download) ..." >&2
        "$PYTHON" -m pip download --quiet --no-deps --no-binary :all: "llama-cpp-python==$VERSION" -d "$OUT/sdist"
    fi
    sdist="$OUT/sdist/llama_cpp_python-$VERSION.tar.gz"
fi
if [ -d "$sdist" ]; then
    src="$sdist/vendor/llama.cpp"
else
    if [ ! -d "$OUT/src/llama_cpp_python-$VERSION" ]; then
        mkdir -p "$OUT/src"
        tar -xzf "$sdist" -C "$OUT/src"
    fi
    src="$OUT/src/llama_cpp_python-$VERSION/vendor/llama.cpp"
fi
[ -f "$src/tools/imatrix/imatrix.cpp" ] || { echo "no tools/imatrix/imatrix.cpp under $src" >&2; exit 1; }

generator=()
command -v ninja >/dev/null 2>&1 && generator=(-G Ninja)
cmake -S "$src" -B "$OUT/cmake" "${generator[@]}" \
    -DCMAKE_BUILD_TYPE=Release \
    -DGGML_NATIVE=OFF \
    -DBUILD_SHARED_LIBS=OFF \
    -DLLAMA_BUILD_TOOLS=ON -DLLAMA_BUILD_COMMON=ON \
    -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_SERVER=OFF -DLLAMA_BUILD_APP=OFF \
    -DLLAMA_OPENSSL=OFF -DLLAMA_CURL=OFF \
    >"$OUT/cmake.log" 2>&1 || { tail -30 "$OUT/cmake.log" >&2; exit 1; }
cmake --build "$OUT/cmake" --target llama-imatrix llama-quantize -j "$JOBS" >"$OUT/build.log" 2>&1 \
    || { tail -30 "$OUT/build.log" >&2; exit 1; }
cp "$OUT/cmake/bin/llama-imatrix" "$OUT/cmake/bin/llama-quantize" "$OUT/"
echo "built llama-imatrix and llama-quantize (llama.cpp from llama-cpp-python $VERSION) in" \
     "$(( $(date +%s) - start )) s with $JOBS jobs" >&2
echo "$OUT/llama-imatrix"
