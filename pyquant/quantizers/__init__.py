"""Quantization methods, one module each; each provides a config class."""
from .base import QuantConfig
from .rtn import RTNConfig, fake_quantize, fake_quantize_ste
from .unisvq import UniSVQConfig

__all__ = ["QuantConfig", "RTNConfig", "UniSVQConfig", "fake_quantize", "fake_quantize_ste"]
