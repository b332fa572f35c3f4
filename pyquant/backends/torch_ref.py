"""The torch reference backend: dense dequantization + matmul, in fp32, in plain torch ops.

Always available, takes every layer, and differentiable by autograd as it stands; the ground
truth, and the fallback where no kernel takes a layer. Slow: it rebuilds the dense weight on
every call unless ``PYQUANT_TORCH_CACHE=1`` (read at import) keeps it in the layer's kernel
state, which costs fp32 memory and stops gradients from reaching ``A``, ``b`` and ``w_scale``.
"""
from __future__ import annotations

import os

import torch

from ..format import dequantize_rotated, finish_output
from ..hadamard import blockwise_hadamard

NAME = "torch"
_CACHE_DENSE = os.environ.get("PYQUANT_TORCH_CACHE") == "1"


def available() -> bool:
    return True


def supports(layer, dtype: torch.dtype, needs_grad: bool) -> str | None:
    return None


def build(layer) -> torch.Tensor | None:
    """The dense rotated weight, when caching it was asked for."""
    if not _CACHE_DENSE:
        return None
    with torch.no_grad():
        return dequantize_rotated(layer.packed)


def forward(x: torch.Tensor, layer, w_rot: torch.Tensor | None) -> torch.Tensor:
    pw = layer.packed
    if w_rot is None:
        w_rot = dequantize_rotated(pw)
    xp = blockwise_hadamard(x.float() * pw.su.float(), pw.had_in, dim=-1)
    return finish_output(xp @ w_rot.T, pw, layer.bias).to(x.dtype)
