"""Hugging Face ``transformers`` integration: ``quant_method: "pyquant"``.

``import pyquant`` registers, through transformers' public registries (as soon as
``transformers.quantizers`` is imported, see :mod:`pyquant._hf_hook`):

- :class:`PyquantConfig` (``register_quantization_config("pyquant")``): what ``config.json``'s
  ``quantization_config`` holds: the method, the format version, per quantized layer its shapes,
  Hadamard blocks and scale dtypes (the same entries as ``quantization_config.json`` of
  :func:`pyquant.save_quantized`), and the modules left unconverted;
- :class:`PyquantHfQuantizer` (``register_quantizer("pyquant")``).

Then, for a ``PreTrainedModel``:

- ``model.save_pretrained(dir)`` of a model quantized by :func:`pyquant.quantize_model` writes a
  self-contained directory (``config.json`` with the ``quantization_config``, safetensors sharded
  by transformers' own logic);
- ``AutoModel*.from_pretrained(dir)`` swaps the listed linear layers for empty ``QuantLinear`` on
  the meta device before any weight loads (no dense weight is ever made), checks the checkpoint's
  tensors against the config first (a missing or misshapen tensor raises ``ValueError`` naming
  it: never random initialisation), lets transformers load the packed tensors, then validates
  every layer and builds its kernel state;
- ``from_pretrained(fp_dir, quantization_config=PyquantConfig(method="rtn"))`` quantizes while
  loading (data-free methods only; UniSVQ and DAQ need data: ``quantize_model``, then
  ``save_pretrained``).

Without ``import pyquant`` transformers does not know ``quant_method: "pyquant"`` and says so
(``Unknown quantization type``); the fix is ``import pyquant`` before ``from_pretrained``.
"""
from __future__ import annotations

import torch
from torch import nn
# The submodules, not the package: this module is imported while transformers.quantizers itself
# is still being imported (see _hf_hook).
from transformers.quantizers.auto import register_quantization_config, register_quantizer
from transformers.quantizers.base import HfQuantizer
from transformers.utils.quantization_config import QuantizationConfigMixin

from .format import FORMAT_VERSION, READABLE_FORMAT_VERSIONS
from .io import check_tensor, layer_entry, read_header, skeleton_layer, verify_checksum_of
from .nn import QuantLinear, is_conv1d, linear_view, quantize_model, quantized_modules, set_submodule
from .quantizers import RTNConfig

QUANT_METHOD = "pyquant"
DATA_FREE_METHODS = {"rtn": RTNConfig}


@register_quantization_config(QUANT_METHOD)
class PyquantConfig(QuantizationConfigMixin):
    """The ``quantization_config`` of a pyquant model.

    Args:
        method: the quantizer. For quantize-on-load a data-free one (``"rtn"``); a saved model
            records what made it (``"rtn"``, ``"unisvq"``, ...).
        bits, hadamard: options of the data-free quantizer (``RTNConfig``; the packed format holds
            2 bits).
        layers: ``{module name: entry}`` per quantized layer (filled when a model is saved; see
            :func:`pyquant.io.layer_entry`).
        modules_to_not_convert: module names (or name prefixes) left in full precision when
            quantizing on load; default: the output head (``lm_head``) and what transformers'
            ``get_keys_to_not_convert`` finds (tied embeddings).
        format_version: the packed format's version (:data:`pyquant.format.FORMAT_VERSION`).
    """

    def __init__(self, method: str = "rtn", bits: int = 2, hadamard: bool = True, layers: dict | None = None,
                 modules_to_not_convert: list[str] | None = None, format_version: int = FORMAT_VERSION, **kwargs):
        self.quant_method = QUANT_METHOD
        self.method = method
        self.bits = bits
        self.hadamard = hadamard
        self.layers = dict(layers or {})
        self.modules_to_not_convert = modules_to_not_convert
        self.format_version = format_version
        self.post_init()

    def post_init(self):
        if not isinstance(self.method, str):
            raise TypeError(f"PyquantConfig.method must be a str, got {type(self.method).__name__}")
        if isinstance(self.format_version, bool) or self.format_version not in READABLE_FORMAT_VERSIONS:
            raise ValueError(f"PyquantConfig.format_version {self.format_version!r} is unknown; this pyquant reads "
                             f"versions {list(READABLE_FORMAT_VERSIONS)}")
        if not isinstance(self.layers, dict):
            raise TypeError("PyquantConfig.layers must be a dict {module name: entry}")
        if self.modules_to_not_convert is not None and not all(isinstance(m, str) for m in self.modules_to_not_convert):
            raise TypeError("PyquantConfig.modules_to_not_convert must be a list of module names")

    def quantizer_config(self):
        """The data-free pyquant config for quantize-on-load."""
        if self.method not in DATA_FREE_METHODS:
            raise ValueError(f"quantize-on-load needs a data-free method ({sorted(DATA_FREE_METHODS)}), got "
                             f"{self.method!r}: quantize with pyquant.quantize_model(model, ...) and calibration "
                             f"data, then save_pretrained")
        return DATA_FREE_METHODS[self.method](bits=self.bits, hadamard=self.hadamard)

    @classmethod
    def from_model(cls, model: nn.Module, **kwargs) -> "PyquantConfig":
        """The config of a model quantized by :func:`pyquant.quantize_model`."""
        layers = {fqn: layer_entry(m) for fqn, m in quantized_modules(model).items()}
        methods = sorted({e["method"] for e in layers.values()})
        skipped = sorted(getattr(model, "pyquant_skipped", {}))
        return cls(method=methods[0] if len(methods) == 1 else "+".join(methods), layers=layers,
                   modules_to_not_convert=skipped, **kwargs)


