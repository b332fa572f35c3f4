"""Checkpoints. A transformers model is saved as a Hugging Face directory (``save_pretrained``:
``config.json`` with the ``quantization_config``, sharded safetensors; see :mod:`pyquant.hf`)
and loaded with ``from_pretrained``; ``save_quantized`` / ``load_quantized`` are thin wrappers
there. Any other model is saved as a directory with ``model.safetensors`` (plain packed tensors,
every other parameter and buffer as is) and ``quantization_config.json`` (format version, and
per quantized layer its kind, method, shapes and Hadamard blocks or grid), which also is what
pyquant wrote for every model before (format version 1: it keeps loading).

Two kinds of quantized layer are saved: ``packed`` (:class:`QuantLinear`, the 2-bit
format) and ``dequant`` (:class:`pyquant.fakequant.DequantLinear`, DAQ's fp8 / int-n
grids with block scales).

Saving builds the directory under a temporary name beside the target and
renames it into place, so an interrupted save never leaves a half checkpoint
under the final name.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_model, save_model
from torch import nn

from .fakequant import DequantLinear, parse_grid, scale_grid_shape
from .format import FORMAT_VERSION
from .nn import QuantLinear, is_transformers_model, quantized_modules, set_submodule

WEIGHTS_NAME = "model.safetensors"
CONFIG_NAME = "quantization_config.json"
FORMAT_NAME = "pyquant-affine-int2-d4"


def layer_entry(layer: QuantLinear | DequantLinear) -> dict:
    entry = {"method": layer.method, "in_features": layer.in_features, "out_features": layer.out_features,
             "bias": layer.bias is not None}
    if isinstance(layer, DequantLinear):
        return {**entry, "kind": "dequant", "grid": layer.grid, "block": list(layer.block)}
    return {**entry, "kind": "packed", "had_in": layer.had_in, "had_out": layer.had_out, "seed": layer.seed,
            "su_dtype": str(layer.su.dtype).removeprefix("torch."),
            "sv_dtype": str(layer.sv.dtype).removeprefix("torch.")}


def skeleton_layer(entry: dict, device: torch.device) -> nn.Module:
    """An empty layer of the entry's kind and shapes, for ``load_model`` to fill."""
    n, k = entry["out_features"], entry["in_features"]
    if entry.get("kind", "packed") == "dequant":
        grid, block = parse_grid(entry["grid"]), tuple(entry["block"])
        codes = torch.zeros(n, k, device=device).to(grid.code_dtype)
        scales = torch.ones(scale_grid_shape((n, k), block), device=device)
        bias = torch.zeros(n, device=device) if entry["bias"] else None
        return DequantLinear(codes, scales, block, grid.name, bias, method=entry["method"])
    layer = QuantLinear(k, n, entry["bias"], had_in=entry["had_in"], had_out=entry["had_out"],
                        scale_dtype=getattr(torch, entry["su_dtype"]), method=entry["method"], seed=entry["seed"],
                        device=device)
    layer.sv = layer.sv.to(getattr(torch, entry["sv_dtype"]))
    return layer


def hf_quantization_config(path: str | os.PathLike) -> dict | None:
    """The ``quantization_config`` of a Hugging Face directory, if it is a pyquant one."""
    cfg = Path(path) / "config.json"
    try:
        qc = json.loads(cfg.read_text()).get("quantization_config") if cfg.is_file() else None
    except (json.JSONDecodeError, UnicodeDecodeError, AttributeError) as e:
        raise ValueError(f"{cfg} is not a valid config.json ({e})") from e
    return qc if isinstance(qc, dict) and qc.get("quant_method") == "pyquant" else None


def _replaceable(path: Path) -> bool:
    """An empty directory or a pyquant checkpoint (either layout): what a save may replace."""
    files = set(os.listdir(path))
    return not files or files <= {WEIGHTS_NAME, CONFIG_NAME} or hf_quantization_config(path) is not None


