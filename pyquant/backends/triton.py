"""The Triton backend: ``torch.ops.pyquant.triton_linear``, kernels from the ``pyquant.triton_kernels`` package.

- 1-16 tokens: fused activation transform (``su``, ``H_in``, ``A^T``, per-token
  constant) -> split-K INT2 GEMV -> output pass (split sum, ``w_scale``, ``H_out``,
  ``sv``, bias); with a single split the GEMV finishes the layer itself.
- more tokens: activation transform (``H_in(su * x)``) -> fused-dequant GEMM with
  the output transform in its epilogue (or in the output pass when a Hadamard
  block is wider than the tile).

The op is a ``torch.library.triton_op`` whose launches go through ``wrap_triton``, so
Inductor sees (and can schedule) the Triton kernels; it takes the stored tensors as they are
and has ``pyquant::linear``'s schema and autograd formula, which makes it the GPU path for
layers that need gradients. Runs on CUDA tensors, and on CPU tensors through the Triton
interpreter when ``TRITON_INTERPRET=1`` was set before the kernels were imported (testing only).

Configs: the forward takes the tuned config from the on-disk cache of
:mod:`pyquant.triton_kernels.autotune` when there is one, else the heuristic default; it never times
anything. :func:`tune` (``pyquant.kernels.tune(model)``) fills the cache for a layer's shapes.

Split-K reduction: deterministic by default (partials summed in a fixed order, bit-identical
between runs); ``PYQUANT_TRITON_REDUCTION=atomic`` (read at import, or :func:`set_reduction`)
switches to fp32 atomics (one buffer, no ordering), unless
``torch.use_deterministic_algorithms(True)``.
"""
from __future__ import annotations

import contextlib
import functools
import importlib.util
import os
from typing import Optional

import torch

from ..ops import INPUT_DTYPES, check_linear_args, register_autograd
from ..format import PackedWeight

NAME = "triton"
MAX_GEMV_TOKENS = 16
_REDUCTIONS = ("deterministic", "atomic")


@functools.lru_cache(maxsize=1)
def _triton_importable() -> bool:
    # find_spec, not import: importing triton here would fix compiled mode for the
    # whole process before a test or user could set TRITON_INTERPRET=1.
    return importlib.util.find_spec("triton") is not None


def _interpret_env() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def available() -> bool:
    """Whether the kernels can run in this process (a CUDA GPU, or ``TRITON_INTERPRET=1``); the
    first time they can, ``pyquant::triton_linear`` is registered."""
    ok = _triton_importable() and (torch.cuda.is_available() or _interpret_env())
    if ok:
        _register_op()
    return ok


def _kernels_interpreted() -> bool:
    # Imported here, not at module top: Triton fixes compiled vs interpreted when
    # the kernels are decorated, so the import must wait until a caller needs them.
    from pyquant.triton_kernels.common import interpreted

    return interpreted()


def supports(layer, dtype: torch.dtype, needs_grad: bool) -> str | None:
    if dtype not in INPUT_DTYPES:
        return f"dtype {dtype} is not one of fp16, bf16, fp32"
    try:
        _kernels_interpreted()
    except Exception as e:  # a broken triton install: fall back, don't crash the dispatcher
        return f"pyquant.triton_kernels failed to import: {type(e).__name__}: {e}"
    device = layer.codes.device
    if device.type == "cuda":
        if _kernels_interpreted():
            return "the Triton kernels were imported under TRITON_INTERPRET=1 (interpreter), not compiled for CUDA"
    elif device.type == "cpu":
        if not _interpret_env():
            return "CPU layer: Triton runs on CPU only through the interpreter (TRITON_INTERPRET=1)"
        if not _kernels_interpreted():
            return "CPU layer: pyquant.triton_kernels was imported before TRITON_INTERPRET=1 was set (restart the process)"
    else:
        return f"device {device.type} is not supported"
    from pyquant.triton_kernels.common import MAX_HADAMARD

    for name in ("had_in", "had_out"):
        if getattr(layer, name) > MAX_HADAMARD:
            return f"{name}={getattr(layer, name)} exceeds the largest Hadamard block the kernels hold ({MAX_HADAMARD})"
    return None


