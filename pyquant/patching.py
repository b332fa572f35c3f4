"""Weight-space vectors: quantization vectors (QAT robustness moved between tasks)
and the task-vector arithmetic under them.

A *vector* is a ``dict[str, Tensor]`` keyed by state-dict names. The quantization
vector of a donor task D is ``tau_q = theta_QAT,D - theta_FT,D`` (two runs from
the same init, seed and hyper-parameters, one of them with fake quantization);
patching a receiver R is ``theta_R' = theta_FT,R + lam * tau_q``, then the usual
quantize -> swap. By default a vector holds every floating-point backbone tensor, as the
reference (dansolombrino/qat-transfer) builds it: linear weights and biases, LayerNorms,
embeddings (:func:`backbone_names`); never the task head, whose classes differ between
tasks. ``scope="quantizable"`` keeps only what the quantizers take (:func:`quantizable_names`).
``lam`` is chosen on the reference's grid, ties to the smallest (:func:`search_lambda`).

    v = quantization_vector(qat_model, ft_model)          # donor
    apply_vector(receiver, v, lam=1.0)                     # in place
    lam = search_lambda(receiver, v, eval_fn)              # on a validation split
    save_vector(v, "qv.safetensors"); v = load_vector("qv.safetensors")

Vectors are kept in float64 by default: the difference of two fp32 weights is
then exact (unless they are more than 2**29 apart in magnitude), so applying a
vector with ``lam = 1`` gives back the QAT weights bit for bit.

This module sits left of ``quantizers`` and ``nn`` in the import graph: it
imports neither (its fake quantization comes from :mod:`pyquant.fakequant`).
"""
from __future__ import annotations

import math
import os
import tempfile
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrize

from .fakequant import fake_quantize_rows_ste

__all__ = [
    "HEAD_NAMES",
    "DEFAULT_LAMBDA_GRID",
    "PROJECT_LAMBDA_GRID",
    "is_head",
    "backbone_names",
    "quantizable_names",
    "quantization_vector",
    "task_vector",
    "apply_vector",
    "search_lambda",
    "save_vector",
    "load_vector",
    "add_vectors",
    "scale_vector",
    "restrict",
    "rename",
    "vector_norm",
    "cosine",
    "finetune",
    "qat_finetune",
]

Vector = dict[str, torch.Tensor]
NameFilter = Callable[[str], bool]

# Module names that mark a task head: a tensor below one of these is never in a vector by default.
HEAD_NAMES = frozenset({"head", "heads", "classifier", "lm_head", "score", "qa_outputs"})
# The reference's receiver-side grid (qat-transfer's ALLOWED_ALPHAS; its selection keeps the first
# best in ascending order, so ties go to the smallest). Its code notes that this filter was never
# applied, so its published BERT numbers were selected over 40 values 0.05..2.00.
DEFAULT_LAMBDA_GRID = (0.15, 0.30, 0.45, 0.60, 0.75, 0.90, 1.00, 1.05, 1.20, 1.35, 1.50)
# This project's earlier, coarser grid (not the paper's).
PROJECT_LAMBDA_GRID = (0.15, 0.25, 0.5, 0.75, 1.0, 1.25, 1.5)
SCOPES = ("backbone", "quantizable")


# ---------------------------------------------------------------- names and states
def is_head(name: str) -> bool:
    """Whether the tensor ``name`` lives under a task-head module (see :data:`HEAD_NAMES`)."""
    return any(part in HEAD_NAMES for part in name.split(".")[:-1])


def _state(obj, arg: str) -> dict[str, torch.Tensor]:
    """The tensors of a module (parameters and buffers) or of a state-dict mapping, detached."""
    if isinstance(obj, nn.Module):
        return {k: v.detach() for k, v in obj.state_dict(keep_vars=True).items()}
    if isinstance(obj, Mapping):
        for k, v in obj.items():
            if not isinstance(k, str) or not isinstance(v, torch.Tensor):
                raise TypeError(f"{arg} must map str names to tensors; entry {k!r} is {type(v).__name__}")
        return {k: v.detach() for k, v in obj.items()}
    raise TypeError(f"{arg} must be an nn.Module or a state dict, got {type(obj).__name__}")


