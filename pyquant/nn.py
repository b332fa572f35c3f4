"""``QuantLinear`` and the one-call model swap ``quantize_model``."""
from __future__ import annotations

import logging
import sys
from typing import Callable, Iterable

import torch
from torch import nn

from . import kernels
from .fakequant import DequantLinear
from .format import PACKED_TENSORS, PackedWeight, dequantize, stored_bytes
from .quantizers import QuantConfig, RTNConfig

log = logging.getLogger(__name__)

_INPUT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


class QuantLinear(nn.Module):
    """Drop-in replacement of ``nn.Linear`` holding a 2-bit packed weight.

    Shape constraints: ``in_features % 4 == 0`` (one code byte per 4 inputs);
    ``had_in`` / ``had_out`` are 0 or powers of two dividing ``in_features`` /
    ``out_features``. Input: any ``[..., in_features]`` fp32/fp16/bf16 tensor on
    the layer's device; output has the input's dtype.

    The forward is one ``torch.ops.pyquant`` op (``torch.compile(fullgraph=True)``,
    ``torch.export`` and autograd take it as it is): gradients reach the input and, when they
    require grad, ``A``, ``b``, ``su``, ``sv``, ``w_scale`` and the bias; codes are frozen.
    Kernel state (repacked codes, fp32 copies, the backend per input dtype) is built when the
    layer is made, loaded or moved; call :meth:`invalidate` after changing its tensors in place
    (on the CPU an eager call reads the tensors themselves; a compiled graph reads the state).

    After an eager forward, ``last_backend`` and ``last_backend_reason`` say which kernel ran
    and why (see :func:`pyquant.kernels.explain`); a compiled graph fixes its kernel when it is
    traced, and its calls leave them as they were.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True, *, had_in: int = 0,
                 had_out: int = 0, scale_dtype: torch.dtype = torch.float16, method: str = "unknown",
                 seed: int | None = None, device=None):
        super().__init__()
        for name, v in (("in_features", in_features), ("out_features", out_features)):
            if not isinstance(v, int) or v <= 0:
                raise ValueError(f"{name} must be a positive int, got {v!r}")
        if in_features % 4:
            raise ValueError(f"in_features must be divisible by 4, got {in_features}")
        self.in_features, self.out_features = in_features, out_features
        self.had_in, self.had_out, self.method, self.seed = had_in, had_out, method, seed
        self.register_buffer("codes", kernels.zeros_codes(out_features, in_features // 4, device))
        # fp32 spelled out: a model built under another default dtype (from_pretrained(dtype=...))
        # keeps the format's dtypes
        f32 = dict(dtype=torch.float32, device=device)
        self.register_buffer("A", torch.eye(4, **f32))
        self.register_buffer("b", torch.full((4,), -1.5, **f32))
        self.register_buffer("su", torch.ones(in_features, dtype=scale_dtype, device=device))
        self.register_buffer("sv", torch.ones(out_features, dtype=scale_dtype, device=device))
        self.register_buffer("w_scale", torch.ones((), **f32))
        self.bias = nn.Parameter(torch.zeros(out_features, **f32)) if bias else None
        # [backend, why] of the last forward: a list updated in place, because nn.Module.__setattr__
        # would cost more than the whole kernel call of a small layer
        self._last_run: list[str | None] = [None, None]
        # True when the tensors are a serving engine's (from_packed(share=True)): nothing may
        # replace them, not even with a copy in other memory (see backends/cpu.py)
        self._shares_tensors = False
        # True when that engine calls refresh() after it refills them in place (pyquant.vllm): a
        # backend may then keep copies of them (the CPU backend's mode "lut" codes and params)
        self._engine_refreshes = False
        self.packed.validate()
        self._plan = kernels.KernelPlan(self)

    # ---- construction -------------------------------------------------
    @classmethod
    def from_packed(cls, pw: PackedWeight, bias: torch.Tensor | None = None, *, share: bool = False,
                    refreshed: bool = False) -> "QuantLinear":
        """Wrap a validated :class:`PackedWeight` (and an optional fp bias of shape ``[N]``).

        ``share=True`` makes the layer hold ``pw``'s tensors themselves (views stay views: a
        serving engine's fused parameters, see :mod:`pyquant.tp`) instead of copies; such a layer
        has no bias (a fused layer adds its bias once, after its partitions), and its kernels keep
        no copy of the tensors (the engine may refill them in place at any time), unless
        ``refreshed=True``: the engine promises to call :meth:`refresh` after every refill."""
        pw.validate()
        if bias is not None and tuple(bias.shape) != (pw.out_features,):
            raise ValueError(f"bias must have shape ({pw.out_features},), got {tuple(bias.shape)}")
        if share:
            if bias is not None:
                raise ValueError("from_packed(share=True) makes a bias-free layer; add the bias after it")
            layer = cls(pw.in_features, pw.out_features, False, had_in=pw.had_in, had_out=pw.had_out,
                        scale_dtype=pw.su.dtype, method=pw.method, seed=pw.seed, device="meta")
            for name in PACKED_TENSORS:
                layer._buffers[name] = getattr(pw, name)
            layer._shares_tensors = True
            layer._engine_refreshes = refreshed
            layer.validate().invalidate()
            return layer
        layer = cls(pw.in_features, pw.out_features, bias is not None, had_in=pw.had_in, had_out=pw.had_out,
                    scale_dtype=pw.su.dtype, method=pw.method, seed=pw.seed, device=pw.codes.device)
        if pw.sv.dtype != pw.su.dtype:
            layer.sv = layer.sv.to(pw.sv.dtype)
        with torch.no_grad():
            for name in PACKED_TENSORS:
                getattr(layer, name).copy_(getattr(pw, name))
            if bias is not None:
                layer.bias.copy_(bias.detach().float())
        layer.invalidate()
        return layer

    @classmethod
    def from_linear(cls, linear: nn.Linear, config: QuantConfig | None = None) -> "QuantLinear":
        """Quantize one ``nn.Linear`` with a data-free method (default ``RTNConfig(bits=2)``)."""
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"linear must be an nn.Linear, got {type(linear).__name__}")
        if linear.in_features % 4:
            raise ValueError(f"linear.in_features must be divisible by 4, got {linear.in_features}")
        config = RTNConfig() if config is None else config
        if not isinstance(config, QuantConfig):
            raise TypeError(f"config must be a pyquant QuantConfig, got {type(config).__name__}")
        pw = config.quantize_weight(linear.weight.detach().cpu()).to(linear.weight.device)
        return cls.from_packed(pw, linear.bias)

    # ---- views --------------------------------------------------------
    @property
    def packed(self) -> PackedWeight:
        """The layer's tensors as a :class:`PackedWeight` (views, no copy)."""
        return PackedWeight(self.codes, self.A, self.b, self.su, self.sv, self.w_scale,
                            had_in=self.had_in, had_out=self.had_out, seed=self.seed, method=self.method)

    def validate(self) -> "QuantLinear":
        """Raise ``ValueError``/``TypeError`` naming the first bad tensor: the packed weight
        (:meth:`PackedWeight.validate`) and a bias that is not finite (run on load)."""
        self.packed.validate()
        if self.bias is not None and self.bias.device.type != "meta" and not torch.isfinite(self.bias).all():
            raise ValueError("bias holds NaN or Inf")
        return self

    def dequantize(self) -> nn.Linear:
        """An fp32 ``nn.Linear`` with the dense weight this layer applies."""
        lin = nn.Linear(self.in_features, self.out_features, self.bias is not None, device=self.codes.device)
        with torch.no_grad():
            lin.weight.copy_(dequantize(self.packed))
            if self.bias is not None:
                lin.bias.copy_(self.bias)
        return lin

    def stored_bytes(self) -> int:
        return stored_bytes(self.packed)

    def invalidate(self) -> None:
        """Rebuild the kernel-side state (repacked codes, backend choices) from the layer's
        tensors. Loading, ``.to()`` and the quantizers call it; call it after changing the
        tensors in place yourself."""
        self._plan = kernels.KernelPlan(self)

    def refresh(self, changed=None) -> None:
        """Rewrite the kernel-side copies of the tensors in place from the tensors as they are now:
        what a serving engine calls after refilling a ``share=True, refreshed=True`` layer's
        tensors. Unlike :meth:`invalidate` it keeps every tensor object, so a graph compiled
        without guards (vLLM's) sees the new values. ``changed``: the names of the tensors
        refilled (of ``codes``, ``A``, ``b``, ``su``, ``sv``, ``w_scale``, ``bias``), None for all:
        only the copies made from them are rewritten (the CPU's LUT-layout codes are repacked only
        when ``codes`` changed: ~25 ms for 11008 x 4096, once per tensor a loader writes)."""
        names = ("bias",) + PACKED_TENSORS
        if changed is None:
            changed = names
        elif isinstance(changed, str) or not all(isinstance(n, str) for n in changed):
            raise TypeError(f"changed must be a collection of tensor names, got {changed!r}")
        unknown = sorted(set(changed) - set(names))
        if unknown:
            raise ValueError(f"changed: unknown tensor names {unknown}; expected some of {list(names)}")
        self._plan.refresh(self, frozenset(changed))

    def needs_grad(self) -> bool:
        """Whether any of the trainable tensors (``A``, ``b``, ``su``, ``sv``, ``w_scale``, bias)
        requires grad. Codes never do."""
        return any(t is not None and t.requires_grad for t in self.op_tensors()[1:])

    def op_tensors(self) -> tuple:
        """``(codes, A, b, su, sv, w_scale, bias)`` as the ops take them. Read from the module's
        dicts: ``nn.Module.__getattr__`` costs about a microsecond a name, a third of a small
        layer's call."""
        buf = self._buffers
        try:
            return buf["codes"], buf["A"], buf["b"], buf["su"], buf["sv"], buf["w_scale"], self._parameters.get("bias")
        except KeyError:  # a tensor turned into a Parameter (to train it): the general lookup
            return self.codes, self.A, self.b, self.su, self.sv, self.w_scale, self.bias

    # ---- forward ------------------------------------------------------
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"input must be a torch.Tensor, got {type(x).__name__}")
        if x.dtype not in _INPUT_DTYPES:
            raise TypeError(f"input dtype must be one of {_INPUT_DTYPES}, got {x.dtype}")
        plan = self._plan
        if x.device != plan.device:
            raise ValueError(f"input is on {x.device} but the layer is on {plan.device}")
        if x.dim() == 0 or x.shape[-1] != self.in_features:
            raise ValueError(f"input must have shape [..., {self.in_features}], got {tuple(x.shape)}")
        flat = x.dim() == 2
        x2d = (x if flat else x.reshape(-1, self.in_features)).contiguous()
        needs_grad = torch.is_grad_enabled() and (x.requires_grad or self.needs_grad())
        choice = plan.choice(self, x.dtype, needs_grad)
        if torch.compiler.is_compiling():
            # (and no _last_run update: replayed after every compiled call, it cost ~3 us a layer)
            y = choice.call_traced(x2d, self)
        else:
            self._last_run[:] = (choice.name, choice.why)
            y = choice(x2d, self)
        return y if flat else y.reshape(*x.shape[:-1], self.out_features)

    @property
    def last_backend(self) -> str | None:
        return self._last_run[0]

    @property
    def last_backend_reason(self) -> str | None:
        return self._last_run[1]

    # copy.deepcopy and pickling (torch.save(model)) take the tensors and settings; the kernel
    # plan holds backend modules, which cannot be pickled, and is rebuilt on the other side.
    def __getstate__(self):
        state = self.__dict__.copy()
        del state["_plan"]
        return state

    def __setstate__(self, state):
        super().__setstate__(state)
        self.invalidate()

    def _apply(self, fn, recurse=True):
        out = super()._apply(fn, recurse)
        self.invalidate()  # kernel state for the new device and tensors
        return out

    def _load_from_state_dict(self, *args, **kwargs):
        super()._load_from_state_dict(*args, **kwargs)
        self.invalidate()

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"method={self.method}, had_in={self.had_in}, had_out={self.had_out}")