def build(layer) -> None:
    return None  # the op reads the stored tensors; configs live in the autotune cache


def forward(x: torch.Tensor, layer, state: None) -> torch.Tensor:
    return torch.ops.pyquant.triton_linear.default(x, *layer.op_tensors(), layer.had_in, layer.had_out)


# ---------------------------------------------------------------------------- reduction mode

def _check_reduction(mode: str, what: str) -> str:
    mode = mode.strip().lower()
    if mode not in _REDUCTIONS:
        raise ValueError(f"{what} must be 'deterministic' or 'atomic', got {mode!r}")
    return mode


_reduction = _check_reduction(os.environ.get("PYQUANT_TRITON_REDUCTION", "deterministic"),
                              "PYQUANT_TRITON_REDUCTION")


def set_reduction(mode: str) -> None:
    """``"deterministic"`` or ``"atomic"`` for the split-K GEMV from now on."""
    global _reduction
    _reduction = _check_reduction(mode, "mode")


def reduction() -> str:
    """``"deterministic"`` or ``"atomic"`` (see the module docstring)."""
    return "deterministic" if torch.are_deterministic_algorithms_enabled() else _reduction


# ---------------------------------------------------------------------------- configs

@functools.lru_cache(maxsize=16)
def _device_info(device: torch.device) -> tuple[str, int]:
    if device.type != "cuda":
        return "interpreter", 1
    props = torch.cuda.get_device_properties(device)
    return props.name, props.multi_processor_count


def _gemv_key(m, n, k, dtype, deterministic) -> str:
    from pyquant.triton_kernels.autotune import m_bucket

    return f"N={n}|K={k}|M={m_bucket(m)}|x={str(dtype)[6:]}|det={int(deterministic)}"


def _gemm_key(m, n, k, dtype, had_out) -> str:
    from pyquant.triton_kernels.autotune import m_bucket

    return f"N={n}|K={k}|M={m_bucket(m)}|x={str(dtype)[6:]}|had_out={had_out}"


