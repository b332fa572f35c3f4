"""GPU benchmark: pyquant's Triton (and CUDA) kernels against cuBLAS ``F.linear``.

    python benchmarks/gpu_suite.py [--out benchmarks/results] [--quick] [--shapes 8192x28672,...] [--batches 1 16 512]

Layers ``N x K`` = out x in features: 4096x4096, 8192x8192, 8192x28672 (out
8192, in 28672: a 70B-class MLP down projection) and 28672x8192 (out 28672, in
8192: its up/gate projection); batch (tokens) 1, 4, 8, 16, 32, 64, 128, 512. Random packed weights (timing does not depend
on the values) with the default 128-wide Hadamard blocks on both sides.

Each time is the median of ``triton.testing.do_bench``, which clears L2 before
every call, so weights come from HBM as in a real model. Columns:

- cuBLAS fp16 / bf16: ``F.linear`` with the dense dequantized weight;
- triton: a ``QuantLinear`` forced to the Triton backend (the whole
  layer: activation transform, GEMV/GEMM, output transform; deterministic
  reduction), launched from Python as a model would;
- triton graph: the same call replayed from a CUDA graph (no Python launch
  overhead: what a graph-captured decoder sees);
- triton atomic (batch <= 16): split-K with atomics instead of the fixed-order sum;
- cuda (when the CUDA extension is built): ``pyquant.kernels.force_backend("cuda")``.

Speed-ups are cuBLAS fp16 time / method time. ``pyquant.kernels.tune`` tunes each
shape and batch before it is timed (cached on disk, see ``pyquant.triton_kernels.autotune``).
Writes ``gpu_<gpu name>.json`` and ``.md`` to ``--out``. Exits 0 with a message
when no CUDA GPU is present.
"""
from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import re
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

SHAPES = [(4096, 4096), (8192, 8192), (8192, 28672), (28672, 8192)]  # (N, K) = (out, in)
BATCHES = [1, 4, 8, 16, 32, 64, 128, 512]
# Acceptance targets of the issue: speed-up over cuBLAS fp16 per (shape, batch).
TARGETS = {((8192, 28672), 1): 5.0, ((28672, 8192), 1): 5.0,
           ((8192, 28672), 16): 3.0, ((28672, 8192), 16): 3.0,
           **{(s, 512): 1.0 for s in SHAPES}}


