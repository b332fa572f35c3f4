#!/usr/bin/env python
"""Eager and compiled speed of QuantLinear and of the 2-bit MiniLM, side by side in one process.

    python benchmarks/compile_bench.py [--before f16aa24] [--out benchmarks/results]

1. Per-call time of a 384x384 batch-1 ``QuantLinear`` (the Python + dispatch overhead a small
   layer pays), eager, under ``torch.no_grad`` and with gradients enabled (bias and input frozen).
   ``--before REF`` also builds the package as of git revision ``REF`` (a worktree under
   /tmp, its C++ extension built in place, imported as ``pyquant_before``) and times its layer
   in the same interleaved rounds: the before/after comparison.
2. MiniLM (all-MiniLM-L6-v2, real weights; encoder Linear layers 2-bit RTN) encode time at
   batch 1 and 32 (128 tokens): fp32 eager, fp32 ``torch.compile``, 2-bit eager, 2-bit
   compiled (``fullgraph=True``), all under ``torch.no_grad``. Two ways, each interleaved:
   warm, a sample being as many back-to-back encodes of one model as take ~0.25 s (at most
   ``--warm-calls``; a server encoding one request after another), and cold, a sample being one
   encode right after the other three models ran (their weights, 42 MB in fp32, have pushed this
   one's out of the caches). Where the CPU's kernel set has table-lookup kernels
   (``_C.has_lut_kernel()``), the 2-bit model built in mode "lut" too (eager and compiled).

Times are medians over interleaved rounds (``suite.side_by_side``); only ratios within one run
mean anything on a machine whose memory bandwidth drifts. Writes ``compile_bench.{json,md}``.
"""
from __future__ import annotations

import argparse
import copy
import datetime
import importlib
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import suite  # noqa: E402

import pyquant  # noqa: E402
from pyquant.evaluation import encoder_filter, load_minilm, tokenize  # noqa: E402
from pyquant.sentences import split_sentences  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def build_before(ref: str) -> Path:
    """A directory holding package ``pyquant_before``: pyquant as of ``ref``, built in place."""
    work = Path("/tmp") / f"pyquant_before_{ref}"
    pkg = work / "site" / "pyquant_before"
    if pkg.is_dir():
        return pkg.parent
    tree = work / "tree"
    if not tree.is_dir():
        subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", str(tree), ref], check=True)
    if "TORCH_LIBRARY(pyquant" in (tree / "csrc" / "cpu" / "module.cpp").read_text():
        raise SystemExit(f"--before {ref}: that revision registers the pyquant op library, which this process "
                         "registers already (torch allows one per namespace); compare with a revision from before "
                         "the ops (f16aa24 or older), or run this benchmark at each revision")
    subprocess.run([sys.executable, "setup.py", "build_ext", "--inplace"], cwd=tree, check=True,
                   env={**__import__("os").environ, "PYQUANT_NO_CUDA": "1"}, stdout=subprocess.DEVNULL)
    shutil.copytree(tree / "pyquant", pkg)
    for f in pkg.rglob("*.py"):  # absolute module names inside the old package
        f.write_text(f.read_text().replace('"pyquant.backends', '"pyquant_before.backends'))
    return pkg.parent


def layer_calls(before: str | None, min_time: float) -> dict:
    from conftest import random_packed  # tests/conftest.py: a random packed weight

    pw = random_packed(384, 384)
    bias = torch.randn(384)
    layers = {"after": pyquant.QuantLinear.from_packed(pw, bias)}
    if before:
        sys.path.insert(0, str(build_before(before)))
        old = importlib.import_module("pyquant_before")
        old_pw = old.PackedWeight(pw.codes, pw.A, pw.b, pw.su, pw.sv, pw.w_scale, had_in=pw.had_in, had_out=pw.had_out)
        layers["before"] = old.QuantLinear.from_packed(old_pw, bias)
    x = torch.randn(1, 384)
    reps = 200

    def calls_of(layer):
        def run():
            for _ in range(reps):
                layer(x)
            return reps
        return run

    out = {}
    for grad in (False, True):
        for layer in layers.values():
            layer.bias.requires_grad_(grad)
        with torch.set_grad_enabled(grad):
            t = suite.side_by_side({name: calls_of(layer) for name, layer in layers.items()}, min_time)
        out["grad" if grad else "no_grad"] = {name: v["median"] * 1e6 for name, v in t.items()}
    out["backends"] = {name: layer.last_backend for name, layer in layers.items()}
    return out


