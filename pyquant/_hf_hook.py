"""Registers pyquant with Hugging Face transformers when (and only when) transformers loads its
quantizer registry: ``import pyquant`` stays as fast as before for people who never use
transformers, and ``from_pretrained`` of a pyquant directory works after ``import pyquant``
whichever of the two was imported first."""
from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import sys

_REGISTRY = "transformers.quantizers.auto"


def _register() -> None:
    importlib.import_module(f"{__package__}.hf")  # its decorators register the config and quantizer


class _AfterRegistryImport(importlib.abc.MetaPathFinder):
    """Finds transformers' registry module as usual, and runs :func:`_register` once it is loaded."""

    def find_spec(self, name, path=None, target=None):
        if name != _REGISTRY:
            return None
        sys.meta_path.remove(self)  # one registration; and let the normal finders find the module
        spec = importlib.util.find_spec(name)
        if spec is None or spec.loader is None:
            return spec
        exec_module = spec.loader.exec_module

        def exec_then_register(module):
            exec_module(module)
            _register()

        spec.loader.exec_module = exec_then_register
        return spec


def install() -> None:
    if _REGISTRY in sys.modules:
        _register()
    elif importlib.util.find_spec("transformers") is not None:
        sys.meta_path.insert(0, _AfterRegistryImport())
