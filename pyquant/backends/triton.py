"""The Triton backend: kernels from the ``triton_kernels`` package.

- 1-16 tokens: fused activation transform (``su``, ``H_in``, ``A^T``, per-token
  constant) -> split-K INT2 GEMV -> output pass (split sum, ``w_scale``, ``H_out``,
  ``sv``, bias); with a single split the GEMV finishes the layer itself.
- more tokens: activation transform (``H_in(su * x)``) -> fused-dequant GEMM with
  the output transform in its epilogue (or in the output pass when a Hadamard
  block is wider than the tile).

Runs on CUDA tensors, and on CPU tensors through the Triton interpreter when
``TRITON_INTERPRET=1`` was set before the kernels were imported (testing only: slow).

Split-K reduction: deterministic by default (partials summed in a fixed order,
bit-identical between runs); ``PYQUANT_TRITON_REDUCTION=atomic`` switches to fp32
atomics (one buffer, no ordering), unless ``torch.use_deterministic_algorithms(True)``.
"""
from __future__ import annotations

import contextlib
import functools
import importlib.util
import os

import torch

from ..format import PackedWeight

NAME = "triton"
DTYPES = (torch.float16, torch.bfloat16, torch.float32)
MAX_GEMV_TOKENS = 16


@functools.lru_cache(maxsize=1)
def _triton_importable() -> bool:
    # find_spec, not import: importing triton here would fix compiled mode for the
    # whole process before a test or user could set TRITON_INTERPRET=1.
    return importlib.util.find_spec("triton") is not None


def _interpret_env() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def available() -> bool:
    return _triton_importable() and (torch.cuda.is_available() or _interpret_env())


def _kernels_interpreted() -> bool:
    # Imported here, not at module top: Triton fixes compiled vs interpreted when
    # the kernels are decorated, so the import must wait until a caller needs them.
    from triton_kernels.common import interpreted

    return interpreted()


def supports(x: torch.Tensor, pw: PackedWeight) -> str | None:
    if not isinstance(x, torch.Tensor):
        return f"x is a {type(x).__name__}, not a tensor"
    if x.dtype not in DTYPES:
        return f"dtype {x.dtype} is not one of fp16, bf16, fp32"
    try:
        _kernels_interpreted()
    except Exception as e:  # a broken triton install: fall back, don't crash the dispatcher
        return f"triton_kernels failed to import: {type(e).__name__}: {e}"
    if x.device.type == "cuda":
        if _kernels_interpreted():
            return "the Triton kernels were imported under TRITON_INTERPRET=1 (interpreter), not compiled for CUDA"
    elif x.device.type == "cpu":
        if not _interpret_env():
            return "CPU tensor: Triton runs on CPU only through the interpreter (TRITON_INTERPRET=1)"
        if not _kernels_interpreted():
            return "CPU tensor: triton_kernels was imported before TRITON_INTERPRET=1 was set (restart the process)"
    else:
        return f"device {x.device.type} is not supported"
    from triton_kernels.common import MAX_HADAMARD

    for name in ("had_in", "had_out"):
        if getattr(pw, name) > MAX_HADAMARD:
            return f"{name}={getattr(pw, name)} exceeds the largest Hadamard block the kernels hold ({MAX_HADAMARD})"
    return None


def reduction() -> str:
    """``"deterministic"`` or ``"atomic"`` (see the module docstring)."""
    mode = os.environ.get("PYQUANT_TRITON_REDUCTION", "deterministic").strip().lower()
    if mode not in ("deterministic", "atomic"):
        raise ValueError(f"PYQUANT_TRITON_REDUCTION must be 'deterministic' or 'atomic', got {mode!r}")
    if torch.are_deterministic_algorithms_enabled():
        return "deterministic"
    return mode


# ---------------------------------------------------------------------------- input checks

def _check(x: torch.Tensor, pw: PackedWeight, bias: torch.Tensor | None) -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
    if x.dtype not in DTYPES:
        raise TypeError(f"x must be fp16, bf16 or fp32, got {x.dtype}")
    if x.dim() != 2:
        raise ValueError(f"x must be 2-D [M, K], got shape {tuple(x.shape)}")
    if x.shape[1] != pw.in_features:
        raise ValueError(f"x has K={x.shape[1]} but the weight has in_features={pw.in_features}")
    if x.shape[0] and x.stride(1) != 1:
        raise ValueError(f"x must be contiguous along K, got strides {x.stride()}")
    if x.device != pw.codes.device:
        raise ValueError(f"x is on {x.device} but the weight is on {pw.codes.device}")
    if bias is not None:
        if not isinstance(bias, torch.Tensor) or not bias.is_floating_point():
            raise TypeError("bias must be a floating-point tensor or None")
        if tuple(bias.shape) != (pw.out_features,):
            raise ValueError(f"bias must have shape ({pw.out_features},), got {tuple(bias.shape)}")
        if bias.device != x.device:
            raise ValueError(f"bias is on {bias.device} but x is on {x.device}")


