#!/usr/bin/env bash
# Compile-check the CUDA sources without a GPU:
#   every csrc/cuda/*.cu with nvcc for sm_80 and sm_90a (the flags setup.py's CUDAExtension uses),
#   and csrc/cuda/*.cpp (the torch bindings) with the host compiler, syntax only.
# Exits non-zero on any failure; prints a skip message and exits 0 only when nvcc is absent.
# Usage: bash scripts/check_cuda.sh   (env: PYTHON, NVCC, CXX, CHECK_CUDA_JOBS=2, CHECK_CUDA_ARCHS)
set -uo pipefail
cd "$(dirname "$0")/.."
start=$(date +%s)

NVCC=${NVCC:-$(command -v nvcc || true)}
if [ -z "$NVCC" ] && [ -n "${CUDA_HOME:-}" ] && [ -x "$CUDA_HOME/bin/nvcc" ]; then NVCC=$CUDA_HOME/bin/nvcc; fi
if [ -z "$NVCC" ]; then
  echo "check_cuda: nvcc not found; skipping the CUDA compile check"
  exit 0
fi
PY=${PYTHON:-}
if [ -z "$PY" ]; then
  if [ -x .venv/bin/python ]; then PY=.venv/bin/python; else PY=python3; fi
fi
CXX=${CXX:-c++}
JOBS=${CHECK_CUDA_JOBS:-2}
ARCHS=${CHECK_CUDA_ARCHS:-"sm_80 sm_90a"}

# Include paths and the nvcc flags torch's extension builder adds (it defines
# __CUDA_NO_HALF_CONVERSIONS__ & co., which the kernels must live with).
info=$("$PY" - <<'EOF'
import sysconfig
from torch.utils import cpp_extension as c
print(" ".join("-I" + p for p in c.include_paths()))
print(sysconfig.get_paths()["include"])
print(" ".join(c.COMMON_NVCC_FLAGS))
EOF
) || { echo "check_cuda: cannot import torch with $PY (needed for the include paths)"; exit 1; }
TORCH_INC=$(sed -n 1p <<<"$info")
PY_INC=$(sed -n 2p <<<"$info")
TORCH_NVCC_FLAGS=$(sed -n 3p <<<"$info")
# The CUDA headers, for the host compiler: ask nvcc where it finds them (it may be a wrapper).
CUDA_INC=$(cd /tmp && echo | "$NVCC" --dryrun -x cu -c - -o /dev/null 2>&1 | sed -n 's/.*INCLUDES="-I\([^"]*\)".*/\1/p' | head -1)
for d in "$CUDA_INC" "${CUDA_HOME:-/nonexistent}/include" /usr/local/cuda/include; do
  if [ -f "$d/cuda_runtime.h" ]; then CUDA_INC=$d; break; fi
done

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
# A CPU-only torch wheel lacks this cmake-generated header of the c10 CUDA library; its content is
# one macro, reproduced here so the bindings can be checked against a CPU torch as well.
torch_root=$(sed 's/^-I//; s/ .*//' <<<"$TORCH_INC")
if [ ! -f "$torch_root/c10/cuda/impl/cuda_cmake_macros.h" ]; then
  mkdir -p "$work/shim/c10/cuda/impl"
  printf '#pragma once\n#define C10_CUDA_BUILD_SHARED_LIBS\n' > "$work/shim/c10/cuda/impl/cuda_cmake_macros.h"
  TORCH_INC="$TORCH_INC -I$work/shim"
fi

jobs_list=()
for f in csrc/cuda/*.cu; do
  [ -e "$f" ] || continue
  for arch in $ARCHS; do jobs_list+=("nvcc|$arch|$f"); done
done
for f in csrc/cuda/*.cpp; do
  [ -e "$f" ] || continue
  jobs_list+=("cxx|host|$f")
done
if [ ${#jobs_list[@]} -eq 0 ]; then echo "check_cuda: no sources in csrc/cuda"; exit 1; fi

run_one() {  # $1 = index into jobs_list
  local spec=${jobs_list[$1]} kind arch src log t0
  IFS='|' read -r kind arch src <<<"$spec"
  log="$work/$1.log"
  t0=$(date +%s)
  if [ "$kind" = nvcc ]; then
    # shellcheck disable=SC2086
    "$NVCC" -c -std=c++17 -O3 --use_fast_math -arch="$arch" $TORCH_NVCC_FLAGS $TORCH_INC -I"$PY_INC" \
      -DTORCH_EXTENSION_NAME=_C_cuda -Xptxas -warn-spills "$src" -o "$work/$1.o" >"$log" 2>&1
  else
    # shellcheck disable=SC2086
    "$CXX" -fsyntax-only -std=c++17 -w $TORCH_INC -I"$CUDA_INC" -I"$PY_INC" -DTORCH_EXTENSION_NAME=_C_cuda \
      "$src" >"$log" 2>&1
  fi
  echo $? > "$work/$1.rc"
  echo "$(( $(date +%s) - t0 ))" > "$work/$1.time"
}

echo "check_cuda: $($NVCC --version | tail -1); ${#jobs_list[@]} compiles, $JOBS at a time"
i=0
while [ $i -lt ${#jobs_list[@]} ]; do
  pids=()
  for _ in $(seq 1 "$JOBS"); do
    [ $i -lt ${#jobs_list[@]} ] || break
    run_one $i & pids+=($!)
    i=$((i + 1))
  done
  for pid in "${pids[@]}"; do wait "$pid"; done
done

failed=0
for i in "${!jobs_list[@]}"; do
  IFS='|' read -r kind arch src <<<"${jobs_list[$i]}"
  rc=$(cat "$work/$i.rc" 2>/dev/null || echo 1)
  if [ "$rc" = 0 ]; then
    echo "  ok    $src ($arch, $(cat "$work/$i.time") s)"
    grep -i "spill\|warning" "$work/$i.log" | sed 's/^/        /' | head -20
  else
    failed=1
    echo "  FAIL  $src ($arch)"
    sed 's/^/        /' "$work/$i.log" | head -60
  fi
done
echo "check_cuda: $([ $failed = 0 ] && echo passed || echo FAILED) in $(( $(date +%s) - start )) s"
exit $failed
