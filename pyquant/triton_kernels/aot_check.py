"""Compile every kernel variant for NVIDIA targets without a GPU.

``python -m pyquant.triton_kernels.aot_check [--arch 80 90] [--quick]`` lowers each kernel
through Triton's full pipeline (TTIR -> TTGIR -> LLVM -> PTX -> cubin with ptxas)
for the given compute capabilities. It catches what the interpreter cannot:
layout, shape and dtype errors that only the GPU compiler raises. Must run
without ``TRITON_INTERPRET=1`` (the compiler needs the compiled-mode functions).
"""
from __future__ import annotations

import argparse
import itertools
import sys
import time

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from . import autotune, gemm_dequant, gemv_splitk, transform
from .common import interpreted, log2


def _variants(quick: bool):
    """(name, kernel, signature, constexprs, options) for the variants the backend launches."""
    ptr = lambda t: f"*{t}"  # noqa: E731
    tr = transform._input_transform_kernel
    for had, apply_a, xdt in [(128, True, "fp16"), (0, True, "bf16"), (4096, False, "fp32"), (1, False, "fp16")]:
        tile = max(had, transform.DEFAULT_TILE)
        sig = {"x_ptr": ptr(xdt), "su_ptr": "*fp16", "a_ptr": "*fp32", "b_ptr": "*fp32",
               "out_ptr": "*fp32" if apply_a else ptr(xdt), "cpart_ptr": "*fp32",
               "K": "i32", "n_tiles": "i32", "stride_xm": "i32", "stride_om": "i32"}
        ce = {"TILE": tile, "LOG2_HAD": log2(had), "HAD_SCALE": had ** -0.5 if had else 1.0,
              "HAS_HAD": had > 0, "APPLY_A": apply_a}
        yield f"input_transform had={had} A={apply_a} x={xdt}", tr, sig, ce, {"num_warps": transform._warps(tile)}
    ot = transform._output_transform_kernel
    for had, has_const, odt in [(128, True, "fp16"), (4096, False, "bf16"), (0, True, "fp32")]:
        block = max(had, transform.DEFAULT_TILE)
        sig = {"part_ptr": "*fp32", "n_split": "i32", "cpart_ptr": "*fp32", "n_ctiles": "i32", "ws_ptr": "*fp32",
               "sv_ptr": "*fp32", "bias_ptr": ptr(odt), "out_ptr": ptr(odt), "M": "i32", "N": "i32", "stride_om": "i32"}
        ce = {"BLOCK": block, "CTILES": 32, "LOG2_HAD": log2(had), "HAD_SCALE": had ** -0.5 if had else 1.0,
              "HAS_HAD": had > 0, "HAS_CONST": has_const, "HAS_BIAS": True}
        yield f"output_transform had={had} const={has_const} out={odt}", ot, sig, ce, {"num_warps": transform._warps(block)}
    gv = gemv_splitk._gemv_kernel
    gemv_cfgs = sorted({(bm, c) for bm in (1, 2, 4, 8, 16) for c in autotune.gemv_space(bm)},
                       key=lambda t: (t[0], str(t[1])))
    if quick:
        gemv_cfgs = [c for c in gemv_cfgs if c[0] in (1, 16)][:4]
    # Epilogues: deterministic partials, atomic partials, fused output (fp16 out, had_out 64).
    for (mb, cfg), mode in itertools.product(gemv_cfgs, ("det", "atomic", "fused")):
        if quick and mode != "fused" and cfg.use_dot:
            continue
        dots = ("bf16", "fp16") if cfg.use_dot else ("fp32",)
        for dd in dots[:1] if quick else dots:
            fused = mode == "fused"
            sig = {"xt_ptr": "*fp32", "codes_ptr": "*u8", "out_ptr": "*fp16" if fused else "*fp32",
                   "cpart_ptr": "*fp32", "n_ctiles": "i32", "ws_ptr": "*fp32", "sv_ptr": "*fp16", "bias_ptr": "*fp16",
                   "M": "i32", "N": "i32", "K4": "i32", "k4_per_split": "i32", "stride_xm": "i32",
                   "stride_cn": "i32", "stride_om": "i32"}
            ce = {"BLOCK_M": gemv_splitk.block_m(mb, cfg), "BLOCK_N": cfg.block_n, "BLOCK_K4": cfg.block_k // 4,
                  "USE_DOT": cfg.use_dot, "DOT_DTYPE": {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}[dd],
                  "ATOMIC": mode == "atomic", "FUSE_OUT": fused, "CTILES": 32 if fused else 1,
                  "HAS_HAD": fused, "LOG2_HAD": 6 if fused else 0, "HAD_SCALE": 0.125 if fused else 1.0,
                  "HAS_BIAS": fused}
            if fused and cfg.block_n < 64:
                ce.update(HAS_HAD=False, LOG2_HAD=0, HAD_SCALE=1.0)
            yield (f"gemv M<={mb} {cfg} {mode} dot={dd}", gv, sig, ce,
                   {"num_warps": cfg.num_warps, "num_stages": cfg.num_stages})
    gm = gemm_dequant._gemm_kernel
    gemm_cfgs = sorted({c for mb in (32, 64, 128, 512) for c in autotune.gemm_space(mb)}, key=str)
    if quick:
        gemm_cfgs = gemm_cfgs[:2]
    for cfg in gemm_cfgs:
        for xdt, had in [("fp16", 128), ("bf16", 64), ("fp32", 0), ("fp16", 4096)][: 2 if quick else 4]:
            fuse = gemm_dequant.fuses_output(had, cfg)
            odt = xdt if fuse else "fp32"
            sig = {"x_ptr": ptr(xdt), "codes_ptr": "*u8", "a_ptr": "*fp32", "b_ptr": "*fp32", "ws_ptr": "*fp32",
                   "sv_ptr": "*fp16", "bias_ptr": "*fp16", "out_ptr": ptr(odt), "M": "i32", "N": "i32", "K": "i32",
                   "stride_xm": "i32", "stride_cn": "i32", "stride_om": "i32"}
            ce = {"BLOCK_M": cfg.block_m, "BLOCK_N": cfg.block_n, "BLOCK_K": cfg.block_k, "GROUP_M": cfg.group_m,
                  "FUSE_OUT": fuse, "HAS_HAD": had > 0, "LOG2_HAD": log2(had),
                  "HAD_SCALE": had ** -0.5 if had else 1.0, "HAS_BIAS": True,
                  "PRECISION": "tf32x3" if xdt == "fp32" else "tf32"}
            yield (f"gemm {cfg} x={xdt} had_out={had} fused={fuse}", gm, sig, ce,
                   {"num_warps": cfg.num_warps, "num_stages": cfg.num_stages})


