"""vLLM integration: serve pyquant checkpoints (``quant_method: "pyquant"``) with vLLM.

Installed with pyquant as the ``vllm.general_plugins`` entry point ``pyquant =
pyquant.vllm:register``: vLLM calls :func:`register` in each of its processes, which registers
the quantization method ``"pyquant"``. Nothing else is needed::

    vllm serve ./llama-pyquant            # the directory save_pretrained wrote
    vllm.LLM(model="./llama-pyquant")

This module imports vLLM; ``import pyquant`` never imports it.

- :class:`PyquantVllmConfig` reads the ``quantization_config`` that ``save_pretrained`` wrote
  (:class:`pyquant.hf.PyquantConfig`: format version, one entry per quantized layer). vLLM names
  its layers after its own modules (``qkv_proj`` fused from ``q_proj``/``k_proj``/``v_proj``,
  ``model.`` prefixes); a layer's entries are found through the model's
  ``packed_modules_mapping`` and by dropping leading name components.
- :class:`PyquantLinearMethod` creates the rank's packed tensors as parameters with their own
  weight loaders (:class:`pyquant.tp.Shard`: column-parallel layers hold whole rows, row-parallel
  ones whole Hadamard blocks of columns), builds one ``QuantLinear`` per fused partition sharing
  those tensors in ``process_weights_after_loading`` (kernel state, once; the copies CPU mode
  "lut" keeps are rewritten by the weight loader after any later write), and runs them in
  ``apply`` (the ``torch.ops.pyquant`` ops, which vLLM's ``torch.compile`` keeps in one graph).
  A quantized ``lm_head`` (vLLM's ``ParallelLMHead``) is served the same way, its vocabulary cut
  across ranks as vLLM cuts it. Layers the checkpoint left in full precision get vLLM's
  unquantized method.

Refused at load, with the layer named: a format version this pyquant does not read, a
tensor-parallel size whose cut does not fall on whole Hadamard blocks, a fused layer of which
only some partitions are quantized, a quantized head tied to the embeddings, DAQ's ``dequant``
layers.
"""
from __future__ import annotations

from functools import partial

import torch
from torch import nn
from vllm.model_executor.layers.linear import (
    ColumnParallelLinear,
    LinearBase,
    LinearMethodBase,
    QKVParallelLinear,
    ReplicatedLinear,
    RowParallelLinear,
    UnquantizedLinearMethod,
)
from vllm.model_executor.layers.quantization import register_quantization_config
from vllm.model_executor.layers.quantization.base_config import QuantizationConfig
from vllm.model_executor.layers.vocab_parallel_embedding import ParallelLMHead, VocabParallelEmbedding
from vllm.model_executor.utils import set_weight_attrs

from . import tp
from .format import PACKED_TENSORS, READABLE_FORMAT_VERSIONS

QUANT_METHOD = "pyquant"
# Layer names some vLLM model code gets wrong, and the names its weights load under: vLLM 0.32's
# BertSelfAttention is built with its sibling's ".output" prefix, so BERT's fused QKV is named
# "...attention.output.qkv_proj" while it loads "...attention.self.{query,key,value}".
PREFIX_QUIRKS = ((".attention.output.qkv_proj", ".attention.self.qkv_proj"),)


def register() -> None:
    """The ``vllm.general_plugins`` entry point: importing this module registered the method."""


