"""What serving a fused layer as one kernel per partition costs (pyquant.tp; the vLLM method).

    python benchmarks/fused_partitions.py

Llama-2-7B's ``qkv_proj`` (q, k, v: 4096 -> 4096 each, each with its own codebook and ``su``)
run as vLLM runs it, three kernels on the shared input and a concatenation, against one
4096 -> 12288 layer (what a codebook shared across the group at quantization time would allow),
and ``gate_up_proj`` (2 x 4096 -> 11008) likewise; 8 distinct weight sets cycled (more than the
last-level cache), medians of interleaved rounds, all in one process. Prints a markdown table.
"""
from __future__ import annotations

import statistics
import time

import torch
from torch import nn

import pyquant
from pyquant import tp
from pyquant.format import PACKED_TENSORS
from pyquant.io import layer_entry

SETS, ROUNDS, CALLS = 8, 7, 40


def quantized(k: int, n: int, seed: int) -> pyquant.QuantLinear:
    torch.manual_seed(seed)
    return pyquant.QuantLinear.from_linear(nn.Linear(k, n, bias=False), pyquant.RTNConfig(seed=seed))


def partitions(k: int, rows: list[int], seed: int) -> list[pyquant.QuantLinear]:
    """The partitions as the vLLM method builds them: loaded into one fused set of tensors."""
    parts = [quantized(k, n, seed + i) for i, n in enumerate(rows)]
    shard = tp.Shard.column("fused", [layer_entry(p) for p in parts], rows, [0] * len(rows))
    tensors = shard.empty()
    for i, p in enumerate(parts):
        for name in PACKED_TENSORS:
            shard.load(tensors, name, getattr(p, name), i)
    return shard.layers(tensors)


def timed(fn, xs) -> float:
    t0 = time.perf_counter()
    for i in range(CALLS):
        fn(i % SETS, xs[i % SETS])
    return (time.perf_counter() - t0) / CALLS * 1e3


def main() -> None:
    torch.set_num_threads(torch.get_num_threads())
    print(f"threads {torch.get_num_threads()}, CPU mode {pyquant.ops._C.get_mode()}, {SETS} weight sets cycled, "
          f"ms per call (median of {ROUNDS})\n")
    print("| layer | batch | one kernel per partition ms | one fused kernel ms | ratio |")
    print("|---|---:|---:|---:|---:|")
    for label, k, rows in (("qkv_proj 3 x 4096x4096", 4096, [4096] * 3), ("gate_up_proj 2 x 4096x11008", 4096, [11008] * 2)):
        split = [partitions(k, rows, 100 * s) for s in range(SETS)]
        whole = [quantized(k, sum(rows), 100 * s + 50) for s in range(SETS)]
        for batch in (1, 8):
            xs = [torch.randn(batch, k, dtype=torch.bfloat16) for _ in range(SETS)]
            a, b = [], []
            with torch.no_grad():
                for fn in (lambda i, x: tp.forward(split[i], x), lambda i, x: whole[i](x)):
                    timed(fn, xs)  # warm-up
                for _ in range(ROUNDS):
                    a.append(timed(lambda i, x: tp.forward(split[i], x), xs))
                    b.append(timed(lambda i, x: whole[i](x), xs))
            ma, mb = statistics.median(a), statistics.median(b)
            print(f"| {label} | {batch} | {ma:.3f} | {mb:.3f} | {ma / mb:.2f} |", flush=True)


if __name__ == "__main__":
    main()