def backbone_names(model_or_state) -> set[str]:
    """Names of every floating-point tensor (parameters and buffers) outside the head: the
    reference's vector scope (it drops the head and the integer tensors, e.g. ``position_ids``)."""
    return {n for n, t in _state(model_or_state, "model_or_state").items() if t.is_floating_point() and not is_head(n)}


def _scope_filter(scope: str, source) -> NameFilter:
    if scope not in SCOPES:
        raise ValueError(f"scope must be one of {SCOPES}, got {scope!r}")
    return (backbone_names if scope == "backbone" else quantizable_names)(source).__contains__


def quantizable_names(model_or_state) -> set[str]:
    """Names of the backbone tensors that the quantizers take: weight and bias of
    every ``nn.Linear`` with ``in_features % 4 == 0`` outside the head.

    From a bare state dict the layer types are unknown, so a 2-D floating
    ``*.weight`` stands for a Linear layer, except embedding tables (``embed``
    in the name)."""
    names: set[str] = set()
    if isinstance(model_or_state, nn.Module):
        for fqn, m in model_or_state.named_modules():
            if isinstance(m, nn.Linear) and m.in_features % 4 == 0 and not is_head(f"{fqn}.weight"):
                names.add(f"{fqn}.weight")
                if m.bias is not None:
                    names.add(f"{fqn}.bias")
        return names
    state = _state(model_or_state, "model_or_state")
    for name, t in state.items():
        prefix = name.removesuffix(".weight")
        if (name.endswith(".weight") and t.is_floating_point() and t.dim() == 2 and t.shape[1] % 4 == 0
                and "embed" not in prefix and not is_head(name)):
            names.add(name)
            if f"{prefix}.bias" in state:
                names.add(f"{prefix}.bias")
    return names


def _check_vector(v, arg: str = "v") -> Vector:
    if not isinstance(v, Mapping) or not v:
        raise TypeError(f"{arg} must be a non-empty dict of name -> tensor, got {type(v).__name__}")
    for k, t in v.items():
        if not isinstance(k, str) or not isinstance(t, torch.Tensor) or not t.is_floating_point():
            raise TypeError(f"{arg} must map str names to floating-point tensors; entry {k!r} is not one")
    return dict(v)


# ---------------------------------------------------------------- vectors
def task_vector(post, pre, filter_fn: NameFilter | None = None, dtype: torch.dtype = torch.float64,
                scope: str = "backbone") -> Vector:
    """``post - pre`` over the names ``filter_fn(name)`` keeps (default: the ``scope``'s names,
    :func:`backbone_names` or :func:`quantizable_names`, of ``post``, or of ``pre`` when ``post``
    is a bare state dict and ``pre`` a module)."""
    ps, qs = _state(post, "post"), _state(pre, "pre")
    if filter_fn is None:
        filter_fn = _scope_filter(scope, post if isinstance(post, nn.Module) or not isinstance(pre, nn.Module) else pre)
    elif not callable(filter_fn):
        raise TypeError("filter_fn must be callable as filter_fn(name) -> bool")
    names = sorted(n for n in ps if ps[n].is_floating_point() and filter_fn(n))
    if not names:
        raise ValueError("the filter keeps no floating-point tensor: the vector would be empty")
    missing = [n for n in names if n not in qs]
    if missing:
        raise ValueError(f"the two models differ: {len(missing)} tensors are missing from the second one, "
                         f"e.g. {missing[:3]}")
    for n in names:
        if ps[n].shape != qs[n].shape:
            raise ValueError(f"the two models differ in shape at {n!r}: {tuple(ps[n].shape)} vs {tuple(qs[n].shape)}")
    return {n: ps[n].to(dtype) - qs[n].to(dtype) for n in names}