@register_quantization_config(QUANT_METHOD)
class PyquantVllmConfig(QuantizationConfig):
    """The ``quantization_config`` of a pyquant checkpoint, as vLLM sees it."""

    def __init__(self, layers: dict[str, dict], format_version: int, method: str = "unknown"):
        super().__init__()
        self.layers, self.format_version, self.method = layers, format_version, method

    def __repr__(self) -> str:
        return f"PyquantVllmConfig(method={self.method!r}, layers={len(self.layers)}, format={self.format_version})"

    @classmethod
    def from_config(cls, config: dict) -> "PyquantVllmConfig":
        version = config.get("format_version")
        if isinstance(version, bool) or version not in READABLE_FORMAT_VERSIONS:
            raise ValueError(f"this pyquant checkpoint has format_version {version!r}; the installed pyquant reads "
                             f"versions {list(READABLE_FORMAT_VERSIONS)} (a newer checkpoint needs a newer pyquant)")
        layers = config.get("layers")
        if not isinstance(layers, dict) or not layers:
            raise ValueError("this pyquant checkpoint's quantization_config lists no quantized layers ('layers')")
        return cls(layers, version, str(config.get("method", "unknown")))

    def get_name(self) -> str:
        return QUANT_METHOD

    def get_supported_act_dtypes(self) -> list[torch.dtype]:
        return [torch.bfloat16, torch.float16, torch.float32]

    @classmethod
    def get_min_capability(cls) -> int:
        return 80  # the CUDA kernels' sm_80 (only asked on CUDA)

    @staticmethod
    def get_config_filenames() -> list[str]:
        return []  # config.json's quantization_config holds everything

    def get_quant_method(self, layer: nn.Module, prefix: str):
        found = self.entries_for(prefix)
        if isinstance(layer, LinearBase) or (isinstance(layer, ParallelLMHead) and found):
            return PyquantLinearMethod(self, prefix, found) if found else UnquantizedLinearMethod()
        if isinstance(layer, VocabParallelEmbedding) and found:
            raise ValueError(f"{prefix}: this pyquant checkpoint quantizes an input embedding, which pyquant's vLLM "
                             f"method does not serve (pyquant quantizes linear layers only)")
        return None  # vLLM's own (unquantized) method

    def entries_for(self, prefix: str) -> list[tuple[str, dict]]:
        """The checkpoint entries of vLLM layer ``prefix``: one per fused partition (through the
        model's ``packed_modules_mapping``), ``[]`` for a layer left in full precision."""
        found = self._entries_for(prefix)
        for wrong, right in PREFIX_QUIRKS:
            if not found and prefix.endswith(wrong):
                found = self._entries_for(prefix.removesuffix(wrong) + right)
        return found

    def _entries_for(self, prefix: str) -> list[tuple[str, dict]]:
        head, _, last = prefix.rpartition(".")
        subs = self.packed_modules_mapping.get(last)
        names = [f"{head}.{s}" if head else s for s in subs] if subs and subs != [last] else [prefix]
        found = [(n, self._entry(n)) for n in names]
        hits = [(n, e) for n, e in found if e is not None]
        if hits and len(hits) != len(found):
            missing = [n for n, e in found if e is None]
            raise ValueError(f"{prefix}: vLLM fuses {names}, but the checkpoint quantizes only "
                             f"{[n for n, _ in hits]} (not {missing}); quantize all of them or none")
        return hits

    def _entry(self, name: str) -> dict | None:
        # vLLM's names may carry prefixes the checkpoint's lack ("model.encoder..." vs "encoder..."):
        # the longest suffix that the checkpoint names
        parts = name.split(".")
        for i in range(len(parts)):
            entry = self.layers.get(".".join(parts[i:]))
            if entry is not None:
                return entry
        return None


