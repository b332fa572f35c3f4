"""The C++ CPU backend: ``torch.ops.pyquant.linear`` (csrc/cpu).

The kernels pick the widest instruction set the CPU has at run time (AVX-512 with VNNI or AVX2 on
x86-64, NEON on AArch64, portable C++ everywhere; ``_C.supported_isas()`` lists them) and thread
with torch's thread pool. Activations are transformed once per token and rounded to 16-bit fixed
point (two int8 halves), so the weight product is an exact integer dot product of the 2-bit levels
(relative error about 1e-5 against fp32, bit-identical on every ISA). Its state for a layer: the
codes in memory backed by 2 MB pages where they are 2 MB or more (Linux: a batch-1 call streams
them up to 1.5x faster than from 4 KB pages; a new layer's codes are made there,
:func:`pyquant.kernels.zeros_codes`, and ``_C.in_huge_pages`` moves codes that come from elsewhere:
a tensor put in the layer's place, a move from another device; a checkpoint's pages copied from are
given back to the OS, ``_C.page_out``), and the layer's ``A``, ``b``, ``w_scale``, ``su``, ``sv``
and bias laid out once in one fp32 tensor (:func:`frozen_params`). A traced graph
(``torch.compile``, ``torch.export``) passes it to ``pyquant::frozen_linear`` in calls that need no
gradient, instead of the six tensors: five tensors fewer per layer for the graph's guards and input
checks (the compiled 2-bit MiniLM at batch 1: see the README). Like every backend's state it is a
copy, rebuilt by ``QuantLinear.invalidate`` (loading, ``.to()`` and the quantizers call it): a
compiled graph sees tensors changed in place after that. Eager calls run ``pyquant::linear`` on the
tensors themselves, as they are at the call (checking that the copy is current would cost more
there: each Python step of a call after a large layer's runs from caches its codes have flushed).
Its gradient is the formula in :mod:`pyquant.ops`.

Mode ``"lut"`` (the default on the ``avx2`` kernel set, where mode ``"auto"`` picks it;
``PYQUANT_CPU_MODE=lut``, or ``pyquant.kernels.set_cpu_mode("lut", model)``, elsewhere), for CPUs
whose kernel set has table-lookup kernels (``_C.has_lut_kernel()``: AVX2, where the byte multiplies
of the int kernels are the bottleneck, 1.5-2.6x int mode; AVX-512 and NEON, not measured for speed,
where "auto" keeps int): a layer built under it also holds its codes in the LUT layout
(``_C.pack_lut_codes``, one more copy of the codes, rebuilt by ``invalidate`` like the rest; where
the codes are a checkpoint's pages, as ``load_quantized`` and ``from_pretrained`` leave them,
``_C.page_out`` gives those back to the OS, so that they are resident once), and its calls that
need no gradient, eager or traced, run ``pyquant::lut_linear``: the activations keep 14 bits
instead of 16 (relative error ~2e-4 instead of ~5e-5) and the products come from ``vpshufb`` table
lookups. Its eager calls see in-place changes of the layer's tensors as int mode's do: a tensor
whose version counter moved since its copy was made (an optimizer step, a fill) has that copy
rewritten first (:func:`refresh`). Elsewhere, and for layers built under another mode, ``"lut"``
runs the int mode.

Mode ``"lut3"`` (``PYQUANT_CPU_MODE=lut3`` or ``set_cpu_mode("lut3", model)``; "auto" picks it
for a layer of 1 MB of codes or more on the ``avx512`` kernel set of an AMD CPU with VBMI2,
``_C.layer_mode``) works the same way with the LUT3 layout (``_C.pack_lut3_codes``) and
``pyquant::lut3_linear``, where the kernel set runs its own triple-lookup kernel
(``_C.has_lut3_kernel()``: AVX-512 with VBMI2, Ice Lake and Zen 4 on): 12-bit activations (relative
error ~2-7e-4), one ``vpermi2w`` lookup per three weights and 32 rows. Elsewhere it runs int mode.

Environment overrides, read when this module is imported:
``PYQUANT_CPU_ISA=scalar|avx2|avx512|amx|neon`` forces an instruction set (for tests and comparisons),
``PYQUANT_CPU_MODE=int`` the exact 16-bit mode above where "auto" would pick lut or lut3,
``PYQUANT_CPU_MODE=float`` keeps the activations in fp32 instead (slower, for comparison),
``PYQUANT_CPU_MODE=lut`` or ``lut3`` the modes above, ``auto`` the default.
"""
from __future__ import annotations

import os
from typing import NamedTuple

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


class State(NamedTuple):
    """A layer's state: :func:`frozen_params`, and its codes in the LUT layout in mode ``"lut"``
    (the LUT3 layout in mode ``"lut3"``, ``lut3`` true; None otherwise) with ``versions``, the
    version counters of the layer's tensors (:data:`TENSOR_NAMES`) the copies were made from, by
    which eager calls see in-place changes."""
    params: torch.Tensor | None
    lut_codes: torch.Tensor | None
    versions: list[int] | None = None
    lut3: bool = False


TENSOR_NAMES = ("codes", "A", "b", "su", "sv", "w_scale", "bias")  # QuantLinear.op_tensors' order


def _versions(tensors) -> list[int]:
    """The tensors' version counters (bumped by every in-place change), -1 for None and for
    inference tensors, which have none."""
    try:
        return [-1 if t is None else t._version for t in tensors]
    except RuntimeError:  # an inference tensor
        return [-1 if t is None or t.is_inference() else t._version for t in tensors]


def _pack(codes: torch.Tensor, lut3: bool) -> torch.Tensor:
    return _C.pack_lut3_codes(codes) if lut3 else _C.pack_lut_codes(codes)


