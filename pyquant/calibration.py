"""Calibration: second moments ``H = E[x xᵀ]`` of the inputs of selected layers.

Hessian-aware quantizers (UniSVQ's LDLQ) weight a layer's rounding error by
``H``: ``tr((W − Ŵ) H (W − Ŵ)ᵀ)`` is the expected squared output error over
the calibration inputs. ``H`` is accumulated batch by batch (streaming: no
activation is kept) in float64, and padding tokens are left out: a dict batch
with an ``"attention_mask"`` ``[B, T]`` selects the rows of every ``[B, T, K]``
activation (or ``[B*T, K]``, flattened) whose mask is non-zero.

Calibration data is an iterable of model inputs, each a tensor (``model(x)``)
or a dict (``model(**x)``). :func:`materialize` checks every item up front, and
the hooks check every activation, so bad input fails with a clear
``ValueError``/``TypeError`` before any quantization work is done.
"""
from __future__ import annotations

from typing import Iterable, Mapping

import torch
from torch import nn
from tqdm.auto import tqdm

__all__ = [
    "CalibrationError",
    "materialize",
    "check_token_ids",
    "batch_mask",
    "run_model",
    "HessianCollector",
    "FiniteCheck",
    "collect_hessians",
]


class CalibrationError(ValueError):
    """Bad calibration input, detected before any quantization work is lost."""


def _check_tensor(t: torch.Tensor, where: str) -> None:
    if t.device.type == "meta":
        raise CalibrationError(f"{where} is on the meta device: it has no values to calibrate with")
    if t.numel() == 0:
        raise CalibrationError(f"{where} is empty (shape {tuple(t.shape)})")
    if t.is_floating_point() and not torch.isfinite(t).all():
        raise CalibrationError(f"{where} holds NaN or Inf values")


def _check_batch(batch, index: int) -> None:
    where = f"calibration_data[{index}]"
    if isinstance(batch, torch.Tensor):
        if batch.dim() == 0:
            raise CalibrationError(f"{where} must have at least one dimension, got a scalar tensor")
        _check_tensor(batch, where)
        return
    if not isinstance(batch, dict):
        raise TypeError(f"{where} must be a torch.Tensor (passed as model(x)) or a dict of model inputs "
                        f"(passed as model(**x)), got {type(batch).__name__}")
    tensors = {k: v for k, v in batch.items() if isinstance(v, torch.Tensor)}
    if not tensors:
        raise TypeError(f"{where} is a dict without any tensor value (keys: {sorted(map(str, batch))})")
    for key, t in tensors.items():
        _check_tensor(t, f"{where}[{key!r}]")
    mask = batch.get("attention_mask")
    if mask is None:
        return
    if not isinstance(mask, torch.Tensor):
        raise TypeError(f"{where}['attention_mask'] must be a tensor, got {type(mask).__name__}")
    if mask.dim() != 2:
        raise CalibrationError(f"{where}['attention_mask'] must be 2-D [batch, tokens], got shape {tuple(mask.shape)}")
    for key in ("input_ids", "token_type_ids", "inputs_embeds"):
        t = tensors.get(key)
        if t is not None and tuple(t.shape[:2]) != tuple(mask.shape):
            raise CalibrationError(f"{where}: attention_mask has shape {tuple(mask.shape)} but {key} has shape "
                                   f"{tuple(t.shape)}; their [batch, tokens] dimensions must agree")
    if not bool((mask != 0).any()):
        raise CalibrationError(f"{where}['attention_mask'] masks out every token")


def check_token_ids(model: nn.Module, data: list) -> None:
    """Every token id of the batches (``input_ids`` of a dict, or an integer tensor batch) is a row of
    the model's input embedding table, when it has one: an out-of-vocabulary id fails here, naming
    the batch, instead of deep inside the first forward."""
    getter = getattr(model, "get_input_embeddings", None)
    emb = getter() if callable(getter) else None
    if not isinstance(emb, nn.Embedding):
        return
    for i, batch in enumerate(data):
        ids = batch.get("input_ids") if isinstance(batch, dict) else batch
        if isinstance(ids, torch.Tensor) and not ids.is_floating_point() and ids.numel():
            lo, hi = int(ids.min()), int(ids.max())
            if lo < 0 or hi >= emb.num_embeddings:
                raise CalibrationError(f"calibration_data[{i}] holds token ids in [{lo}, {hi}], outside the model's "
                                       f"vocabulary of {emb.num_embeddings}")