def default_filter(module: nn.Module, fqn: str) -> bool:
    """Every ``nn.Linear`` whose ``in_features`` is divisible by 4."""
    return isinstance(module, nn.Linear) and module.in_features % 4 == 0


def set_submodule(model: nn.Module, fqn: str, module: nn.Module) -> None:
    parent_name, _, child = fqn.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, module)


def quantize_model(model: nn.Module, config: QuantConfig,
                   filter_fn: Callable[[nn.Module, str], bool] | None = None,
                   calibration_data: Iterable | None = None, progress: bool = True) -> nn.Module:
    """Quantize the selected ``nn.Linear`` layers of ``model`` in place and return it.

    ``filter_fn(module, fqn) -> bool`` picks layers among the ``nn.Linear``
    modules (default: ``in_features % 4 == 0``, and for a transformers model not its
    output head: ``lm_head`` stays in full precision, as QuIP# and AQLM keep it, and a head
    tied to the input embeddings stays tied; pass a ``filter_fn`` to quantize it). GPT-2-style
    ``Conv1D`` layers (transformers' linear with the weight stored transposed) count as
    ``nn.Linear`` (``filter_fn`` sees the equivalent ``nn.Linear``). Linear layers that are not
    taken are left as they are and listed in ``model.pyquant_skipped``
    (fqn -> reason). ``calibration_data`` is an iterable of model inputs (a
    tensor, passed as ``model(x)``, or a dict, passed as ``model(**x)``), used
    by methods that need activations.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    if not isinstance(config, QuantConfig):
        raise TypeError(f"config must be a pyquant QuantConfig (e.g. pyquant.RTNConfig()), got {type(config).__name__}")
    if filter_fn is not None and not callable(filter_fn):
        raise TypeError("filter_fn must be callable as filter_fn(module, fqn) -> bool")
    targets, skipped, conv1d = select_targets(model, filter_fn)
    for fqn, linear in targets.items():
        if linear.weight.device.type == "meta":
            raise ValueError(f"{fqn}.weight is on the meta device: it has no values to quantize (load the weights "
                             f"first; pyquant.streaming.quantize_checkpoint reads a checkpoint larger than memory)")
    if skipped:
        log.info("pyquant: left %d linear layers unquantized: %s", len(skipped), skipped)
    if not targets:
        log.warning("pyquant: quantize_model found no layer to quantize%s",
                    f" (skipped: {skipped})" if skipped else " (the model has no nn.Linear)")
    for fqn, linear in targets.items():
        if fqn in conv1d:  # in the model while quantizing, so calibration hooks on it see its inputs
            set_submodule(model, fqn, linear)

    def swap(fqn: str, pw: PackedWeight) -> QuantLinear:
        linear = targets[fqn]
        layer = QuantLinear.from_packed(pw.to(linear.weight.device), linear.bias)
        set_submodule(model, fqn, layer)
        return layer

    # All or nothing: on any failure (bad data, an interrupt) the model is put back as it was:
    # every original layer (the replaced modules are kept, not copied) and what the method changes
    # in place besides them.
    saved = [(t, t.detach().clone()) for t in config.mutated_tensors(model, targets)]
    try:
        config.apply(model, targets, calibration_data, swap, progress=progress)
    except BaseException:
        for fqn, linear in targets.items():
            set_submodule(model, fqn, conv1d.get(fqn, linear))
        with torch.no_grad():
            for t, copy in saved:
                t.copy_(copy)
        raise
    model.pyquant_skipped = skipped
    if is_transformers_model(model):
        from .hf import attach  # transformers is loaded already: this costs nothing more

        attach(model)  # so that model.save_pretrained writes a pyquant quantization_config
    return model


def select_targets(model: nn.Module, filter_fn: Callable[[nn.Module, str], bool] | None = None
                   ) -> tuple[dict[str, nn.Linear], dict[str, str], dict[str, nn.Module]]:
    """The layers :func:`quantize_model` takes: ``(targets, skipped, conv1d)``: fqn -> ``nn.Linear``
    (a transposed view for a ``Conv1D``), fqn -> why a linear layer is left, fqn -> the ``Conv1D``."""
    head = model.get_output_embeddings() if filter_fn is None and is_transformers_model(model) else None
    targets, skipped, conv1d = {}, {}, {}
    for fqn, module in list(model.named_modules()):
        linear = linear_view(module) if is_conv1d(module) else module
        if not isinstance(linear, nn.Linear):
            continue
        if head is not None and module is head:
            skipped[fqn] = "the output head stays in full precision by default (pass a filter_fn to quantize it)"
        elif filter_fn is not None and not filter_fn(linear, fqn):
            skipped[fqn] = "excluded by filter_fn"
        elif linear.in_features % 4:
            skipped[fqn] = f"in_features={linear.in_features} is not divisible by 4"
        elif linear.out_features == 0 or linear.in_features == 0:
            skipped[fqn] = f"empty: {linear.in_features} -> {linear.out_features}"
        else:
            targets[fqn] = linear
            if linear is not module:
                conv1d[fqn] = module
    return targets, skipped, conv1d


def is_conv1d(module: nn.Module) -> bool:
    """transformers' ``Conv1D`` (GPT-2 and kin): a linear layer with its weight stored ``[in, out]``."""
    utils = sys.modules.get("transformers.pytorch_utils")  # loaded wherever such a layer exists
    return utils is not None and isinstance(module, utils.Conv1D)


