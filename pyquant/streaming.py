"""Quantize a Hugging Face checkpoint larger than memory, one tensor at a time.

:func:`quantize_checkpoint` reads a (sharded) safetensors checkpoint tensor by tensor, quantizes
the weights of the layers :func:`pyquant.quantize_model` would take (a data-free method: RTN),
and writes a sharded pyquant checkpoint that ``from_pretrained`` loads (after ``import pyquant``).
The model itself only ever exists as a skeleton on the meta device (to know its layers): the
resident memory is about one dense weight, its quantization work, and one output shard.

Methods that need calibration data (UniSVQ, DAQ) run on a model in memory:
``quantize_model`` then ``save_pretrained``.
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Callable

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn
from tqdm.auto import tqdm

from .io import layer_entry, read_header, staged_checkpoint
from .nn import QuantLinear, select_targets
from .quantizers import QuantConfig, RTNConfig
from .quantizers.base import check_weight

INDEX_NAME = "model.safetensors.index.json"


def checkpoint_files(src: Path) -> list[Path]:
    """The safetensors files of a checkpoint directory: those its index names, or the one file."""
    index = src / INDEX_NAME
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError, RecursionError) as e:
            raise ValueError(f"{index} is not a safetensors index ({type(e).__name__}: {e})") from None
        return [src / f for f in sorted(set(weight_map.values()))]
    files = sorted(src.glob("*.safetensors"))
    if not files:
        raise ValueError(f"{str(src)!r} holds no safetensors weights (model.safetensors or {INDEX_NAME})")
    return files


def skeleton(config) -> nn.Module:
    """The model of a transformers config on the meta device: names and shapes, no memory."""
    import transformers

    arch = (getattr(config, "architectures", None) or [None])[0]
    cls = getattr(transformers, arch, None) if arch else None
    with torch.device("meta"):
        return cls(config) if cls is not None else transformers.AutoModel.from_config(config)


class _ShardWriter:
    """Collects output tensors and writes a shard whenever ``shard_bytes`` are held."""

    def __init__(self, out: Path, shard_bytes: int):
        self.out, self.shard_bytes = out, shard_bytes
        self.pending: dict[str, torch.Tensor] = {}
        self.size, self.files, self.weight_map, self.total = 0, [], {}, 0

    def add(self, name: str, t: torch.Tensor) -> None:
        self.pending[name] = t.contiguous()
        nbytes = t.numel() * t.element_size()
        self.size += nbytes
        self.total += nbytes
        if self.size >= self.shard_bytes:
            self.flush()

    def flush(self) -> None:
        if not self.pending:
            return
        name = f"part-{len(self.files):05d}.safetensors"
        save_file(self.pending, str(self.out / name), metadata={"format": "pt"})
        self.files.append((name, list(self.pending)))
        self.pending, self.size = {}, 0

    def finish(self) -> None:
        """Give the shards transformers' names and write the index."""
        self.flush()
        n = len(self.files)
        for i, (name, keys) in enumerate(self.files):
            final = "model.safetensors" if n == 1 else f"model-{i + 1:05d}-of-{n:05d}.safetensors"
            (self.out / name).rename(self.out / final)
            self.weight_map.update({k: final for k in keys})
        if n > 1:
            index = {"metadata": {"total_size": self.total}, "weight_map": dict(sorted(self.weight_map.items()))}
            (self.out / INDEX_NAME).write_text(json.dumps(index, indent=2))


