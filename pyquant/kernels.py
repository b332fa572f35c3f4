"""The one dispatcher: which backend runs a ``QuantLinear``, decided when the layer is built.

Order of preference by the layer's device: CUDA ``cuda > triton > torch``; CPU ``cpu > torch``
(Triton runs CPU tensors only in its interpreter, which is for tests: it is used there only
when forced). The torch reference is the fallback, never the default where a kernel takes the
layer. Each backend lives in ``pyquant/backends/<name>.py`` (see ``pyquant.backends``).

A choice depends only on what a layer fixes and on the call's input dtype and whether it needs
gradients (the CUDA kernels have no backward). Every QuantLinear holds a :class:`KernelPlan`,
made when the layer is made, loaded or moved: it builds each backend's kernel state once (repacked
codes, fp32 copies) and keeps the choice per ``(input dtype, needs grad, forced backend)``, every
key filled in up front. The forward only looks its choice up: it never validates, tunes or reads
the environment. Choices by batch size (GEMV or GEMM) are made inside each op, on the real ``M``.

Override with the environment variable ``PYQUANT_BACKEND=torch|cpu|triton|cuda`` (read when
this module is imported) or :func:`force_backend`; a forced backend that cannot take a layer
raises ``ValueError`` rather than silently running something else.
``explain(x, layer)`` tells which backend would run and why the others would not.
"""
from __future__ import annotations

import contextlib
import importlib
import logging
import os
from dataclasses import dataclass
from types import ModuleType
from typing import Any, Callable

import torch

from . import ops

log = logging.getLogger(__name__)

BACKENDS = ("cuda", "triton", "cpu", "torch")
_ORDER = {"cuda": ("cuda", "triton", "torch"), "cpu": ("cpu", "torch")}
_MODULES = {"cuda": "cuda", "triton": "triton", "cpu": "cpu", "torch": "torch_ref"}
_loaded: dict[str, ModuleType | None] = {}


def _check_name(name: str, what: str) -> str:
    if name not in BACKENDS:
        raise ValueError(f"{what} must be one of {BACKENDS}, got {name!r}")
    return name


_env = os.environ.get("PYQUANT_BACKEND", "").strip()
_forced: str | None = _check_name(_env, "PYQUANT_BACKEND") if _env else None


def _backend(name: str) -> ModuleType | None:
    """The backend module, or None when it is not part of this install."""
    if name not in _loaded:
        try:
            _loaded[name] = importlib.import_module(f"pyquant.backends.{_MODULES[name]}")
        except ImportError as e:  # a backend that is not built here
            log.debug("backend %s not importable: %s", name, e)
            _loaded[name] = None
    return _loaded[name]


def forced_backend() -> str | None:
    """The backend forced by :func:`force_backend` or ``PYQUANT_BACKEND``, if any."""
    return _forced


@contextlib.contextmanager
def force_backend(name: str | None):
    """Context manager forcing one backend (``None`` restores automatic choice)."""
    global _forced
    prev, _forced = _forced, (_check_name(name, "backend") if name is not None else None)
    try:
        yield
    finally:
        _forced = prev


CPU_MODES = ("auto", "int", "float", "lut", "lut3")


