"""LoRA adapters on quantized layers (QLoRA-style: a frozen 2-bit base, trainable low-rank update).

    pyquant.quantize_model(model, pyquant.RTNConfig(bits=2))
    names = pyquant.lora.add_lora(model, rank=8, alpha=16)    # wraps every QuantLinear
    # ... train: only the adapters (and whatever else you unfreeze) get gradients ...

A wrapped layer computes ``y = base(x) + (alpha / rank) * B(A(dropout(x)))``. The base is a
:class:`~pyquant.nn.QuantLinear`, whose op passes the exact input gradient through the 2-bit
weight (``torch.ops.pyquant.linear``'s autograd), so adapters in early layers train too; its
codes and scales stay frozen and bit-identical. ``B`` starts at zero: a fresh adapter changes
nothing. Adapters are kept separate (a 2-bit weight cannot absorb a dense update).
"""
from __future__ import annotations

import math
from typing import Callable

import torch
from torch import nn

from .nn import QuantLinear, set_submodule


class LoRALinear(nn.Module):
    """A frozen ``base`` layer (``QuantLinear`` or ``nn.Linear``) plus a rank-``rank`` update."""

    def __init__(self, base: nn.Module, rank: int = 8, alpha: float = 16.0, dropout: float = 0.0):
        super().__init__()
        if not isinstance(base, (QuantLinear, nn.Linear)):
            raise TypeError(f"base must be a QuantLinear or nn.Linear, got {type(base).__name__}")
        if not isinstance(rank, int) or isinstance(rank, bool) or rank < 1:
            raise ValueError(f"rank must be a positive int, got {rank!r}")
        if not alpha > 0:
            raise ValueError(f"alpha must be positive, got {alpha!r}")
        if not 0 <= dropout < 1:
            raise ValueError(f"dropout must be in [0, 1), got {dropout!r}")
        device = base.weight.device if isinstance(base, nn.Linear) else base.codes.device
        self.base = base
        for p in base.parameters():
            p.requires_grad_(False)
        self.lora_A = nn.Linear(base.in_features, rank, bias=False, device=device)
        self.lora_B = nn.Linear(rank, base.out_features, bias=False, device=device)
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B.weight)
        self.dropout = nn.Dropout(dropout) if dropout else nn.Identity()
        self.scaling = alpha / rank

    @property
    def in_features(self) -> int:
        return self.base.in_features

    @property
    def out_features(self) -> int:
        return self.base.out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        update = self.lora_B(self.lora_A(self.dropout(x.to(self.lora_A.weight.dtype))))
        return self.base(x) + (update * self.scaling).to(x.dtype)


def add_lora(model: nn.Module, rank: int = 8, alpha: float = 16.0, dropout: float = 0.0,
             filter_fn: Callable[[nn.Module, str], bool] | None = None) -> list[str]:
    """Wrap the ``QuantLinear`` layers of ``model`` picked by ``filter_fn(module, fqn)`` (default:
    all) in :class:`LoRALinear`, in place, and freeze every other parameter of the model.
    Returns the wrapped layers' names. Raises ``ValueError`` when nothing was wrapped."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    if filter_fn is not None and not callable(filter_fn):
        raise TypeError("filter_fn must be callable as filter_fn(module, fqn) -> bool")
    targets = [fqn for fqn, m in model.named_modules()
               if isinstance(m, QuantLinear) and (filter_fn is None or filter_fn(m, fqn))]
    if not targets:
        raise ValueError("model has no QuantLinear layer (selected by filter_fn) to add LoRA adapters to")
    adapters = {fqn: LoRALinear(model.get_submodule(fqn), rank, alpha, dropout) for fqn in targets}  # all or none
    for p in model.parameters():
        p.requires_grad_(False)
    for fqn, adapter in adapters.items():
        set_submodule(model, fqn, adapter)
    return targets


def lora_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The adapters' trainable parameters, for the optimizer."""
    return [p for m in model.modules() if isinstance(m, LoRALinear) for p in (m.lora_A.weight, m.lora_B.weight)]