def quantize_checkpoint(src: str | os.PathLike, dst: str | os.PathLike, config: QuantConfig | None = None,
                        filter_fn: Callable[[nn.Module, str], bool] | None = None, *,
                        shard_bytes: int = 2**29, progress: bool = True) -> Path:
    """Quantize the Hugging Face checkpoint directory ``src`` into ``dst`` without loading it.

    Args:
        config: a data-free pyquant config (default ``RTNConfig(bits=2)``).
        filter_fn: as for :func:`pyquant.quantize_model` (default: every linear layer with
            ``in_features % 4 == 0`` but the output head), called on the meta skeleton's layers.
        shard_bytes: output shard size (the output is held in memory up to one shard).

    ``dst`` must not exist, or be an empty directory or a pyquant checkpoint (replaced atomically,
    as :func:`pyquant.save_quantized` does). Other files of ``src`` (tokenizer, generation config)
    are copied. Returns ``dst``.
    """
    from transformers import AutoConfig

    from .hf import PyquantConfig

    config = RTNConfig(bits=2) if config is None else config
    if not isinstance(config, QuantConfig):
        raise TypeError(f"config must be a pyquant QuantConfig, got {type(config).__name__}")
    if type(config).apply is not QuantConfig.apply:
        raise ValueError(f"quantize_checkpoint takes data-free methods (rtn); {config.method} needs calibration "
                         f"data: load the model, quantize_model(...), then save_pretrained")
    if not isinstance(shard_bytes, int) or shard_bytes <= 0:
        raise ValueError(f"shard_bytes must be a positive int, got {shard_bytes!r}")
    src, dst = Path(src), Path(dst)
    if not (src / "config.json").is_file():
        raise ValueError(f"{str(src)!r} is not a Hugging Face model directory (no config.json)")
    files = checkpoint_files(src)
    header = read_header(files)
    where = {}
    for f in files:
        with safe_open(str(f), framework="pt") as h:
            where.update({k: f for k in h.keys()})

    hf_config = AutoConfig.from_pretrained(src)
    model = skeleton(hf_config)
    targets, skipped, conv1d = select_targets(model, filter_fn)
    prefix = model.base_model_prefix
    keys = {}  # target fqn -> its weight's key in the checkpoint (with or without the base model's prefix)
    for fqn in targets:
        key = next((k for k in (f"{fqn}.weight", f"{fqn.removeprefix(prefix + '.')}.weight") if k in header), None)
        if key is None:
            raise ValueError(f"the checkpoint lacks {fqn}.weight")
        keys[fqn] = key
    weight_of = {k: fqn for fqn, k in keys.items()}
    biases = {k.removesuffix(".weight") + ".bias" for k in weight_of}

    with staged_checkpoint(dst) as tmp:
        writer, entries = _ShardWriter(tmp, shard_bytes), {}
        for key in tqdm(list(where), desc=f"{config.method} streaming", disable=not progress):
            if key in biases:
                continue  # written with its layer
            with safe_open(str(where[key]), framework="pt") as h:  # per tensor: no mapping stays resident
                t = h.get_tensor(key)
            fqn = weight_of.get(key)
            if fqn is None:
                writer.add(key, t)
                continue
            bias_key = key.removesuffix(".weight") + ".bias"
            bias = None
            if bias_key in where:
                with safe_open(str(where[bias_key]), framework="pt") as h:
                    bias = h.get_tensor(bias_key)
            weight = t.t() if fqn in conv1d else t  # transformers' Conv1D stores [in, out]
            layer = QuantLinear.from_packed(config.quantize_weight(check_weight(weight, key)), bias)
            entries[fqn] = layer_entry(layer)
            stem = key.removesuffix(".weight")
            for name, v in layer.state_dict().items():
                writer.add(f"{stem}.{name}", v)
            del t, weight, layer
        writer.finish()
        qc = PyquantConfig(method=config.method, layers=entries, modules_to_not_convert=sorted(skipped),
                           **{k: getattr(config, k) for k in ("bits", "hadamard") if hasattr(config, k)})
        hf_config.quantization_config = qc.to_dict()
        hf_config.save_pretrained(tmp)
        for f in src.iterdir():  # tokenizer, generation config, ...
            if f.is_file() and f.suffix != ".safetensors" and f.name not in (INDEX_NAME, "config.json"):
                shutil.copy2(f, tmp / f.name)
    return dst
