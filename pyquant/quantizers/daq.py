"""DAQ, delta-aware quantization: quantize a post-trained weight with the scales
that best keep what post-training changed.

With ``dW = W_post - W_base`` and ``dW_hat = Q(W_post) - W_base``, plain absmax
scales minimise nothing about ``dW``, and a small fine-tuning delta easily drowns
in rounding noise. DAQ searches one scale multiplier per 128x128 block (or per
row, or per tensor) with the reference's grids (Tencent/AngelSlim, ``scale_search.py``):
the best of 5 points in 0.8..1.5 (the first on ties), then the best of 10 points in
``[max(c − 0.0875, 0.8), min(c + 0.0875, 1.5)]`` around that best ``c``, kept unless it
scores below the plain scale (multiplier 1) on the chosen metric. Unlike the reference, a
block with no delta to keep (the metric undefined there) keeps 1.0 (the reference ends at
0.8 there). Metrics:

* ``sign``: share of entries with ``|dW| > 1e-5`` whose sign ``dW_hat`` keeps
  (a quantized delta of 0 counts as lost);
* ``cosine``: cosine of ``dW`` and ``dW_hat``;
* ``mse``: ``-||Q(W_post) - W_post||^2`` (the delta-blind baseline).

Every candidate is scored on the dense tensor the deployed layer computes with
(same codes, same stored scales, same dequantization code), never a proxy, and
the chosen blocks of those scored tensors are what the layer ends up holding.

Grids: ``fp8`` (e4m3 codes, fp32 block scales), ``int2``..``int8`` (symmetric
levels, fp32 block scales) — both deployed as :class:`pyquant.fakequant.DequantLinear`
— and ``pyquant2``, the project's packed 2-bit format (``QuantLinear``), where the
search moves ``sv`` (``granularity="row"``, per-row scales, input-side Hadamard
only) or ``w_scale`` (``granularity="tensor"``, Hadamard on both sides as in
``RTNConfig``); a 128x128 block scale is not representable there.
"""
from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Callable, Iterable

import torch
import torch.nn.functional as F
from torch import nn

from ..fakequant import (DequantLinear, absmax_scales, block_shape, dequantize_codes, expand_scales,
                         parse_grid, quantize_codes)
from ..format import PackedWeight, dequantize, pack_codes
from ..hadamard import blockwise_hadamard, default_block, random_signs
from .base import QuantConfig, SwapFn, check_weight
from .rtn import _GRID_A, _GRID_B, _fit_scale_dtype, _round_to_grid, _search_scale

__all__ = ["DAQConfig", "DAQResult", "daq_quantize", "delta_metrics", "METRICS", "GRANULARITIES"]

METRICS = ("sign", "cosine", "mse")
GRANULARITIES = ("block", "row", "tensor")
SIGN_THRESHOLD = 1e-5
COARSE = (0.8, 1.5, 5)      # lo, hi, points
FINE_POINTS = 10            # in [max(c - h, lo), min(c + h, hi)], h = half a coarse step (0.0875)


