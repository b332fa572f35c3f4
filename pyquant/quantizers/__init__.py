"""Quantization methods, one module each; each provides a config class."""
from .base import QuantConfig
from .rtn import RTNConfig, fake_quantize, fake_quantize_ste

__all__ = ["QuantConfig", "RTNConfig", "fake_quantize", "fake_quantize_ste"]