def materialize(calibration_data: Iterable | None) -> list:
    """The calibration batches as a list (quantizers pass over them several
    times), each one checked: tensor or dict of tensors, non-empty, finite,
    attention mask 2-D and matching the token tensors. Raises ``ValueError``
    for a missing or empty iterable, ``TypeError`` for a wrong item type."""
    if calibration_data is None:
        raise CalibrationError("calibration_data is required: an iterable of model inputs "
                               "(tensors, or dicts such as tokenizer outputs)")
    if isinstance(calibration_data, (torch.Tensor, Mapping)):
        raise TypeError("calibration_data must be an iterable of batches (e.g. a list of tokenizer outputs), "
                        f"not a single {type(calibration_data).__name__}; wrap it in a list")
    if isinstance(calibration_data, (str, bytes)):
        raise TypeError("calibration_data must be an iterable of model inputs, not a string; tokenize it first")
    try:
        iterator = iter(calibration_data)
    except TypeError:
        raise TypeError(f"calibration_data must be an iterable of batches, got {type(calibration_data).__name__}") from None
    out = []
    for i, batch in enumerate(iterator):
        if isinstance(batch, Mapping) and not isinstance(batch, dict):
            batch = dict(batch)  # a tokenizer's BatchEncoding (a UserDict), or another mapping of inputs
        _check_batch(batch, i)
        out.append(batch)
    if not out:
        raise CalibrationError("calibration_data is empty: give at least one batch")
    return out


def batch_mask(batch) -> torch.Tensor | None:
    """The ``[B, T]`` bool token mask of a dict batch, or None."""
    if isinstance(batch, dict) and isinstance(batch.get("attention_mask"), torch.Tensor):
        return batch["attention_mask"] != 0
    return None