def quantization_vector(qat, ft, filter_fn: NameFilter | None = None, dtype: torch.dtype = torch.float64,
                        scope: str = "backbone") -> Vector:
    """``tau_q = theta_QAT - theta_FT`` (latent float QAT weights minus plain fine-tuned weights of
    the same task) over the backbone's floating tensors (``scope="quantizable"``: its quantizable
    layers only)."""
    return task_vector(qat, ft, filter_fn, dtype, scope)


def _check_fits(state: dict[str, torch.Tensor], v: Vector) -> None:
    """Raise ``ValueError`` unless every entry of ``v`` names a floating tensor of ``state`` of the same shape."""
    missing = [n for n in v if n not in state]
    if missing:
        raise ValueError(f"vector does not fit this model: {len(missing)} of its {len(v)} tensors are missing, "
                         f"e.g. {missing[:3]}")
    for n, t in v.items():
        if state[n].shape != t.shape:
            raise ValueError(f"vector does not fit this model: {n!r} has shape {tuple(t.shape)} in the vector "
                             f"but {tuple(state[n].shape)} in the model")
        if not state[n].is_floating_point():
            raise ValueError(f"vector entry {n!r} targets a non-floating tensor ({state[n].dtype})")
        if not torch.isfinite(t).all():
            raise ValueError(f"vector entry {n!r} holds NaN or Inf")


def apply_vector(model, v: Mapping[str, torch.Tensor], lam: float = 1.0):
    """``theta += lam * v`` in place on a module or a state dict of tensors; returns it.

    Every name and shape is checked before anything is changed, so a vector
    from another model raises ``ValueError`` and leaves ``model`` untouched.
    The sum is formed in float64 and rounded once to each tensor's dtype.
    """
    v = _check_vector(v)
    if isinstance(lam, bool) or not isinstance(lam, (int, float)) or not math.isfinite(lam):
        raise TypeError(f"lam must be a finite number, got {lam!r}")
    state = _state(model, "model")
    _check_fits(state, v)
    with torch.no_grad():
        for n, t in v.items():
            target = state[n]
            delta = t.to(device=target.device, dtype=torch.float64)
            target.copy_((target.to(torch.float64) + lam * delta).to(target.dtype))
    return model


def search_lambda(model, v: Mapping[str, torch.Tensor], eval_fn: Callable[[nn.Module], float],
                  grid: Iterable[float] | None = None, return_scores: bool = False, ties: str = "smallest"):
    """The ``lam`` of ``grid`` (default :data:`DEFAULT_LAMBDA_GRID`) whose patched
    model scores highest under ``eval_fn(model) -> float`` (higher is better;
    run it on a validation split). Ties go to the smallest ``lam``, as in the reference
    (``ties="closest_to_one"``: to the ``lam`` closest to 1, this project's earlier rule).

    ``eval_fn`` gets the patched full-precision model and must not change its
    tensors (quantize a copy). ``model`` is restored exactly afterwards.
    With ``return_scores``, returns ``(lam, {lam: score})``.
    """
    v = _check_vector(v)
    if not callable(eval_fn):
        raise TypeError("eval_fn must be callable as eval_fn(model) -> float")
    if ties not in ("smallest", "closest_to_one"):
        raise ValueError(f"ties must be 'smallest' or 'closest_to_one', got {ties!r}")
    grid = list(DEFAULT_LAMBDA_GRID if grid is None else grid)
    if not grid or any(isinstance(g, bool) or not isinstance(g, (int, float)) or not math.isfinite(g) for g in grid):
        raise ValueError(f"grid must be a non-empty list of finite numbers, got {grid!r}")
    state = _state(model, "model")
    _check_fits(state, v)
    saved = {n: state[n].clone() for n in v}
    scores: dict[float, float] = {}
    try:
        for lam in grid:
            apply_vector(model, v, float(lam))
            scores[float(lam)] = float(eval_fn(model))
            with torch.no_grad():
                for n, t in saved.items():
                    state[n].copy_(t)
    finally:
        with torch.no_grad():
            for n, t in saved.items():
                state[n].copy_(t)
    best = max(scores, key=lambda g: (scores[g], -g if ties == "smallest" else -abs(g - 1.0)))
    return (best, scores) if return_scores else best