def _config(x: torch.Tensor, pw: PackedWeight, deterministic: bool):
    """The cached tuned config for this call's shape, else the heuristic default."""
    from pyquant.triton_kernels import autotune as at

    m, n, k = x.shape[0], pw.out_features, pw.in_features
    gpu, sms = _device_info(x.device)
    tuner = at.tuner_for(gpu) if x.device.type == "cuda" else None
    if m <= MAX_GEMV_TOKENS:
        hit = tuner.lookup("gemv", _gemv_key(m, n, k, x.dtype, deterministic)) if tuner else None
        return hit or at.default_gemv(m, n, k // 4, sms)
    hit = tuner.lookup("gemm", _gemm_key(m, n, k, x.dtype, pw.had_out)) if tuner else None
    return hit or at.default_gemm(m)


def tune(layer, batch_sizes=(1, 8, 16, 64, 512), dtype: torch.dtype = torch.float16) -> int:
    """Time the config space for ``layer``'s shape at each batch size (on its GPU) and keep the
    fastest in the on-disk cache, where later forwards find it. Returns how many keys were tuned
    now (0 when all were cached, when tuning is off, or off a GPU)."""
    from pyquant.triton_kernels import autotune as at

    if layer.codes.device.type != "cuda" or _kernels_interpreted() or not at.tuning_enabled():
        return 0
    pw, bias = layer.packed, layer.bias
    gpu, sms = _device_info(layer.codes.device)
    tuner = at.tuner_for(gpu)
    before = tuner.tunings
    det = reduction() == "deterministic"
    with torch.no_grad(), torch.cuda.device(layer.codes.device):
        for m in batch_sizes:
            x = torch.randn(m, pw.in_features, device=layer.codes.device, dtype=dtype)
            n, k = pw.out_features, pw.in_features
            if m <= MAX_GEMV_TOKENS:
                cands = at.with_splits(at.gemv_space(at.m_bucket(m)), n, k // 4, sms)
                tuner.choose("gemv", _gemv_key(m, n, k, dtype, det), cands,
                             lambda c: run_gemv(x, pw, bias, c, det))
            else:
                tuner.choose("gemm", _gemm_key(m, n, k, dtype, pw.had_out), at.gemm_space(at.m_bucket(m)),
                             lambda c: run_gemm(x, pw, bias, c))
    return tuner.tunings - before


# ---------------------------------------------------------------------------- the two paths

def run_gemv(x, pw, bias, cfg, deterministic: bool) -> torch.Tensor:
    """The 1-16 token path with an explicit :class:`~pyquant.triton_kernels.gemv_splitk.GemvConfig`."""
    from pyquant.triton_kernels.gemv_splitk import fuses_output, gemv_fused, gemv_partials
    from pyquant.triton_kernels.transform import input_transform, output_transform

    xt, cpart = input_transform(x, pw.su, pw.A, pw.b, pw.had_in)
    if fuses_output(pw.codes.shape[1], pw.had_out, cfg):
        return gemv_fused(xt, cpart, pw.codes, pw.w_scale, pw.sv, bias, pw.had_out, x.dtype, cfg, _gemv_dot_dtype(x))
    part = gemv_partials(xt, pw.codes, cfg, deterministic, _gemv_dot_dtype(x))
    return output_transform(part, pw.sv, bias, pw.had_out, x.dtype, cpart=cpart, w_scale=pw.w_scale)


def run_gemm(x, pw, bias, cfg) -> torch.Tensor:
    """The >16 token path with an explicit :class:`~pyquant.triton_kernels.gemm_dequant.GemmConfig`."""
    from pyquant.triton_kernels.gemm_dequant import gemm_dequant, operand_dtype
    from pyquant.triton_kernels.transform import input_transform, output_transform

    op = operand_dtype(x.dtype, _kernels_interpreted())
    xp, _ = input_transform(x, pw.su, pw.A, pw.b, pw.had_in, apply_a=False, out_dtype=op)
    y, finished = gemm_dequant(xp, pw.codes, pw.A, pw.b, pw.w_scale, pw.sv, bias, pw.had_out, x.dtype, cfg)
    return y if finished else output_transform(y, pw.sv, bias, pw.had_out, x.dtype)


def _gemv_dot_dtype(x: torch.Tensor) -> torch.dtype:
    # bf16 hi/lo halves keep fp32 range (no overflow or subnormal loss); the
    # interpreter's bf16 math is wrong, so it uses fp16 halves.
    return torch.float16 if _kernels_interpreted() else torch.bfloat16


# ---------------------------------------------------------------------------- the op

def _triton_linear(x: torch.Tensor, codes: torch.Tensor, A: torch.Tensor, b: torch.Tensor, su: torch.Tensor,
                   sv: torch.Tensor, w_scale: torch.Tensor, bias: Optional[torch.Tensor], had_in: int,
                   had_out: int) -> torch.Tensor:
    m, n, _ = check_linear_args(x, codes, A, b, su, sv, w_scale, bias, had_in, had_out)
    pw = PackedWeight(codes, A, b, su, sv, w_scale, had_in=had_in, had_out=had_out)
    if m == 0:
        return x.new_empty((0, n))
    det = reduction() == "deterministic"
    cfg = _config(x, pw, det)
    with torch.cuda.device(x.device) if x.is_cuda else contextlib.nullcontext():
        if m <= MAX_GEMV_TOKENS:
            return run_gemv(x, pw, bias, cfg, det)
        return run_gemm(x, pw, bias, cfg)


def _register_op() -> None:
    # Only where the kernels can run: triton_op imports Inductor and sympy (~74 MiB and ~1-2 s in
    # every CPU-only process that builds a layer, for an op it would never call).
    global _registered
    if not _registered:
        torch.library.triton_op("pyquant::triton_linear", _triton_linear, mutates_args=())
        register_autograd("pyquant::triton_linear")
        _registered = True


_registered = False
available()  # registers the op where the kernels can run
