"""The C++ CPU backend: ``pyquant._C.qlinear`` (csrc/cpu/).

The kernels pick the widest instruction set the CPU has at run time (AVX-512 with VNNI, AVX2, or
portable C++) and thread with torch's thread pool. Activations are transformed once per token and
rounded to 16-bit fixed point (two int8 halves), so the weight product is an exact integer dot
product of the 2-bit levels (relative error about 1e-5 against fp32, bit-identical on every ISA).

Environment overrides, read when this module is imported:
``PYQUANT_CPU_ISA=scalar|avx2|avx512`` forces an instruction set (for tests and comparisons),
``PYQUANT_CPU_MODE=float`` keeps the activations in fp32 instead (slower, for comparison).
"""
from __future__ import annotations

import os

import torch

from ..format import PackedWeight

NAME = "cpu"
DTYPES = (torch.float32, torch.bfloat16, torch.float16)

try:
    from .. import _C
except ImportError:  # the extension is not built
    _C = None

if _C is not None and hasattr(_C, "qlinear"):
    if os.environ.get("PYQUANT_CPU_ISA"):
        _C.set_isa(os.environ["PYQUANT_CPU_ISA"])
    if os.environ.get("PYQUANT_CPU_MODE"):
        _C.set_mode(os.environ["PYQUANT_CPU_MODE"])


def available() -> bool:
    return _C is not None and hasattr(_C, "qlinear")


def supports(x: torch.Tensor, pw: PackedWeight) -> str | None:
    if x.device.type != "cpu":
        return f"input is on {x.device}, not the CPU"
    if pw.codes.device.type != "cpu":
        return f"weight is on {pw.codes.device}, not the CPU"
    if x.dtype not in DTYPES:
        return f"input dtype {x.dtype} is not one of {DTYPES}"
    if x.dim() != 2:
        return f"input must be 2-D [M, K], got {x.dim()}-D"
    return None


def linear(x: torch.Tensor, pw: PackedWeight, bias: torch.Tensor | None, cache: dict) -> torch.Tensor:
    # fp16 su / sv are widened inside the C++ call (cheaper than a cached .float() and never stale)
    return _C.qlinear(x, pw.codes, pw.A, pw.b, pw.su, pw.sv, pw.w_scale, pw.had_in, pw.had_out, bias)
