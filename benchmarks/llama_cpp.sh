#!/usr/bin/env bash
# Build llama.cpp's CPU tools for benchmarks/decode_cpu.py, cached outside the repository.
#
#   bash benchmarks/llama_cpp.sh          # prints LLAMA_CPP_SRC=... LLAMA_CPP_BIN=... LLAMA_CPP_VERSION=...
#
# The source is the llama.cpp tree vendored in the llama-cpp-python sdist (a package registry is
# the only network here): `pip download --no-binary :all: --no-deps llama-cpp-python`. It builds
# llama-bench, llama-quantize and llama-batched-bench (when the tree has it) with cmake: Release,
# CPU only, -march=native (GGML_NATIVE), static, no curl. Cache: ${PYQUANT_CACHE:-~/.cache/pyquant}/llama.cpp
# (sdist/, src/, build/); every step that is already done is skipped, so a second call takes a
# second. The build takes ~8 minutes on 2 cores (JOBS, default nproc; run it niced if the machine
# is shared). It also makes sure the python that runs the converter (PYTHON, default the repo's
# .venv) has what convert_hf_to_gguf.py needs: gguf (from the tree's own gguf-py, so converter and
# library match) and sentencepiece, installed only if missing; cmake is pip-installed if absent.
# The last three lines of stdout are KEY=value, for decode_cpu.py to read.
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
CACHE=${PYQUANT_CACHE:-$HOME/.cache/pyquant}/llama.cpp
PY=${PYTHON:-$ROOT/.venv/bin/python}
[ -x "$PY" ] || PY=python3
JOBS=${JOBS:-$(nproc)}
mkdir -p "$CACHE/sdist"
log() { echo "llama_cpp.sh: $*" >&2; }

# 1. the sdist (any version already downloaded is kept: the build must not change under a cache)
sdist=$(ls "$CACHE"/sdist/llama_cpp_python-*.tar.gz 2>/dev/null | sort -V | tail -1 || true)
if [ -z "$sdist" ]; then
  log "downloading the llama-cpp-python sdist"
  "$PY" -m pip download -q --no-binary :all: --no-deps -d "$CACHE/sdist" llama-cpp-python >&2
  sdist=$(ls "$CACHE"/sdist/llama_cpp_python-*.tar.gz | sort -V | tail -1)
fi
pyver=$(basename "$sdist" .tar.gz); pyver=${pyver#llama_cpp_python-}

# 2. the vendored tree
SRC=$CACHE/src/llama_cpp_python-$pyver/vendor/llama.cpp
if [ ! -f "$SRC/CMakeLists.txt" ]; then
  log "extracting $sdist"
  rm -rf "$CACHE/src" && mkdir -p "$CACHE/src"
  tar -xzf "$sdist" -C "$CACHE/src"
fi
[ -f "$SRC/convert_hf_to_gguf.py" ] || { log "no convert_hf_to_gguf.py in $SRC"; exit 1; }

# 3. cmake (the system one if there is one)
CMAKE=$(command -v cmake || true)
if [ -z "$CMAKE" ]; then
  [ -x "$(dirname "$PY")/cmake" ] || { log "pip install cmake"; "$PY" -m pip install -q cmake >&2; }
  CMAKE=$(dirname "$PY")/cmake
fi

# 4. the build; llama-batched-bench is built only if the tree defines it (old trees lack it)
BUILD=$CACHE/build
targets="llama-bench llama-quantize"
grep -rqs "llama-batched-bench" "$SRC/tools" "$SRC/examples" && targets="$targets llama-batched-bench"
# GGML_NATIVE: -march=native, as a CPU user building it for their own machine gets; but without
# AMX (LLAMA_CPP_AMX=1 keeps it): on an AMX Xeon (a firecracker VM, llama.cpp 0c1e570) its AMX
# matmul dies with SIGILL at `tilezero` whenever a batch has more than one token (a prompt, or
# batched decode), in llama-batched-bench and llama-cli alike; llama-bench -p 0 never gets there.
# Without it ggml uses its AVX-512 paths, what every non-AMX x86 CPU runs (Zen included).
# Static, so the binaries run without LD_LIBRARY_PATH; no curl (no network anyway).
noamx="-mno-amx-tile -mno-amx-int8 -mno-amx-bf16"
[ "${LLAMA_CPP_AMX:-0}" = 1 ] && noamx=""
flags=(-DCMAKE_BUILD_TYPE=Release -DGGML_NATIVE=ON -DBUILD_SHARED_LIBS=OFF -DGGML_CUDA=OFF -DGGML_METAL=OFF
       -DGGML_VULKAN=OFF -DGGML_OPENMP=ON -DLLAMA_CURL=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_SERVER=OFF
       "-DCMAKE_C_FLAGS=$noamx" "-DCMAKE_CXX_FLAGS=$noamx")
missing=""
# a build made with other options is redone (the stamp holds the options it was made with)
[ "$(cat "$BUILD/pyquant-build-flags" 2>/dev/null)" = "${flags[*]}" ] || missing=" (options changed)"
for t in $targets; do [ -x "$BUILD/bin/$t" ] || missing="$missing $t"; done
if [ -n "$missing" ]; then
  missing=$targets
  log "building $missing in $BUILD with $JOBS jobs (about 8 minutes on 2 cores)"
  "$CMAKE" -S "$SRC" -B "$BUILD" "${flags[@]}" >"$CACHE/cmake.log" 2>&1 \
    || { tail -30 "$CACHE/cmake.log" >&2; exit 1; }
  "$CMAKE" --build "$BUILD" --config Release -j "$JOBS" --target $missing >"$CACHE/build.log" 2>&1 \
    || { tail -30 "$CACHE/build.log" >&2; exit 1; }
  echo "${flags[*]}" >"$BUILD/pyquant-build-flags"
fi

# 5. the converter's python dependencies, only if missing (gguf from this tree: pinned to it)
"$PY" - "$SRC" <<'EOF' >&2
import importlib.util, subprocess, sys
need = []
if importlib.util.find_spec("gguf") is None:
    need.append(sys.argv[1] + "/gguf-py")
for mod in ("sentencepiece", "numpy", "safetensors"):
    if importlib.util.find_spec(mod) is None:
        need.append(mod)
if need:
    print("llama_cpp.sh: pip install", *need, flush=True)
    subprocess.check_call([sys.executable, "-m", "pip", "install", "-q", *need])
EOF

# The commit of the vendored tree: the sdist carries no .git; llama.cpp's CMake writes what it
# found (often "unknown") into build-info, and the sdist version names the llama-cpp-python release.
commit=$(grep -ho 'LLAMA_COMMIT = "[^"]*"' "$BUILD"/common/build-info.cpp 2>/dev/null | head -1 | cut -d'"' -f2 || true)
echo "LLAMA_CPP_SRC=$SRC"
echo "LLAMA_CPP_BIN=$BUILD/bin"
echo "LLAMA_CPP_VERSION=llama-cpp-python $pyver sdist, vendored llama.cpp commit ${commit:-unknown}"
