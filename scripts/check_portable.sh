#!/usr/bin/env bash
# The portable build (issue 15), without torch and without an AArch64 machine:
#  1. the standalone kernel harness (csrc/cpu/harness/kernel_check.cpp), native: every kernel set
#     of this build that the CPU runs against the portable kernels (on x86-64 the kernel timing
#     tool, csrc/cpu/harness/kernel_bench.cpp, is built too);
#  2. the same harness cross-compiled for AArch64 (Debian's g++-aarch64-linux-gnu, static) and run
#     under qemu-aarch64: the NEON kernels against the portable ones, and int mode's digests
#     (activations, scales, dot products) equal to the native run's;
#  3. the extension's torch-facing sources compile for AArch64 against torch's headers.
# Steps 2-3 need the cross toolchain and qemu-user; with CI=true they are installed (apt-get) when
# missing, otherwise the script says so and stops after step 1.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
SRC=csrc/cpu
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

arch_files() {  # the files of arch_sources.json for architecture $1
  python3 -c "import json, sys; print(' '.join('$SRC/' + f for f in json.load(open('$SRC/arch_sources.json')).get(sys.argv[1], [])))" "$1"
}
library="$SRC/kernel_table.cpp $SRC/transform.cpp $SRC/kernels_scalar.cpp"  # the portable files the harnesses link
common="$SRC/harness/kernel_check.cpp $library"
flags="-O3 -std=c++17 -ffp-contract=off -I$SRC"

echo "== native ($(uname -m))"
# shellcheck disable=SC2046
g++ $flags $common $(arch_files "$(uname -m)") -o "$work/native" 2> "$work/native.log" || { cat "$work/native.log"; exit 1; }
"$work/native" | tee "$work/native.out"
if [ "$(uname -m)" = x86_64 ]; then  # the kernel timing tool: built so that it keeps up with the kernels, not run
  # shellcheck disable=SC2046
  g++ $flags "$SRC/harness/kernel_bench.cpp" $library $(arch_files x86_64) -lpthread -o "$work/bench" 2> "$work/bench.log" ||
    { cat "$work/bench.log"; exit 1; }
  echo "kernel_bench builds"
fi

if ! command -v aarch64-linux-gnu-g++ > /dev/null || ! command -v qemu-aarch64 > /dev/null; then
  if [ "${CI:-}" = "true" ] && command -v apt-get > /dev/null; then
    echo "== installing g++-aarch64-linux-gnu and qemu-user"
    apt-get install -y -q --no-install-recommends g++-aarch64-linux-gnu qemu-user > "$work/apt.log" 2>&1 ||
      { apt-get update -q > /dev/null 2>&1 && apt-get install -y -q --no-install-recommends g++-aarch64-linux-gnu qemu-user > "$work/apt.log" 2>&1; } ||
      { tail -20 "$work/apt.log"; echo "check_portable: could not install the AArch64 toolchain"; exit 1; }
  else
    echo "check_portable: aarch64-linux-gnu-g++ or qemu-aarch64 missing: AArch64 steps not run" \
         "(apt-get install g++-aarch64-linux-gnu qemu-user)"
    exit 0
  fi
fi

echo "== aarch64 (cross-compiled, qemu-aarch64)"
# shellcheck disable=SC2046
aarch64-linux-gnu-g++ $flags -static $common $(arch_files aarch64) -o "$work/aarch64" 2> "$work/aarch64.log" ||
  { cat "$work/aarch64.log"; exit 1; }
qemu-aarch64 "$work/aarch64" | tee "$work/aarch64.out"
if ! diff <(grep '^digest' "$work/native.out") <(grep '^digest' "$work/aarch64.out") > /dev/null; then
  echo "check_portable: int mode differs between $(uname -m) and aarch64 (digests above)"
  exit 1
fi
echo "int mode: the same activations, scales and dot products on $(uname -m) and aarch64"

echo "== the extension's torch-facing sources for aarch64 (syntax check against torch's headers)"
inc=$("$PY" -c "from torch.utils.cpp_extension import include_paths; import sysconfig; print(' '.join('-I' + p for p in include_paths() + [sysconfig.get_paths()['include']]))")
for f in $(grep -l '#include "ops.h"' $SRC/*.cpp); do  # the others were built whole for the harness above
  # shellcheck disable=SC2086
  aarch64-linux-gnu-g++ -std=c++17 -fsyntax-only -w -fopenmp -DTORCH_EXTENSION_NAME=_C -DTORCH_API_INCLUDE_EXTENSION_H \
    $inc "$f" || { echo "check_portable: $f does not compile for aarch64"; exit 1; }
  echo "  $f"
done
echo "check_portable: passed"
