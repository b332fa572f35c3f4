#!/usr/bin/env python
"""CPU benchmark suite: pyquant's 2-bit kernels against torch's own CPU matmuls.

    python benchmarks/suite.py [--quick]     (or: python -m pyquant bench [--quick])

For every weight shape (in x out features) and batch size, in one process, side by side:

- pyquant 2-bit        ``torch.ops.pyquant.linear`` (the CPU backend's eager call), fp32 activations
- pyquant lut          ``torch.ops.pyquant.lut_linear`` (mode "lut": 14-bit activations, table
                       lookups), where the kernel set has table-lookup kernels (``_C.has_lut_kernel()``)
- pyquant lut3         ``torch.ops.pyquant.lut3_linear`` (mode "lut3": 12-bit activations, one lookup
                       per three weights), where the kernel set has its own (``_C.has_lut3_kernel()``)
- F.linear fp32        dense fp32 weight
- F.linear bf16        dense bf16 weight, bf16 activations
- int4 (group 128)     ``torch._weight_int4pack_mm_for_cpu``, bf16 activations
- int8                 ``torch._weight_int8pack_mm`` (per-channel scales), bf16 activations
- floor                pyquant's stored bytes / the read bandwidth (the time just to stream the
                       2-bit weight from memory once); the bandwidth is a 256 MiB sum timed in the
                       same interleaved rounds, since a shared machine's bandwidth drifts over minutes

Methods are interleaved round by round (so load from other processes hits all of them alike)
and each call takes the next of several distinct weights of the shape, so weights stream from
memory rather than from cache: 16 per shape, fewer only for dense weights too large to hold 16
of (the cycled set is then still >= 1 GiB, well above the last-level cache). Times are medians
over rounds; ratios are speed-ups of pyquant (> 1: pyquant faster), and pyquant / floor.

Writes ``benchmarks/results/cpu_{quick,full}_<threads>t.{json,md}`` with the machine's description
(``--threads 1`` gives numbers that a machine shared with other work disturbs much less).
``bench_minilm`` adds MiniLM encode throughput (quantized vs fp32); ``--compare-isas`` times the C++
kernel sets this CPU runs (avx2, avx512, amx, ...) against each other on the same weights.
"""
from __future__ import annotations

import argparse
import copy
import datetime
import json
import math
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run from a checkout
    sys.path.insert(0, str(ROOT))

import pyquant  # noqa: E402
from pyquant import QuantLinear  # noqa: E402
from pyquant.backends import cpu as cpu_backend  # noqa: E402
from pyquant.format import PackedWeight, stored_bytes  # noqa: E402
from pyquant.hadamard import default_block  # noqa: E402

SHAPES = [(4096, 4096), (4096, 11008), (11008, 4096), (8192, 8192), (384, 384), (384, 1536), (1536, 384)]
BATCHES = [1, 2, 4, 8, 32, 128, 512]
QUICK_SHAPES = [(4096, 4096), (384, 1536)]
QUICK_BATCHES = [1, 8, 32, 128]
N_WEIGHTS = 16
DENSE_SET_BYTES = 1 << 30  # cap on one dense method's cycled set when 16 weights would not fit

# The table-lookup modes whose kernels this CPU's kernel set has: mode -> (codes in its layout,
# the layer call on w = (codes in that layout, frozen params, codes) of PackedWeight pw).
_C = pyquant.ops._C
TABLE_MODES = {mode: spec for mode, has, spec in (
    ("lut", _C.has_lut_kernel, (_C.pack_lut_codes, lambda x, w, pw: torch.ops.pyquant.lut_linear(
        x, w[0], w[1], pw.had_in, pw.had_out))),
    ("lut3", _C.has_lut3_kernel, (_C.pack_lut3_codes, lambda x, w, pw: torch.ops.pyquant.lut3_linear(
        x, w[2], w[0], w[1], pw.had_in, pw.had_out)))) if has()}