def set_cpu_mode(mode: str, model: torch.nn.Module | None = None) -> str:
    """Sets the CPU kernels' mode and returns the previous setting (``PYQUANT_CPU_MODE`` sets it at
    import): ``"auto"``, the default: ``"lut"`` where the CPU's kernel set has a lut kernel measured
    faster than its int kernels (``avx2``); ``"lut3"`` for a layer of 1 MB of codes or more
    (4096 x 1024 weights; such codes stream from memory) on the ``avx512`` set of an AMD CPU
    with AVX-512 VBMI2 (Zen 4 on; 1.0-1.6x int mode there at 1-32 tokens); else ``"int"``.
    ``"int"``: activations in 16-bit fixed point, relative error ~5e-5, the same bits on every
    kernel set; ``"float"``: fp32 activations, slower;
    ``"lut"``: 14-bit activations, products from table lookups (~2e-4; 1.5-2.6x int mode on AVX2
    CPUs; int mode where ``ops._C.has_lut_kernel()`` is false); ``"lut3"``: 12-bit activations, one
    table lookup per three weights (~2-7e-4; on AVX-512 VBMI2 CPUs, where the int kernels' byte
    multiplies are the bottleneck; int mode where ``ops._C.has_lut3_kernel()`` is false).
    ``ops._C.get_mode()`` says which one runs, ``ops._C.layer_mode(out_features, in_features // 4)``
    which one a layer of that shape is built in. Int and float apply from the next call. Lut and
    lut3 apply to layers built from then on, which keep their codes in a second layout too;
    ``model``: its ``QuantLinear`` layers are rebuilt now (into that mode, or out of it, dropping
    those copies)."""
    if not isinstance(mode, str) or mode not in CPU_MODES:
        raise ValueError(f"mode must be one of {CPU_MODES}, got {mode!r}")
    if model is not None and not isinstance(model, torch.nn.Module):
        raise TypeError(f"model must be a torch.nn.Module or None, got {type(model).__name__}")
    from .nn import QuantLinear

    previous = ops._C.get_mode(resolve=False)
    ops._C.set_mode(mode)
    for layer in () if model is None else model.modules():
        if isinstance(layer, QuantLinear):
            layer.invalidate()
    return previous


def zeros_codes(out_features: int, k4: int, device=None) -> torch.Tensor:
    """A new layer's codes, ``[out_features, k4]`` uint8 zeros on ``device`` (torch's default
    device for None). On the CPU they are made where the CPU backend streams them from (2 MB
    pages, :func:`pyquant.backends.cpu.build`), so that it need not copy them there, and pages
    never written cost no memory: a layer made to be loaded takes memory once, as it loads,
    instead of its zeros, their copy and the heap blocks the allocator kept of both."""
    device = torch.get_default_device() if device is None else torch.device(device)
    # a plain tensor even under inference_mode: an inference tensor could not be saved for a
    # later backward (nor replaced: the CPU backend keeps codes already in 2 MB pages)
    with torch.inference_mode(False):
        if device.type == "cpu":
            return ops._C.zeros_in_huge_pages([out_features, k4], torch.uint8)
        return torch.zeros(out_features, k4, dtype=torch.uint8, device=device)


def available_backends() -> list[str]:
    """Backends built and importable in this process."""
    return [n for n in BACKENDS if (m := _backend(n)) is not None and m.available()]


def _reason_not(name: str, layer, dtype: torch.dtype, needs_grad: bool) -> str | None:
    mod = _backend(name)
    if mod is None:
        return "not installed"
    if not mod.available():
        return "not available in this process"
    return mod.supports(layer, dtype, needs_grad)


def _order(device: torch.device) -> tuple[str, ...]:
    return _ORDER.get(device.type, ("torch",))


@dataclass(frozen=True)
class Choice:
    """The backend one kind of call runs on, why, that backend's state for the layer, and what
    runs it: for calls that need no gradient the backend's ``forward_nograd`` (eager) and
    ``forward_traced`` (a traced graph) where it has them, else its ``forward``."""
    name: str
    why: str
    module: ModuleType
    state: Any
    eager: Callable[[torch.Tensor, Any, Any], torch.Tensor]
    traced: Callable[[torch.Tensor, Any, Any], torch.Tensor]

    def __call__(self, x: torch.Tensor, layer) -> torch.Tensor:
        return self.eager(x, layer, self.state)

    def call_traced(self, x: torch.Tensor, layer) -> torch.Tensor:
        return self.traced(x, layer, self.state)


