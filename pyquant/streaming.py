"""Quantize a Hugging Face checkpoint larger than memory, one tensor or one block at a time.

:func:`quantize_checkpoint` reads a (sharded) safetensors checkpoint and writes a sharded pyquant
checkpoint that ``from_pretrained`` loads (after ``import pyquant``), quantizing the layers
:func:`pyquant.quantize_model` would take; the dense model is never held:

- RTN (data-free): tensor by tensor. The model is only a skeleton on the meta device (to know its
  layers); resident memory is about one dense weight, its quantization work and one output shard.
- UniSVQ (calibrated): block by block (:mod:`pyquant.quantizers.blockwise`): the parts outside the
  transformer blocks (embeddings, final norm, head) and one block at a time are loaded (fp32), the
  block is quantized and fine-tuned on the calibration activations, written, and dropped. Memory:
  the outer parts, one block with its fine-tuning state, and the activations of the calibration
  batches at one block (a few sequences).

DAQ needs the base model too: ``quantize_model`` then ``save_pretrained``.
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Callable, Iterable

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn
from tqdm.auto import tqdm

from .io import layer_entry, read_header, staged_checkpoint
from .nn import QuantLinear, select_targets, set_submodule
from .quantizers import QuantConfig, RTNConfig, UniSVQConfig, blockwise
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


def skeleton(config, buffers: bool = False) -> nn.Module:
    """The model of a transformers config with its parameters on the meta device: names and shapes,
    no memory. ``buffers``: its buffers (rotary frequencies) real, to run it once loaded."""
    import transformers
    from accelerate import init_empty_weights

    arch = (getattr(config, "architectures", None) or [None])[0]
    cls = getattr(transformers, arch, None) if arch else None
    with init_empty_weights(include_buffers=not buffers):
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
                        calibration_data: Iterable | None = None, shard_bytes: int = 2**28,
                        progress: bool = True) -> Path:
    """Quantize the Hugging Face checkpoint directory ``src`` into ``dst`` without loading it.

    Args:
        config: ``RTNConfig`` (the default, ``bits=2``), streamed tensor by tensor, or
            ``UniSVQConfig`` with ``calibration_data`` (as for ``quantize_model``: token-id
            batches), streamed block by block; only the blocks' layers are then selectable.
        filter_fn: as for :func:`pyquant.quantize_model` (default: every linear layer with
            ``in_features % 4 == 0`` but the output head), called on the skeleton's layers.
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
    by_block = isinstance(config, UniSVQConfig)
    if type(config).apply is not QuantConfig.apply and not by_block:
        raise ValueError(f"quantize_checkpoint streams rtn and unisvq; {config.method} needs more (a base model): "
                         f"load the model, quantize_model(...), then save_pretrained")
    if by_block and calibration_data is None:
        raise ValueError("unisvq needs calibration data: pass calibration_data (token-id batches)")
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
    model = skeleton(hf_config, buffers=by_block)
    targets, skipped, conv1d = select_targets(model, filter_fn)
    if by_block and conv1d:
        raise ValueError("unisvq streaming takes nn.Linear models (Llama, Qwen2, Mistral, Phi-3); this one has "
                         "Conv1D layers (GPT-2): quantize it in memory")
    for fqn in targets:
        if f"{fqn}.weight" not in header:
            raise ValueError(f"the checkpoint lacks {fqn}.weight")
    reader = _Reader(where)
    with staged_checkpoint(dst) as tmp:
        writer, entries = _ShardWriter(tmp, shard_bytes), {}
        if by_block:
            _stream_blocks(model, targets, config, calibration_data, reader, header, writer, entries, progress)
        else:
            _stream_tensors(targets, conv1d, config, reader, writer, entries, progress)
        writer.finish()
        qc = PyquantConfig(method=config.method, layers=entries, modules_to_not_convert=sorted(skipped),
                           **{k: getattr(config, k) for k in ("bits", "hadamard") if hasattr(config, k)})
        hf_config.quantization_config = qc.to_dict()
        hf_config.save_pretrained(tmp)
        for f in src.iterdir():  # tokenizer, generation config, ...
            if f.is_file() and f.suffix != ".safetensors" and f.name not in (INDEX_NAME, "config.json"):
                shutil.copy2(f, tmp / f.name)
    return dst