def _honour_umask(path: Path) -> None:
    """Give a file or directory the permissions a plain ``open``/``mkdir`` would (0666 / 0777 less
    the umask): temporary files are created private."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(path, (0o777 if path.is_dir() else 0o666) & ~umask)


def save_quantized(model: nn.Module, path: str | os.PathLike) -> Path:
    """Write ``model`` (with its ``QuantLinear`` / ``DequantLinear`` layers) to the directory ``path``:
    a transformers model through its ``save_pretrained``, any other in the format of this module.

    An existing ``path`` is replaced only if it is an empty directory or a pyquant checkpoint.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    layers = quantized_modules(model)
    if not layers:
        raise ValueError("model has no quantized layers: quantize it first (pyquant.quantize_model)")
    path = Path(path)
    if path.exists() and (not path.is_dir() or not _replaceable(path)):
        raise ValueError(f"path {str(path)!r} exists and is not a pyquant checkpoint directory; refusing to overwrite")
    path.parent.mkdir(parents=True, exist_ok=True)
    config = {"quant_method": "pyquant", "format": FORMAT_NAME, "format_version": FORMAT_VERSION,
              "layers": {fqn: layer_entry(m) for fqn, m in layers.items()},
              "modules_not_converted": sorted(getattr(model, "pyquant_skipped", {}))}
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))
    try:
        _honour_umask(tmp)  # mkdtemp makes it 0700: a checkpoint is for sharing like any saved file
        if is_transformers_model(model):
            model.save_pretrained(tmp)
        else:
            save_model(model, str(tmp / WEIGHTS_NAME))
            (tmp / CONFIG_NAME).write_text(json.dumps(config, indent=2, sort_keys=True))
        for f in tmp.rglob("*"):
            _honour_umask(f)
        old = None
        if path.exists():
            old = path.parent / f".{path.name}.old-{os.getpid()}"
            path.rename(old)
        tmp.rename(path)
        if old is not None:
            shutil.rmtree(old)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return path


def read_config(path: str | os.PathLike) -> dict:
    """Read and check ``quantization_config.json`` of a checkpoint directory."""
    path = Path(path)
    cfg_file, weights = path / CONFIG_NAME, path / WEIGHTS_NAME
    for f in (cfg_file, weights):
        if not f.is_file():
            raise ValueError(f"{str(path)!r} is not a pyquant checkpoint: {f.name} is missing")
    try:
        config = json.loads(cfg_file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{cfg_file} is not valid JSON ({e}); the checkpoint is corrupt") from e
    if not isinstance(config, dict) or config.get("format") != FORMAT_NAME:
        raise ValueError(f"{cfg_file} does not describe a {FORMAT_NAME} checkpoint")
    if config.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"unknown format_version {config.get('format_version')!r} in {cfg_file}; "
                         f"this pyquant reads version {FORMAT_VERSION}")
    if not isinstance(config.get("layers"), dict):
        raise ValueError(f"{cfg_file} has no 'layers' table")
    return config


def load_quantized(model: nn.Module, path: str | os.PathLike) -> nn.Module:
    """Load a checkpoint written by :func:`save_quantized` into ``model``, the
    unquantized skeleton of the same architecture; swaps ``QuantLinear`` in and
    returns ``model``. A Hugging Face directory (a transformers ``model``) loads through
    ``type(model).from_pretrained(path)``, which returns a new model. Raises ``ValueError`` for
    a checkpoint that is truncated, of an unknown version, or from another model."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    if hf_quantization_config(path) is not None:
        if not is_transformers_model(model):
            raise ValueError(f"{str(path)!r} is a Hugging Face directory: load it with transformers' "
                             f"from_pretrained (after import pyquant), not into a {type(model).__name__}")
        return type(model).from_pretrained(path)
    config = read_config(path)
    for fqn, entry in config["layers"].items():
        try:
            linear = model.get_submodule(fqn)
        except AttributeError:
            raise ValueError(f"checkpoint is from another model: it quantizes {fqn!r}, which this model lacks") from None
        if isinstance(linear, (QuantLinear, DequantLinear)):
            raise ValueError(f"model is already quantized at {fqn!r}; pass the unquantized skeleton")
        try:
            shape = (int(entry["out_features"]), int(entry["in_features"]))
        except (KeyError, TypeError, ValueError) as e:
            raise ValueError(f"checkpoint entry for {fqn!r} is invalid: {e!r} (in_features / out_features)") from e
        if not isinstance(linear, nn.Linear) or tuple(linear.weight.shape) != shape:
            raise ValueError(f"checkpoint is from another model: {fqn!r} is {linear!r} here but "
                             f"a Linear {shape[1]}->{shape[0]} in the checkpoint")
        try:
            layer = skeleton_layer(entry, linear.weight.device)
        except (KeyError, TypeError, ValueError, AttributeError) as e:
            raise ValueError(f"checkpoint entry for {fqn!r} is invalid: {e!r}") from e
        set_submodule(model, fqn, layer)
    try:
        load_model(model, str(Path(path) / WEIGHTS_NAME), strict=True)
    except SafetensorError as e:
        raise ValueError(f"{Path(path) / WEIGHTS_NAME} is truncated or corrupt: {e}") from e
    except RuntimeError as e:  # missing/unexpected keys or shape mismatches from load_state_dict
        raise ValueError(f"checkpoint does not match this model: {e}") from e
    for fqn, layer in quantized_modules(model).items():
        try:
            layer.validate()
        except (ValueError, TypeError) as e:
            raise ValueError(f"checkpoint layer {fqn!r} is invalid: {e}") from e
    model.pyquant_skipped = {name: "not converted" for name in config.get("modules_not_converted", [])}
    return model
