"""Mode "lut3" against int mode, layer calls side by side (csrc/cpu/kernel_api.h's triple lookups).

    python benchmarks/lut3_bench.py [--threads 1 2] [--batches 1 2 4 8] [--shapes 4096x4096 ...]

Per shape (in x out), thread count and batch: the median ms of ``frozen_linear`` (int mode, the
default on AVX-512 CPUs) and of ``lut3_linear`` on the same random layers, each call on the next of
16 distinct layers (codes from memory, as in a model), rounds interleaved; and the relative error
of both against fp64. Prints a markdown table; only ratios within one run mean anything.
"""
import argparse
import time

import torch

from pyquant.ops import _C

PARAMS_HEAD = 32


def layers(n_out: int, k: int, count: int):
    out = []
    for i in range(count):
        g = torch.Generator().manual_seed(i)
        codes = torch.randint(0, 256, (n_out, k // 4), dtype=torch.uint8, generator=g)
        A = torch.eye(4) + 0.3 * torch.randn(4, 4, generator=g)
        b = 0.1 * torch.randn(4, generator=g)
        su = torch.randn(k, generator=g).sign()
        sv = torch.randn(n_out, generator=g).sign()
        head = torch.zeros(PARAMS_HEAD)
        head[:16], head[16:20], head[20] = A.reshape(16), b, 0.02
        params = torch.cat([head, su, sv])
        out.append((codes, _C.pack_lut3_codes(codes), params, (A, b, su, sv)))
    return out


def median_ms(fn, calls: int) -> float:
    times = []
    for i in range(calls):
        t0 = time.perf_counter()
        fn(i)
        times.append(time.perf_counter() - t0)
    times.sort()
    return 1e3 * times[len(times) // 2]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--threads", type=int, nargs="+", default=[2, 1])
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 2, 4, 8])
    ap.add_argument("--shapes", nargs="+", default=["4096x4096", "4096x11008", "11008x4096", "384x1536"])
    ap.add_argument("--rounds", type=int, default=5)
    args = ap.parse_args()
    print(f"kernel set {_C.get_isa()}, own lut3 kernel: {_C.has_lut3_kernel()}, torch {torch.__version__}\n")
    print("| in x out | threads | batch | int ms | lut3 ms | lut3 speed-up | int rel. err | lut3 rel. err |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    with torch.inference_mode():
        for shape in args.shapes:
            k, n_out = map(int, shape.split("x"))
            ls = layers(n_out, k, 16)
            for threads in args.threads:
                torch.set_num_threads(threads)
                for m in args.batches:
                    x = torch.randn(m, k, generator=torch.Generator().manual_seed(99))
                    int_call = lambda i: torch.ops.pyquant.frozen_linear(x, ls[i % 16][0], ls[i % 16][2], 0, 0)
                    lut3_call = lambda i: torch.ops.pyquant.lut3_linear(x, ls[i % 16][0], ls[i % 16][1], ls[i % 16][2], 0,
                                                                        0)
                    int_call(0), lut3_call(0)
                    t_int, t_lut3 = [], []
                    for _ in range(args.rounds):
                        t_int.append(median_ms(int_call, 48))
                        t_lut3.append(median_ms(lut3_call, 48))
                    ti, tl = sorted(t_int)[len(t_int) // 2], sorted(t_lut3)[len(t_lut3) // 2]
                    codes, _, params, (A, b, su, sv) = ls[0]
                    ref = torch.ops.pyquant.cpu_linear(x.double().float(), codes, A, b, su, sv, torch.tensor(0.02),
                                                       None, 0, 0, isa="scalar", mode="float").double()
                    err = lambda y: ((y.double() - ref).norm() / ref.norm()).item()
                    print(f"| {k} x {n_out} | {threads} | {m} | {ti:.3f} | {tl:.3f} | {ti / tl:.2f} | "
                          f"{err(int_call(0)):.1e} | {err(lut3_call(0)):.1e} |", flush=True)


if __name__ == "__main__":
    main()