def _lut_mode(codes: torch.Tensor) -> str | None:
    """"lut" or "lut3" where the mode of a layer with these codes is one of them (``_C.layer_mode``:
    "auto" picks lut3 for large layers on some CPUs) and the kernel set has its own kernel for it."""
    mode = _C.layer_mode(codes.shape[0], codes.shape[1])
    if mode == "lut" and _C.has_lut_kernel():
        return mode
    if mode == "lut3" and _C.has_lut3_kernel():
        return mode
    return None


def _lut_state(layer, params: torch.Tensor, codes: torch.Tensor, lut3: bool) -> State:
    state = State(params, _C.in_huge_pages(_pack(codes, lut3)), _versions(layer.op_tensors()), lut3)
    _C.page_out(codes)  # the calls stream the LUT layout; the codes' pages go back until needed
    return state


def build(layer) -> State:
    """Moves the codes (in mode ``"lut"``: their LUT layout, which the calls then stream) into
    2 MB pages; :func:`frozen_params` of the layer. A layer sharing a serving engine's tensors
    gets copies only in mode ``"lut"``, and only when the engine refreshes them
    (``from_packed(share=True, refreshed=True)``: vLLM's weight loader, ``pyquant.tp.Shard.load``,
    has :func:`refresh` rewrite them after every later write)."""
    codes = layer._buffers.get("codes")
    mode = _lut_mode(codes) if codes is not None else None
    lut, lut3 = mode is not None, mode == "lut3"
    if layer._shares_tensors:  # the engine's codes stay where they are
        if not (lut and layer._engine_refreshes and codes.device.type == "cpu"):
            return State(None, None)
        with torch.inference_mode(False):
            return _lut_state(layer, _params(layer), codes, lut3)
    params = frozen_params(layer)
    if codes is not None:
        # A plain tensor even when the layer is built under inference_mode: an inference tensor
        # could not be saved for a later backward.
        with torch.inference_mode(False):
            if lut and params is not None:
                return _lut_state(layer, params, codes, lut3)
            layer._buffers["codes"] = placed = _C.in_huge_pages(codes)
            if placed is not codes:  # (a checkpoint's mapping outlives this view of it)
                _C.page_out(codes)
    return State(params, None)


def frozen_params(layer) -> torch.Tensor | None:
    """``[A (16) | b (4) | w_scale | 11 zeros | su (K) | sv (N) | bias (N), if any]`` fp32
    (``PARAMS_HEAD`` = 32 floats before ``su``; csrc/cpu/ops.h), or None for a layer whose tensors
    are a serving engine's (``from_packed(share=True)``: the engine may refill them in place between
    any two calls) or not on the CPU."""
    _, A, b, su, sv, w_scale, bias = layer.op_tensors()
    small = (A, b, su, sv, w_scale) + (() if bias is None else (bias,))
    if layer._shares_tensors or any(t.device.type != "cpu" for t in small):
        return None
    return _params(layer)


def _params(layer) -> torch.Tensor:
    _, A, b, su, sv, w_scale, bias = layer.op_tensors()
    # a plain tensor even under inference_mode: a graph compiled outside it takes it as an input
    with torch.inference_mode(False), torch.no_grad():
        head = torch.zeros(PARAMS_HEAD)
        head[:16], head[16:20], head[20] = A.reshape(16), b, w_scale
        return torch.cat([head, su.float(), sv.float()] + ([] if bias is None else [bias.float()]))


def refresh(layer, state: State, changed: frozenset[str]) -> None:
    """Rewrites the copies in ``state`` made from the ``changed`` tensors in place from the layer's
    tensors as they are now."""
    with torch.inference_mode(False), torch.no_grad():
        now = _versions(layer.op_tensors()) if state.versions is not None else None
        if state.params is not None and changed - {"codes"}:
            state.params.copy_(_params(layer))  # (from every tensor but the codes)
            if now is not None:
                state.versions[1:] = now[1:]
        if state.lut_codes is not None and "codes" in changed:
            state.lut_codes.copy_(_pack(layer._buffers["codes"], state.lut3))
            if now is not None:
                state.versions[0] = now[0]


def forward(x: torch.Tensor, layer, state: State) -> torch.Tensor:
    return torch.ops.pyquant.linear.default(x, *layer.op_tensors(), layer.had_in, layer.had_out)


def forward_nograd(x: torch.Tensor, layer, state: State) -> torch.Tensor:
    if state.lut_codes is None:
        return forward(x, layer, state)
    # An eager call sees the tensors as they are, as int mode's does: copies made before an
    # in-place change (an optimizer step, a fill) are rewritten first (the check: ~3 us a call here,
    # ~2 % of an eager 384 x 384 call at 29 tokens).
    now = _versions(layer.op_tensors())
    if now != state.versions:
        refresh(layer, state, frozenset(n for n, a, b in zip(TENSOR_NAMES, now, state.versions) if a != b))
    return _lut_call(x, layer, state)


def _lut_call(x: torch.Tensor, layer, state: State) -> torch.Tensor:
    if state.lut3:
        return torch.ops.pyquant.lut3_linear.default(x, layer._buffers["codes"], state.lut_codes, state.params,
                                                     layer.had_in, layer.had_out)
    return torch.ops.pyquant.lut_linear.default(x, state.lut_codes, state.params, layer.had_in, layer.had_out)


def forward_traced(x: torch.Tensor, layer, state: State) -> torch.Tensor:
    if state.lut_codes is not None:
        return _lut_call(x, layer, state)
    if state.params is None:
        return forward(x, layer, state)
    return torch.ops.pyquant.frozen_linear.default(x, layer.op_tensors()[0], state.params, layer.had_in,
                                                   layer.had_out)