def _prepared(pw: PackedWeight, cache: dict) -> PackedWeight:
    """The weight validated (once per layer: the check syncs with the GPU) with
    contiguous tensors, kept in the layer's cache."""
    ident = tuple((t.data_ptr(), tuple(t.shape), t.dtype) for t in (pw.codes, pw.A, pw.b, pw.su, pw.sv, pw.w_scale))
    hit = cache.get("triton_weight")
    if hit is not None and hit[0] == ident and hit[1].had_in == pw.had_in and hit[1].had_out == pw.had_out:
        return hit[1]
    pw.validate()
    prep = PackedWeight(*(t.contiguous() for t in (pw.codes, pw.A, pw.b, pw.su, pw.sv, pw.w_scale)),
                        had_in=pw.had_in, had_out=pw.had_out)
    cache.clear()  # configs chosen for another weight are stale too
    cache["triton_weight"] = (ident, prep)
    return prep


# ---------------------------------------------------------------------------- configs

@functools.lru_cache(maxsize=16)
def _device_info(device: torch.device) -> tuple[str, int]:
    if device.type != "cuda":
        return "interpreter", 1
    props = torch.cuda.get_device_properties(device)
    return props.name, props.multi_processor_count


def _tune(x: torch.Tensor) -> bool:
    from triton_kernels.autotune import tuning_enabled

    return x.device.type == "cuda" and not _kernels_interpreted() and tuning_enabled()


def _gemv_config(x, pw, deterministic, dot_dtype, run):
    from triton_kernels import autotune as at

    m, n, k4 = x.shape[0], pw.out_features, pw.codes.shape[1]
    gpu, sms = _device_info(x.device)
    if not _tune(x):
        return at.default_gemv(m, n, k4, sms)
    key = f"N={n}|K={4 * k4}|M={at.m_bucket(m)}|x={str(x.dtype)[6:]}|det={int(deterministic)}"
    cands = at.with_splits(at.gemv_space(at.m_bucket(m)), n, k4, sms)
    return at.tuner_for(gpu).choose("gemv", key, cands, run)


def _gemm_config(x, pw, run):
    from triton_kernels import autotune as at

    m = x.shape[0]
    if not _tune(x):
        return at.default_gemm(m)
    gpu, _ = _device_info(x.device)
    key = (f"N={pw.out_features}|K={pw.in_features}|M={at.m_bucket(m)}|x={str(x.dtype)[6:]}"
           f"|had_out={pw.had_out}")
    return at.tuner_for(gpu).choose("gemm", key, at.gemm_space(at.m_bucket(m)), run)


# ---------------------------------------------------------------------------- the two paths

def run_gemv(x, pw, bias, cfg, deterministic: bool) -> torch.Tensor:
    """The 1-16 token path with an explicit :class:`~triton_kernels.gemv_splitk.GemvConfig`."""
    from triton_kernels.gemv_splitk import fuses_output, gemv_fused, gemv_partials
    from triton_kernels.transform import input_transform, output_transform

    xt, cpart = input_transform(x, pw.su, pw.A, pw.b, pw.had_in)
    if fuses_output(pw.codes.shape[1], pw.had_out, cfg):
        return gemv_fused(xt, cpart, pw.codes, pw.w_scale, pw.sv, bias, pw.had_out, x.dtype, cfg, _gemv_dot_dtype(x))
    part = gemv_partials(xt, pw.codes, cfg, deterministic, _gemv_dot_dtype(x))
    return output_transform(part, pw.sv, bias, pw.had_out, x.dtype, cpart=cpart, w_scale=pw.w_scale)


def run_gemm(x, pw, bias, cfg) -> torch.Tensor:
    """The >16 token path with an explicit :class:`~triton_kernels.gemm_dequant.GemmConfig`."""
    from triton_kernels.gemm_dequant import gemm_dequant, operand_dtype
    from triton_kernels.transform import input_transform, output_transform

    op = operand_dtype(x.dtype, _kernels_interpreted())
    xp, _ = input_transform(x, pw.su, pw.A, pw.b, pw.had_in, apply_a=False, out_dtype=op)
    y, finished = gemm_dequant(xp, pw.codes, pw.A, pw.b, pw.w_scale, pw.sv, bias, pw.had_out, x.dtype, cfg)
    return y if finished else output_transform(y, pw.sv, bias, pw.had_out, x.dtype)


def _gemv_dot_dtype(x: torch.Tensor) -> torch.dtype:
    # bf16 hi/lo halves keep fp32 range (no overflow or subnormal loss); the
    # interpreter's bf16 math is wrong, so it uses fp16 halves.
    return torch.float16 if _kernels_interpreted() else torch.bfloat16


def linear(x: torch.Tensor, pw: PackedWeight, bias: torch.Tensor | None, cache: dict) -> torch.Tensor:
    _check(x, pw, bias)
    pw = _prepared(pw, cache)
    if bias is not None:
        bias = bias.contiguous()
    m = x.shape[0]
    if m == 0:
        return x.new_empty((0, pw.out_features))
    with torch.cuda.device(x.device) if x.is_cuda else contextlib.nullcontext():
        if m <= MAX_GEMV_TOKENS:
            det = reduction() == "deterministic"
            ckey = ("triton_gemv", m, det)
            cfg = cache.get(ckey)
            if cfg is None:
                cfg = cache[ckey] = _gemv_config(x, pw, det, _gemv_dot_dtype(x),
                                                 lambda c: run_gemv(x, pw, bias, c, det))
            return run_gemv(x, pw, bias, cfg, det)
        from triton_kernels.autotune import m_bucket

        ckey = ("triton_gemm", m_bucket(m))
        cfg = cache.get(ckey)
        if cfg is None:
            cfg = cache[ckey] = _gemm_config(x, pw, lambda c: run_gemm(x, pw, bias, c))
        return run_gemm(x, pw, bias, cfg)
