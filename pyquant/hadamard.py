"""Randomized blockwise Hadamard transform (the incoherence step of QuIP#/UniSVQ).

A dimension ``D`` is cut into contiguous blocks of ``block`` elements (a power
of two dividing ``D``); each block is multiplied by the normalized Sylvester
Hadamard matrix ``H_block / sqrt(block)``. That matrix is symmetric and
orthogonal, so the transform is its own inverse. Random signs are *not* part
of the transform: the quantizers fold them into ``su`` / ``sv``.
"""
from __future__ import annotations

import functools
import math

import torch

__all__ = [
    "hadamard_matrix",
    "default_block",
    "blockwise_hadamard",
    "random_signs",
]


@functools.lru_cache(maxsize=32)
def _hadamard_cpu(n: int) -> torch.Tensor:
    h = torch.ones(1, 1, dtype=torch.float64)
    while h.shape[0] < n:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return (h / n**0.5).to(torch.float32)


def _check_block(block: int) -> None:
    if not isinstance(block, int) or block < 1 or block & (block - 1):
        raise ValueError(f"block must be a positive power of two, got {block!r}")


def _hadamard_ops(n: int, device) -> torch.Tensor:
    # H[i, j] = (-1)^popcount(i & j) / sqrt(n), from torch ops only: what a fake-tensor trace
    # (torch.compile's backward, opcheck) can record, where a cached real tensor cannot enter.
    i = torch.arange(n, device=device)
    both = i[:, None] & i[None, :]
    parity = torch.zeros_like(both)
    for bit in range(n.bit_length() - 1):
        parity = parity ^ ((both >> bit) & 1)
    return (1 - 2 * parity).to(torch.float64) / n**0.5


def hadamard_matrix(n: int, dtype=torch.float32, device=None) -> torch.Tensor:
    """Normalized Sylvester Hadamard matrix of size ``n`` (a power of two)."""
    _check_block(n)
    if torch._guards.detect_fake_mode() is not None:
        return _hadamard_ops(n, device).to(dtype)
    return _hadamard_cpu(n).to(dtype=dtype, device=device)


def default_block(dim: int, cap: int = 128) -> int:
    """Largest power of two dividing ``dim``, capped at ``cap``; 0 (no
    transform) when ``dim`` is not divisible by 4, where incoherence through
    such tiny blocks is not worth it."""
    if dim % 4:
        return 0
    _check_block(cap)
    return min(dim & -dim, cap)


def blockwise_hadamard(x: torch.Tensor, block: int, dim: int = -1) -> torch.Tensor:
    """Apply the normalized Hadamard transform to each contiguous block of
    ``block`` elements along ``dim``. ``block == 0`` returns ``x`` unchanged.

    Computed in at least fp32 (fp64 stays fp64); the result has ``x``'s dtype.
    """
    if block == 0:
        return x
    _check_block(block)
    size = x.shape[dim]
    if size % block:
        raise ValueError(f"dimension {dim} of size {size} is not divisible by the Hadamard block {block}")
    compute = torch.float64 if x.dtype == torch.float64 else torch.float32
    h = hadamard_matrix(block, compute, x.device)
    d = dim % x.dim()
    inner = math.prod(x.shape[d + 1:])
    xc = x.to(compute)
    if inner == 1:  # the last dimension: rows of blocks times H
        return (xc.reshape(-1, block) @ h).reshape(x.shape).to(x.dtype)
    # Another dimension: H (symmetric) times each [block, inner] slab, in place in memory. (Moving
    # the dimension last instead gives matmul operands strided by the whole row: 80x slower.)
    xr = xc.reshape(math.prod(x.shape[:d]) * (size // block), block, inner)
    return torch.matmul(h, xr).reshape(x.shape).to(x.dtype)


def random_signs(n: int, generator: torch.Generator) -> torch.Tensor:
    """``n`` independent ±1 values (fp32) drawn from ``generator``."""
    return torch.randint(0, 2, (n,), generator=generator).float() * 2 - 1