def minilm(batch_sizes, seq_len: int | None, min_time: float, warm_calls: int) -> list[dict]:
    model, tok = load_minilm()
    qmodel = pyquant.quantize_model(copy.deepcopy(model), pyquant.RTNConfig(bits=2), filter_fn=encoder_filter,
                                    progress=False)
    qmodel, lut = suite.built_in_mode(qmodel, "int"), suite.built_in_mode(qmodel, "lut")
    _, sentences = split_sentences(0, max(batch_sizes))
    rows = []
    for bs in batch_sizes:
        batch = (tokenize(tok, sentences[:bs]) if seq_len is None  # real lengths, padded to the longest
                 else tokenize(tok, sentences[:bs], max_length=seq_len, padding="max_length"))
        torch._dynamo.reset()
        variants = {"fp32": model, "fp32_compiled": torch.compile(model),
                    "2bit": qmodel, "2bit_compiled": torch.compile(qmodel, fullgraph=True)}
        if lut is not None:
            variants |= {"2bit_lut": lut, "2bit_lut_compiled": torch.compile(lut, fullgraph=True)}
        with torch.no_grad():
            out = {name: m(**batch).last_hidden_state for name, m in variants.items()}  # compiles
            start = time.perf_counter()
            variants["fp32"](**batch)
            calls = max(2, min(warm_calls, int(0.25 / (time.perf_counter() - start))))  # ~0.25 s per warm sample
            warm = suite.side_by_side({name: (lambda m=m: [m(**batch) for _ in range(calls)] and calls)
                                       for name, m in variants.items()}, min_time)
            cold = suite.side_by_side({name: (lambda m=m: (m(**batch), 1)[1]) for name, m in variants.items()},
                                      min_time)
        row = {"batch": bs, "tokens": int(batch["input_ids"].shape[1]), "warm_calls": calls,
               **{f"{n}_ms": v["median"] * 1e3 for n, v in warm.items()},
               **{f"{n}_cold_ms": v["median"] * 1e3 for n, v in cold.items()}, "rounds": warm["fp32"]["rounds"],
               # compiled against eager of the same model: what compiling changes
               "fp32_compiled_rel_err": suite_rel(out["fp32_compiled"], out["fp32"]),
               "2bit_compiled_rel_err": suite_rel(out["2bit_compiled"], out["2bit"])}
        row["2bit_compiled_x_fp32_compiled_cold"] = row["fp32_compiled_cold_ms"] / row["2bit_compiled_cold_ms"]
        row["2bit_compiled_x_fp32_compiled"] = row["fp32_compiled_ms"] / row["2bit_compiled_ms"]
        row["2bit_x_fp32"] = row["fp32_ms"] / row["2bit_ms"]
        if lut is not None:
            row["2bit_lut_rel_err"] = suite_rel(out["2bit_lut"], out["2bit"])  # against int mode
            row["2bit_lut_compiled_x_fp32_compiled"] = row["fp32_compiled_ms"] / row["2bit_lut_compiled_ms"]
            row["2bit_lut_compiled_x_fp32_compiled_cold"] = (row["fp32_compiled_cold_ms"]
                                                             / row["2bit_lut_compiled_cold_ms"])
            row["2bit_lut_x_fp32"] = row["fp32_ms"] / row["2bit_lut_ms"]
        rows.append(row)
        print(row, flush=True)
    return rows