def _excluded(fqn: str, skip: list[str]) -> bool:
    return any(fqn == s or fqn.startswith(s + ".") or fqn.endswith("." + s) or s in fqn.split(".") for s in skip)


@register_quantizer(QUANT_METHOD)
class PyquantHfQuantizer(HfQuantizer):
    """Loads pyquant checkpoints into transformers models, and quantizes on load (data-free)."""

    requires_calibration = False

    def validate_environment(self, *args, **kwargs):
        if not self.pre_quantized:
            self.quantization_config.quantizer_config()  # raises for methods that need data

    def _process_model_before_weight_loading(self, model, checkpoint_files=None, **kwargs):
        if not self.pre_quantized:
            return model
        layers = self.quantization_config.layers
        if not layers:
            raise ValueError("this checkpoint's quantization_config (quant_method 'pyquant') lists no layers")
        on_disk = read_header(f for f in checkpoint_files or () if str(f).endswith(".safetensors"))
        prefix = model.base_model_prefix
        for fqn, entry in layers.items():
            try:
                linear = model.get_submodule(fqn)
            except AttributeError:
                raise ValueError(f"the checkpoint quantizes {fqn!r}, which this {type(model).__name__} lacks") from None
            try:
                layer = skeleton_layer(entry, torch.device("meta"))
            except (KeyError, TypeError, ValueError, AttributeError) as e:
                raise ValueError(f"quantization_config entry for {fqn!r} is invalid: {e!r}") from e
            if is_conv1d(linear):
                linear = linear_view(linear)
            if not isinstance(linear, nn.Linear) or (linear.out_features, linear.in_features) != (
                    layer.out_features, layer.in_features):
                raise ValueError(f"the checkpoint's {fqn!r} is a {layer.in_features}->{layer.out_features} layer, "
                                 f"the model has {linear!r}")
            if on_disk:
                self._check_tensors(fqn, layer, on_disk, prefix)
            set_submodule(model, fqn, layer)
            parent = model.get_submodule(fqn.rpartition(".")[0])
            if not any(True for _ in parent.parameters(recurse=False)):
                # Nothing of its own to initialise; some models' _init_weights reach from such a parent
                # into a child's .weight by name (GPT-2's c_proj), which a QuantLinear does not have.
                parent._is_hf_initialized = True
        return model

    @staticmethod
    def _check_tensors(fqn: str, layer: nn.Module, on_disk: dict, prefix: str) -> None:
        """Every tensor the layer needs is in the checkpoint with its dtype and shape."""
        for name, t in layer.state_dict().items():
            key = f"{fqn}.{name}"
            found = on_disk.get(key) or on_disk.get(f"{prefix}.{key}") or on_disk.get(key.removeprefix(prefix + "."))
            check_tensor(key, t, found)

    def _process_model_after_weight_loading(self, model, **kwargs):
        if not self.pre_quantized:
            cfg = self.quantization_config
            skip = cfg.modules_to_not_convert
            if skip is None:
                skip = self.get_modules_to_not_convert(model, None, getattr(model, "_keep_in_fp32_modules", None))
            quantize_model(model, cfg.quantizer_config(), filter_fn=lambda m, fqn: not _excluded(fqn, skip),
                           progress=False)
            done = PyquantConfig.from_model(model, bits=cfg.bits, hadamard=cfg.hadamard)
            self.quantization_config = done
            model.config.quantization_config = done
            return model
        for fqn, layer in quantized_modules(model).items():
            bad = [n for n, t in layer.state_dict().items() if t.device.type == "meta"]
            if bad:
                raise ValueError(f"quantized layer {fqn!r} did not get {bad} from the checkpoint")
            try:
                verify_checksum_of(layer.state_dict(), self.quantization_config.layers.get(fqn, {}),
                                   self.quantization_config.format_version)
                layer.validate()
            except (ValueError, TypeError) as e:
                raise ValueError(f"checkpoint layer {fqn!r} is invalid: {e}") from e
            if isinstance(layer, QuantLinear):
                layer.invalidate()
        model.pyquant_skipped = {n: "not converted" for n in self.quantization_config.modules_to_not_convert or ()}
        return model

    def get_state_dict_and_metadata(self, model):
        """(``save_pretrained`` calls this before it writes ``config.json``.) The layer entries are
        made now, from the tensors being saved: their checksums must be those of the file, whatever
        changed since the model was quantized."""
        self.quantization_config.layers = {fqn: layer_entry(m) for fqn, m in quantized_modules(model).items()}
        self.quantization_config.format_version = FORMAT_VERSION
        model.config.quantization_config = self.quantization_config
        return None, {}

    def is_serializable(self):
        return True

    @property
    def is_trainable(self) -> bool:
        return True  # adapters on the frozen 2-bit layers (pyquant.lora)

    @property
    def is_compileable(self) -> bool:
        return True


def attach(model: nn.Module) -> None:
    """Make a transformers model quantized by :func:`pyquant.quantize_model` save as one:
    ``config.quantization_config`` and ``model.hf_quantizer`` (what ``save_pretrained`` writes
    and ``from_pretrained`` reads back). Called by ``quantize_model`` for ``PreTrainedModel``s."""
    config = PyquantConfig.from_model(model)
    model.config.quantization_config = config
    model.hf_quantizer = PyquantHfQuantizer(config, pre_quantized=True)
    model.is_quantized = True
    model.quantization_method = QUANT_METHOD
