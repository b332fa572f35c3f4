"""The C++ CPU backend: ``torch.ops.pyquant.linear`` (csrc/cpu).

The kernels pick the widest instruction set the CPU has at run time (AVX-512 with VNNI or AVX2 on
x86-64, NEON on AArch64, portable C++ everywhere; ``_C.supported_isas()`` lists them) and thread
with torch's thread pool. Activations are transformed once per token and
rounded to 16-bit fixed point (two int8 halves), so the weight product is an exact integer dot
product of the 2-bit levels (relative error about 1e-5 against fp32, bit-identical on every ISA).
Its state for a layer: the codes moved into memory backed by 2 MB pages where they are 2 MB or
more (``_C.in_huge_pages``; Linux: a batch-1 call streams them up to 1.5x faster than from 4 KB
pages), and the layer's ``A``, ``b``, ``w_scale``, ``su`` and ``sv`` laid out once in fp32
(:class:`FrozenParams`), which calls that need no gradient pass to ``pyquant::frozen_linear``
instead of the five tensors: the format's fp16 ``su`` / ``sv`` are not widened per call, and
``torch.compile`` guards and checks four tensors fewer per layer call (the compiled 2-bit MiniLM
at batch 1: see the README). An eager call first checks that the five are the tensors the copy
was taken from, unchanged (their version counters), and retakes it if not; a compiled graph
cannot, nor can anything for tensors made under ``torch.inference_mode`` (they have no version
counter), so changes made in place show there after ``QuantLinear.invalidate`` (loading, ``.to()``
and the quantizers call it) or, in a compiled graph, the next eager call. Calls that need gradients run
``pyquant::linear`` on the tensors themselves; its gradient is the formula in :mod:`pyquant.ops`.

Environment overrides, read when this module is imported:
``PYQUANT_CPU_ISA=scalar|avx2|avx512|amx|neon`` forces an instruction set (for tests and comparisons),
``PYQUANT_CPU_MODE=float`` keeps the activations in fp32 instead (slower, for comparison).
"""
from __future__ import annotations

import os

import torch

from ..ops import INPUT_DTYPES, PARAMS_HEAD, _C

NAME = "cpu"

if os.environ.get("PYQUANT_CPU_ISA"):
    _C.set_isa(os.environ["PYQUANT_CPU_ISA"])
if os.environ.get("PYQUANT_CPU_MODE"):
    _C.set_mode(os.environ["PYQUANT_CPU_MODE"])


def available() -> bool:
    return True


def supports(layer, dtype: torch.dtype, needs_grad: bool) -> str | None:
    if layer.codes.device.type != "cpu":
        return f"the layer is on {layer.codes.device}, not the CPU"
    if dtype not in INPUT_DTYPES:
        return f"input dtype {dtype} is not one of {INPUT_DTYPES}"
    return None


class FrozenParams:
    """``params``: ``[A (16) | b (4) | w_scale | 11 zeros | su (K) | sv (N)]`` fp32 (``PARAMS_HEAD`` = 32
    floats before ``su``; csrc/cpu/ops.h), copied from the layer's tensors, which it remembers with
    their version counters to tell when the copy is out of date."""

    def __init__(self, layer):
        with torch.inference_mode(False):  # a plain tensor, which a compiled graph can take as input
            self.params = torch.empty(PARAMS_HEAD + layer.in_features + layer.out_features)
        self.take(layer)

    @staticmethod
    def _sources(layer) -> tuple:
        _, A, b, su, sv, w_scale, _ = layer.op_tensors()
        return A, b, w_scale, su, sv

    def take(self, layer) -> None:
        """Copy the layer's tensors (as they are now) into ``params``."""
        A, b, w_scale, su, sv = self.sources = self._sources(layer)
        k = su.shape[0]
        with torch.no_grad():
            self.params[:PARAMS_HEAD].zero_()
            self.params[:16].copy_(A.reshape(16))
            self.params[16:20].copy_(b)
            self.params[20:21].copy_(w_scale.reshape(1))
            self.params[PARAMS_HEAD:PARAMS_HEAD + k].copy_(su)
            self.params[PARAMS_HEAD + k:].copy_(sv)
        # (inference tensors, made under torch.inference_mode, have no version counter)
        self.versions = None if any(t.is_inference() for t in self.sources) else tuple(t._version for t in self.sources)

    def refresh(self, layer) -> None:
        """Retake the copy if a tensor was replaced or changed in place since it was taken."""
        now = self._sources(layer)
        if any(a is not b for a, b in zip(now, self.sources)) or (
                self.versions is not None and tuple(t._version for t in now) != self.versions):
            self.take(layer)


def build(layer) -> FrozenParams | None:
    """Moves the codes into 2 MB pages; returns the layer's :class:`FrozenParams`, or None for a
    layer whose tensors are a serving engine's (``from_packed(share=True)``: the engine may refill
    them in place, between any two calls) or not on the CPU."""
    codes = layer._buffers.get("codes")
    if codes is not None and not layer._shares_tensors:
        # A plain tensor even when the layer is built under inference_mode: an inference tensor
        # could not be saved for a later backward.
        with torch.inference_mode(False):
            layer._buffers["codes"] = _C.in_huge_pages(codes)
    if layer._shares_tensors or any(t.device.type != "cpu" for t in layer.op_tensors()[:6]):
        return None
    return FrozenParams(layer)


def forward(x: torch.Tensor, layer, state: FrozenParams | None) -> torch.Tensor:
    return torch.ops.pyquant.linear.default(x, *layer.op_tensors(), layer.had_in, layer.had_out)


def forward_no_grad(x: torch.Tensor, layer, state: FrozenParams | None) -> torch.Tensor:
    if state is None:
        return forward(x, layer, state)
    if not torch.compiler.is_compiling():  # (a compiled graph cannot read version counters)
        state.refresh(layer)
    codes, *_, bias = layer.op_tensors()
    return torch.ops.pyquant.frozen_linear.default(x, codes, state.params, bias, layer.had_in, layer.had_out)
