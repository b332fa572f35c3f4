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

- DAQ (:func:`daq_checkpoint`): a post-trained checkpoint against its base, both read tensor by
  tensor (either may be FP8 block-scaled, as DeepSeek-V3-style checkpoints are), written as a
  Hugging Face FP8 block-scaled checkpoint, the layout transformers and vLLM load natively.

:class:`CheckpointTensors` reads any of these checkpoints one tensor at a time; an FP8 block-scaled
source is read dequantized (its FP8 weights that stay unquantized are written in bfloat16).
"""
from __future__ import annotations

import json
import math
import os
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Callable, Iterable, Iterator

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn
from tqdm.auto import tqdm

from .io import SAFETENSORS_DTYPES, layer_entry, quantization_config_of, read_header, staged_checkpoint
from .nn import QuantLinear, select_targets, set_submodule
from .quantizers import DAQConfig, QuantConfig, RTNConfig, UniSVQConfig, blockwise
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
    if by_block and config.e2e_epochs > 0:
        raise ValueError(f"config.e2e_epochs={config.e2e_epochs}: end-to-end fine-tuning needs the whole model in "
                         "memory; stream with e2e_epochs=0, or load the model and use quantize_model")
    if not isinstance(shard_bytes, int) or shard_bytes <= 0:
        raise ValueError(f"shard_bytes must be a positive int, got {shard_bytes!r}")
    src, dst = Path(src), Path(dst)
    if not (src / "config.json").is_file():
        raise ValueError(f"{str(src)!r} is not a Hugging Face model directory (no config.json)")
    reader = CheckpointTensors(src)

    hf_config = AutoConfig.from_pretrained(src)
    model = skeleton(hf_config, buffers=by_block)
    targets, skipped, conv1d = select_targets(model, filter_fn)
    if by_block and conv1d:
        raise ValueError("unisvq streaming takes nn.Linear models (Llama, Qwen2, Mistral, Phi-3); this one has "
                         "Conv1D layers (GPT-2): quantize it in memory")
    for fqn in targets:
        if f"{fqn}.weight" not in reader:
            raise ValueError(f"the checkpoint lacks {fqn}.weight")
    with staged_checkpoint(dst) as tmp:
        writer, entries = _ShardWriter(tmp, shard_bytes), {}
        if by_block:
            _stream_blocks(model, targets, config, calibration_data, reader, writer, entries, progress)
        else:
            _stream_tensors(targets, conv1d, config, reader, writer, entries, progress)
        writer.finish()
        qc = PyquantConfig(method=config.method, layers=entries, modules_to_not_convert=sorted(skipped),
                           **{k: getattr(config, k) for k in ("bits", "hadamard") if hasattr(config, k)})
        hf_config.quantization_config = qc.to_dict()
        hf_config.save_pretrained(tmp)
        _copy_other_files(src, tmp)
    return dst


def daq_checkpoint(post: str | os.PathLike, dst: str | os.PathLike, config: DAQConfig,
                   filter_fn: Callable[[nn.Module, str], bool] | None = None, *, shard_bytes: int = 2**30,
                   progress: bool = True) -> Path:
    """DAQ of the post-trained checkpoint directory ``post`` against ``config.base`` (a checkpoint
    directory or a ``.safetensors`` file), one tensor at a time, written to ``dst`` as a Hugging Face FP8
    block-scaled checkpoint: each quantized layer's ``weight`` in float8_e4m3fn with its
    ``weight_scale_inv`` (float32, ``[⌈N/b⌉, ⌈K/b⌉]``), ``quantization_config`` ``{quant_method:
    "fp8", fmt: "e4m3", activation_scheme: "dynamic", weight_block_size: [b, b]}`` with
    ``b = config.block``; every other tensor as ``post`` stores it. Either checkpoint may itself be
    FP8 block-scaled (read dequantized, see :class:`CheckpointTensors`) and sharded.

    ``config``: a :class:`DAQConfig` with ``grid="fp8"``, ``granularity="block"`` and ``base`` a path
    (None with ``search=False``: plain absmax scales). ``filter_fn`` as for ``quantize_model`` (default:
    every linear layer but the output head). Everything is checked before anything is written: the
    layers' weights in both checkpoints, of one shape and floating-point. Returns ``dst``;
    ``dst`` is replaced atomically, as :func:`quantize_checkpoint` does.
    """
    from transformers import AutoConfig

    if not isinstance(config, DAQConfig):
        raise TypeError(f"config must be a DAQConfig, got {type(config).__name__}")
    if config.grid != "fp8" or config.granularity != "block":
        raise ValueError(f"daq_checkpoint writes the FP8 block-scaled layout: DAQConfig(grid='fp8', "
                         f"granularity='block'), got grid={config.grid!r}, granularity={config.granularity!r}")
    if config.base is not None and not isinstance(config.base, (str, os.PathLike)):
        raise TypeError(f"daq_checkpoint reads the base from disk: DAQConfig.base must be a checkpoint directory or "
                        f".safetensors file, got {type(config.base).__name__}")
    if not isinstance(shard_bytes, int) or shard_bytes <= 0:
        raise ValueError(f"shard_bytes must be a positive int, got {shard_bytes!r}")
    post, dst = Path(post), Path(dst)
    if not (post / "config.json").is_file():
        raise ValueError(f"post: {str(post)!r} is not a Hugging Face model directory (no config.json)")
    post_t = CheckpointTensors(post)
    base_t = CheckpointTensors(config.base) if config.base is not None else None
    hf_config = AutoConfig.from_pretrained(post)
    targets, skipped, conv1d = select_targets(skeleton(hf_config), filter_fn)
    if conv1d:
        raise ValueError(f"the FP8 layout is for nn.Linear weights; this model has Conv1D layers: {sorted(conv1d)[:3]}")
    if not targets:
        raise ValueError("no layer selected: nothing to quantize")
    for fqn in targets:
        key = f"{fqn}.weight"
        for name, t in [("post", post_t)] + ([("base", base_t)] if base_t is not None else []):
            if key not in t:
                raise ValueError(f"{name} checkpoint {str(t.path)!r} lacks {key}")
            dtype = t.header[key][0]
            if dtype not in FLOAT_DTYPES:
                raise ValueError(f"{name} {key} is stored as {dtype}, not floating point")
            if t.is_fp8(key) and not t.block_scaled(key):
                raise ValueError(f"{name} {key} is stored in {dtype} without its {key}{SCALE_SUFFIX}")
        if base_t is not None and post_t.shape(key) != base_t.shape(key):
            raise ValueError(f"{key}: post has shape {list(post_t.shape(key))}, base {list(base_t.shape(key))}: "
                             "base is another model")

    report = {}
    with staged_checkpoint(dst) as tmp:
        writer = _ShardWriter(tmp, shard_bytes)
        for key in tqdm(list(post_t), desc="daq streaming", disable=not progress):
            fqn = key.removesuffix(".weight") if key.endswith(".weight") else None
            if fqn not in targets:
                writer.add(key, post_t.raw(key))
                if post_t.block_scaled(key):  # a layer left as it was stored, FP8 with its scale
                    writer.add(key + SCALE_SUFFIX, post_t.raw(key + SCALE_SUFFIX))
                continue
            res = config._quantize(post_t[key], None if base_t is None else base_t[key])
            writer.add(key, res.codes)
            writer.add(key + SCALE_SUFFIX, res.scales.float())
            report[fqn] = {"plain": res.plain, "chosen": res.chosen, "blocks_changed": int((res.multipliers != 1).sum()),
                           "blocks": res.multipliers.numel()}
        writer.finish()
        hf_config.quantization_config = {
            "quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
            "weight_block_size": [config.block, config.block], "modules_to_not_convert": sorted(skipped),
            "pyquant": {"method": "daq", "metric": config.metric, "search": config.search}}
        hf_config.save_pretrained(tmp)
        _copy_other_files(post, tmp)
        (tmp / "daq_report.json").write_text(json.dumps(report, indent=1))
    return dst


def _copy_other_files(src: Path, dst: Path) -> None:
    """The tokenizer, generation config and other files of a checkpoint directory."""
    for f in src.iterdir():
        if f.is_file() and f.suffix != ".safetensors" and f.name not in (INDEX_NAME, "config.json"):
            shutil.copy2(f, dst / f.name)


SAFETENSORS_NAMES = {name: dtype for dtype, name in SAFETENSORS_DTYPES.items()}
FP8_DTYPES = {"F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2}
FLOAT_DTYPES = {"F16", "BF16", "F32", "F64", *FP8_DTYPES}
SCALE_SUFFIX = "_scale_inv"  # transformers' fine-grained FP8: `<name>.weight` + `<name>.weight_scale_inv`


class CheckpointTensors(Mapping):
    """The tensors of a safetensors checkpoint (a directory, sharded through its index JSON, or one
    ``.safetensors`` file), each read from disk when asked for: nothing stays in memory.

    A block-scaled FP8 weight (``weight`` in float8 plus ``weight_scale_inv`` of shape
    ``[⌈N/bn⌉, ⌈K/bk⌉]``, ``[bn, bk]`` the ``weight_block_size`` of the directory's
    ``quantization_config``, default ``[128, 128]``) reads as its dequantized float32 value
    ``weight * weight_scale_inv`` (per block), and its scale is not a key of its own; :meth:`raw`
    reads any tensor as stored. :attr:`header` maps every stored name to its ``(dtype, shape)``.
    """

    def __init__(self, path: str | os.PathLike):
        path = Path(path)
        if path.is_dir():
            files, directory = checkpoint_files(path), path
        elif path.is_file() and path.suffix == ".safetensors":
            files, directory = [path], path.parent
        else:
            raise ValueError(f"{str(path)!r} is neither a checkpoint directory nor a .safetensors file")
        self.path = path
        self.header: dict[str, tuple[str, tuple]] = {}
        self.where: dict[str, Path] = {}
        for f in files:  # one header read per file gives both
            names = read_header([f])
            self.header.update(names)
            self.where.update(dict.fromkeys(names, f))
        block = (quantization_config_of(directory) or {}).get("weight_block_size")
        block = [128, 128] if block is None else block
        if (not isinstance(block, (list, tuple)) or len(block) != 2
                or not all(isinstance(b, int) and b > 0 for b in block)):
            raise ValueError(f"{directory / 'config.json'}: weight_block_size must be two positive ints, got {block!r}")
        self.block = tuple(block)
        self._scaled = {k for k in self.header if self.header[k][0] in FP8_DTYPES and k + SCALE_SUFFIX in self.header}

    def _is_scale_of_a_weight(self, key: str) -> bool:
        return key.endswith(SCALE_SUFFIX) and key[:-len(SCALE_SUFFIX)] in self._scaled

    def __iter__(self) -> Iterator[str]:
        return (k for k in self.where if not self._is_scale_of_a_weight(k))

    def __len__(self) -> int:
        return len(self.where) - len(self._scaled)

    def __contains__(self, key) -> bool:
        return key in self.where and not self._is_scale_of_a_weight(key)

    def block_scaled(self, key: str) -> bool:
        """Stored in float8 with a ``weight_scale_inv``."""
        return key in self._scaled

    def is_fp8(self, key: str) -> bool:
        """Stored in float8 (with or without a block scale)."""
        return self.header[key][0] in FP8_DTYPES

    def shape(self, key: str) -> tuple:
        return self.header[key][1]

    def raw(self, key: str) -> torch.Tensor:
        """The tensor as stored. Each read opens its file anew, so that no memory mapping (counted
        as resident once read) outlives it."""
        with safe_open(str(self.where[key]), framework="pt") as h:
            return h.get_tensor(key)

    def dense_dtype(self, key: str) -> torch.dtype:
        """The dtype ``key`` keeps in a checkpoint that is not in the FP8 layout: as stored, but
        bfloat16 for an FP8 block-scaled weight."""
        return torch.bfloat16 if key in self._scaled else SAFETENSORS_NAMES[self.header[key][0]]

    def dense(self, key: str) -> torch.Tensor:
        """``self[key]`` in :meth:`dense_dtype`."""
        return self[key].to(self.dense_dtype(key))

    def __getitem__(self, key: str) -> torch.Tensor:
        if key not in self:
            raise KeyError(key)
        if key not in self._scaled:
            if self.is_fp8(key):
                raise ValueError(f"{key} is stored in {self.header[key][0]} without its {key}{SCALE_SUFFIX}: its "
                                 "values cannot be recovered")
            return self.raw(key)
        w, scale = self.raw(key), self.raw(key + SCALE_SUFFIX).float()
        (n, k), (bn, bk) = w.shape, self.block
        if w.dim() != 2 or tuple(scale.shape) != (math.ceil(n / bn), math.ceil(k / bk)):
            raise ValueError(f"{key}{SCALE_SUFFIX} has shape {list(scale.shape)}; a {list(w.shape)} weight in "
                             f"{bn}x{bk} blocks needs [{math.ceil(n / bn)}, {math.ceil(k / bk)}]")
        full = scale.repeat_interleave(bn, 0)[:n].repeat_interleave(bk, 1)[:, :k]
        return w.float() * full


def _write_layer(layer: QuantLinear, fqn: str, writer: "_ShardWriter", entries: dict) -> None:
    entries[fqn] = layer_entry(layer)
    for name, v in layer.state_dict().items():
        writer.add(f"{fqn}.{name}", v)


def _stream_tensors(targets, conv1d, config, reader, writer, entries, progress) -> None:
    """RTN: every tensor in checkpoint order, the targets' weights quantized."""
    biases = {f"{fqn}.bias" for fqn in targets}
    for key in tqdm(list(reader), desc=f"{config.method} streaming", disable=not progress):
        fqn = key.removesuffix(".weight") if key.endswith(".weight") else None
        if key in biases:
            continue  # written with its layer
        if fqn not in targets:
            writer.add(key, reader.dense(key))
            continue
        weight = reader[key]
        weight = weight.t() if fqn in conv1d else weight  # transformers' Conv1D stores [in, out]
        bias = reader.raw(f"{fqn}.bias") if f"{fqn}.bias" in reader else None
        _write_layer(QuantLinear.from_packed(config.quantize_weight(check_weight(weight, key)), bias), fqn,
                     writer, entries)
        del weight


def _stream_blocks(model, targets, config, calibration_data, reader, writer, entries, progress) -> None:
    """UniSVQ: the outer parts, then one block at a time, loaded, quantized, written, dropped."""
    from accelerate.utils import set_module_tensor_to_device

    from . import calibration as cal

    block_name, blocks = blockwise.find_blocks(model, targets)
    prefixes = [f"{block_name}.{i}." for i in range(len(blocks))]
    in_blocks = lambda key: any(key.startswith(p) for p in prefixes)  # noqa: E731

    def load(keys):
        for key in keys:
            set_module_tensor_to_device(model, key, "cpu", value=reader[key].float())

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
            writer.add(key, t.detach().to(reader.dense_dtype(key)))  # norms (fine-tuned), unselected layers
        for fqn in [f for f in targets if f.startswith(prefixes[i])]:
            _write_layer(model.get_submodule(fqn), fqn, writer, entries)
            targets[fqn].to("meta")  # the swapped-out dense layer: the driver still refers to it
        block.to("meta")  # drop the block's memory

    config.run_blocks(model, targets, data, swap, progress, load_block=load_block, release_block=release_block)
    for key in reader:  # the outer parts as they were stored
        if not in_blocks(key):
            writer.add(key, reader.dense(key))
