#!/usr/bin/env python3
"""Throughput of an instruction mix on this core: what a kernel loop of that mix could reach at best.

    python3 csrc/cpu/harness/mix_bench.py NAME=OP:COUNT,OP:COUNT,... [NAME=...]
    python3 csrc/cpu/harness/mix_bench.py lut3=ld:7,perm:8,srl:5,shrd:2,add:7,dpw:4 one=shift:1

Each mix becomes an inline-asm loop (g++, AVX-512 VBMI/VBMI2/VNNI) of four independent copies of
its operations, interleaved op by op, writing 16 rotating zmm registers from fixed sources: no
dependency chain longer than an operation's own, so the time is the issue rate of the mix. Prints
TSC ticks per copy and that over the ticks of one 512-bit shift (one a cycle on Zen 4 and on
Intel's AVX-512 cores), i.e. cycles. Operations: OPS below (ld / st: 64-byte loads from and stores
to an L1-resident buffer; perm: vpermi2w from a register copy, as the lut3 kernel uses it).
Session 31 (Zen 4): the lut3 GEMV's chunk mix 13.7-14.1 cycles, 14.6 with its loads (README).
"""
import subprocess
import sys
import tempfile
from pathlib import Path

OPS = {
    "perm": "vmovdqa64 %%zmm22, %%zmm{i}\\n vpermi2w %%zmm21, %%zmm20, %%zmm{i}\\n",
    "srl": "vpsrlw $6, %%zmm20, %%zmm{i}\\n",
    "shrd": "vpshrdw $12, %%zmm21, %%zmm20, %%zmm{i}\\n",
    "mulhu": "vpmulhuw %%zmm21, %%zmm20, %%zmm{i}\\n",
    "add": "vpaddw %%zmm20, %%zmm21, %%zmm{i}\\n",
    "addd": "vpaddd %%zmm20, %%zmm21, %%zmm{i}\\n",
    "srad": "vpsrad $16, %%zmm20, %%zmm{i}\\n",
    "and": "vpandd %%zmm20, %%zmm21, %%zmm{i}\\n",
    "dpw": "vpdpwssd %%zmm20, %%zmm21, %%zmm{i}\\n",
    "dpbusd": "vpdpbusd %%zmm20, %%zmm21, %%zmm{i}\\n",
    "madd": "vpmaddwd %%zmm20, %%zmm21, %%zmm{i}\\n",
    "permb": "vpermb %%zmm21, %%zmm20, %%zmm{i}\\n",
    "pshufb": "vpshufb %%zmm21, %%zmm20, %%zmm{i}\\n",
    "ld": "vmovdqu64 {off}(%1), %%zmm{i}\\n",
    "st": "vmovdqu64 %%zmm20, {off}(%2)\\n",
}
OPS["shift"] = OPS["srl"]
COPIES = 4


def parse(arg: str) -> tuple[str, list[str]]:
    name, _, spec = arg.partition("=")
    if not name.isidentifier() or not spec:
        raise ValueError(f"a mix is NAME=OP:COUNT,... with NAME an identifier, got {arg!r}")
    ops = []
    for part in spec.split(","):
        op, _, count = part.partition(":")
        if op not in OPS or not count.isdigit():
            raise ValueError(f"{part!r}: OP must be one of {sorted(OPS)} and COUNT a number")
        ops += [op] * int(count)
    return name, ops


def source(mixes: dict[str, list[str]]) -> str:
    clobbers = ", ".join(f'"zmm{i}"' for i in range(24))
    out = ["#include <x86intrin.h>", "#include <cstdint>", "#include <cstdio>",
           "alignas(64) static char g_in[8192]; alignas(64) static char g_out[8192];",
           "template <typename F> double ticks(F f, long n) {",
           "  f(n / 10); uint64_t best = ~0ull;",
           "  for (int r = 0; r < 7; ++r) { uint64_t t = __rdtsc(); f(n); t = __rdtsc() - t; if (t < best) best = t; }",
           "  return double(best) / n; }"]
    for name, ops in {**mixes, "ref_shift": ["srl"]}.items():
        body, k = "", 0
        for op in ops:
            for _ in range(COPIES):
                body += OPS[op].format(i=k % 16, off=64 * (k % 64))
                k += 1
        out.append(f'static void f_{name}(long n) {{ asm volatile("1:\\n" "{body}" "dec %0\\n jnz 1b\\n" '
                   f': "+r"(n) : "r"(g_in), "r"(g_out) : "memory", {clobbers}); }}')
    out += ["int main() {", f"  const double cycle = ticks(f_ref_shift, 2000000) / {COPIES};"]
    for name, ops in mixes.items():
        out.append(f'  {{ const double t = ticks(f_{name}, 200000) / {COPIES}; printf("%-16s %3d ops: '
                   f'%6.2f ticks, %6.2f cycles per copy\\n", "{name}", {len(ops)}, t, t / cycle); }}')
    out.append("}")
    return "\n".join(out) + "\n"


def main(argv: list[str]) -> int:
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__)
        return 0 if argv else 2
    try:
        mixes = dict(parse(a) for a in argv)
    except ValueError as e:
        print(f"mix_bench: {e}", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory() as tmp:
        src, exe = Path(tmp) / "mix.cpp", Path(tmp) / "mix"
        src.write_text(source(mixes))
        subprocess.run(["g++", "-O2", "-mavx512f", "-mavx512bw", "-mavx512vbmi", "-mavx512vbmi2", "-mavx512vnni",
                        str(src), "-o", str(exe)], check=True)
        return subprocess.run([str(exe)]).returncode


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
