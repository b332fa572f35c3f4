"""Round-to-nearest: the baseline quantizer, and the n-bit fake-quant used for QAT.

:class:`RTNConfig` writes the packed 2-bit format with the plain uniform grid
(``A = I``, ``b = -1.5``: levels ±0.5, ±1.5). Without Hadamard, each output
channel gets its own scale (in ``sv``). With Hadamard (the default), rows are
first normalised by their RMS (kept in ``sv``), randomly signed and rotated on
both sides; the rotated weight is near-Gaussian and takes one global scale
(``w_scale``) — a per-row scale cannot live inside ``H_out``.
Scales are chosen by a small MSE search over clipping ratios (absmax is the
grid's upper end), which matters a lot at 2 bits.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..fakequant import fake_quantize_rows, fake_quantize_rows_ste
from ..format import PackedWeight, pack_codes
from ..hadamard import blockwise_hadamard, default_block, random_signs
from .base import QuantConfig, check_weight

_GRID_A = torch.eye(4)
_GRID_B = torch.full((4,), -1.5)
_LEVEL_MAX = 1.5  # largest |codeword| of the uniform grid


def _round_to_grid(w: torch.Tensor, scale: torch.Tensor, inplace: bool = False) -> torch.Tensor:
    """Nearest level z in 0..3 of ``w / scale`` on the grid ``z - 1.5`` (``inplace``: in ``w``'s
    memory, which it overwrites)."""
    if inplace:
        return w.div_(scale).add_(1.5).round_().clamp_(0, 3)
    return torch.clamp(torch.round(w / scale + 1.5), 0, 3)


def _search_scale(w: torch.Tensor, per_row: bool, steps: int = 40) -> torch.Tensor:
    """Scale (per row, or one global) minimising ``||w - scale*(z-1.5)||^2``
    over clipping ratios 0.3..1.0 of ``absmax / 1.5``."""
    amax = (w.abs().amax(dim=1, keepdim=True) if per_row else w.abs().max().reshape(1, 1)).clamp_min(1e-12)
    if not per_row and w.numel() > 1 << 20:  # a global scale is well estimated from a strided sample
        w = w.reshape(-1)[:: w.numel() >> 20].reshape(1, -1).contiguous()
    best_err = torch.full_like(amax, float("inf"))
    best = amax / _LEVEL_MAX
    for ratio in torch.linspace(0.3, 1.0, steps).tolist():
        scale = amax * ratio / _LEVEL_MAX
        err = (w - scale * (_round_to_grid(w, scale) - 1.5)).square()
        err = err.sum(dim=1, keepdim=True) if per_row else err.sum().reshape(1, 1)
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best = torch.where(better, scale, best)
    return best


def _fit_scale_dtype(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``t`` in ``dtype`` when that keeps it finite and non-zero, else fp32."""
    c = t.to(dtype)
    return c if torch.isfinite(c).all() and bool((c != 0).eq(t != 0).all()) else t.float()


@dataclass
class RTNConfig(QuantConfig):
    """Round-to-nearest into the packed 2-bit format.

    Args:
        bits: must be 2 (the packed format); see :func:`fake_quantize` for 3/4/8.
        hadamard: randomized Hadamard incoherence on both sides.
        hadamard_block: largest Hadamard block (a power of two).
        seed: seed of the random signs.
        scale_dtype: storage dtype of ``su``/``sv`` (float16 or float32).
    """

    bits: int = 2
    hadamard: bool = True
    hadamard_block: int = 128
    seed: int = 0
    scale_dtype: torch.dtype = torch.float16
    method = "rtn"

    def __post_init__(self):
        if self.bits != 2:
            raise ValueError(f"RTNConfig.bits must be 2 for the packed format, got {self.bits}; "
                             "use pyquant.quantizers.rtn.fake_quantize for other bit-widths")
        if self.scale_dtype not in (torch.float16, torch.float32):
            raise TypeError(f"RTNConfig.scale_dtype must be torch.float16 or torch.float32, got {self.scale_dtype}")

    def quantize_weight(self, weight: torch.Tensor, hessian: torch.Tensor | None = None) -> PackedWeight:
        w = check_weight(weight)
        n, k = w.shape
        dev = w.device  # random signs come from a CPU generator (same draw on every device), then move
        if self.hadamard:
            had_in, had_out = default_block(k, self.hadamard_block), default_block(n, self.hadamard_block)
            gen = torch.Generator().manual_seed(self.seed)
            s_in, s_out = random_signs(k, gen).to(dev), random_signs(n, gen).to(dev)
            row_rms = w.square().mean(dim=1).sqrt()
            row_rms = torch.where(row_rms > 0, row_rms, torch.ones_like(row_rms))
            rotated = (w / row_rms[:, None]).mul_(s_out[:, None]).mul_(s_in[None, :])  # in place: one weight's memory
            rotated = blockwise_hadamard(blockwise_hadamard(rotated, had_in, dim=1), had_out, dim=0)
            scale = _search_scale(rotated, per_row=False)
            z = _round_to_grid(rotated, scale, inplace=True)  # one weight's memory
            su, sv, w_scale = s_in, s_out * row_rms, scale.reshape(())
        else:
            had_in = had_out = 0
            scale = _search_scale(w, per_row=True)
            z = _round_to_grid(w, scale)
            su, sv, w_scale = torch.ones(k, device=dev), scale.reshape(n), torch.tensor(1.0, device=dev)
        return PackedWeight(
            codes=pack_codes(z.to(torch.uint8)), A=_GRID_A.to(dev, copy=True), b=_GRID_B.to(dev, copy=True),
            su=_fit_scale_dtype(su, self.scale_dtype), sv=_fit_scale_dtype(sv, self.scale_dtype),
            w_scale=w_scale.float(), had_in=had_in, had_out=had_out,
            seed=self.seed if self.hadamard else None, method=self.method,
        ).validate()


# The n-bit fake quant lives in pyquant.fakequant (shared with patching's QAT and DAQ's int grids);
# these names keep the quantizers' public API.
fake_quantize = fake_quantize_rows
fake_quantize_ste = fake_quantize_rows_ste
