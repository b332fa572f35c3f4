"""Fused-dequant GEMM for larger batches (> 16 tokens).

Each program owns a ``[BLOCK_M, BLOCK_N]`` output tile and walks K: it loads
``BLOCK_K / 4`` code bytes per row, unpacks the four 2-bit levels in registers,
builds the codewords ``w_scale * (A z + b)`` with fp32 multiply-adds (``A``, ``b``
and ``w_scale`` are 21 scalars per layer), casts them to the operand dtype and
feeds ``tl.dot`` with the transformed activations ``x' = H_in(su * x)``.

The output transform ``sv * H_out(.) + bias`` is fused into the epilogue when a
tile holds whole Hadamard blocks (``BLOCK_N % had_out == 0``); otherwise the tile
is written as fp32 and :func:`triton_kernels.transform.output_transform` finishes
it in one extra pass.

Operand precision: fp16 inputs use fp16 operands, bf16 inputs bf16 (as cuBLAS
does), fp32 inputs fp32 operands with ``input_precision="tf32x3"`` (about fp32
accuracy on tensor cores). Accumulation is always fp32.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from .common import fwht, launch, log2, small_int_to_float


@dataclass(frozen=True)
class GemmConfig:
    block_m: int = 64
    block_n: int = 64
    block_k: int = 64
    group_m: int = 8
    num_warps: int = 4
    num_stages: int = 3

    def __post_init__(self):
        for name in ("block_m", "block_n", "block_k"):
            v = getattr(self, name)
            if v < 16 or v & (v - 1):
                raise ValueError(f"GemmConfig.{name} must be a power of two >= 16, got {v}")


@triton.jit
def _gemm_kernel(
    x_ptr, codes_ptr, a_ptr, b_ptr, ws_ptr, sv_ptr, bias_ptr, out_ptr,
    M, N, K, stride_xm, stride_cn, stride_om,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
    FUSE_OUT: tl.constexpr, HAS_HAD: tl.constexpr, LOG2_HAD: tl.constexpr, HAD_SCALE: tl.constexpr,
    HAS_BIAS: tl.constexpr, PRECISION: tl.constexpr,
):
    BLOCK_K4: tl.constexpr = BLOCK_K // 4
    # Grouped launch order: GROUP_M row-tiles share each column of weight tiles
    # while it is still in L2.
    pid = tl.program_id(0)
    grid_m = (M + BLOCK_M - 1) // BLOCK_M
    grid_n = (N + BLOCK_N - 1) // BLOCK_N
    per_group = GROUP_M * grid_n
    first_m = (pid // per_group) * GROUP_M
    group_size = tl.minimum(grid_m - first_m, GROUP_M)
    pid_m = first_m + (pid % per_group) % group_size
    pid_n = (pid % per_group) // group_size

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_mask = offs_m < M
    n_mask = offs_n < N

    # The codebook, pre-scaled: W[.., r] = sum_c a_rc z_c + b_r with a = w_scale*A, b = w_scale*b.
    ws = tl.load(ws_ptr)
    a00 = tl.load(a_ptr + 0) * ws
    a01 = tl.load(a_ptr + 1) * ws
    a02 = tl.load(a_ptr + 2) * ws
    a03 = tl.load(a_ptr + 3) * ws
    a10 = tl.load(a_ptr + 4) * ws
    a11 = tl.load(a_ptr + 5) * ws
    a12 = tl.load(a_ptr + 6) * ws
    a13 = tl.load(a_ptr + 7) * ws
    a20 = tl.load(a_ptr + 8) * ws
    a21 = tl.load(a_ptr + 9) * ws
    a22 = tl.load(a_ptr + 10) * ws
    a23 = tl.load(a_ptr + 11) * ws
    a30 = tl.load(a_ptr + 12) * ws
    a31 = tl.load(a_ptr + 13) * ws
    a32 = tl.load(a_ptr + 14) * ws
    a33 = tl.load(a_ptr + 15) * ws
    b0 = tl.load(b_ptr + 0) * ws
    b1 = tl.load(b_ptr + 1) * ws
    b2 = tl.load(b_ptr + 2) * ws
    b3 = tl.load(b_ptr + 3) * ws

    K4 = K // 4
    acc = tl.full((BLOCK_M, BLOCK_N), 0.0, tl.float32)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        x = tl.load(x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :],
                    mask=m_mask[:, None] & (offs_k < K)[None, :], other=0.0)
        offs_j = k0 // 4 + tl.arange(0, BLOCK_K4)
        # Masked K lanes give level 0 (codeword b, not 0) but meet zero activations.
        c = tl.load(codes_ptr + offs_n[:, None] * stride_cn + offs_j[None, :],
                    mask=n_mask[:, None] & (offs_j < K4)[None, :], other=0).to(tl.int32)
        z0 = small_int_to_float((c >> 6) & 3, tl.float32)
        z1 = small_int_to_float((c >> 4) & 3, tl.float32)
        z2 = small_int_to_float((c >> 2) & 3, tl.float32)
        z3 = small_int_to_float(c & 3, tl.float32)
        w0 = z0 * a00 + z1 * a01 + z2 * a02 + z3 * a03 + b0
        w1 = z0 * a10 + z1 * a11 + z2 * a12 + z3 * a13 + b1
        w2 = z0 * a20 + z1 * a21 + z2 * a22 + z3 * a23 + b2
        w3 = z0 * a30 + z1 * a31 + z2 * a32 + z3 * a33 + b3
        # join stacks on a new last axis; this nesting yields w0, w1, w2, w3 in
        # order, so the reshape lays chunk j's codeword at columns 4j..4j+3.
        w = tl.reshape(tl.join(tl.join(w0, w2), tl.join(w1, w3)), (BLOCK_N, BLOCK_K))
        acc = tl.dot(x, tl.trans(w.to(x.dtype)), acc, input_precision=PRECISION)

    out_offs = offs_m[:, None] * stride_om + offs_n[None, :]
    out_mask = m_mask[:, None] & n_mask[None, :]
    if FUSE_OUT:
        if HAS_HAD:
            # Rows of the tile are contiguous in the flattened order and BLOCK_N is a
            # multiple of the block, so every Hadamard block lies inside one row.
            acc = tl.reshape(fwht(tl.reshape(acc, (BLOCK_M * BLOCK_N,)), BLOCK_M * BLOCK_N, LOG2_HAD),
                             (BLOCK_M, BLOCK_N)) * HAD_SCALE
        acc = acc * tl.load(sv_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)[None, :]
        if HAS_BIAS:
            acc += tl.load(bias_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)[None, :]
    tl.store(out_ptr + out_offs, acc.to(out_ptr.dtype.element_ty), mask=out_mask)


def operand_dtype(x_dtype: torch.dtype, interpreted: bool) -> torch.dtype:
    """The dtype fed to ``tl.dot``: the input's, except bf16 in the interpreter,
    whose bf16 arithmetic is wrong (fp32 there)."""
    if x_dtype == torch.bfloat16 and interpreted:
        return torch.float32
    return x_dtype


def fuses_output(had_out: int, cfg: GemmConfig) -> bool:
    return had_out <= cfg.block_n


def gemm_dequant(xp: torch.Tensor, codes: torch.Tensor, A: torch.Tensor, b: torch.Tensor,
                 w_scale: torch.Tensor, sv: torch.Tensor, bias: torch.Tensor | None, had_out: int,
                 out_dtype: torch.dtype, cfg: GemmConfig) -> tuple[torch.Tensor, bool]:
    """``xp`` ``[M, K]`` (already ``H_in(su * x)``, in the operand dtype) times the
    dequantized rotated weight. Returns ``(y, finished)``: when ``finished`` the
    output transform is applied and ``y`` has ``out_dtype``; otherwise ``y`` is
    fp32 ``W_hat @ x'`` for :func:`~triton_kernels.transform.output_transform`."""
    m, k = xp.shape
    n, k4 = codes.shape
    if k != 4 * k4:
        raise ValueError(f"xp has K={k} but codes cover K={4 * k4}")
    fuse = fuses_output(had_out, cfg)
    y = torch.empty((m, n), device=xp.device, dtype=out_dtype if fuse else torch.float32)
    if m == 0 or n == 0:
        return y, fuse
    grid = (triton.cdiv(m, cfg.block_m) * triton.cdiv(n, cfg.block_n),)
    launch(_gemm_kernel)[grid](
        xp, codes, A, b, w_scale, sv, bias if bias is not None else sv, y,
        m, n, k, xp.stride(0), codes.stride(0), y.stride(0),
        BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k, GROUP_M=cfg.group_m,
        FUSE_OUT=fuse, HAS_HAD=had_out > 0, LOG2_HAD=log2(had_out),
        HAD_SCALE=(had_out ** -0.5 if had_out else 1.0), HAS_BIAS=bias is not None,
        PRECISION="tf32x3" if xp.dtype == torch.float32 else "tf32",  # only fp32 operands read it
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )
    return y, fuse