def random_weight(n: int, k: int, device: str, seed: int = 0):
    """A packed weight with random codes and a rotated uniform 2-bit codebook."""
    from pyquant.format import PackedWeight
    from pyquant.hadamard import default_block

    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(4, 4, generator=g))
    signs = lambda d: torch.where(torch.rand(d, generator=g) < 0.5, -1.0, 1.0)  # noqa: E731
    return PackedWeight(
        codes=torch.randint(0, 256, (n, k // 4), generator=g, dtype=torch.uint8),
        A=q / math.sqrt(1.25), b=-1.5 * q.sum(1) / math.sqrt(1.25),
        su=((torch.rand(k, generator=g) + 0.5) * signs(k)).half(),
        sv=((torch.rand(n, generator=g) + 0.5) * signs(n)).half(),
        w_scale=torch.tensor(0.02), had_in=default_block(k), had_out=default_block(n),
    ).validate().to(device)


def bench(fn) -> float:
    """Median milliseconds, L2 cleared before each call."""
    import triton.testing

    return float(triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median"))


def graph_of(fn):
    """``fn`` captured in a CUDA graph (after warm-up on a side stream), or the error."""
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        fn()
    return g.replay


def rel_err(y: torch.Tensor, ref: torch.Tensor) -> float:
    return ((y.double() - ref.double()).norm() / ref.double().norm()).item()


def run_shape(n: int, k: int, batches: list[int], use_graph: bool, log, device: str = "cuda",
              timer=bench) -> list[dict]:
    """One layer shape at every batch. ``device``/``timer`` let the logic be
    exercised on CPU through the Triton interpreter (no meaningful times)."""
    from pyquant import QuantLinear, kernels
    from pyquant.backends import triton as triton_backend
    from pyquant.format import dequantize

    pw = random_weight(n, k, device)
    w32 = dequantize(pw)
    w16, wbf = w32.half(), w32.bfloat16()
    has_cuda_backend = "cuda" in kernels.available_backends()
    rows = []
    for m in batches:
        x = torch.randn(m, k, device=device, dtype=torch.float16)
        xb = x.bfloat16()
        row = {"N": n, "K": k, "batch": m}
        row["cublas_fp16_ms"] = timer(lambda: F.linear(x, w16))
        row["cublas_bf16_ms"] = timer(lambda: F.linear(xb, wbf))
        ref = F.linear(x.float(), w32)

        layer = QuantLinear.from_packed(pw)
        kernels.tune(layer, batch_sizes=(m,), dtype=x.dtype)

        def pyquant_call(backend):
            def call():
                with kernels.force_backend(backend), torch.no_grad():
                    return layer(x)
            return call

        variants = [("triton", "triton", "deterministic")]
        if m <= 16:
            variants.append(("triton_atomic", "triton", "atomic"))
        if has_cuda_backend:
            variants.append(("cuda", "cuda", None))
        for name, backend, reduction in variants:
            if reduction is not None:
                triton_backend.set_reduction(reduction)
            try:
                call = pyquant_call(backend)
                y = call()
                row[f"{name}_rel_err"] = rel_err(y, ref)
                row[f"{name}_ms"] = timer(call)
                if use_graph and name != "triton_atomic":
                    try:
                        row[f"{name}_graph_ms"] = timer(graph_of(call))
                    except Exception as e:  # report, keep the eager number
                        row[f"{name}_graph_error"] = f"{type(e).__name__}: {e}"
            except Exception as e:
                row[f"{name}_error"] = f"{type(e).__name__}: {e}"
                log(f"  {name} failed at N={n} K={k} batch={m}: {row[f'{name}_error']}")
            finally:
                triton_backend.set_reduction("deterministic")
        rows.append(row)
        log(f"  N={n} K={k} batch={m}: " + ", ".join(
            f"{key[:-3]} {v * 1e3:.1f}us" for key, v in row.items() if key.endswith("_ms")))
    del w32, w16, wbf, pw
    if device == "cuda":
        torch.cuda.empty_cache()
    return rows


COLUMNS = [("cublas_fp16_ms", "cuBLAS fp16"), ("cublas_bf16_ms", "cuBLAS bf16"), ("triton_ms", "triton"),
           ("triton_graph_ms", "triton graph"), ("triton_atomic_ms", "triton atomic"),
           ("cuda_ms", "cuda"), ("cuda_graph_ms", "cuda graph")]


def markdown(meta: dict, rows: list[dict]) -> str:
    cols = [(k, t) for k, t in COLUMNS if any(k in r for r in rows)]
    head = ["N x K (out x in)", "batch"] + [f"{t} us" for _, t in cols] + \
           [f"x {t}" for k, t in cols if k not in ("cublas_fp16_ms",)]
    lines = [f"# pyquant GPU suite: {meta['gpu']}", "",
             f"{meta['date']}; torch {meta['torch']}, triton {meta['triton']}, CUDA {meta['cuda']}; "
             "median of triton.testing.do_bench (L2 cleared before each call); "
             "speed-up = cuBLAS fp16 time / method time; fp16 activations.", "",
             "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        base = r["cublas_fp16_ms"]
        cells = [f"{r['N']} x {r['K']}", str(r["batch"])]
        cells += [f"{r[k] * 1e3:.1f}" if k in r else "-" for k, _ in cols]
        cells += [f"{base / r[k]:.2f}" if k in r else "-" for k, _ in cols if k != "cublas_fp16_ms"]
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", "Targets (speed-up of `triton` over cuBLAS fp16; graph replay in brackets):", ""]
    for ((n, k), m), target in TARGETS.items():
        r = next((r for r in rows if (r["N"], r["K"], r["batch"]) == (n, k, m)), None)
        if r is None or "triton_ms" not in r:
            continue
        eager = r["cublas_fp16_ms"] / r["triton_ms"]
        graph = r["cublas_fp16_ms"] / r["triton_graph_ms"] if "triton_graph_ms" in r else float("nan")
        ok = "met" if eager >= target else "met in graph replay only" if graph >= target else "MISSED"
        lines.append(f"- {n} x {k}, batch {m}: target {target:g}x, reached {eager:.2f}x ({graph:.2f}x) -> {ok}")
    errs = [r[k] for r in rows for k in r if k.endswith("_error")]
    if errs:
        lines += ["", "Errors:", ""] + [f"- {e}" for e in errs]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description="pyquant GPU benchmark (Triton/CUDA vs cuBLAS)")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results"), help="directory for the JSON and md")
    p.add_argument("--quick", action="store_true", help="4096x4096 only, batches 1, 16, 512")
    p.add_argument("--batches", type=int, nargs="+", default=None)
    p.add_argument("--shapes", default=None,
                   help="comma-separated N x K (out x in) layers, e.g. 8192x28672,28672x8192 (default: all four)")
    p.add_argument("--no-graph", action="store_true", help="skip the CUDA-graph replay columns")
    args = p.parse_args(argv)

    if not torch.cuda.is_available():
        print("gpu_suite: no CUDA GPU in this process (torch.cuda.is_available() is False); "
              "nothing to benchmark. Run it on a machine with an NVIDIA GPU.")
        return 0
    try:
        import triton
    except ImportError:
        print("gpu_suite: triton is not installed; the Triton backend cannot run.")
        return 0

    shapes = SHAPES[:1] if args.quick else SHAPES
    if args.shapes:
        try:
            shapes = [tuple(int(d) for d in s.lower().split("x")) for s in args.shapes.split(",")]
        except ValueError:
            p.error(f"--shapes: expected NxK[,NxK...], got {args.shapes!r}")
        if any(len(s) != 2 or min(s) <= 0 or s[1] % 4 for s in shapes):
            p.error(f"--shapes: each entry must be two positive numbers N x K with K a multiple of 4, got {args.shapes!r}")
    batches = args.batches or ([1, 16, 512] if args.quick else BATCHES)
    gpu = torch.cuda.get_device_name()
    meta = {"gpu": gpu, "date": datetime.datetime.now().isoformat(timespec="seconds"),
            "torch": torch.__version__, "triton": triton.__version__, "cuda": torch.version.cuda,
            "host": platform.node(), "sms": torch.cuda.get_device_properties(0).multi_processor_count,
            "shapes_are": "N x K = out_features x in_features", "activations": "fp16",
            "timer": "triton.testing.do_bench median, L2 flushed"}
    print(f"gpu_suite on {gpu}: shapes {shapes}, batches {batches}", flush=True)
    rows = []
    for n, k in shapes:
        rows += run_shape(n, k, batches, not args.no_graph, lambda s: print(s, flush=True))

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = "gpu_" + re.sub(r"[^A-Za-z0-9._-]+", "_", gpu).strip("_")
    (out / f"{stem}.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    md = markdown(meta, rows)
    (out / f"{stem}.md").write_text(md)
    print(md)
    print(f"wrote {out / (stem + '.json')} and {out / (stem + '.md')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