def select_rows(x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """``[R, K]``: the rows of activation ``x`` (``[..., K]``) that are real tokens.

    The mask applies where ``x`` is ``[B, T, ...K]`` with ``[B, T]`` matching it,
    or ``[B*T, K]``; an activation of any other layout is taken whole."""
    k = x.shape[-1]
    if mask is not None:
        mask = mask.to(x.device)
        if x.dim() == 3 and tuple(x.shape[:2]) == tuple(mask.shape):
            return x[mask]
        if x.dim() == 2 and x.shape[0] == mask.numel():
            return x[mask.reshape(-1)]
    return x.reshape(-1, k)


def _device_of(model: nn.Module) -> torch.device:
    for p in model.parameters():
        return p.device
    for b in model.buffers():
        return b.device
    return torch.device("cpu")


def _to(batch, device):
    if isinstance(batch, torch.Tensor):
        return batch.to(device)
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


def run_model(model: nn.Module, batch, index: int):
    """``model(batch)`` or ``model(**batch)`` on the model's device; a failure of
    the forward becomes a ``ValueError`` naming the batch (calibration errors
    raised by hooks pass through unchanged)."""
    batch = _to(batch, _device_of(model))
    try:
        return model(**batch) if isinstance(batch, dict) else model(batch)
    except CalibrationError:
        raise
    except (RuntimeError, ValueError, TypeError, IndexError) as e:
        raise CalibrationError(f"calibration_data[{index}]: the model's forward failed on this batch "
                               f"({type(e).__name__}: {e})") from e


class HessianCollector:
    """Forward hooks accumulating ``sum x xᵀ`` (float64) and the row count of
    the inputs of the given modules. Use as a context manager (hooks are
    removed on exit, also on error); set :attr:`mask` and :attr:`batch_index`
    before each forward. Layers sharing one input tensor (q/k/v projections)
    share the product computed for the first of them."""

    def __init__(self, modules: dict[str, nn.Module]):
        self.modules = modules
        self.mask: torch.Tensor | None = None
        self.batch_index = 0
        self.sums: dict[str, torch.Tensor] = {}
        self.counts: dict[str, int] = {name: 0 for name in modules}
        self._handles = []
        self._last: tuple | None = None  # (input tensor, its rows' product, row count, version)
        self._buffers: dict = {}
        self._current = ""
        self._hessians: dict[str, torch.Tensor] | None = None

    def __enter__(self) -> "HessianCollector":
        for name, module in self.modules.items():
            self._handles.append(module.register_forward_pre_hook(self._hook(name)))
        return self

    def __exit__(self, *exc) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()
        self._last = None
        self._buffers.clear()

    def _product(self, x: torch.Tensor) -> tuple[torch.Tensor, int]:
        """``(xᵀx over the real-token rows of x, row count)``, in a reused fp32
        buffer per width: one batch's product in fp32 is exact to ~1e-6 and half
        the cost of fp64 on CPU; the running sums are float64. Fresh large
        allocations are avoided because page faults dominate on some hosts."""
        if self._last is not None and self._last[0] is x and self._last[3] == x._version:
            return self._last[1], self._last[2]
        xs = select_rows(x.detach(), self.mask).float()
        k = xs.shape[-1]
        buf = self._buffers.get((k, xs.device))
        if buf is None:
            buf = self._buffers[(k, xs.device)] = torch.empty(k, k, device=xs.device)
        torch.mm(xs.T, xs, out=buf)
        # A NaN/Inf anywhere in column k makes the diagonal entry sum(x_k^2) NaN/Inf.
        if not torch.isfinite(buf.diagonal()).all():
            raise CalibrationError(f"calibration_data[{self.batch_index}]: the input activations of "
                                   f"{self._current} hold NaN or Inf values")
        self._last = (x, buf, xs.shape[0], x._version)
        return buf, xs.shape[0]

    def _hook(self, name: str):
        def hook(module, args):
            if not args or not isinstance(args[0], torch.Tensor):
                raise CalibrationError(f"calibration_data[{self.batch_index}]: {name} was called without a "
                                       "tensor input")
            self._current = name
            prod, rows = self._product(args[0])
            acc = self.sums.get(name)
            if acc is None:
                acc = self.sums[name] = torch.zeros(prod.shape, dtype=torch.float64, device=prod.device)
            acc += prod
            self.counts[name] += rows
        return hook

    def hessians(self) -> dict[str, torch.Tensor]:
        """``{name: E[x xᵀ]}`` (float64); a module that saw no token is an error. Ends the
        collection: the sums become the means (a second call returns the same tensors)."""
        if self._hessians is not None:
            return self._hessians
        missing = [n for n, c in self.counts.items() if c == 0]
        if missing:
            raise CalibrationError(f"no calibration token reached {missing}: these layers are not used by the "
                                   "model's forward on the calibration data")
        # In place (no second copy of every [K, K] sum); layers that saw the same inputs (q/k/v,
        # gate/up) get one shared tensor. Callers must not modify the results in place.
        out: dict[str, torch.Tensor] = {}
        firsts: list[str] = []  # the first layer of each distinct sum
        for n in self.modules:
            acc = self.sums[n]
            twin = next((m for m in firsts if self.counts[m] == self.counts[n] and self.sums[m].shape == acc.shape
                         and torch.equal(self.sums[m], acc)), None)
            if twin is None:
                firsts.append(n)
            out[n] = out[twin] if twin is not None else acc
        for n in firsts:
            out[n].div_(self.counts[n])
        self._hessians = out
        return out


class FiniteCheck:
    """Forward pre-hooks that raise :class:`CalibrationError` as soon as the input
    of one of ``modules`` holds NaN/Inf on a real token (a cheap pass over the
    whole model before any quantization, so bad data fails early and clearly).
    Set :attr:`mask` and :attr:`batch_index` before each forward."""

    def __init__(self, modules: dict[str, nn.Module]):
        self.modules = modules
        self.mask: torch.Tensor | None = None
        self.batch_index = 0
        self.called: set[str] = set()  # the modules the forwards reached
        self._handles = []

    def __enter__(self) -> "FiniteCheck":
        for name, module in self.modules.items():
            self._handles.append(module.register_forward_pre_hook(self._hook(name)))
        return self

    def __exit__(self, *exc) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()

    def _hook(self, name: str):
        def hook(module, args):
            self.called.add(name)
            if args and isinstance(args[0], torch.Tensor) and args[0].is_floating_point():
                if not torch.isfinite(select_rows(args[0].detach(), self.mask)).all():
                    raise CalibrationError(f"calibration_data[{self.batch_index}]: the input activations of "
                                           f"{name} hold NaN or Inf values")
        return hook


@torch.no_grad()
def collect_hessians(model: nn.Module, modules: dict[str, nn.Module], calibration_data: Iterable,
                     progress: bool = False) -> dict[str, torch.Tensor]:
    """``{name: H = E[x xᵀ]}`` (float64 ``[K, K]``) of the inputs of ``modules``
    (submodules of ``model``, typically ``nn.Linear``), over every real token of
    ``calibration_data`` run through ``model``. Modules that saw the same inputs (q/k/v
    projections) share one tensor: do not modify the results in place."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    if not isinstance(modules, dict) or not all(isinstance(m, nn.Module) for m in modules.values()):
        raise TypeError("modules must be a dict {name: nn.Module}")
    if not modules:
        raise ValueError("modules is empty: nothing to calibrate")
    data = materialize(calibration_data)
    with HessianCollector(modules) as col:
        for i, batch in enumerate(tqdm(data, desc="calibration", disable=not progress, leave=False)):
            col.mask, col.batch_index = batch_mask(batch), i
            run_model(model, batch, i)
            col._last = None
    return col.hessians()