_COUNTS = {"M", "n_split", "n_tiles", "n_ctiles", "stride_om"}  # token/split counts: any value


def _fix_dtypes(ce: dict) -> dict:
    import triton.language as tl

    return {k: getattr(tl, v) if k == "DOT_DTYPE" else v for k, v in ce.items()}


def compile_all(archs=(80, 90), quick: bool = False, verbose: bool = True) -> list[str]:
    """Compile every variant for every arch; returns the failures (empty when all pass)."""
    if interpreted():
        raise RuntimeError("aot_check needs compiled-mode kernels: run it without TRITON_INTERPRET=1")
    failures = []
    for name, fn, sig, ce, opts in _variants(quick):
        ce = _fix_dtypes(ce)
        full_sig = dict(sig, **{k: "constexpr" for k in ce})
        # What the JIT infers for real layer shapes: pointers, sizes and strides are
        # multiples of 16 (this enables vector loads and cp.async pipelining).
        attrs = {(i,): [["tt.divisibility", 16]] for i, k in enumerate(full_sig)
                 if k in sig and k not in _COUNTS}
        for cc in archs:
            t0 = time.perf_counter()
            try:
                ck = triton.compile(ASTSource(fn=fn, signature=full_sig, constexprs=ce, attrs=attrs),
                                    target=GPUTarget("cuda", cc, 32), options=opts)
                status = f"ok  {len(ck.asm['cubin'])} B cubin, {ck.metadata.shared} B smem"
                # Compiles but cannot launch on this arch: the autotuner skips such a
                # config there (it raises OutOfResources), so it is a note, not a failure.
                if ck.metadata.shared > (232448 if cc >= 90 else 166912):
                    status = f"too big for sm_{cc}: {ck.metadata.shared} B shared memory (autotune skips it)"
            except Exception as e:  # report every failure, not just the first
                status = f"FAIL {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
                failures.append(f"sm_{cc} {name}: {status}")
            if verbose:
                print(f"sm_{cc} {time.perf_counter() - t0:5.1f}s {status}  {name}", flush=True)
    return failures


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--arch", type=int, nargs="+", default=[80, 90], help="compute capabilities (default 80 90)")
    p.add_argument("--quick", action="store_true", help="a few variants only")
    args = p.parse_args(argv)
    failures = compile_all(tuple(args.arch), args.quick)
    print(f"{len(failures)} failure(s)" + "".join("\n  " + f for f in failures))
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
