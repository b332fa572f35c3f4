"""Scaled-grid weight quantization outside the packed 2-bit format: fp8 e4m3 and
symmetric int-n, with one fp32 scale per block of the weight (a 128x128 tile,
a row, or the whole tensor), and ``DequantLinear``, the layer that holds them.

This is the deployed representation DAQ searches (``quantizers/daq.py``) and the
fake quantization QAT trains through (``patching.py``). The torch reference
path is the only compute path: ``W = codes.float() * expanded scales``, then
``F.linear``. Every function here is deterministic, so a weight quantized twice
with the same scales gives bit-identical codes.

A scale tensor has shape ``[ceil(N / br), ceil(K / bc)]`` for a weight
``[N, K]`` and block ``(br, bc)``: per-row scales are block ``(1, K)``, shape
``[N, 1]``; per-tensor is block ``(N, K)``, shape ``[1, 1]``.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .format import MAX_WEIGHT

__all__ = [
    "FP8_MAX",
    "Grid",
    "parse_grid",
    "block_shape",
    "expand_scales",
    "absmax_scales",
    "quantize_codes",
    "dequantize_codes",
    "fake_quantize_rows",
    "fake_quantize_rows_ste",
    "DequantLinear",
    "scale_grid_shape",
    "check_scale_block",
]

FP8_MAX = 448.0  # largest finite float8_e4m3fn
_INT_GRID = re.compile(r"int([2-8])$")


@dataclass(frozen=True)
class Grid:
    """A scaled quantization grid: ``fp8`` (e4m3) or ``int<n>`` (levels ``-qmax..qmax``,
    ``qmax = 2**(n-1) - 1``, the same levels as ``rtn.fake_quantize``)."""

    name: str
    qmax: float
    code_dtype: torch.dtype

    @property
    def is_fp8(self) -> bool:
        return self.code_dtype == torch.float8_e4m3fn


def parse_grid(grid: str) -> Grid:
    """``"fp8"`` or ``"int2"`` .. ``"int8"`` -> :class:`Grid`."""
    if not isinstance(grid, str):
        raise TypeError(f"grid must be a string like 'fp8' or 'int4', got {type(grid).__name__}")
    if grid == "fp8":
        return Grid("fp8", FP8_MAX, torch.float8_e4m3fn)
    m = _INT_GRID.match(grid)
    if m:
        bits = int(m.group(1))
        return Grid(grid, float(2 ** (bits - 1) - 1), torch.int8)
    raise ValueError(f"grid must be 'fp8' or 'int2'..'int8', got {grid!r}")


def block_shape(shape: tuple[int, int], granularity: str, block: int = 128) -> tuple[int, int]:
    """The ``(rows, cols)`` of one scale block for ``granularity`` block|row|tensor."""
    n, k = shape
    if granularity == "block":
        return (block, block)
    if granularity == "row":
        return (1, k)
    if granularity == "tensor":
        return (n, k)
    raise ValueError(f"granularity must be 'block', 'row' or 'tensor', got {granularity!r}")


def check_scale_block(block) -> tuple[int, int]:
    """A scale block: two positive ints ``(rows, cols)`` (larger than the weight = one block)."""
    if (not isinstance(block, (tuple, list)) or len(block) != 2
            or not all(isinstance(b, int) and not isinstance(b, bool) and b > 0 for b in block)):
        raise ValueError(f"block must be two positive ints (rows, cols), got {block!r}")
    return int(block[0]), int(block[1])


def scale_grid_shape(shape, block) -> tuple[int, int]:
    """Shape of the per-block scale grid of a ``shape`` weight (edge blocks may be partial)."""
    return (math.ceil(shape[0] / block[0]), math.ceil(shape[1] / block[1]))


def expand_scales(scales: torch.Tensor, shape: tuple[int, int], block: tuple[int, int]) -> torch.Tensor:
    """Per-block ``scales`` broadcast to a full ``[N, K]`` tensor (edge blocks cropped)."""
    if tuple(scales.shape) != scale_grid_shape(shape, block):
        raise ValueError(f"scales must have shape {scale_grid_shape(shape, block)} for a {tuple(shape)} weight "
                         f"with block {block}, got {tuple(scales.shape)}")
    # a gather, not repeat_interleave: a block far larger than the weight costs nothing extra
    rows = torch.arange(shape[0], device=scales.device) // block[0]
    cols = torch.arange(shape[1], device=scales.device) // block[1]
    return scales[rows][:, cols]


def block_reduce_amax(w: torch.Tensor, block: tuple[int, int]) -> torch.Tensor:
    """Max ``|w|`` of each block, ``[ceil(N/br), ceil(K/bc)]``."""
    n, k = w.shape
    gr, gc = scale_grid_shape(w.shape, block)
    padded = F.pad(w.abs(), (0, gc * block[1] - k, 0, gr * block[0] - n))
    return padded.reshape(gr, block[0], gc, block[1]).amax(dim=(1, 3))


def absmax_scales(w: torch.Tensor, grid: Grid, block: tuple[int, int]) -> torch.Tensor:
    """The plain scales: block absmax / the grid's largest level (fp32)."""
    return (block_reduce_amax(w.detach().float(), block).clamp_min(1e-12) / grid.qmax).float()