def linear_view(conv1d: nn.Module) -> nn.Linear:
    """An ``nn.Linear`` computing the same as a ``Conv1D``, sharing its tensors (the weight as a
    transposed view: no copy)."""
    n_in, n_out = conv1d.weight.shape
    linear = nn.Linear(n_in, n_out, bias=conv1d.bias is not None, device="meta")
    linear.weight = nn.Parameter(conv1d.weight.detach().t(), requires_grad=conv1d.weight.requires_grad)
    if conv1d.bias is not None:
        linear.bias = conv1d.bias
    return linear


def is_transformers_model(model: nn.Module) -> bool:
    modeling = sys.modules.get("transformers.modeling_utils")  # loaded wherever such a model exists
    return modeling is not None and isinstance(model, modeling.PreTrainedModel)


def quantized_layers(model: nn.Module) -> dict[str, QuantLinear]:
    return {fqn: m for fqn, m in model.named_modules() if isinstance(m, QuantLinear)}


def quantized_modules(model: nn.Module) -> dict[str, QuantLinear | DequantLinear]:
    """Every quantized layer: packed 2-bit ``QuantLinear`` and DAQ's fp8 / int-n ``DequantLinear``."""
    return {fqn: m for fqn, m in model.named_modules() if isinstance(m, (QuantLinear, DequantLinear))}


def bits_per_weight(model: nn.Module) -> float:
    """Stored bits per weight over the quantized layers: all stored bytes
    (codes, codebook, scales, block sizes) * 8 / number of weights; biases,
    which stay in full precision as in ``nn.Linear``, are not counted."""
    layers = list(quantized_modules(model).values())
    if not layers:
        raise ValueError("model has no quantized (QuantLinear or DequantLinear) layers")
    total = sum(m.stored_bytes() for m in layers)
    return total * 8 / sum(m.in_features * m.out_features for m in layers)