class KernelPlan:
    """A layer's kernel-side state, built for the layer's current device and tensors.

    ``states[name]`` is what backend ``name`` built for the layer (its own type, or None),
    built once the first time a choice picks that backend; ``choices`` maps
    ``(input dtype, needs grad, forced backend)`` to a :class:`Choice`. Made anew whenever the
    layer's tensors change (``QuantLinear.invalidate``)."""

    def __init__(self, layer):
        self.device = layer.codes.device
        self.states: dict[str, Any] = {}
        self.choices: dict[tuple, Choice] = {}
        # Every key up front, so that a traced forward only looks up (a miss would trace the
        # choice itself, which graph-breaks on the backend imports).
        for forced in (None, *BACKENDS):
            for dtype in ops.INPUT_DTYPES:
                for needs_grad in (False, True):
                    try:
                        self.choices[(dtype, needs_grad, forced)] = self._choose(layer, dtype, needs_grad, forced)
                    except ValueError:  # a forced backend that cannot run it: the forward says so
                        pass

    def refresh(self, layer, changed: frozenset[str]) -> None:
        """Each backend's ``refresh(layer, state, changed)``, where it has one: its copies of the
        ``changed`` tensors rewritten in place."""
        for name, state in self.states.items():
            hook = getattr(_backend(name), "refresh", None)
            if hook is not None:
                hook(layer, state, changed)

    def choice(self, layer, dtype: torch.dtype, needs_grad: bool) -> Choice:
        hit = self.choices.get((dtype, needs_grad, _forced))
        if hit is None:  # an unusual dtype, or a forced backend that cannot run the layer: raises
            hit = self._choose(layer, dtype, needs_grad, _forced)
        return hit

    def _choose(self, layer, dtype, needs_grad, forced) -> Choice:
        if forced is not None:
            reason = _reason_not(forced, layer, dtype, needs_grad)
            if reason is not None:
                raise ValueError(f"backend {forced!r} was forced but cannot run this layer: {reason}")
            return self._make(layer, forced, "forced", needs_grad)
        skipped = []
        for name in _order(self.device):
            reason = _reason_not(name, layer, dtype, needs_grad)
            if reason is None:
                why = "preferred" if not skipped else "fallback; " + "; ".join(skipped)
                if skipped:
                    log.debug("pyquant: %s falls back to %s: %s", layer, name, why)
                return self._make(layer, name, why, needs_grad)
            skipped.append(f"{name}: {reason}")
        raise AssertionError("the torch backend takes every layer")  # unreachable

    def _make(self, layer, name: str, why: str, needs_grad: bool) -> Choice:
        module = _backend(name)
        if name not in self.states:
            self.states[name] = module.build(layer)
        eager = module.forward if needs_grad else getattr(module, "forward_nograd", module.forward)
        traced = module.forward if needs_grad else getattr(module, "forward_traced", module.forward)
        return Choice(name, why, module, self.states[name], eager, traced)


def explain(x: torch.Tensor, layer) -> dict[str, str]:
    """For each backend: ``"selected"``, ``"usable"`` or the reason it is not used for input
    ``x`` (its dtype, and whether it needs gradients) on ``layer`` (a QuantLinear, or a
    PackedWeight, which is wrapped in one)."""
    from .format import PackedWeight
    from .nn import QuantLinear

    if isinstance(layer, PackedWeight):
        layer = QuantLinear.from_packed(layer)
    needs_grad = torch.is_grad_enabled() and (x.requires_grad or layer.needs_grad())
    out, chosen = {}, None
    order = (_forced,) if _forced is not None else _order(layer.codes.device)
    for name in BACKENDS:
        reason = _reason_not(name, layer, x.dtype, needs_grad)
        if name not in order:
            reason = reason or (f"not forced (forced: {_forced})" if _forced is not None
                                else f"not used for {layer.codes.device.type} layers unless forced")
        if reason is None and chosen is None:
            chosen, reason = name, "selected"
        out[name] = reason or "usable"
    return out


def tune(model: torch.nn.Module, batch_sizes=(1, 8, 16, 64, 512), dtype: torch.dtype = torch.float16) -> int:
    """Autotune the Triton kernels for every distinct layer shape of ``model`` (a module holding
    QuantLinear layers, or one) on its GPU, at these batch sizes, outside any forward. The
    choices go to the on-disk cache (``pyquant.triton_kernels.autotune``), where the forward finds them.
    Returns how many configs were tuned now (0 off a GPU, or when all were cached)."""
    from .nn import QuantLinear

    layers = [model] if isinstance(model, QuantLinear) else [m for m in model.modules() if isinstance(m, QuantLinear)]
    triton = _backend("triton")
    if triton is None or not triton.available():
        return 0
    seen, tuned = set(), 0
    for layer in layers:
        shape = (layer.in_features, layer.out_features, layer.had_out, layer.codes.device)
        if shape not in seen:
            seen.add(shape)
            tuned += triton.tune(layer, batch_sizes, dtype)
    return tuned