class _Reader:
    """One tensor from the checkpoint; each read opens its file anew, so that no memory mapping
    (counted as resident once read) outlives it."""

    def __init__(self, where: dict[str, Path]):
        self.where = where

    def __contains__(self, key: str) -> bool:
        return key in self.where

    def __call__(self, key: str) -> torch.Tensor:
        with safe_open(str(self.where[key]), framework="pt") as h:
            return h.get_tensor(key)


def _write_layer(layer: QuantLinear, fqn: str, writer: "_ShardWriter", entries: dict) -> None:
    entries[fqn] = layer_entry(layer)
    for name, v in layer.state_dict().items():
        writer.add(f"{fqn}.{name}", v)


def _stream_tensors(targets, conv1d, config, reader, writer, entries, progress) -> None:
    """RTN: every tensor in checkpoint order, the targets' weights quantized."""
    biases = {f"{fqn}.bias" for fqn in targets}
    for key in tqdm(list(reader.where), desc=f"{config.method} streaming", disable=not progress):
        fqn = key.removesuffix(".weight") if key.endswith(".weight") else None
        if key in biases:
            continue  # written with its layer
        if fqn not in targets:
            writer.add(key, reader(key))
            continue
        weight = reader(key)
        weight = weight.t() if fqn in conv1d else weight  # transformers' Conv1D stores [in, out]
        bias = reader(f"{fqn}.bias") if f"{fqn}.bias" in reader else None
        _write_layer(QuantLinear.from_packed(config.quantize_weight(check_weight(weight, key)), bias), fqn,
                     writer, entries)
        del weight


def _stream_blocks(model, targets, config, calibration_data, reader, header, writer, entries, progress) -> None:
    """UniSVQ: the outer parts, then one block at a time, loaded, quantized, written, dropped."""
    from accelerate.utils import set_module_tensor_to_device

    from . import calibration as cal
    from .io import SAFETENSORS_DTYPES

    block_name, blocks = blockwise.find_blocks(model, targets)
    prefixes = [f"{block_name}.{i}." for i in range(len(blocks))]
    in_blocks = lambda key: any(key.startswith(p) for p in prefixes)  # noqa: E731
    stored = {name: dtype for dtype, name in SAFETENSORS_DTYPES.items()}

    def load(keys):
        for key in keys:
            set_module_tensor_to_device(model, key, "cpu", value=reader(key).float())

    load(k for k, _ in model.named_parameters() if not in_blocks(k) and k in reader)
    model.tie_weights()  # a tied head shares the embedding just loaded
    data = cal.materialize(calibration_data)
    cal.check_token_ids(model, data)

    def swap(fqn, pw):
        layer = QuantLinear.from_packed(pw, targets[fqn].bias)
        set_submodule(model, fqn, layer)
        return layer

    def load_block(i, block):
        load(prefixes[i] + n for n, _ in block.named_parameters())

    def release_block(i, block):
        for name, t in block.state_dict().items():
            key = prefixes[i] + name
            owner = key.rpartition(".")[0]
            if isinstance(model.get_submodule(owner), QuantLinear):
                continue
            writer.add(key, t.detach().to(stored[header[key][0]]))  # norms (fine-tuned), unselected layers
        for fqn in [f for f in targets if f.startswith(prefixes[i])]:
            _write_layer(model.get_submodule(fqn), fqn, writer, entries)
            targets[fqn].to("meta")  # the swapped-out dense layer: the driver still refers to it
        block.to("meta")  # drop the block's memory

    config.run_blocks(model, targets, data, swap, progress, load_block=load_block, release_block=release_block)
    for key in reader.where:  # the outer parts as they were stored
        if not in_blocks(key):
            writer.add(key, reader(key))
