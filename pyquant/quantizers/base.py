"""What every quantization method provides: one config class per method.

A config is a dataclass (so it serialises into ``quantization_config.json``)
that turns a dense weight into a :class:`~pyquant.format.PackedWeight`.
Methods that need more than the weight (calibration Hessians, block-wise
fine-tuning) override :meth:`QuantConfig.apply`, which drives a whole model.
"""
from __future__ import annotations

import dataclasses
from typing import Callable, Iterable

import torch
from torch import nn

from ..format import PackedWeight

# swap(fqn, packed) replaces the nn.Linear at fqn by a QuantLinear and returns it.
SwapFn = Callable[[str, PackedWeight], nn.Module]


def check_weight(weight: torch.Tensor, name: str = "weight") -> torch.Tensor:
    """A finite 2-D float weight with ``K % 4 == 0``, returned as fp32."""
    if not isinstance(weight, torch.Tensor) or not weight.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got {getattr(weight, 'dtype', type(weight))}")
    if weight.dim() != 2:
        raise ValueError(f"{name} must be 2-D [out_features, in_features], got shape {tuple(weight.shape)}")
    if weight.shape[1] % 4:
        raise ValueError(f"{name}: in_features must be divisible by 4 (one code per 4 weights), got {weight.shape[1]}")
    if not torch.isfinite(weight).all():
        raise ValueError(f"{name} holds NaN or Inf values")
    return weight.detach().float()


class QuantConfig:
    """Base of every method's config. Subclasses are dataclasses with a
    class attribute ``method`` (the name written into checkpoints)."""

    method = "base"

    def quantize_weight(self, weight: torch.Tensor, hessian: torch.Tensor | None = None) -> PackedWeight:
        raise NotImplementedError

    def mutated_tensors(self, model: nn.Module, targets: dict[str, nn.Linear]) -> list[torch.Tensor]:
        """Tensors of ``model`` besides the targets that :meth:`apply` changes in place (e.g. norms
        that fine-tuning trains): ``quantize_model`` keeps copies to put back if quantization fails."""
        return []

    def apply(self, model: nn.Module, targets: dict[str, nn.Linear], calibration_data: Iterable | None,
              swap: SwapFn, progress: bool = True) -> None:
        """Quantize every target layer and swap it in; the default needs no data."""
        from tqdm.auto import tqdm

        weights = {fqn: check_weight(linear.weight, f"{fqn}.weight") for fqn, linear in targets.items()}  # all first
        for fqn, weight in tqdm(list(weights.items()), desc=f"{self.method} quantize", disable=not progress):
            swap(fqn, self.quantize_weight(weight))

    def to_dict(self) -> dict:
        out = {"method": self.method}
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            out[f.name] = str(v).removeprefix("torch.") if isinstance(v, torch.dtype) else v
        return out
