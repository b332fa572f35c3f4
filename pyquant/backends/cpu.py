"""The C++ CPU backend: ``torch.ops.pyquant.linear`` (csrc/cpu).

The kernels pick the widest instruction set the CPU has at run time (AVX-512 with VNNI or AVX2 on
x86-64, NEON on AArch64, portable C++ everywhere; ``_C.supported_isas()`` lists them) and thread
with torch's thread pool. Activations are transformed once per token and
rounded to 16-bit fixed point (two int8 halves), so the weight product is an exact integer dot
product of the 2-bit levels (relative error about 1e-5 against fp32, bit-identical on every ISA).
The op takes the stored tensors as they are (fp16 ``su`` / ``sv`` are widened inside the call),
so this backend keeps no state of its own: building a layer only moves codes of 2 MB and more
into memory backed by 2 MB pages (``_C.in_huge_pages``; Linux), where a batch-1 call streams them
up to 1.5x faster than from 4 KB pages. Its gradient is the formula in :mod:`pyquant.ops`.

Environment overrides, read when this module is imported:
``PYQUANT_CPU_ISA=scalar|avx2|avx512|amx|neon`` forces an instruction set (for tests and comparisons),
``PYQUANT_CPU_MODE=float`` keeps the activations in fp32 instead (slower, for comparison).
"""
from __future__ import annotations

import os

import torch

from ..ops import INPUT_DTYPES, _C

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


def build(layer) -> None:
    codes = layer._buffers.get("codes")
    if codes is not None and not layer._shares_tensors:
        # A plain tensor even when the layer is built under inference_mode: an inference tensor
        # could not be saved for a later backward.
        with torch.inference_mode(False):
            layer._buffers["codes"] = _C.in_huge_pages(codes)
    return None


def forward(x: torch.Tensor, layer, state: None) -> torch.Tensor:
    return torch.ops.pyquant.linear.default(x, *layer.op_tensors(), layer.had_in, layer.had_out)