class PyquantLinearMethod(LinearMethodBase):
    """A pyquant 2-bit linear layer in vLLM: the rank's packed tensors, one kernel per partition."""

    def __init__(self, config: PyquantVllmConfig, prefix: str, entries: list[tuple[str, dict]]):
        self.config, self.prefix, self.entries = config, prefix, [e for _, e in entries]

    def shard(self, layer: nn.Module, input_size_per_partition: int, output_partition_sizes: list[int]) -> tp.Shard:
        """The :class:`pyquant.tp.Shard` this rank holds of ``layer``."""
        rank, size = getattr(layer, "tp_rank", 0), getattr(layer, "tp_size", 1)
        name, entries = self.prefix, self.entries
        if isinstance(layer, ParallelLMHead):
            # the rank's slice of the vocabulary, then zero rows up to vLLM's padded size (sliced off
            # from the logits by vLLM)
            idx = layer.shard_indices
            if len(entries) != 1 or idx.num_added_elements:
                raise ValueError(f"{name}: a quantized output head is served as one matrix without added vocabulary")
            shard = tp.Shard(name, [tp.Part(entries[0], idx.num_org_elements, idx.org_vocab_start_index, 0)],
                             entries[0]["in_features"])
            if shard.in_features != input_size_per_partition:
                raise ValueError(f"{name}: the checkpoint's head takes {shard.in_features} inputs, vLLM's "
                                 f"{input_size_per_partition}")
            return shard
        if isinstance(layer, RowParallelLinear):
            if len(entries) != 1:
                raise ValueError(f"{name}: a row-parallel layer fused from {len(entries)} checkpoint matrices")
            shard = tp.Shard.row(name, entries[0], rank, size)
        elif len(entries) != len(output_partition_sizes):
            # fused on disk (one checkpoint matrix for vLLM's several partitions, e.g. Phi-3's qkv_proj):
            # one codebook for the whole output, which a tensor-parallel cut would split unevenly
            if len(entries) != 1 or size != 1:
                raise ValueError(f"{name}: the checkpoint holds {len(entries)} matrices for vLLM's "
                                 f"{len(output_partition_sizes)} partitions; served with tensor parallel size 1 only")
            shard = tp.Shard.column(name, entries, [sum(output_partition_sizes)], [0])
        elif isinstance(layer, QKVParallelLinear):
            kv_slot = rank // layer.num_kv_head_replicas  # kv heads replicated when tp > their number
            shard = tp.Shard.column(name, entries, list(output_partition_sizes), [rank, kv_slot, kv_slot])
        elif isinstance(layer, ColumnParallelLinear):  # also MergedColumnParallelLinear (gate/up)
            shard = tp.Shard.column(name, entries, list(output_partition_sizes), [rank] * len(entries))
        elif isinstance(layer, ReplicatedLinear) or size == 1:
            shard = tp.Shard.column(name, entries, list(output_partition_sizes), [0] * len(entries))
        else:
            raise ValueError(f"{name}: pyquant does not know how vLLM's {type(layer).__name__} is split")
        if shard.in_features != input_size_per_partition or shard.out_features != sum(output_partition_sizes):
            raise ValueError(f"{name}: the checkpoint's layer is {shard.in_features}->{shard.out_features} on this "
                             f"rank, vLLM's is {input_size_per_partition}->{sum(output_partition_sizes)}")
        return shard

    def create_weights(self, layer: nn.Module, input_size_per_partition: int, output_partition_sizes: list[int],
                       input_size: int, output_size: int, params_dtype: torch.dtype, **extra_weight_attrs):
        shard = self.shard(layer, input_size_per_partition, output_partition_sizes)
        layer.pyquant_pad = sum(output_partition_sizes) - shard.out_features  # a head's padded vocabulary rows
        for name, t in shard.empty().items():
            param = nn.Parameter(t, requires_grad=False)
            # our loader, not vLLM's (which would narrow by output_dim / input_dim attributes)
            set_weight_attrs(param, {"weight_loader": partial(_load, shard, name)})
            layer.register_parameter(name, param)
        layer.pyquant_shard = shard

    def process_weights_after_loading(self, layer: nn.Module) -> None:
        tensors = {n: getattr(layer, n).data for n in PACKED_TENSORS}
        bias = getattr(layer, "bias", None)
        # a bias vLLM converted to a lower precision no longer matches the saved checksum: checked without it
        checked = bias is None or bias.dtype == torch.float32
        # refreshed: every later write into the tensors (a weight update in place) is _load's
        layer.pyquant_layers = layer.pyquant_shard.layers(
            tensors, bias.data if bias is not None else None, self.config.format_version if checked else None,
            refreshed=True)

    def apply(self, layer: nn.Module, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        y = tp.forward(layer.pyquant_layers, x, bias)
        return torch.nn.functional.pad(y, (0, layer.pyquant_pad)) if layer.pyquant_pad else y

    def tie_weights(self, layer: nn.Module, embed_tokens: nn.Module):
        raise ValueError(f"{self.prefix}: a quantized output head cannot be tied to the input embeddings "
                         f"(tie_word_embeddings is set): keep a tied head in full precision, quantize_model's default")


def _load(shard: tp.Shard, name: str, param: nn.Parameter, loaded_weight: torch.Tensor, shard_id=None) -> None:
    """vLLM's weight loader call: the shard id comes as an argument (older model code) or as an
    attribute of the tensor (vLLM's AutoWeightsLoader)."""
    if shard_id is None:
        shard_id = getattr(loaded_weight, "shard_id", None)
    shard.load({name: param.data}, name, loaded_weight, shard_id)