def suite_rel(a, b) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def markdown(report: dict) -> str:
    mi = report["machine"]
    lc = report["layer_call"]
    lines = [f"# QuantLinear call overhead and compiled MiniLM ({report['date']})", "",
             f"- CPU: {mi['cpu']} — {mi['logical_cpus']} logical CPUs, {mi['torch_threads']} torch threads; "
             f"torch {mi['torch']}; load average at start {mi['load_average_start']}",
             f"- Command: `{report['command']}`", "",
             "## 384x384 QuantLinear, batch 1, eager (µs per call, median of interleaved rounds)", "",
             "| mode | " + " | ".join(k for k in lc["no_grad"]) + " |",
             "|---|" + "---:|" * len(lc["no_grad"])]
    for mode in ("no_grad", "grad"):
        lines.append(f"| {mode} | " + " | ".join(f"{v:.1f}" for v in lc[mode].values()) + " |")
    lines += ["", f"Backends: {lc['backends']}.", "",
              "## MiniLM encode, torch.no_grad (ms per batch)", "",
              "Warm: back-to-back encodes of one model per sample (as many as take ~0.25 s, at most `--warm-calls`: "
              + ", ".join(f"{r['warm_calls']} at batch {r['batch']} x {r['tokens']}" for r in report["minilm"])
              + "); cold: one encode per sample, right after the other models.", "",
              "| batch | tokens | fp32 eager | fp32 compiled | 2-bit eager | 2-bit compiled | 2-bit compiled × fp32 "
              "compiled | 2-bit eager × fp32 eager | cold: fp32 compiled / 2-bit compiled (×) | compiled vs eager "
              "rel. err (fp32 / 2-bit) |",
              "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in report["minilm"]:
        lines.append(f"| {r['batch']} | {r['tokens']} | {r['fp32_ms']:.2f} | {r['fp32_compiled_ms']:.2f} | "
                     f"{r['2bit_ms']:.2f} | {r['2bit_compiled_ms']:.2f} | {r['2bit_compiled_x_fp32_compiled']:.2f} | "
                     f"{r['2bit_x_fp32']:.2f} | {r['fp32_compiled_cold_ms']:.2f} / {r['2bit_compiled_cold_ms']:.2f} "
                     f"({r['2bit_compiled_x_fp32_compiled_cold']:.2f}) | "
                     f"{r['fp32_compiled_rel_err']:.1e} / {r['2bit_compiled_rel_err']:.1e} |")
    if "2bit_lut_ms" in report["minilm"][0]:
        lines += ["", "### The 2-bit model in mode \"lut\" (same rounds as above)", "",
                  "| batch | tokens | lut eager | lut compiled | lut compiled × fp32 compiled | lut eager × fp32 eager "
                  "| cold: fp32 compiled / lut compiled (×) | lut vs int mode rel. err |",
                  "|---:|---:|---:|---:|---:|---:|---:|---:|"]
        for r in report["minilm"]:
            lines.append(f"| {r['batch']} | {r['tokens']} | {r['2bit_lut_ms']:.2f} | {r['2bit_lut_compiled_ms']:.2f} | "
                         f"{r['2bit_lut_compiled_x_fp32_compiled']:.2f} | {r['2bit_lut_x_fp32']:.2f} | "
                         f"{r['fp32_compiled_cold_ms']:.2f} / {r['2bit_lut_compiled_cold_ms']:.2f} "
                         f"({r['2bit_lut_compiled_x_fp32_compiled_cold']:.2f}) | {r['2bit_lut_rel_err']:.1e} |")
    lines += ["", "tokens: sequence length of the batch (real sentences padded to the longest in the batch, or "
              "to `--seq-len`)."]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--before", help="git revision to time the layer call of, side by side (e.g. f16aa24)")
    p.add_argument("--batches", type=int, nargs="+", default=[1, 32])
    p.add_argument("--seq-len", type=int, nargs="*", default=[0, 128],
                   help="token counts to pad to; 0 = the sentences' own lengths (padded to the batch's longest)")
    p.add_argument("--min-time", type=float, default=2.0, help="seconds per method per table row (at least)")
    p.add_argument("--warm-calls", type=int, default=100, help="back-to-back encodes per warm sample, at most")
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    args = p.parse_args(argv)
    sys.path.insert(0, str(ROOT / "tests"))
    report = {"date": datetime.datetime.now().isoformat(timespec="seconds"), "machine": suite.machine_info(),
              "command": "python benchmarks/compile_bench.py " + " ".join(argv if argv is not None else sys.argv[1:])}
    report["layer_call"] = layer_calls(args.before, min(args.min_time, 1.0))
    print(report["layer_call"], flush=True)
    report["minilm"] = [row for seq in args.seq_len
                        for row in minilm(args.batches, seq or None, args.min_time, args.warm_calls)]
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "compile_bench.json").write_text(json.dumps(report, indent=1))
    (args.out / "compile_bench.md").write_text(markdown(report))
    print(markdown(report))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