OTHERS = ("fp32", "bf16", "int4", "int8")
METHODS = ("pyquant",) + tuple(f"pyquant_{mode}" for mode in TABLE_MODES) + OTHERS
LABELS = {"pyquant": "pyquant 2-bit", "pyquant_lut": "pyquant lut", "pyquant_lut3": "pyquant lut3",
          "fp32": "F.linear fp32", "bf16": "F.linear bf16", "int4": "int4 g128", "int8": "int8"}
RESULTS = ROOT / "benchmarks" / "results"


# ----------------------------------------------------------------------------- machine

def _cpuinfo_field(name: str) -> str | None:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(name):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return None


BANDWIDTH_PROBE_BYTES = 256 << 20


def read_probe(nbytes: int = BANDWIDTH_PROBE_BYTES):
    """fn() summing a buffer far larger than the caches, returning 1 (one call), with its size:
    timed among the methods, it measures the read bandwidth of the same moments. The buffer is in
    2 MB pages, as pyquant's large codes are (4 KB pages read ~30 % slower here: TLB misses), so
    the floor is what the memory can give, not what 4 KB pages allow."""
    buf = pyquant.ops._C.in_huge_pages(torch.ones(nbytes // 4))

    def run():
        buf.sum()
        return 1
    return run, nbytes


def measure_read_bandwidth(nbytes: int = 512 << 20, reps: int = 7) -> float:
    """Read bandwidth in bytes/s: best of ``reps`` sums over a buffer far larger than the caches."""
    run, nbytes = read_probe(nbytes)
    run()
    best = math.inf
    for _ in range(reps):
        t0 = time.perf_counter()
        run()
        best = min(best, time.perf_counter() - t0)
    return nbytes / best


def cpu_core(vendor: str | None, family: int | None, flags: set) -> str | None:
    """The AMD core a CPUID family means, where the family tells it: the model name a VM shows
    ("AMD EPYC") does not, and sessions 2-28 took this machine for a Zen 5 until its family (25:
    Zen 3 and Zen 4; Zen 5 is 26) and 32 KB L1d said otherwise. None elsewhere."""
    if vendor != "AuthenticAMD" or family is None:
        return None
    if family == 25:
        return "Zen 4" if "avx512f" in flags else "Zen 3"
    return {23: "Zen / Zen 2", 26: "Zen 5"}.get(family)


def _cache_size(index: int) -> str | None:
    path = Path(f"/sys/devices/system/cpu/cpu0/cache/index{index}/size")
    return path.read_text().strip() if path.exists() else None


def machine_info() -> dict:
    flags = set((_cpuinfo_field("flags") or "").split())
    family, model = _cpuinfo_field("cpu family"), _cpuinfo_field("model\t")  # (not "model name")
    family = int(family) if family and family.isdigit() else None
    vendor = _cpuinfo_field("vendor_id")
    l3 = Path("/sys/devices/system/cpu/cpu0/cache/index3/size")
    meminfo = Path("/proc/meminfo").read_text().splitlines()[0] if Path("/proc/meminfo").exists() else ""
    return {
        "cpu": _cpuinfo_field("model name") or platform.processor(),
        "cpu_id": f"family {family} model {model}" if family is not None else None,
        "cpu_core": cpu_core(vendor, family, flags),
        "l1d": _cache_size(0), "l2": _cache_size(2),
        "logical_cpus": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "l3": l3.read_text().strip() if l3.exists() else None,
        "memory": meminfo.split(":", 1)[-1].strip(),
        "isa_flags": sorted(f for f in flags if f in {"avx2", "fma", "avx512f", "avx512bw", "avx512_vnni",
                                                      "avx512_bf16", "avx512_fp16", "amx_tile", "avx_vnni"}),
        "torch": torch.__version__,
        "torch_cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "pyquant": pyquant.__version__,
        "pyquant_isa": pyquant.ops._C.get_isa(),
        "pyquant_mode": pyquant.ops._C.get_mode(),
        "python": platform.python_version(),
        "load_average_start": os.getloadavg(),
    }


# ----------------------------------------------------------------------------- weights

def random_packed(k: int, n: int, seed: int = 0) -> PackedWeight:
    """A random 2-bit weight (speed does not depend on the values) with the default Hadamard blocks."""
    g = torch.Generator().manual_seed(seed)
    return PackedWeight(
        codes=torch.randint(0, 256, (n, k // 4), generator=g, dtype=torch.uint8),
        A=torch.randn(4, 4, generator=g), b=torch.randn(4, generator=g),
        su=torch.randn(k, generator=g).half(), sv=torch.rand(n, generator=g).half(), w_scale=torch.tensor(0.02),
        had_in=default_block(k), had_out=default_block(n),
    ).validate()


def _copies(make, nbytes: int, cap: int | None = None) -> list:
    """Distinct copies of one weight: 16, or as many as fit ``cap`` bytes (at least 2)."""
    count = N_WEIGHTS if cap is None else max(2, min(N_WEIGHTS, cap // nbytes))
    return [make() for _ in range(count)]


def make_methods(k: int, n: int) -> dict:
    """name -> (weights, fn(x, w), activation dtype)."""
    pw = random_packed(k, n)
    dense = torch.randn(n, k) / k**0.5
    int4_base = torch.ops.aten._convert_weight_to_int4pack_for_cpu(torch.randint(0, 16, (n, k), dtype=torch.int32), 1)
    int4_sz = torch.rand(k // 128, n, 2).to(torch.bfloat16)
    int8_base = torch.randint(-127, 128, (n, k), dtype=torch.int8)
    int8_scales = torch.rand(n).to(torch.bfloat16)
    bf16 = dense.to(torch.bfloat16)
    methods = {
        # distinct layers, each calling the CPU backend's op on its own codes
        "pyquant": (_copies(lambda: QuantLinear.from_packed(PackedWeight(pw.codes.clone(), pw.A, pw.b, pw.su, pw.sv,
                                                                         pw.w_scale, had_in=pw.had_in,
                                                                         had_out=pw.had_out)), stored_bytes(pw)),
                    lambda x, w: cpu_backend.forward(x, w, None), torch.float32),
        "fp32": (_copies(dense.clone, dense.numel() * 4, DENSE_SET_BYTES), F.linear, torch.float32),
        "bf16": (_copies(bf16.clone, bf16.numel() * 2, DENSE_SET_BYTES), F.linear, torch.bfloat16),
        "int4": (_copies(int4_base.clone, int4_base.numel(), DENSE_SET_BYTES),
                 lambda x, w: torch._weight_int4pack_mm_for_cpu(x, w, 128, int4_sz), torch.bfloat16),
        "int8": (_copies(int8_base.clone, int8_base.numel(), DENSE_SET_BYTES),
                 lambda x, w: torch._weight_int8pack_mm(x, w, int8_scales), torch.bfloat16),
    }
    for mode, (pack, call) in TABLE_MODES.items():
        # the same in a table mode: (codes in its layout, in 2 MB pages as the backend keeps them, params)
        params = cpu_backend.frozen_params(QuantLinear.from_packed(pw))
        methods[f"pyquant_{mode}"] = ([(_C.in_huge_pages(pack(codes)), params, codes)
                                       for codes in (pw.codes.clone() for _ in range(N_WEIGHTS))],
                                      lambda x, w, call=call: call(x, w, pw), torch.float32)
    return {name: methods[name] for name in METHODS}, stored_bytes(pw)


# ----------------------------------------------------------------------------- timing

def _clock():
    """Wall-clock time; with one torch thread, the thread's CPU time instead, which leaves out the
    time the OS gives other processes on a shared machine (memory stalls still count)."""
    return time.thread_time if torch.get_num_threads() == 1 else time.perf_counter


def side_by_side(calls: dict, min_time: float, min_rounds: int = 3, max_rounds: int = 30) -> dict:
    """``calls``: name -> fn() running one pass over that method's weights, returning the number
    of calls made. Runs the passes interleaved, round by round; returns name -> seconds per call
    (median and min over rounds)."""
    samples = {name: [] for name in calls}
    clock = _clock()
    for fn in calls.values():  # warm-up pass
        fn()
    t0 = time.perf_counter()
    rounds = 0
    while rounds < min_rounds or (time.perf_counter() - t0 < min_time * len(calls) and rounds < max_rounds):
        for name, fn in calls.items():
            start = clock()
            count = fn()
            samples[name].append((clock() - start) / count)
        rounds += 1
    return {name: {"median": statistics.median(s), "min": min(s), "rounds": len(s)} for name, s in samples.items()}


def _pass(weights, fn, x):
    def run():
        for w in weights:
            fn(x, w)
        return len(weights)
    return run


@torch.inference_mode()
def bench_shape(k: int, n: int, batches: list[int], min_time: float, progress) -> list[dict]:
    methods, nbytes = make_methods(k, n)
    probe, probe_bytes = read_probe()
    rows = []
    for m in batches:
        x32 = torch.randn(m, k)
        calls = {name: _pass(ws, fn, x32.to(dt)) for name, (ws, fn, dt) in methods.items()}
        t = side_by_side({**calls, "read": probe}, min_time)
        ms = {name: t[name]["median"] * 1e3 for name in METHODS}
        bandwidth = probe_bytes / t["read"]["median"]
        floor_ms = nbytes / bandwidth * 1e3
        rows.append({
            "in": k, "out": n, "batch": m, "ms": ms,
            "ms_min": {name: t[name]["min"] * 1e3 for name in METHODS},
            "rounds": t["pyquant"]["rounds"],
            "weights_cycled": {name: len(methods[name][0]) for name in METHODS},
            "pyquant_bytes": nbytes, "floor_ms": floor_ms, "read_bandwidth_gbs": bandwidth / 1e9,
            "speedup": {name: ms[name] / ms["pyquant"] for name in METHODS if name != "pyquant"},
            "pyquant_over_floor": ms["pyquant"] / floor_ms,
            # the speed-up over each of these a kernel would have at the floor: no 2-bit kernel
            # reads its weight faster than the memory gives it, so past this a target is unreachable
            "ceiling": {name: ms[name] / floor_ms for name in ("int4", "bf16") if name in ms},
        })
        for mode in TABLE_MODES:
            rows[-1][f"{mode}_speedup"] = {name: ms[name] / ms[f"pyquant_{mode}"] for name in OTHERS + ("pyquant",)}
            rows[-1][f"{mode}_over_floor"] = ms[f"pyquant_{mode}"] / floor_ms
        progress.update(1)
    return rows


# ----------------------------------------------------------------------------- int vs float mode

@torch.inference_mode()
def int_vs_float(k: int, n: int, batches=(1, 32), min_time: float = 0.2) -> list[dict]:
    """The measurement behind int mode being the default: its time and relative error against the
    fp64 reference (format.dequantize + F.linear), next to float mode's (fp32 activations)."""
    from pyquant.format import dequantize

    pw = random_packed(k, n, seed=1)
    weights = [(PackedWeight(pw.codes.clone(), pw.A, pw.b, pw.su, pw.sv, pw.w_scale, had_in=pw.had_in,
                             had_out=pw.had_out), {}) for _ in range(N_WEIGHTS)]
    dense = dequantize(pw).double()
    out = []
    for m in batches:
        x = torch.randn(m, k)
        ref = F.linear(x.double(), dense)
        calls, err = {}, {}
        for mode in ("int", "float"):
            run = lambda x, w, mode=mode: torch.ops.pyquant.cpu_linear(  # noqa: E731
                x, w[0].codes, w[0].A, w[0].b, w[0].su.float(), w[0].sv.float(), w[0].w_scale, None, w[0].had_in,
                w[0].had_out, mode=mode)
            calls[mode] = _pass(weights, run, x)
            y = run(x, weights[0]).double()
            err[mode] = ((y - ref).norm() / ref.norm()).item()
        for mode, (pack, call) in TABLE_MODES.items():
            table = [(pack(w.codes), cpu_backend.frozen_params(QuantLinear.from_packed(w)), w.codes) for w, _ in weights]
            run = lambda x, w, call=call: call(x, w, pw)  # noqa: E731
            calls[mode] = _pass(table, run, x)
            err[mode] = ((run(x, table[0]).double() - ref).norm() / ref.norm()).item()
        t = side_by_side(calls, min_time)
        out.append({"in": k, "out": n, "batch": m, "int_ms": t["int"]["median"] * 1e3,
                    "float_ms": t["float"]["median"] * 1e3, "int_rel_err": err["int"], "float_rel_err": err["float"]})
        for mode in TABLE_MODES:
            out[-1] |= {f"{mode}_ms": t[mode]["median"] * 1e3, f"{mode}_rel_err": err[mode]}
    return out


# ----------------------------------------------------------------------------- kernel sets

@torch.inference_mode()
def compare_isas(shapes, batches, min_time: float = 0.2) -> list[dict]:
    """The C++ kernel sets this CPU runs (``_C.supported_isas()`` minus the portable one), side by
    side on the same 16 weights per shape: ms per call of ``cpu_linear`` forced to each set, int
    mode, and that its outputs equal the first set's bit for bit (int mode's promise)."""
    isas = [i for i in pyquant.ops._C.supported_isas() if i != "scalar"]
    out = []
    for k, n in shapes:
        weights = [(w, w.su.float(), w.sv.float()) for w in (random_packed(k, n, seed=s) for s in range(N_WEIGHTS))]
        for m in batches:
            x = torch.randn(m, k)
            calls, outputs = {}, {}
            for isa in isas:
                run = lambda x, t, isa=isa: torch.ops.pyquant.cpu_linear(  # noqa: E731
                    x, t[0].codes, t[0].A, t[0].b, t[1], t[2], t[0].w_scale, None, t[0].had_in, t[0].had_out, isa=isa,
                    mode="int")
                calls[isa] = _pass(weights, run, x)
                outputs[isa] = run(x, weights[0])
            t = side_by_side(calls, min_time)
            out.append({"in": k, "out": n, "batch": m, "ms": {i: t[i]["median"] * 1e3 for i in isas},
                        "identical": all(torch.equal(outputs[isas[0]], outputs[i]) for i in isas)})
    return out


# ----------------------------------------------------------------------------- MiniLM

def built_in_mode(qmodel, mode: str):
    """A copy of ``qmodel`` whose layers are built in CPU mode ``mode`` (in "lut" and "lut3" their
    state holds the codes in that mode's layout), or None for a table mode whose kernels this CPU's
    kernel set does not have. (The columns name their mode: the default, "auto", is "lut" on some
    CPUs.)"""
    if mode in ("lut", "lut3") and mode not in TABLE_MODES:
        return None
    before = pyquant.kernels.set_cpu_mode(mode)
    try:
        return copy.deepcopy(qmodel)  # (a layer's copy rebuilds its kernel state)
    finally:
        pyquant.kernels.set_cpu_mode(before)


@torch.inference_mode()
def bench_minilm(batch_sizes=(1, 32), seq_len: int = 128, min_time: float = 2.0) -> list[dict]:
    """MiniLM (all-MiniLM-L6-v2) encode throughput in sentences/s at ``seq_len`` tokens, fp32
    against the same model with its encoder's Linear layers quantized to 2 bits (RTN), measured
    side by side on real sentences padded or cut to exactly ``seq_len`` tokens."""
    from pyquant.evaluation import encoder_filter, load_minilm, tokenize
    from pyquant.sentences import split_sentences

    model, tokenizer = load_minilm()
    qmodel = pyquant.quantize_model(copy.deepcopy(model), pyquant.RTNConfig(bits=2), filter_fn=encoder_filter,
                                    progress=False)
    tables = {mode: built_in_mode(qmodel, mode) for mode in TABLE_MODES}
    qmodel = built_in_mode(qmodel, "int")
    layer = next(m for m in qmodel.modules() if isinstance(m, pyquant.QuantLinear))
    _, sentences = split_sentences(0, max(batch_sizes))
    out = []
    for bs in batch_sizes:
        batch = tokenize(tokenizer, sentences[:bs], max_length=seq_len, padding="max_length")
        calls = {"fp32": lambda: (model(**batch), 1)[1], "pyquant": lambda: (qmodel(**batch), 1)[1]}
        for mode, table in tables.items():
            calls[f"pyquant_{mode}"] = lambda table=table: (table(**batch), 1)[1]
        t = side_by_side(calls, min_time)
        fp32, q = bs / t["fp32"]["median"], bs / t["pyquant"]["median"]
        out.append({"batch": bs, "seq_len": seq_len, "fp32_sentences_per_s": fp32, "pyquant_sentences_per_s": q,
                    "speedup": q / fp32, "backend": layer.last_backend, "rounds": t["fp32"]["rounds"]})
        for mode in tables:
            out[-1][f"pyquant_{mode}_sentences_per_s"] = bs / t[f"pyquant_{mode}"]["median"]
            out[-1][f"{mode}_speedup"] = out[-1][f"pyquant_{mode}_sentences_per_s"] / fp32
    return out


# ----------------------------------------------------------------------------- report

def _fmt(v: float) -> str:
    return f"{v:.3f}" if v < 10 else f"{v:.1f}"


def cpu_id_text(mi: dict) -> str:
    """" (family 25 model 17: Zen 4)", or "" for a report from before session 29 or a CPU without it."""
    if not mi.get("cpu_id"):
        return ""
    return f" ({mi['cpu_id']}" + (f": {mi['cpu_core']})" if mi.get("cpu_core") else ")")


def markdown(report: dict) -> str:
    mi = report["machine"]
    lines = [
        f"# pyquant CPU benchmark ({report['kind']}, {report['date']})", "",
        f"- CPU: {mi['cpu']}{cpu_id_text(mi)} — {mi['logical_cpus']} logical CPUs, {mi['torch_threads']} torch "
        f"threads, " + (f"L1d {mi['l1d']} / L2 {mi['l2']} per core, " if mi.get("l1d") else "") +
        f"L3 {mi['l3']}, memory {mi['memory']}",
        f"- ISA flags: {', '.join(mi['isa_flags'])}; pyquant kernels: {mi['pyquant_isa']} ({mi['pyquant_mode']} mode); "
        f"torch {mi['torch']} ({mi['torch_cpu_capability']})",
        f"- read bandwidth at start: {report['read_bandwidth_gbs']:.1f} GB/s (each row's floor uses the one "
        "measured in its own rounds: read GB/s); load average at start "
        f"{', '.join(f'{v:.1f}' for v in mi['load_average_start'])}, at end "
        f"{', '.join(f'{v:.1f}' for v in report['load_average_end'])}",
        f"- times: median {'CPU' if mi['torch_threads'] == 1 else 'wall-clock'} ms per call over interleaved rounds, "
        "each call on the next of 16 distinct weights "
        "(fewer for dense weights over 64 MiB: see the JSON); speed-up = other / pyquant; floor = pyquant's "
        "stored bytes / read bandwidth; at the floor: x int4 and x bf16 = their ms / floor ms, the speed-ups a "
        "kernel reading at the floor would have (none can read faster)", "",
    ]
    by_shape: dict[tuple, list] = {}
    for row in report["results"]:
        by_shape.setdefault((row["in"], row["out"]), []).append(row)
    for (k, n), rows in by_shape.items():
        modes = [mode for mode in ("lut", "lut3") if f"{mode}_speedup" in rows[0]]
        lut_cols = [f"{mode}{c}" for mode in modes for c in (" / floor", ": x pyquant int", ": x int4", ": x bf16")]
        methods = [m for m in METHODS if m in rows[0]["ms"]]
        ceiling = list(rows[0].get("ceiling", {}))  # (none in reports from before session 29)
        lines += [f"## {k} x {n} (in x out), {rows[0]['pyquant_bytes'] / 2**20:.2f} MiB stored at 2-bit", "",
                  "| batch | " + " | ".join(f"{LABELS[m]} ms" for m in methods) + " | read GB/s | floor ms | "
                  + " | ".join(f"x {m}" for m in OTHERS) + " | pyquant / floor | " + "".join(f"{c} | " for c in lut_cols)
                  + "".join(f"at the floor: x {m} | " for m in ceiling),
                  "|" + "---:|" * (len(methods) + len(OTHERS) + 4 + len(lut_cols) + len(ceiling))]
        for r in rows:
            lines.append(f"| {r['batch']} | " + " | ".join(_fmt(r["ms"][m]) for m in methods)
                         + f" | {r['read_bandwidth_gbs']:.1f} | {_fmt(r['floor_ms'])} | "
                         + " | ".join(f"{r['speedup'][m]:.2f}" for m in OTHERS)
                         + f" | {r['pyquant_over_floor']:.2f} |"
                         + "".join(f" {r[f'{mode}_over_floor']:.2f} | {r[f'{mode}_speedup']['pyquant']:.2f} | "
                                   f"{r[f'{mode}_speedup']['int4']:.2f} | {r[f'{mode}_speedup']['bf16']:.2f} |"
                                   for mode in modes)
                         + "".join(f" {r['ceiling'][m]:.2f} |" for m in ceiling))
        lines.append("")
    if report.get("modes"):
        modes = [mode for mode in ("lut", "lut3") if f"{mode}_ms" in report["modes"][0]]
        named = {"lut": "lut mode (14-bit, table lookups)", "lut3": "lut3 mode (12-bit, triple lookups)"}
        lines += ["## int mode (16-bit fixed-point activations) vs float mode (fp32 activations)"
                  + "".join(f" and {named[mode]}" for mode in modes), "",
                  "Relative error ||y - y_ref|| / ||y_ref|| against format.dequantize + F.linear in fp64.", "",
                  "| shape (in x out) | batch | int ms | float ms | float / int | int rel. error | float rel. error |"
                  + "".join(f" {mode} ms | int / {mode} | {mode} rel. error |" for mode in modes),
                  "|---|---:|---:|---:|---:|---:|---:|" + "---:|---:|---:|" * len(modes)]
        for r in report["modes"]:
            lines.append(f"| {r['in']} x {r['out']} | {r['batch']} | {_fmt(r['int_ms'])} | {_fmt(r['float_ms'])} | "
                         f"{r['float_ms'] / r['int_ms']:.2f} | {r['int_rel_err']:.1e} | {r['float_rel_err']:.1e} |"
                         + "".join(f" {_fmt(r[f'{mode}_ms'])} | {r['int_ms'] / r[f'{mode}_ms']:.2f} | "
                                   f"{r[f'{mode}_rel_err']:.1e} |" for mode in modes))
        lines.append("")
    if report.get("isas"):
        isas = list(report["isas"][0]["ms"])
        lines += ["## Kernel sets side by side (int mode, same weights, same rounds)", "",
                  f"Speed-up of the best set (`{isas[-1]}`, this CPU's default) over each other one.", "",
                  "| shape (in x out) | batch | " + " | ".join(f"{i} ms" for i in isas) + " | "
                  + " | ".join(f"x {i}" for i in isas[:-1]) + " | outputs identical |",
                  "|---|---:|" + "---:|" * (2 * len(isas) - 1) + "---|"]
        for r in report["isas"]:
            lines.append(f"| {r['in']} x {r['out']} | {r['batch']} | " + " | ".join(_fmt(r["ms"][i]) for i in isas)
                         + " | " + " | ".join(f"{r['ms'][i] / r['ms'][isas[-1]]:.2f}" for i in isas[:-1])
                         + f" | {'yes' if r['identical'] else 'NO'} |")
        lines.append("")
    if report.get("minilm"):
        modes = [mode for mode in ("lut", "lut3") if f"{mode}_speedup" in report["minilm"][0]]
        lines += ["## MiniLM (all-MiniLM-L6-v2) encode, 2-bit RTN encoder vs fp32", "",
                  "| batch | seq len | fp32 sentences/s | pyquant sentences/s | speed-up | backend |"
                  + "".join(f" {mode} sentences/s | {mode} speed-up |" for mode in modes),
                  "|---:|---:|---:|---:|---:|---|" + "---:|---:|" * len(modes)]
        for r in report["minilm"]:
            lines.append(f"| {r['batch']} | {r['seq_len']} | {r['fp32_sentences_per_s']:.1f} | "
                         f"{r['pyquant_sentences_per_s']:.1f} | {r['speedup']:.2f} | {r['backend']} |"
                         + "".join(f" {r[f'pyquant_{mode}_sentences_per_s']:.1f} | {r[f'{mode}_speedup']:.2f} |"
                                   for mode in modes))
        lines.append("")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help=f"shapes {QUICK_SHAPES}, batches {QUICK_BATCHES}")
    p.add_argument("--min-time", type=float, default=None, help="seconds per method per row (default 0.3, quick 0.15)")
    p.add_argument("--no-minilm", action="store_true", help="skip the MiniLM end-to-end section")
    p.add_argument("--compare-isas", action="store_true",
                   help="also time every C++ kernel set this CPU runs against each other (same shapes and batches)")
    p.add_argument("--shapes", default=None, help="comma-separated in x out shapes, e.g. 4096x4096,384x1536")
    p.add_argument("--batches", default=None, help="comma-separated batch sizes, e.g. 1,32,128")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    p.add_argument("--out", type=Path, default=RESULTS, help="directory for the JSON and markdown results")
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["--"]:  # `python -m pyquant bench -- --quick` passes the separator through
        argv = argv[1:]
    args = p.parse_args(argv)
    if args.threads is not None:
        if args.threads < 1:
            p.error("--threads must be >= 1")
        torch.set_num_threads(args.threads)
    if not cpu_backend.available():
        raise SystemExit("error: pyquant._C is not built (pip install --no-build-isolation -e .)")
    shapes, batches = (QUICK_SHAPES, QUICK_BATCHES) if args.quick else (SHAPES, BATCHES)
    try:
        if args.shapes:
            shapes = [tuple(int(v) for v in item.split("x")) for item in args.shapes.split(",")]
            if any(len(sh) != 2 or min(sh) <= 0 or sh[0] % 128 for sh in shapes):
                raise ValueError
        if args.batches:
            batches = [int(v) for v in args.batches.split(",")]
            if min(batches) <= 0:
                raise ValueError
    except ValueError:
        p.error("--shapes takes IN x OUT pairs with IN a multiple of 128 (int4's group); --batches positive ints")
    min_time = args.min_time if args.min_time is not None else (0.15 if args.quick else 0.3)
    kind = "custom" if args.shapes or args.batches else "quick" if args.quick else "full"
    kind = f"{kind}_{torch.get_num_threads()}t"

    report = {"kind": kind, "date": datetime.datetime.now().isoformat(timespec="seconds"), "machine": machine_info()}
    report["read_bandwidth_gbs"] = measure_read_bandwidth() / 1e9
    report["results"] = []
    with tqdm(total=len(shapes) * len(batches), desc="cpu bench", unit="row") as progress:
        for k, n in shapes:
            progress.set_postfix_str(f"{k}x{n}")
            report["results"] += bench_shape(k, n, batches, min_time, progress)
    report["modes"] = []
    for k, n in tqdm(shapes[:2], desc="int vs float", unit="shape"):
        report["modes"] += int_vs_float(k, n, min_time=min_time)
    if args.compare_isas:
        report["isas"] = compare_isas(shapes, batches, min_time=min_time)
    if not args.no_minilm:
        print("MiniLM end to end ...", file=sys.stderr)
        report["minilm"] = bench_minilm(min_time=1.0 if args.quick else 2.0)
    report["load_average_end"] = os.getloadavg()

    md = markdown(report)
    print(md)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"cpu_{kind}.json").write_text(json.dumps(report, indent=1) + "\n")
    (args.out / f"cpu_{kind}.md").write_text(md + "\n")
    print(f"wrote {args.out / f'cpu_{kind}.json'} and .md", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
