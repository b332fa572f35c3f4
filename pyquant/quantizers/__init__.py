"""Quantization methods, one module each; each provides a config class."""
from .base import QuantConfig
from .rtn import RTNConfig, fake_quantize, fake_quantize_ste
from .daq import DAQConfig
from .unisvq import UniSVQConfig

__all__ = ["DAQConfig", "QuantConfig", "RTNConfig", "UniSVQConfig", "fake_quantize", "fake_quantize_ste"]
