"""pyquant: 2-bit affine-codebook quantization for PyTorch, with CPU, Triton and CUDA kernels.

    import pyquant
    pyquant.quantize_model(model, pyquant.RTNConfig(bits=2))   # swap nn.Linear -> QuantLinear in place
    pyquant.save_quantized(model, "ckpt/")                     # model.safetensors + quantization_config.json
    pyquant.load_quantized(skeleton, "ckpt/")
    pyquant.bits_per_weight(model)
"""
import torch  # noqa: F401  (the C++ extension needs torch loaded first)

from . import kernels, lora, ops
from .format import FORMAT_VERSION, PackedWeight, dequantize
from .io import load_quantized, save_quantized
from .nn import QuantLinear, bits_per_weight, quantize_model
from .quantizers import DAQConfig, QuantConfig, RTNConfig, UniSVQConfig

__version__ = "0.1.0"

from . import _hf_hook  # noqa: E402

_hf_hook.install()  # quant_method "pyquant" for transformers' from_pretrained / save_pretrained


def __getattr__(name: str):
    # pyquant.hf (which imports transformers) on first use, so `import pyquant` stays light
    if name == "hf":
        import importlib

        return importlib.import_module(f"{__name__}.hf")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

__all__ = [
    "DAQConfig", "FORMAT_VERSION", "PackedWeight", "QuantConfig", "QuantLinear", "RTNConfig", "UniSVQConfig", "bits_per_weight",
    "dequantize", "kernels", "load_quantized", "lora", "ops", "quantize_model", "save_quantized",
]