# ---------------------------------------------------------------- metrics
def _block_sum(x: torch.Tensor, block: tuple[int, int]) -> torch.Tensor:
    """``[gr, gc]`` sums of ``x`` over its blocks (zero-padded at ragged edges)."""
    n, k = x.shape
    gr, gc = -(-n // block[0]), -(-k // block[1])
    if gr * block[0] != n or gc * block[1] != k:
        x = F.pad(x, (0, gc * block[1] - k, 0, gr * block[0] - n))
    return x.reshape(gr, block[0], gc, block[1]).sum(dim=(1, 3))


class _Scorer:
    """Per-block score of a candidate dense weight (higher is better; NaN where the
    metric is undefined, e.g. a block with no delta). What does not depend on
    the candidate is computed once."""

    def __init__(self, metric: str, w_post: torch.Tensor, w_base: torch.Tensor, block: tuple[int, int]):
        self.metric, self.w_post, self.w_base, self.block = metric, w_post, w_base, block
        delta = w_post - w_base
        if metric == "sign":
            mask = delta.abs() > SIGN_THRESHOLD
            self.sign = torch.sign(delta) * mask  # 0 outside the mask, so those entries never count as kept
            self.count = _block_sum(mask.float(), block)
            self.defined = self.count > 0
        elif metric == "cosine":
            self.delta = delta
            self.norm = _block_sum(delta.square(), block).sqrt()
            self.defined = self.norm > 0
        else:
            self.defined = torch.ones_like(_block_sum(delta, block), dtype=torch.bool)

    def __call__(self, deq: torch.Tensor) -> torch.Tensor:
        if self.metric == "mse":
            return -_block_sum((deq - self.w_post).square(), self.block)
        dq = deq - self.w_base
        if self.metric == "sign":
            return _block_sum((torch.sign(dq) * self.sign > 0).float(), self.block) / self.count  # 0/0 -> NaN
        dot, nq = _block_sum(self.delta * dq, self.block), _block_sum(dq.square(), self.block).sqrt()
        cos = torch.where(nq > 0, dot / (self.norm * nq), torch.zeros_like(dot))
        return cos.masked_fill(~self.defined, float("nan"))


def delta_metrics(w_post: torch.Tensor, w_base: torch.Tensor, deq: torch.Tensor) -> dict[str, float]:
    """Whole-tensor sign-preservation rate, delta cosine and weight MSE of a quantized ``deq``
    (``sign_n``: how many entries the sign rate is over)."""
    d, dq = (w_post - w_base).double(), (deq.double() - w_base.double())
    mask = d.abs() > SIGN_THRESHOLD
    n = int(mask.sum())
    sign = float(((torch.sign(dq) == torch.sign(d)) & mask).sum() / n) if n else float("nan")
    nd, nq = d.norm().item(), dq.norm().item()
    cos = (d * dq).sum().item() / (nd * nq) if nd > 0 and nq > 0 else float("nan")
    return {"sign": sign, "sign_n": n, "cosine": cos, "mse": (deq.double() - w_post.double()).square().mean().item()}


# ---------------------------------------------------------------- the search
def _coarse_to_fine(build: Callable[[torch.Tensor], torch.Tensor], shape_m: tuple[int, int], score: Callable,
                    search: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Multipliers ``m`` (``shape_m``, one per block) as the reference search picks them (module
    docstring), every candidate scored on ``build(m)``, the deployed dense weight for multipliers
    ``m``. Returns ``m`` and the plain weight ``build(1)``. A block's deployed values depend on its
    own multiplier only, so ``build(m)`` holds exactly the scored blocks."""
    ones = torch.ones(shape_m)
    plain_w = build(ones)
    if not search:
        return ones, plain_w
    plain_s = score(plain_w)

    def best_of(candidates: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        scores = torch.stack([score(build(m)) for m in candidates])
        i = scores.argmax(0, keepdim=True)  # the first best on ties
        return torch.stack(candidates).gather(0, i).squeeze(0), scores.gather(0, i).squeeze(0)

    lo, hi, points = COARSE
    c, _ = best_of([torch.full(shape_m, float(r)) for r in torch.linspace(lo, hi, points)])
    half = (hi - lo) / max(points - 1, 1) / 2
    f_lo, f_hi = (c - half).clamp_min(lo), (c + half).clamp_max(hi)
    m, best_s = best_of([f_lo + t * (f_hi - f_lo) for t in torch.linspace(0, 1, FINE_POINTS)])
    m = torch.where((best_s < plain_s) | plain_s.isnan(), ones, m)  # NaN: no delta in the block
    return m, plain_w


@dataclass
class DAQResult:
    """One quantized weight: ``packed`` (grid ``pyquant2``) or ``codes`` + ``scales`` +
    ``block`` (fp8 / int-n); ``scored``, the dense tensor the search scored for
    the chosen scales (the deployed layer computes with exactly this);
    ``multipliers`` per block; ``plain`` / ``chosen``: :func:`delta_metrics` of the
    plain scales and of the chosen ones (``None`` without a base weight)."""

    grid: str
    scored: torch.Tensor
    multipliers: torch.Tensor
    packed: PackedWeight | None = None
    codes: torch.Tensor | None = None
    scales: torch.Tensor | None = None
    block: tuple[int, int] | None = None
    plain: dict | None = None
    chosen: dict | None = None


def _check_options(grid: str, granularity: str, metric: str) -> None:
    if metric not in METRICS:
        raise ValueError(f"metric must be one of {METRICS}, got {metric!r}")
    if granularity not in GRANULARITIES:
        raise ValueError(f"granularity must be one of {GRANULARITIES}, got {granularity!r}")
    if grid == "pyquant2":
        if granularity == "block":
            raise ValueError("granularity='block' is not representable in the pyquant2 format (one scale per row "
                             "in sv, one global w_scale); use granularity='row' or 'tensor'")
    else:
        parse_grid(grid)


def daq_quantize(w_post: torch.Tensor, w_base: torch.Tensor | None, *, grid: str = "fp8",
                 granularity: str = "block", metric: str = "sign", block: int = 128, search: bool = True,
                 hadamard: bool = True, hadamard_block: int = 128, seed: int = 0,
                 scale_dtype: torch.dtype = torch.float16) -> DAQResult:
    """Quantize ``w_post`` ``[N, K]`` on ``grid``, choosing scales that keep ``w_post - w_base``.

    ``search=False`` (or ``w_base=None``) gives the plain scales: absmax for
    fp8 / int-n, RTN's MSE-clipped scale for pyquant2 (bit-identical to
    ``RTNConfig`` then). ``hadamard``, ``hadamard_block``, ``seed`` and
    ``scale_dtype`` apply to pyquant2 only.
    """
    _check_options(grid, granularity, metric)
    w = check_weight(w_post, "w_post") if grid == "pyquant2" else _check_dense(w_post, "w_post")
    if w_base is not None:
        wb = _check_dense(w_base, "w_base")
        if wb.shape != w.shape:
            raise ValueError(f"w_base has shape {tuple(wb.shape)} but w_post has {tuple(w.shape)}")
    else:
        wb, search = None, False

    if grid == "pyquant2":
        build_rep, m_shape, blk = _pyquant2_builder(w, granularity, hadamard, hadamard_block, seed, scale_dtype)
    else:
        g = parse_grid(grid)
        blk = block_shape(tuple(w.shape), granularity, block)
        s0 = absmax_scales(w, g, blk)
        m_shape = tuple(s0.shape)
        (gr, gc), (n, k) = m_shape, w.shape
        if gr * blk[0] == n and gc * blk[1] == k:
            # whole blocks: broadcast the per-block scales over a [gr, br, gc, bc] view instead of
            # materialising full-size scales; every element sees the same scale value, so the result
            # is bit-identical to DequantLinear's expanded-scale path
            w4 = w.view(gr, blk[0], gc, blk[1])

            def build_rep(m):
                scales = s0 * m
                codes = quantize_codes(w4, scales.view(gr, 1, gc, 1), g)
                return (codes.view(n, k), scales), dequantize_codes(codes, scales.view(gr, 1, gc, 1)).view(n, k)
        else:
            def build_rep(m):
                scales = s0 * m
                full = expand_scales(scales, tuple(w.shape), blk)
                codes = quantize_codes(w, full, g)
                return (codes, scales), dequantize_codes(codes, full)

    score = _Scorer(metric, w, wb, blk) if search else None
    if score is not None and not bool(score.defined.any()):
        search = False  # no block has a delta to keep: every multiplier would be refused anyway

    m, plain = _coarse_to_fine(lambda mm: build_rep(mm)[1], m_shape, score, search)
    rep, scored = build_rep(m)
    out = DAQResult(grid=grid, scored=scored, multipliers=m)
    if grid == "pyquant2":
        out.packed = rep
    else:
        out.codes, out.scales, out.block = rep[0], rep[1], blk
    if wb is not None:
        out.plain, out.chosen = delta_metrics(w, wb, plain), delta_metrics(w, wb, scored)
    return out


def _check_dense(t, name: str) -> torch.Tensor:
    if not isinstance(t, torch.Tensor) or not t.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got {getattr(t, 'dtype', type(t))}")
    if t.dim() != 2:
        raise ValueError(f"{name} must be 2-D [out_features, in_features], got shape {tuple(t.shape)}")
    if not torch.isfinite(t).all():
        raise ValueError(f"{name} holds NaN or Inf values")
    return t.detach().float().contiguous()


def _pyquant2_builder(w: torch.Tensor, granularity: str, hadamard: bool, hadamard_block: int, seed: int,
                      scale_dtype: torch.dtype):
    """``(build(m) -> (PackedWeight, dense), multiplier shape, score block)`` for the packed format.

    ``row``: per-row scale in ``sv`` (``w_scale = 1``), Hadamard on the input
    side only, so rows stay independent and each row's multiplier is its own.
    ``tensor``: RTNConfig's layout (row-RMS normalisation, random signs and
    Hadamard on both sides, one global ``w_scale``) with a multiplier on ``w_scale``.
    """
    if scale_dtype not in (torch.float16, torch.float32):
        raise TypeError(f"scale_dtype must be torch.float16 or torch.float32, got {scale_dtype}")
    n, k = w.shape
    gen = torch.Generator().manual_seed(seed)
    if granularity == "row":
        had_in = default_block(k, hadamard_block) if hadamard else 0
        su = random_signs(k, gen) if hadamard else torch.ones(k)
        rotated = blockwise_hadamard(w * su[None, :], had_in, dim=1)
        s0 = _search_scale(rotated, per_row=True)  # [N, 1]
        # one storage dtype for every candidate, so the chosen rows can be assembled from the scored ones
        probe = _fit_scale_dtype(torch.cat([s0 * COARSE[0], s0 * COARSE[1]]).reshape(-1), scale_dtype)
        sv_dtype, su_stored = probe.dtype, _fit_scale_dtype(su, scale_dtype)

        def build(m):
            scale = s0 * m
            pw = PackedWeight(codes=pack_codes(_round_to_grid(rotated, scale).to(torch.uint8)), A=_GRID_A.clone(),
                              b=_GRID_B.clone(), su=su_stored, sv=scale.reshape(n).to(sv_dtype),
                              w_scale=torch.tensor(1.0), had_in=had_in, had_out=0,
                              seed=seed if hadamard else None, method="daq").validate()
            return pw, dequantize(pw)

        return build, (n, 1), (1, k)
    # granularity == "tensor": the RTNConfig(hadamard=True) layout, or its non-Hadamard per-tensor analogue
    had_in, had_out = (default_block(k, hadamard_block), default_block(n, hadamard_block)) if hadamard else (0, 0)
    s_in, s_out = (random_signs(k, gen), random_signs(n, gen)) if hadamard else (torch.ones(k), torch.ones(n))
    row_rms = w.square().mean(dim=1).sqrt()
    row_rms = torch.where(row_rms > 0, row_rms, torch.ones_like(row_rms))
    rotated = (w / row_rms[:, None]) * s_out[:, None] * s_in[None, :]
    rotated = blockwise_hadamard(blockwise_hadamard(rotated, had_in, dim=1), had_out, dim=0)
    s0 = _search_scale(rotated, per_row=False)  # [1, 1]
    su, sv = _fit_scale_dtype(s_in, scale_dtype), _fit_scale_dtype(s_out * row_rms, scale_dtype)

    def build(m):
        scale = s0 * m
        pw = PackedWeight(codes=pack_codes(_round_to_grid(rotated, scale).to(torch.uint8)), A=_GRID_A.clone(),
                          b=_GRID_B.clone(), su=su, sv=sv, w_scale=scale.reshape(()).float(), had_in=had_in,
                          had_out=had_out, seed=seed if hadamard else None, method="daq").validate()
        return pw, dequantize(pw)

    return build, (1, 1), (n, k)


# ---------------------------------------------------------------- the config
def _load_state(base) -> Mapping[str, torch.Tensor]:
    """The base's tensors by name; a path is read lazily, one tensor when asked for (sharded and
    FP8 block-scaled checkpoints too: :class:`pyquant.streaming.CheckpointTensors`)."""
    if isinstance(base, nn.Module):
        return {k: v.detach() for k, v in base.state_dict().items()}
    if isinstance(base, Mapping):
        return dict(base)
    if isinstance(base, (str, os.PathLike)):
        from ..streaming import CheckpointTensors  # here: streaming imports this package

        try:
            return CheckpointTensors(base)
        except ValueError as e:
            raise ValueError(f"DAQConfig.base: {e}") from None
    raise TypeError(f"DAQConfig.base must be an nn.Module, a state dict or a safetensors path, got {type(base).__name__}")


def _base_weight(state: Mapping[str, torch.Tensor], fqn: str, shape) -> torch.Tensor:
    """``state[fqn + '.weight']``, or the one entry it ends with at a name boundary
    (so a backbone's state dict serves a model that wraps the backbone)."""
    key = f"{fqn}.weight"
    if key not in state:
        hits = [k for k in state if key.endswith("." + k)]
        if len(hits) != 1:
            raise ValueError(f"DAQConfig.base has no weight for layer {fqn!r} (looked for {key!r}"
                             f"{'; ambiguous: ' + str(hits) if hits else ''})")
        key = hits[0]
    t = state[key]
    if tuple(t.shape) != tuple(shape):
        raise ValueError(f"DAQConfig.base weight {key!r} has shape {tuple(t.shape)}, "
                         f"the layer {fqn!r} has {tuple(shape)}: base is another model")
    return t.detach().float().cpu()


def _set_submodule(model: nn.Module, fqn: str, module: nn.Module) -> None:
    parent, _, child = fqn.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, module)


