"""Activation transform (before the weight product) and output transform (after it).

Input side, one fused pass per token and tile of ``K``::

    x' = H_in(su * x)                       blockwise Hadamard, in registers
    xt[4j:4j+4] = A^T x'[4j:4j+4]           (GEMV path only)
    const = sum_j b . x'[4j:4j+4]           one partial sum per tile

so that ``(W_hat @ x')[n] = w_scale * (sum_j z[n,j] . xt[4j:4j+4] + const)``
(see ``pyquant.format.transform_activations``). The GEMM path takes ``x'`` itself
and builds the codewords from ``A`` and ``b``.

Output side (:func:`output_transform`): sum the split-K partials in a fixed order
(deterministic), add the per-token constant, scale by ``w_scale``, blockwise
``H_out``, ``* sv``, ``+ bias``, cast to the output dtype.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .common import MAX_HADAMARD, fwht, launch, log2, next_pow2, _sum_combine

# Tile of K handled by one program: big enough that the per-tile constants stay
# few (the output pass sums them), small enough to keep in registers.
DEFAULT_TILE = 1024


@triton.jit
def _input_transform_kernel(
    x_ptr, su_ptr, a_ptr, b_ptr, out_ptr, cpart_ptr,
    K, n_tiles, stride_xm, stride_om,
    TILE: tl.constexpr, LOG2_HAD: tl.constexpr, HAD_SCALE: tl.constexpr, HAS_HAD: tl.constexpr,
    APPLY_A: tl.constexpr,
):
    m = tl.program_id(0)
    t = tl.program_id(1)
    offs = t * TILE + tl.arange(0, TILE)
    mask = offs < K
    # Masked lanes are whole Hadamard blocks (K % had == 0, TILE % had == 0), so
    # zero-filling them leaves the real blocks untouched.
    x = tl.load(x_ptr + m * stride_xm + offs, mask=mask, other=0.0).to(tl.float32)
    su = tl.load(su_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    x = x * su
    if HAS_HAD:
        x = fwht(x, TILE, LOG2_HAD) * HAD_SCALE
    if APPLY_A:
        r = tl.arange(0, 4)
        a = tl.load(a_ptr + r[:, None] * 4 + r[None, :])  # a[r, c] = A[r, c]
        chunks = tl.reshape(x, (TILE // 4, 4))
        # xt[j, c] = sum_r x'[j, r] * A[r, c]: a 4x4 product per chunk, in fp32.
        xt = tl.reduce(chunks[:, :, None] * a[None, :, :], 1, _sum_combine)
        tl.store(out_ptr + m * stride_om + offs, tl.reshape(xt, (TILE,)), mask=mask)
        bv = tl.load(b_ptr + r)
        tl.store(cpart_ptr + m * n_tiles + t, tl.reduce(chunks * bv[None, :], None, _sum_combine))
    else:
        tl.store(out_ptr + m * stride_om + offs, x.to(out_ptr.dtype.element_ty), mask=mask)


def _tile(k: int, had: int) -> int:
    return max(had, min(DEFAULT_TILE, next_pow2(k)), 4)


def _warps(elements: int) -> int:
    return max(1, min(8, elements // 256))


def input_transform(x: torch.Tensor, su: torch.Tensor, A: torch.Tensor, b: torch.Tensor, had: int,
                    apply_a: bool = True, out_dtype: torch.dtype = torch.float32):
    """Run the fused input transform on ``x`` ``[M, K]``.

    ``apply_a=True`` (GEMV): returns ``(xt, cpart)`` with ``xt`` fp32 ``[M, K]`` and
    ``cpart`` fp32 ``[M, T]`` per-tile partial constants (sum over the last axis
    gives ``const``). ``apply_a=False`` (GEMM): returns ``(x', None)`` with ``x'``
    in ``out_dtype``.
    """
    m, k = x.shape
    if had > MAX_HADAMARD:
        raise ValueError(f"had_in={had} exceeds the largest block the kernel holds ({MAX_HADAMARD})")
    tile = _tile(k, had)
    n_tiles = triton.cdiv(k, tile)
    out = torch.empty((m, k), device=x.device, dtype=torch.float32 if apply_a else out_dtype)
    cpart = torch.empty((m, n_tiles), device=x.device, dtype=torch.float32) if apply_a else out
    if m == 0:
        return out, (cpart if apply_a else None)
    launch(_input_transform_kernel)[(m, n_tiles)](
        x, su, A, b, out, cpart, k, n_tiles, x.stride(0), out.stride(0),
        TILE=tile, LOG2_HAD=log2(had), HAD_SCALE=(had ** -0.5 if had else 1.0), HAS_HAD=had > 0,
        APPLY_A=apply_a, num_warps=_warps(tile),
    )
    return out, (cpart if apply_a else None)


@triton.jit
def _output_transform_kernel(
    part_ptr, n_split, cpart_ptr, n_ctiles, ws_ptr, sv_ptr, bias_ptr, out_ptr,
    M, N, stride_om,
    BLOCK: tl.constexpr, CTILES: tl.constexpr, LOG2_HAD: tl.constexpr, HAD_SCALE: tl.constexpr,
    HAS_HAD: tl.constexpr, HAS_CONST: tl.constexpr, HAS_BIAS: tl.constexpr,
):
    m = tl.program_id(0)
    offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < N
    acc = tl.full((BLOCK,), 0.0, tl.float32)
    # Partials [n_split, M, N] summed in split order: the deterministic reduction.
    for s in range(n_split):
        acc += tl.load(part_ptr + (s * M + m) * N + offs, mask=mask, other=0.0)
    if HAS_CONST:
        ct = tl.arange(0, CTILES)
        const = tl.reduce(tl.load(cpart_ptr + m * n_ctiles + ct, mask=ct < n_ctiles, other=0.0), None, _sum_combine)
        acc = (acc + const) * tl.load(ws_ptr)
    if HAS_HAD:
        # Lanes past N are whole blocks of zeros (N % had_out == 0).
        acc = fwht(acc, BLOCK, LOG2_HAD) * HAD_SCALE
    y = acc * tl.load(sv_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    if HAS_BIAS:
        y += tl.load(bias_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + m * stride_om + offs, y.to(out_ptr.dtype.element_ty), mask=mask)


def output_transform(part: torch.Tensor, sv: torch.Tensor, bias: torch.Tensor | None, had: int,
                     out_dtype: torch.dtype, cpart: torch.Tensor | None = None,
                     w_scale: torch.Tensor | None = None) -> torch.Tensor:
    """``y = sv * H_out(w_scale * (sum_s part[s] + const)) + bias`` as ``[M, N]`` ``out_dtype``.

    ``part`` is fp32 ``[S, M, N]`` (S split-K partials, summed in order) or ``[M, N]``.
    With ``cpart`` (``[M, T]`` partial constants) the constant and ``w_scale`` are
    applied; without, ``part`` already holds ``W_hat @ x'``.
    """
    if part.dim() == 2:
        part = part.unsqueeze(0)
    n_split, m, n = part.shape
    if had > MAX_HADAMARD:
        raise ValueError(f"had_out={had} exceeds the largest block the kernel holds ({MAX_HADAMARD})")
    block = max(had, min(DEFAULT_TILE, next_pow2(n)))
    out = torch.empty((m, n), device=part.device, dtype=out_dtype)
    if m == 0:
        return out
    has_const = cpart is not None
    launch(_output_transform_kernel)[(m, triton.cdiv(n, block))](
        part, n_split, cpart if has_const else part, cpart.shape[1] if has_const else 0,
        w_scale if has_const else part, sv, bias if bias is not None else part, out,
        m, n, out.stride(0),
        BLOCK=block, CTILES=next_pow2(cpart.shape[1]) if has_const else 1, LOG2_HAD=log2(had),
        HAD_SCALE=(had ** -0.5 if had else 1.0), HAS_HAD=had > 0, HAS_CONST=has_const,
        HAS_BIAS=bias is not None, num_warps=_warps(block),
    )
    return out
