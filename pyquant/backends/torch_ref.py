"""The torch reference backend: dense dequantization + matmul, in fp32.

Always available, takes every input; the ground truth, and the fallback where
no kernel takes a shape. Slow: it rebuilds the dense weight on every call
unless the caller opts into caching it (``PYQUANT_TORCH_CACHE=1``), which
costs fp32 memory.
"""
from __future__ import annotations

import os

import torch

from ..format import PackedWeight, dequantize_rotated, finish_output
from ..hadamard import blockwise_hadamard

NAME = "torch"


def available() -> bool:
    return True


def supports(x: torch.Tensor, pw: PackedWeight) -> str | None:
    return None


def linear(x: torch.Tensor, pw: PackedWeight, bias: torch.Tensor | None, cache: dict) -> torch.Tensor:
    w_rot = cache.get("w_rot")
    if w_rot is None:
        w_rot = dequantize_rotated(pw)
        if os.environ.get("PYQUANT_TORCH_CACHE") == "1":
            cache["w_rot"] = w_rot
    xp = blockwise_hadamard(x.float() * pw.su.float(), pw.had_in, dim=-1)
    return finish_output(xp @ w_rot.T, pw, bias).to(x.dtype)
