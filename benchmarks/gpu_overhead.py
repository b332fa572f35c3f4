"""Host-side cost of one eager QuantLinear call on a GPU, per backend, and where the Triton
backend's host time goes.

    python benchmarks/gpu_overhead.py [--n 4096] [--k 4096] [--calls 300] [--top 25]

For each GPU backend (forced in turn) at batch 1: the mean wall time per call over ``--calls``
back-to-back calls (synchronised once at the end, so it is the launch-bound rate when the host is
slower than the GPU) next to the same layer's CUDA-graph replay. Then a cProfile of the Triton
calls, the ``--top`` functions by their own time: the eager Triton path is many times its graph
replay (gpu_suite), and this says which Python code the difference is. Exits 0 with a message
when no CUDA GPU is present.
"""
from __future__ import annotations

import argparse
import cProfile
import io
import pstats
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def per_call_us(fn, calls: int) -> float:
    for _ in range(10):
        fn()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(calls):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - t0) / calls * 1e6


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=4096, help="out features")
    p.add_argument("--k", type=int, default=4096, help="in features")
    p.add_argument("--calls", type=int, default=300)
    p.add_argument("--top", type=int, default=25)
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        print("gpu_overhead: no CUDA GPU in this process; nothing to measure.")
        return 0

    from gpu_suite import graph_of, random_weight
    from pyquant import QuantLinear, kernels

    layer = QuantLinear.from_packed(random_weight(args.n, args.k, "cuda"))
    x = torch.randn(1, args.k, device="cuda", dtype=torch.float16)
    print(f"gpu_overhead: {torch.cuda.get_device_name()}, layer {args.n} x {args.k} (out x in), batch 1, fp16")
    for backend in [b for b in kernels.available_backends() if b in ("cuda", "triton")]:
        def call(backend=backend):
            with kernels.force_backend(backend), torch.no_grad():
                return layer(x)
        eager = per_call_us(call, args.calls)
        graph = per_call_us(graph_of(call), args.calls)
        print(f"  {backend:7s} eager {eager:8.1f} us/call   graph replay {graph:8.1f} us/call")
        if backend == "triton":
            prof = cProfile.Profile()
            prof.enable()
            for _ in range(args.calls):
                call()
            torch.cuda.synchronize()
            prof.disable()
            s = io.StringIO()
            pstats.Stats(prof, stream=s).sort_stats("tottime").print_stats(args.top)
            print(s.getvalue())
    return 0


if __name__ == "__main__":
    sys.exit(main())
