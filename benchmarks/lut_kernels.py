#!/usr/bin/env python
"""The batch-1 CPU kernels side by side, alone (no torch, no activation transform): every kernel
set this CPU runs, int mode and mode "lut", against the floor (the codes' bytes at the read
bandwidth measured in the same run). What the next machine with other instruction sets should
run first (issue 15: is the AVX-512 table-lookup kernel faster than the AVX2 one, and than int
mode's ``vpdpbusd``, on an AVX-512 CPU?).

    python benchmarks/lut_kernels.py [--rounds 3] [--threads 1,2] [--out benchmarks/results]

Builds ``csrc/cpu/harness/kernel_bench.cpp`` (g++, the x86-64 files of arch_sources.json) and
runs it once per (shape, threads, set, mode) and round; the rounds alternate the variants, so
the machine's drift falls on all of them alike. Each run cycles enough distinct layers that the
codes come from memory (kernel_bench.cpp). Shapes: 4096 x 4096, 4096 x 11008 and 11008 x 4096
(in x out), one token. Writes ``lut_kernels_<cpu>_<widest set>.{md,json}`` to ``--out``.
"""
from __future__ import annotations

import argparse
import datetime
import json
import re
import statistics
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from streaming_quantize import cpu_name  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
SRC = ROOT / "csrc" / "cpu"
SHAPES = [(4096, 4096), (11008, 4096), (4096, 11008)]  # (N out, K in), as kernel_bench takes them
# ("avx2", "read"): a plain read of the same rows of the same cycled layers, split as the kernels are
# (kernel_bench's mode read): what streaming one call's codes costs, against the floor's long read
VARIANTS = [("avx2", "read"), ("avx2", "int"), ("avx2", "lut"), ("avx512", "int"), ("avx512", "lut"), ("amx", "int")]
LINE = re.compile(r"kernel ([\d.]+) us .* floor ([\d.]+) us")


def build(path: Path) -> None:
    arch = json.loads((SRC / "arch_sources.json").read_text())["x86_64"]
    files = [SRC / "harness" / "kernel_bench.cpp", SRC / "kernel_table.cpp", SRC / "transform.cpp",
             SRC / "kernels_scalar.cpp"] + [SRC / f for f in arch]
    subprocess.run(["g++", "-O3", "-std=c++17", "-ffp-contract=off", f"-I{SRC}", *map(str, files), "-lpthread",
                    "-o", str(path)], check=True)


def run(bench: Path, n: int, k: int, threads: int, isa: str, mode: str) -> tuple[float, float] | None:
    """(kernel us, floor us), or None where the CPU lacks the set."""
    p = subprocess.run([str(bench), str(n), str(k), "1", str(threads), isa, mode], capture_output=True, text=True)
    if p.returncode != 0:
        if "not supported" in p.stderr or "not in this build" in p.stderr:
            return None
        raise RuntimeError(f"kernel_bench {n} {k} 1 {threads} {isa} {mode}: {p.stderr.strip()}")
    m = LINE.search(p.stdout)
    return float(m.group(1)), float(m.group(2))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", default="1,2")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    args = ap.parse_args()
    if args.rounds < 1:
        raise SystemExit("--rounds must be at least 1")
    threads = [int(t) for t in args.threads.split(",")]
    bench = Path("/tmp/pyquant_kernel_bench")
    build(bench)
    cpu = cpu_name()
    variants = list(VARIANTS)  # those the CPU lacks drop out at their first run
    times: dict[str, list[tuple[float, float]]] = {}
    done = 0
    for _ in range(args.rounds):
        for n, k in SHAPES:
            for t in threads:
                for isa, mode in list(variants):
                    result = run(bench, n, k, t, isa, mode)
                    if result is None:
                        variants.remove((isa, mode))
                        continue
                    times.setdefault(f"{n} {k} {t} {isa} {mode}", []).append(result)
                    done += 1
                    print(f"\r{done} runs", end="", file=sys.stderr, flush=True)
    print(file=sys.stderr)
    rows = []
    for n, k in SHAPES:
        for t in threads:
            best_int = min(statistics.median(x for x, _ in times[f"{n} {k} {t} {isa} {mode}"])
                           for isa, mode in variants if mode == "int")
            read = statistics.median(x for x, _ in times[f"{n} {k} {t} avx2 read"])
            for isa, mode in variants:
                runs = times[f"{n} {k} {t} {isa} {mode}"]
                kern = [x for x, _ in runs]
                floor = statistics.median(f for _, f in runs)
                med = statistics.median(kern)
                rows.append({"in": k, "out": n, "threads": t, "set": isa, "mode": mode, "kernel_us": kern,
                             "floor_us": [f for _, f in runs], "median_us": med, "x_floor": med / floor,
                             "x_read": med / read, "x_best_int": best_int / med})
    stamp = datetime.datetime.now().isoformat(timespec="seconds")
    slug = re.sub(r"[^A-Za-z0-9]+", "_", cpu).strip("_").lower() + "_" + variants[-1][0]
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"lut_kernels_{slug}.json").write_text(json.dumps({"cpu": cpu, "date": stamp, "rows": rows}, indent=1))
    lines = [f"# Batch-1 CPU kernels alone, every set and mode ({cpu}, {stamp})", "",
             f"Command: `python benchmarks/lut_kernels.py --rounds {args.rounds} --threads {args.threads}`; "
             "kernel_bench per run (codes from memory, 2 MB pages), the rounds alternating the variants. "
             "µs: median of the rounds (min-max); floor: the codes' bytes at the read bandwidth of the same run; "
             "× read: over the plain read of the same call's codes (mode read); "
             "× best int: the fastest int-mode set's median over this one's.", "",
             "| in × out | threads | set | mode | kernel µs | × floor | × read | × best int |",
             "|---|---:|---|---|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['in']} × {r['out']} | {r['threads']} | {r['set']} | {r['mode']} | {r['median_us']:.1f} "
                     f"({min(r['kernel_us']):.1f}-{max(r['kernel_us']):.1f}) | {r['x_floor']:.2f} | {r['x_read']:.2f} | "
                     f"{r['x_best_int']:.2f} |")
    (args.out / f"lut_kernels_{slug}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