@dataclass
class DAQConfig(QuantConfig):
    """Delta-aware quantization (see the module docstring).

    Args:
        base: the model before post-training (module, state dict, or path to a
            safetensors file / checkpoint directory); its weights are matched to
            the quantized model's layers by name (a suffix match at a ``.``
            boundary is accepted, e.g. a backbone for a model wrapping it).
        metric: ``sign`` | ``cosine`` | ``mse``.
        granularity: ``block`` (128x128) | ``row`` | ``tensor``.
        grid: ``fp8`` | ``int2``..``int8`` | ``pyquant2``.
        block: block edge for ``granularity="block"``.
        search: False gives the plain scales (the absmax baseline) through the same path.
        hadamard, hadamard_block, seed, scale_dtype: pyquant2 only (see ``RTNConfig``).

    After :func:`pyquant.quantize_model`, ``model.pyquant_daq`` maps each layer
    to its plain and chosen :func:`delta_metrics`.
    """

    base: Any = None
    metric: str = "sign"
    granularity: str = "block"
    grid: str = "fp8"
    block: int = 128
    search: bool = True
    hadamard: bool = True
    hadamard_block: int = 128
    seed: int = 0
    scale_dtype: torch.dtype = torch.float16
    method = "daq"

    def __post_init__(self):
        _check_options(self.grid, self.granularity, self.metric)
        if not isinstance(self.block, int) or self.block < 1:
            raise ValueError(f"DAQConfig.block must be a positive int, got {self.block!r}")
        if self.search and self.base is None:
            raise ValueError("DAQConfig.base is required: the pre-trained model whose delta the search keeps "
                             "(or search=False for plain scales)")
        if self.base is not None and not isinstance(self.base, (nn.Module, Mapping, str, os.PathLike)):
            raise TypeError(f"DAQConfig.base must be an nn.Module, a state dict or a path, got {type(self.base).__name__}")

    def _quantize(self, weight: torch.Tensor, base_weight: torch.Tensor | None) -> DAQResult:
        return daq_quantize(weight, base_weight, grid=self.grid, granularity=self.granularity, metric=self.metric,
                            block=self.block, search=self.search, hadamard=self.hadamard,
                            hadamard_block=self.hadamard_block, seed=self.seed, scale_dtype=self.scale_dtype)

    def quantize_weight(self, weight: torch.Tensor, hessian: torch.Tensor | None = None,
                        base_weight: torch.Tensor | None = None) -> PackedWeight:
        """Grid ``pyquant2`` only (the other grids are not the packed format: use
        :func:`pyquant.quantize_model`, which swaps in ``DequantLinear``)."""
        if self.grid != "pyquant2":
            raise ValueError(f"grid {self.grid!r} does not produce a PackedWeight; use quantize_model or daq_quantize")
        return self._quantize(weight, base_weight).packed

    def apply(self, model: nn.Module, targets: dict[str, nn.Linear], calibration_data: Iterable | None,
              swap: SwapFn, progress: bool = True) -> None:
        from tqdm.auto import tqdm

        state = _load_state(self.base) if self.base is not None else None
        report = {}
        for fqn, linear in tqdm(list(targets.items()), desc="daq quantize", disable=not progress):
            w = linear.weight.detach().cpu()
            wb = None if state is None else _base_weight(state, fqn, w.shape)
            res = self._quantize(w, wb)
            if res.packed is not None:
                swap(fqn, res.packed)
            else:
                dev = linear.weight.device
                _set_submodule(model, fqn, DequantLinear(res.codes.to(dev), res.scales.to(dev), res.block, self.grid,
                                                         linear.bias, method=self.method))
            report[fqn] = {"plain": res.plain, "chosen": res.chosen,
                           "multiplier_mean": res.multipliers.mean().item(),
                           "blocks_changed": int((res.multipliers != 1).sum()), "blocks": res.multipliers.numel()}
        model.pyquant_daq = report

    def to_dict(self) -> dict:
        out = super().to_dict()
        base = self.base
        out["base"] = str(base) if isinstance(base, (str, os.PathLike)) else (
            None if base is None else f"<{type(base).__name__}>")
        return out