def add_vectors(*vectors: Mapping[str, torch.Tensor]) -> Vector:
    """Element-wise sum of vectors over the same names."""
    if not vectors:
        raise ValueError("add_vectors needs at least one vector")
    vs = [_check_vector(v, f"vectors[{i}]") for i, v in enumerate(vectors)]
    names = set(vs[0])
    for i, v in enumerate(vs[1:], 1):
        if set(v) != names:
            raise ValueError(f"vectors[{i}] has other names than vectors[0] "
                             f"(e.g. {sorted(set(v) ^ names)[:3]}); restrict() them to common names first")
        for n in names:
            if v[n].shape != vs[0][n].shape:
                raise ValueError(f"vectors[{i}] has shape {tuple(v[n].shape)} at {n!r}, vectors[0] {tuple(vs[0][n].shape)}")
    return {n: sum(v[n] for v in vs) for n in sorted(names)}


def scale_vector(v: Mapping[str, torch.Tensor], c: float) -> Vector:
    """``c * v``."""
    if isinstance(c, bool) or not isinstance(c, (int, float)) or not math.isfinite(c):
        raise TypeError(f"c must be a finite number, got {c!r}")
    return {n: t * c for n, t in _check_vector(v).items()}


def restrict(v: Mapping[str, torch.Tensor], filter_fn: NameFilter) -> Vector:
    """The entries of ``v`` whose name ``filter_fn`` keeps."""
    if not callable(filter_fn):
        raise TypeError("filter_fn must be callable as filter_fn(name) -> bool")
    return {n: t for n, t in _check_vector(v).items() if filter_fn(n)}


def rename(v: Mapping[str, torch.Tensor], remove_prefix: str = "", add_prefix: str = "") -> Vector:
    """``v`` with ``remove_prefix`` taken off every name and ``add_prefix`` put on, e.g. a vector
    made on a task model (``backbone.encoder...``) applied to the bare backbone (``encoder...``)."""
    v = _check_vector(v)
    if remove_prefix:
        stray = [n for n in v if not n.startswith(remove_prefix)]
        if stray:
            raise ValueError(f"remove_prefix {remove_prefix!r} is not a prefix of {len(stray)} names, e.g. {stray[:3]}")
    return {add_prefix + n[len(remove_prefix):]: t for n, t in v.items()}


def vector_norm(v: Mapping[str, torch.Tensor]) -> float:
    return math.sqrt(sum(t.double().square().sum().item() for t in _check_vector(v).values()))


def cosine(a: Mapping[str, torch.Tensor], b: Mapping[str, torch.Tensor]) -> float:
    """Cosine between two vectors over the same names (0 when either is zero)."""
    a, b = _check_vector(a, "a"), _check_vector(b, "b")
    if set(a) != set(b):
        raise ValueError(f"a and b have different names (e.g. {sorted(set(a) ^ set(b))[:3]})")
    dot = 0.0
    for n in a:
        if a[n].shape != b[n].shape:
            raise ValueError(f"a and b differ in shape at {n!r}")
        dot += (a[n].double() * b[n].double()).sum().item()
    na, nb = vector_norm(a), vector_norm(b)
    return dot / (na * nb) if na > 0 and nb > 0 else 0.0