def quantize_codes(w: torch.Tensor, scales_full: torch.Tensor, grid: Grid) -> torch.Tensor:
    """Codes of ``w`` on ``grid`` given full-size scales: fp8 values (saturated at ±448)
    or int8 levels in ``-qmax..qmax``."""
    x = w.float() / scales_full
    if grid.is_fp8:
        # clamp first: the cast's own out-of-range behaviour is not something to rely on
        return x.clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
    return torch.clamp(torch.round(x), -grid.qmax, grid.qmax).to(torch.int8)


def dequantize_codes(codes: torch.Tensor, scales_full: torch.Tensor) -> torch.Tensor:
    """The dense fp32 weight: ``codes * scales`` — the one reference every consumer uses."""
    return codes.float() * scales_full


def fake_quantize_rows(w: torch.Tensor, bits: int) -> torch.Tensor:
    """Symmetric per-output-channel absmax RTN at ``bits``, dequantized, for any
    tensor whose first dim is the output channel. Same arithmetic as
    ``pyquant.quantizers.rtn.fake_quantize`` (a test keeps the two bit-identical)."""
    if bits not in (2, 3, 4, 8):
        raise ValueError(f"bits must be one of 2, 3, 4, 8, got {bits}")
    qmax = 2 ** (bits - 1) - 1
    amax = w.detach().abs().reshape(w.shape[0], -1).amax(dim=1).clamp_min(1e-12)
    scale = (amax / qmax).reshape(-1, *([1] * (w.dim() - 1)))
    return torch.clamp(torch.round(w / scale), -qmax, qmax) * scale


def fake_quantize_rows_ste(w: torch.Tensor, bits: int) -> torch.Tensor:
    """:func:`fake_quantize_rows` with a straight-through gradient: forward is the
    quantized weight, backward is the identity (the QAT estimator)."""
    return w + (fake_quantize_rows(w, bits) - w).detach()


class DequantLinear(nn.Module):
    """A linear layer holding a weight quantized on an fp8 or int-n grid with
    per-block fp32 scales; computes ``F.linear(x, codes * scales, bias)`` (the
    torch reference path, in the input's dtype)."""

    def __init__(self, codes: torch.Tensor, scales: torch.Tensor, block: tuple[int, int], grid: str,
                 bias: torch.Tensor | None = None, method: str = "unknown"):
        super().__init__()
        g = parse_grid(grid)
        block = check_scale_block(block)
        if not isinstance(codes, torch.Tensor) or codes.dim() != 2 or codes.dtype != g.code_dtype:
            raise TypeError(f"codes must be a 2-D {g.code_dtype} tensor for grid {grid!r}, "
                            f"got {getattr(codes, 'dtype', type(codes))}")
        if not isinstance(scales, torch.Tensor) or scales.dtype != torch.float32:
            raise TypeError("scales must be an fp32 tensor")
        if tuple(scales.shape) != scale_grid_shape(codes.shape, block):
            raise ValueError(f"scales must have shape {scale_grid_shape(codes.shape, block)} for a "
                             f"{tuple(codes.shape)} weight with block {block}, got {tuple(scales.shape)}")
        if bias is not None and tuple(bias.shape) != (codes.shape[0],):
            raise ValueError(f"bias must have shape ({codes.shape[0]},), got {tuple(bias.shape)}")
        self.out_features, self.in_features = codes.shape
        self.grid, self.block, self.method = g.name, block, method
        self.register_buffer("codes", codes.detach().clone())
        self.register_buffer("scales", scales.detach().clone())
        self.bias = None if bias is None else nn.Parameter(bias.detach().float().clone())
        self.validate()

    def validate(self) -> "DequantLinear":
        """Raise ``ValueError`` unless the scales are finite and positive and the codes lie on
        the grid (run on construction, and on load for tensors that came from a file). A skeleton
        on the meta device has no values to check."""
        if self.codes.device.type == "meta":
            return self
        if self.bias is not None and not torch.isfinite(self.bias).all():
            raise ValueError("bias holds NaN or Inf")
        if not torch.isfinite(self.scales).all() or bool((self.scales <= 0).any()):
            raise ValueError("scales must be finite and positive")
        grid = parse_grid(self.grid)
        if float(self.scales.max()) * grid.qmax > MAX_WEIGHT:
            raise ValueError(f"scales allow weights up to {float(self.scales.max()) * grid.qmax:.3g}, above "
                             f"{MAX_WEIGHT:g}: outputs would overflow (a damaged checkpoint?)")
        codes = self.codes.float()
        if not torch.isfinite(codes).all() or bool((codes.abs() > grid.qmax).any()):
            raise ValueError(f"codes must lie on the {grid.name} grid (|code| <= {grid.qmax})")
        return self

    def dequantize_weight(self) -> torch.Tensor:
        """The dense fp32 ``[N, K]`` weight this layer applies."""
        full = expand_scales(self.scales, (self.out_features, self.in_features), self.block)
        return dequantize_codes(self.codes, full)

    def stored_bytes(self) -> int:
        return self.codes.numel() * self.codes.element_size() + self.scales.numel() * 4

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not isinstance(x, torch.Tensor) or not x.is_floating_point():
            raise TypeError(f"input must be a floating-point tensor, got {getattr(x, 'dtype', type(x))}")
        if x.dim() == 0 or x.shape[-1] != self.in_features:
            raise ValueError(f"input must have shape [..., {self.in_features}], got {tuple(x.shape)}")
        w = self.dequantize_weight().to(x.dtype)
        return F.linear(x, w, None if self.bias is None else self.bias.to(x.dtype))

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, grid={self.grid}, "
                f"block={self.block}, bias={self.bias is not None}, method={self.method}")
