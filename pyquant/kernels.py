"""The one dispatcher: picks the backend that runs a ``QuantLinear`` forward.

Order of preference, by the input's device: CUDA tensors ``cuda > triton >
torch``; CPU tensors ``cpu > torch`` (Triton runs CPU tensors only in its
interpreter, which is for tests: it is used there only when forced). The torch
reference is the fallback, never the default where a kernel takes the input. Each backend
lives in ``pyquant/backends/<name>.py`` and says itself whether it is built and
whether it takes a given input (see ``pyquant.backends``).

Override with the environment variable ``PYQUANT_BACKEND=torch|cpu|triton|cuda``
or :func:`force_backend`; a forced backend that cannot take an input raises
``ValueError`` rather than silently running something else.
``explain(x, pw)`` tells which backend would run and why the others would not.
"""
from __future__ import annotations

import contextlib
import importlib
import logging
import os
from types import ModuleType

import torch

from .format import PackedWeight

log = logging.getLogger(__name__)

BACKENDS = ("cuda", "triton", "cpu", "torch")
_ORDER = {"cuda": ("cuda", "triton", "torch"), "cpu": ("cpu", "torch")}
_MODULES = {"cuda": "cuda", "triton": "triton", "cpu": "cpu", "torch": "torch_ref"}
_forced: str | None = None
_loaded: dict[str, ModuleType | None] = {}


def _backend(name: str) -> ModuleType | None:
    """The backend module, or None when it is not part of this install."""
    if name not in _loaded:
        try:
            _loaded[name] = importlib.import_module(f"pyquant.backends.{_MODULES[name]}")
        except ImportError as e:  # a backend that is not written or not built yet
            log.debug("backend %s not importable: %s", name, e)
            _loaded[name] = None
    return _loaded[name]


def _check_name(name: str, what: str) -> str:
    if name not in BACKENDS:
        raise ValueError(f"{what} must be one of {BACKENDS}, got {name!r}")
    return name


def forced_backend() -> str | None:
    """The backend forced by :func:`force_backend` or ``PYQUANT_BACKEND``, if any."""
    if _forced is not None:
        return _forced
    env = os.environ.get("PYQUANT_BACKEND", "").strip()
    return _check_name(env, "PYQUANT_BACKEND") if env else None


@contextlib.contextmanager
def force_backend(name: str | None):
    """Context manager forcing one backend (``None`` restores automatic choice)."""
    global _forced
    prev, _forced = _forced, (_check_name(name, "backend") if name is not None else None)
    try:
        yield
    finally:
        _forced = prev


def available_backends() -> list[str]:
    """Backends built and importable in this process."""
    return [n for n in BACKENDS if (m := _backend(n)) is not None and m.available()]


def _reason_not(name: str, x: torch.Tensor, pw: PackedWeight) -> str | None:
    mod = _backend(name)
    if mod is None:
        return "not installed"
    if not mod.available():
        return "not available in this process"
    return mod.supports(x, pw)


def _order(x: torch.Tensor) -> tuple[str, ...]:
    return _ORDER.get(x.device.type, ("torch",))


def explain(x: torch.Tensor, pw: PackedWeight) -> dict[str, str]:
    """For each backend: ``"selected"``, ``"usable"`` or the reason it is not used."""
    forced = forced_backend()
    out, chosen = {}, None
    order = (forced,) if forced is not None else _order(x)
    for name in BACKENDS:
        reason = _reason_not(name, x, pw)
        if name not in order:
            reason = reason or (f"not forced (PYQUANT_BACKEND={forced})" if forced is not None
                                else f"not used for {x.device.type} tensors unless forced")
        if reason is None and chosen is None:
            chosen, reason = name, "selected"
        out[name] = reason or "usable"
    return out


def select(x: torch.Tensor, pw: PackedWeight) -> tuple[str, str]:
    """``(backend, why)`` for this input. Raises ``ValueError`` when a forced
    backend cannot take it."""
    forced = forced_backend()
    if forced is not None:
        reason = _reason_not(forced, x, pw)
        if reason is not None:
            raise ValueError(f"backend {forced!r} was forced but cannot run this input: {reason}")
        return forced, "forced"
    skipped = []
    for name in _order(x):
        reason = _reason_not(name, x, pw)
        if reason is None:
            why = "preferred" if not skipped else "fallback; " + "; ".join(skipped)
            if skipped:
                log.debug("pyquant fell back to %s: %s", name, why)
            return name, why
        skipped.append(f"{name}: {reason}")
    raise AssertionError("the torch backend takes every input")  # unreachable


def linear(x2d: torch.Tensor, pw: PackedWeight, bias: torch.Tensor | None, cache: dict) -> tuple[torch.Tensor, str, str]:
    """Run the quantized matmul on ``x2d`` ``[M, K]``; returns ``(y, backend, why)``."""
    name, why = select(x2d, pw)
    return _backend(name).linear(x2d, pw, bias, cache), name, why