# ---------------------------------------------------------------- storage
def save_vector(v: Mapping[str, torch.Tensor], path: str | os.PathLike, metadata: dict[str, str] | None = None) -> Path:
    """Write ``v`` to a safetensors file, atomically (temporary file beside it, then rename)."""
    from safetensors.torch import save_file

    v = _check_vector(v)
    if metadata is not None and not all(isinstance(k, str) and isinstance(x, str) for k, x in metadata.items()):
        raise TypeError("metadata must map str to str")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.tmp-", dir=path.parent)
    os.close(fd)
    try:
        save_file({n: t.detach().cpu().contiguous() for n, t in v.items()}, tmp,
                  metadata={"format": "pyquant-vector", **(metadata or {})})
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def load_vector(path: str | os.PathLike) -> Vector:
    """Read a vector written by :func:`save_vector`."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = Path(path)
    if not path.is_file():
        raise ValueError(f"no vector file at {str(path)!r}")
    try:
        v = load_file(str(path))
    except (SafetensorError, OSError) as e:
        raise ValueError(f"{str(path)!r} is not a readable safetensors vector: {e}") from e
    return _check_vector(v, str(path))


# ---------------------------------------------------------------- fine-tuning and QAT
class _FakeQuantSTE(nn.Module):
    """Parametrization: the weight the forward sees is its RTN n-bit fake-quantization."""

    def __init__(self, bits: int):
        super().__init__()
        self.bits = bits

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        return fake_quantize_rows_ste(w, self.bits)


def _call(model: nn.Module, inputs):
    return model(**inputs) if isinstance(inputs, Mapping) else model(inputs)


def finetune(model: nn.Module, data: Iterable, *, steps: int, lr: float, weight_decay: float = 0.0,
             warmup: int = 0, bits: int | None = None, quant_filter: NameFilter | None = None,
             loss_fn: Callable | None = None, seed: int = 0, grad_clip: float | None = 1.0) -> list[float]:
    """Train ``model`` in place for ``steps`` AdamW steps with a linear warm-up then
    cosine decay; return the losses. ``data`` is re-iterated as needed and yields
    ``(inputs, target)`` (a tensor is passed as ``model(x)``, a dict as
    ``model(**x)``); ``loss_fn(output, target)`` defaults to cross-entropy.

    Only parameters with ``requires_grad`` are trained (freeze layers first to
    train a subset). With ``bits``, every ``nn.Linear`` whose ``.weight`` name
    ``quant_filter`` keeps (default: :func:`quantizable_names`) computes with its
    per-channel RTN ``bits``-bit fake-quantized weight and learns through the
    straight-through estimator (QAT); afterwards the layers hold the latent
    float weights again. The same ``seed`` and hyper-parameters with and without
    ``bits`` give the FT/QAT pair a quantization vector is made of.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    if not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps must be a positive int, got {steps!r}")
    if not lr > 0:
        raise ValueError(f"lr must be positive, got {lr!r}")
    if bits is not None and bits not in (2, 3, 4, 8):
        raise ValueError(f"bits must be None (plain fine-tuning) or one of 2, 3, 4, 8, got {bits!r}")
    loss_fn = F.cross_entropy if loss_fn is None else loss_fn
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("model has no parameter with requires_grad=True")

    quantized: list[nn.Linear] = []
    if bits is not None:
        keep = quantizable_names(model).__contains__ if quant_filter is None else quant_filter
        quantized = [m for fqn, m in model.named_modules() if isinstance(m, nn.Linear) and keep(f"{fqn}.weight")]
        if not quantized:
            raise ValueError("bits is set but quant_filter keeps no nn.Linear weight")

    torch.manual_seed(seed)  # dropout masks and data order alike for the FT and QAT runs
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)

    def schedule(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, steps - warmup)))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, schedule)
    was_training = model.training
    losses: list[float] = []
    for m in quantized:
        parametrize.register_parametrization(m, "weight", _FakeQuantSTE(bits))
    try:
        model.train()
        while len(losses) < steps:
            n_before = len(losses)
            for inputs, target in data:
                loss = loss_fn(_call(model, inputs), target)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                if grad_clip is not None:
                    torch.nn.utils.clip_grad_norm_(params, grad_clip)
                opt.step()
                sched.step()
                losses.append(loss.item())
                if len(losses) == steps:
                    break
            if len(losses) == n_before:
                raise ValueError("data yielded no batch")
    finally:
        for m in quantized:
            # keep the latent float weights: they are what a quantization vector is made of
            parametrize.remove_parametrizations(m, "weight", leave_parametrized=False)
        model.train(was_training)
    return losses


def qat_finetune(model: nn.Module, data: Iterable, *, bits: int = 3, **kwargs) -> list[float]:
    """:func:`finetune` with straight-through fake quantization at ``bits`` (default 3)."""
    return finetune(model, data, bits=bits, **kwargs)
