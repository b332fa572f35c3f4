"""Split-K GEMV for 1-16 tokens on transformed activations (the "kernel trick").

With ``xt = A^T x'`` per 4-chunk (see :mod:`triton_kernels.transform`) the weight
product is a plain unsigned INT2 dot product: ``acc[n, m] = sum_k z[n, k] xt[m, k]``.
No codebook, no per-row dequant: each code byte is unpacked into four levels in
registers and multiplied straight away.

Two inner products, picked per config:

- FMA (``USE_DOT=False``): fp32 multiply-adds into a ``[BLOCK_N, BLOCK_K, BLOCK_M]``
  register accumulator, reduced over K once at the end; meant for 1-4 tokens
  (the autotuner decides from timings).
- ``tl.dot`` (``USE_DOT=True``): tokens padded to 16; levels are exact in fp16/bf16
  and ``xt`` is split into ``hi + lo`` halves of that dtype, so two tensor-core
  products give ~16 (bf16) or ~22 (fp16) mantissa bits with fp32 accumulation.

Split-K over the second grid axis, with two reductions:

- ``atomic``: every split ``atomic_add``s into one fp32 ``[M, N]`` buffer (no
  partials to write and re-read, but the order of additions is not fixed: results
  may differ in the last bits run to run);
- ``deterministic``: every split writes its own slice of ``[S, M, N]`` and the
  output pass sums them in split order (bit-identical between runs).

With a single split (many output rows already fill the GPU) there is nothing to
reduce and :func:`gemv_fused` applies the output transform in the epilogue.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from .common import fwht, launch, log2, next_pow2, small_int_to_float, _sum_combine, tl_dtype


@dataclass(frozen=True)
class GemvConfig:
    block_n: int = 32
    block_k: int = 256      # weights per K step (block_k / 4 code bytes)
    split_k: int = 1
    use_dot: bool = False
    num_warps: int = 4
    num_stages: int = 2

    def __post_init__(self):
        for name in ("block_n", "block_k"):
            v = getattr(self, name)
            if v < 16 or v & (v - 1):
                raise ValueError(f"GemvConfig.{name} must be a power of two >= 16, got {v}")
        if self.split_k < 1:
            raise ValueError(f"GemvConfig.split_k must be >= 1, got {self.split_k}")


@triton.jit
def _gemv_kernel(
    xt_ptr, codes_ptr, out_ptr, cpart_ptr, n_ctiles, ws_ptr, sv_ptr, bias_ptr,
    M, N, K4, k4_per_split, stride_xm, stride_cn, stride_om,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K4: tl.constexpr,
    USE_DOT: tl.constexpr, DOT_DTYPE: tl.constexpr, ATOMIC: tl.constexpr,
    FUSE_OUT: tl.constexpr, CTILES: tl.constexpr, HAS_HAD: tl.constexpr, LOG2_HAD: tl.constexpr,
    HAD_SCALE: tl.constexpr, HAS_BIAS: tl.constexpr,
):
    BLOCK_K: tl.constexpr = 4 * BLOCK_K4
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_m = tl.arange(0, BLOCK_M)
    n_mask = offs_n < N
    m_mask = offs_m < M
    # z0 sits in the two high bits: level r of a byte is (byte >> (6 - 2r)) & 3.
    shifts = 6 - 2 * tl.arange(0, 4)
    k4_lo = pid_k * k4_per_split
    k4_hi = tl.minimum(k4_lo + k4_per_split, K4)
    if USE_DOT:
        acc = tl.full((BLOCK_N, BLOCK_M), 0.0, tl.float32)
    else:
        acc3 = tl.full((BLOCK_N, BLOCK_K, BLOCK_M), 0.0, tl.float32)
    for k4 in range(k4_lo, k4_hi, BLOCK_K4):
        offs_j = k4 + tl.arange(0, BLOCK_K4)
        j_mask = offs_j < k4_hi
        # Codes are read once: don't let them push the activations out of L2.
        c = tl.load(codes_ptr + offs_n[:, None] * stride_cn + offs_j[None, :],
                    mask=n_mask[:, None] & j_mask[None, :], other=0, eviction_policy="evict_first")
        z = tl.reshape((c[:, :, None].to(tl.int32) >> shifts[None, None, :]) & 3, (BLOCK_N, BLOCK_K))
        offs_k = 4 * k4 + tl.arange(0, BLOCK_K)
        k_mask = offs_k < 4 * k4_hi
        # Masked K lanes load 0 activations, so the zero levels there add nothing.
        xt = tl.load(xt_ptr + offs_m[None, :] * stride_xm + offs_k[:, None],
                     mask=k_mask[:, None] & m_mask[None, :], other=0.0, eviction_policy="evict_last")
        if USE_DOT:
            zf = small_int_to_float(z, DOT_DTYPE)
            hi = xt.to(DOT_DTYPE)
            lo = (xt - hi.to(tl.float32)).to(DOT_DTYPE)
            acc = tl.dot(zf, hi, acc)
            acc = tl.dot(zf, lo, acc)
        else:
            zf = small_int_to_float(z, tl.float32)
            acc3 += zf[:, :, None] * xt[None, :, :]
    if not USE_DOT:
        acc = tl.reduce(acc3, 1, _sum_combine)
    if FUSE_OUT:
        # One split and whole Hadamard blocks in this tile: finish the layer here
        # (the output pass of transform.py, without its launch and round trip).
        ct = tl.arange(0, CTILES)
        const = tl.reduce(tl.load(cpart_ptr + offs_m[:, None] * n_ctiles + ct[None, :],
                                  mask=m_mask[:, None] & (ct < n_ctiles)[None, :], other=0.0), 1, _sum_combine)
        y = (tl.trans(acc) + const[:, None]) * tl.load(ws_ptr)  # [BLOCK_M, BLOCK_N]
        if HAS_HAD:
            y = tl.reshape(fwht(tl.reshape(y, (BLOCK_M * BLOCK_N,)), BLOCK_M * BLOCK_N, LOG2_HAD),
                           (BLOCK_M, BLOCK_N)) * HAD_SCALE
        y = y * tl.load(sv_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)[None, :]
        if HAS_BIAS:
            y += tl.load(bias_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)[None, :]
        tl.store(out_ptr + offs_m[:, None] * stride_om + offs_n[None, :], y.to(out_ptr.dtype.element_ty),
                 mask=m_mask[:, None] & n_mask[None, :])
        return
    out_offs = offs_m[None, :] * N + offs_n[:, None]
    out_mask = n_mask[:, None] & m_mask[None, :]
    if ATOMIC:
        tl.atomic_add(out_ptr + out_offs, acc, mask=out_mask, sem="relaxed")
    else:
        tl.store(out_ptr + pid_k * M * N + out_offs, acc, mask=out_mask)


def split_layout(k4: int, cfg: GemvConfig) -> tuple[int, int]:
    """``(k4_per_split, n_split)``: code bytes per split (a multiple of the K step,
    so splits never share a step) and the number of non-empty splits."""
    step = cfg.block_k // 4
    per = triton.cdiv(triton.cdiv(k4, cfg.split_k), step) * step
    return per, max(1, triton.cdiv(k4, per))


def block_m(m: int, cfg: GemvConfig) -> int:
    """Tokens per program: padded to 16 for ``tl.dot``, else the next power of two."""
    return 16 if cfg.use_dot else max(1, 1 << (m - 1).bit_length())


def fuses_output(k4: int, had_out: int, cfg: GemvConfig) -> bool:
    """Whether :func:`gemv_fused` can finish the layer in the GEMV itself: a single
    split (no cross-program reduction) and Hadamard blocks that fit in a tile."""
    return split_layout(k4, cfg)[1] == 1 and had_out <= cfg.block_n


def _check_shapes(xt: torch.Tensor, codes: torch.Tensor) -> None:
    if xt.shape[0] > 16:
        raise ValueError(f"gemv takes at most 16 tokens, got {xt.shape[0]}")
    if xt.shape[1] != 4 * codes.shape[1]:
        raise ValueError(f"xt has K={xt.shape[1]} but codes cover K={4 * codes.shape[1]}")


def gemv_partials(xt: torch.Tensor, codes: torch.Tensor, cfg: GemvConfig, deterministic: bool = True,
                  dot_dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """``sum_k z[n, k] xt[m, k]`` for ``xt`` fp32 ``[M, K]`` (M <= 16) and ``codes``
    ``[N, K/4]``: fp32 ``[S, M, N]`` partials (deterministic) or ``[M, N]`` (atomic;
    also whenever a single split covers K). Sum over ``S`` gives the product."""
    _check_shapes(xt, codes)
    m, n, k4 = xt.shape[0], codes.shape[0], codes.shape[1]
    per, n_split = split_layout(k4, cfg)
    atomic = not deterministic and n_split > 1
    if atomic:
        out = torch.zeros((m, n), device=xt.device, dtype=torch.float32)
    else:
        out = torch.empty((n_split, m, n), device=xt.device, dtype=torch.float32)
    if m == 0 or n == 0:
        return out
    launch(_gemv_kernel)[(triton.cdiv(n, cfg.block_n), n_split)](
        xt, codes, out, out, 0, out, out, out, m, n, k4, per, xt.stride(0), codes.stride(0), 0,
        BLOCK_M=block_m(m, cfg), BLOCK_N=cfg.block_n, BLOCK_K4=cfg.block_k // 4,
        USE_DOT=cfg.use_dot, DOT_DTYPE=tl_dtype(dot_dtype), ATOMIC=atomic,
        FUSE_OUT=False, CTILES=1, HAS_HAD=False, LOG2_HAD=0, HAD_SCALE=1.0, HAS_BIAS=False,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )
    return out


def gemv_fused(xt: torch.Tensor, cpart: torch.Tensor, codes: torch.Tensor, w_scale: torch.Tensor,
               sv: torch.Tensor, bias: torch.Tensor | None, had_out: int, out_dtype: torch.dtype,
               cfg: GemvConfig, dot_dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """The whole layer after the input transform, in one launch:
    ``sv * H_out(w_scale * (z @ xt + const)) + bias`` as ``[M, N]`` ``out_dtype``.
    Needs :func:`fuses_output` (one split, ``had_out <= block_n``)."""
    _check_shapes(xt, codes)
    m, n, k4 = xt.shape[0], codes.shape[0], codes.shape[1]
    if not fuses_output(k4, had_out, cfg):
        raise ValueError(f"gemv_fused needs one K split and had_out <= block_n; got {cfg} with had_out={had_out}")
    out = torch.empty((m, n), device=xt.device, dtype=out_dtype)
    if m == 0 or n == 0:
        return out
    launch(_gemv_kernel)[(triton.cdiv(n, cfg.block_n), 1)](
        xt, codes, out, cpart, cpart.shape[1], w_scale, sv, bias if bias is not None else sv,
        m, n, k4, k4, xt.stride(0), codes.stride(0), out.stride(0),
        BLOCK_M=block_m(m, cfg), BLOCK_N=cfg.block_n, BLOCK_K4=cfg.block_k // 4,
        USE_DOT=cfg.use_dot, DOT_DTYPE=tl_dtype(dot_dtype), ATOMIC=False,
        FUSE_OUT=True, CTILES=next_pow2(cpart.shape[1]), HAS_HAD=had_out > 0, LOG2_HAD=log2(had_out),
        HAD_SCALE=(had_out ** -0.5 if had_out else 1.0), HAS_BIAS=bias is not None,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )
    return out
