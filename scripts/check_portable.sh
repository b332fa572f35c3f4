#!/usr/bin/env bash
# The portable build (issue 15), without torch and without an AArch64 machine:
#  1. the standalone kernel harness (csrc/cpu/harness/kernel_check.cpp), native: every kernel set
#     of this build that the CPU runs against the portable kernels (on x86-64 the kernel timing
#     tools, csrc/cpu/harness/kernel_bench.cpp and lut3_ab.cpp, are built too);
#  2. on x86-64, the AVX-512 kernel files on any CPU: built against SIMDe's portable intrinsics
#     (csrc/cpu/harness/avx512_emulation/immintrin.h) with their target pragmas and inline asm
#     taken out, and run in the harness as the `avx512` set (its lut3 kernel too), with and without
#     VBMI (a CPU without AVX-512 otherwise never runs them);
#  3. the harness cross-compiled for AArch64 (Debian's g++-aarch64-linux-gnu, static) and run
#     under qemu-aarch64: the NEON kernels against the portable ones, and int mode's digests
#     (activations, scales, dot products) equal to the native run's;
#  4. the extension's torch-facing sources compile for AArch64 against torch's headers.
# Step 2 needs libsimde-dev, steps 3-4 the cross toolchain and qemu-user; with CI=true they are
# installed (apt-get) when missing, otherwise the script says so and skips step 2 or stops after it.
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
if [ "$(uname -m)" = x86_64 ]; then  # the kernel timing tools: built so that they keep up with the kernels, not run
  # shellcheck disable=SC2046
  g++ $flags "$SRC/harness/kernel_bench.cpp" $library $(arch_files x86_64) -lpthread -o "$work/bench" 2> "$work/bench.log" ||
    { cat "$work/bench.log"; exit 1; }
  echo "kernel_bench builds"
  # the lut3 A/B harness, with the build's own lut3 file as its variant
  # shellcheck disable=SC2046
  g++ $flags -c "$SRC/kernels_lut3_avx512.cpp" -Dlut3_gemv_avx512=lut3_gemv_variant -Dlut3_tables_avx512=lut3_tables_variant \
    -o "$work/variant.o" 2> "$work/ab.log" &&
    g++ $flags "$SRC/harness/lut3_ab.cpp" $library $(arch_files x86_64) "$work/variant.o" -o "$work/lut3_ab" 2>> "$work/ab.log" ||
    { cat "$work/ab.log"; exit 1; }
  echo "lut3_ab builds"
fi

apt_install() {  # apt-get install "$@" under CI=true; returns 1 elsewhere
  [ "${CI:-}" = "true" ] && command -v apt-get > /dev/null || return 1
  echo "== installing $*"
  apt-get install -y -q --no-install-recommends "$@" > "$work/apt.log" 2>&1 ||
    { apt-get update -q > /dev/null 2>&1 && apt-get install -y -q --no-install-recommends "$@" > "$work/apt.log" 2>&1; } ||
    { tail -20 "$work/apt.log"; echo "check_portable: could not install $*"; exit 1; }
}

if [ "$(uname -m)" = x86_64 ]; then
  if [ -f /usr/include/simde/x86/avx512.h ] || apt_install libsimde-dev; then
    for vbmi in true false; do
      echo "== the AVX-512 kernels, emulated (SIMDe), VBMI $vbmi"
      emu="$work/emu_$vbmi"
      mkdir -p "$emu"
      for f in kernels_avx512.cpp kernels_lut3_avx512.cpp transform_avx512.cpp; do
        # no target pragmas or attributes (the compiler would emit AVX-512 itself), the CPU check
        # for VBMI answered; PYQUANT_NO_INLINE_ASM: intrinsics where the files use inline asm
        sed -e 's/^#pragma GCC target.*//' -e 's/__attribute__((target("[^"]*")))//' \
            -e "s/__builtin_cpu_supports(\"avx512vbmi\")/$vbmi/" "$SRC/$f" > "$emu/$f"
        # (-O1: SIMDe's inline functions take gcc 12 ~2 minutes per file at -O3, 20 s here)
        g++ $flags -O1 -DPYQUANT_NO_INLINE_ASM -Wno-ignored-attributes -Wno-psabi -I"$SRC/harness/avx512_emulation" \
          -c "$emu/$f" -o "$emu/${f%.cpp}.o" \
          2> "$emu/build.log" || { cat "$emu/build.log"; exit 1; }
      done
      # the avx512 set, and its lut3 kernel, run whatever the CPU
      sed -e 's/^bool has_avx512_vnni() {/bool has_avx512_vnni() { return true;/' \
          -e 's/^bool has_avx512_vbmi2() {/bool has_avx512_vbmi2() { return true;/' "$SRC/kernel_table.cpp" > "$emu/kernel_table.cpp"
      grep -q 'has_avx512_vnni() { return true;' "$emu/kernel_table.cpp" || { echo "check_portable: has_avx512_vnni not found"; exit 1; }
      grep -q 'has_avx512_vbmi2() { return true;' "$emu/kernel_table.cpp" || { echo "check_portable: has_avx512_vbmi2 not found"; exit 1; }
      # shellcheck disable=SC2046
      g++ $flags "$SRC/harness/kernel_check.cpp" "$emu/kernel_table.cpp" "$SRC/transform.cpp" "$SRC/kernels_scalar.cpp" \
        $(arch_files x86_64 | tr ' ' '\n' | grep -v avx512 | tr '\n' ' ') "$emu"/*.o -o "$emu/check" 2> "$emu/build.log" ||
        { cat "$emu/build.log"; exit 1; }
      "$emu/check" > "$emu/out" || { grep -v '^digest\|^N=\|not supported' "$emu/out"; exit 1; }
      grep -v '^digest\|^N=\|not supported' "$emu/out"
    done
  else
    echo "check_portable: SIMDe missing: the emulated AVX-512 step not run (apt-get install libsimde-dev)"
  fi
fi

if ! command -v aarch64-linux-gnu-g++ > /dev/null || ! command -v qemu-aarch64 > /dev/null; then
  if ! apt_install g++-aarch64-linux-gnu qemu-user; then
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
