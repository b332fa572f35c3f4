"""Tensor-parallel shards of packed layers: what one rank holds of a (fused) layer, how its
tensors are cut from a checkpoint's, and its forward. No vLLM here: :mod:`pyquant.vllm` wires
this into vLLM's linear layers, and the tests check it without a vLLM process.

A packed layer computes ``y = sv ⊙ H_out(W_hat · H_in(su ⊙ x))`` with block-diagonal Hadamard
transforms of ``had_in`` / ``had_out`` columns / rows. Both cuts keep it exact:

- **column-parallel** (output rows split; QKV, gate/up, fc1): a rank holds whole rows of
  ``codes`` and ``sv``, and the whole ``su``, ``A``, ``b``, ``w_scale``. Its rows must be whole
  ``had_out`` blocks, so ``had_out`` divides the rows per rank;
- **row-parallel** (input columns split; o_proj, down_proj, fc2): a rank holds the columns
  ``[r·K/tp, (r+1)·K/tp)`` of ``codes`` (``K/tp/4`` bytes a row) and of ``su``; ``H_in`` is
  block-diagonal, so with whole ``had_in`` blocks per rank its output is its share of the sum,
  and ``sv``, ``H_out``, ``A``, ``b`` and ``w_scale`` (all linear after the sum) are applied by
  every rank to its partial output before the all-reduce. ``had_in`` must divide ``K/tp``.

A fused layer (vLLM's ``qkv_proj`` = q, k, v; ``gate_up_proj`` = gate, up) is several logical
matrices, each quantized on its own with its own codebook ``A``, ``b``, ``w_scale`` and its own
``su`` (its own random signs). The choice here is one kernel call per partition on the shared
input, outputs concatenated: exact, and no change to how checkpoints are made; the cost is one
input transform per partition instead of one per layer and a concatenation (1.03–1.21× one
fused kernel: README, "vLLM on CPU"). The partitions' codes and ``sv`` are stored concatenated
along the output (vLLM's layout), ``su`` / ``A`` / ``b`` / ``w_scale`` stacked along a first
dimension of one row per partition.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .format import PACKED_TENSORS, SCALE_DTYPE_NAMES, PackedWeight
from .io import skeleton_layer, verify_checksum_of
from .nn import QuantLinear

F32 = torch.float32
SHARD_IDS = {"q": 0, "k": 1, "v": 2}  # vLLM's names of the QKV partitions


@dataclass(frozen=True)
class Part:
    """One logical matrix of a (fused) layer as one rank holds it.

    ``entry`` is its checkpoint entry (full ``in_features`` / ``out_features``, Hadamard blocks,
    scale dtypes: :func:`pyquant.io.layer_entry`); the rank holds its rows
    ``[row_start, row_start + rows)``, at rows ``[offset, offset + rows)`` of the fused output."""
    entry: dict
    rows: int
    row_start: int
    offset: int


class Shard:
    """What one rank holds of a (fused) packed layer, and how to fill and run it.

    Args:
        name: the layer's name (for messages).
        parts: its logical matrices in output order (one for an unfused layer).
        in_features: input columns this rank holds (``K / tp`` for row-parallel, else ``K``).
        col_start: the first of them in the full matrix.

    Raises ``ValueError`` naming the layer when a cut does not fall on whole Hadamard blocks or
    code bytes, or when the partitions of a fused layer store ``su`` / ``sv`` in different dtypes.
    """

    def __init__(self, name: str, parts: list[Part], in_features: int, col_start: int = 0):
        if not parts:
            raise ValueError(f"{name}: a layer needs at least one partition")
        self.name, self.parts, self.in_features, self.col_start = name, tuple(parts), in_features, col_start
        # each partition's full-size layer on the meta device: its checkpoint tensors' shapes and dtypes
        self._full = [self._check(p) for p in parts]
        dtypes = {(p.entry["su_dtype"], p.entry["sv_dtype"]) for p in parts}
        if len(dtypes) > 1:
            raise ValueError(f"{name}: its fused partitions store su/sv in different dtypes {sorted(dtypes)}; "
                             f"quantize them with one scale_dtype")
        su, sv = dtypes.pop()
        self.su_dtype, self.sv_dtype = SCALE_DTYPE_NAMES[su], SCALE_DTYPE_NAMES[sv]
        self.out_features = sum(p.rows for p in parts)
        self.built: list[QuantLinear] = []  # the layers(refreshed=True) made: load() refreshes them

    @classmethod
    def column(cls, name: str, entries: list[dict], rows: list[int], rank_slots: list[int]) -> "Shard":
        """Column-parallel: partition ``i`` holds ``rows[i]`` rows starting at
        ``rank_slots[i] * rows[i]`` (the rank, or for replicated KV heads ``rank // replicas``)."""
        parts, offset = [], 0
        for e, n, slot in zip(entries, rows, rank_slots, strict=True):
            parts.append(Part(e, n, slot * n, offset))
            offset += n
        return cls(name, parts, entries[0]["in_features"], 0)

    @classmethod
    def row(cls, name: str, entry: dict, rank: int, tp: int) -> "Shard":
        """Row-parallel: rank ``rank`` of ``tp`` holds input columns ``[rank·K/tp, (rank+1)·K/tp)``."""
        k = entry["in_features"]
        if k % tp:
            raise ValueError(f"{name}: in_features={k} does not split into {tp} tensor-parallel ranks")
        return cls(name, [Part(entry, entry["out_features"], 0, 0)], k // tp, rank * (k // tp))

    def _check(self, p: Part) -> QuantLinear:
        e = p.entry
        if isinstance(e, dict) and e.get("kind", "packed") != "packed":
            raise ValueError(f"{self.name}: a {e.get('kind')!r} layer (DAQ's fp8 / int-n) is not a packed 2-bit "
                             f"layer; pyquant's vLLM method serves packed layers only")
        try:
            full = skeleton_layer(e, torch.device("meta"))  # every field present and of its kind
        except (TypeError, ValueError) as err:
            raise ValueError(f"{self.name}: its quantization_config entry is invalid: {err}") from err
        k_full, had_in, had_out = e["in_features"], e.get("had_in") or 0, e.get("had_out") or 0
        cols = self.in_features
        if self.col_start + cols > k_full or cols % 4 or self.col_start % 4:
            raise ValueError(f"{self.name}: input columns [{self.col_start}, {self.col_start + cols}) of {k_full} "
                             f"are not whole code bytes (4 weights each)")
        if had_in and (cols % had_in or self.col_start % had_in):
            raise ValueError(f"{self.name}: its Hadamard blocks of {had_in} input columns cannot be split into "
                             f"shards of {cols} columns (had_in must divide the in_features / tp = {cols} columns "
                             f"a rank holds); use a tensor-parallel size that keeps them whole, or quantize with "
                             f"a smaller hadamard_block")
        if p.row_start + p.rows > e["out_features"] or p.rows <= 0:
            raise ValueError(f"{self.name}: rows [{p.row_start}, {p.row_start + p.rows}) are outside the "
                             f"{e['out_features']} rows of the checkpoint's matrix")
        if had_out and (p.rows % had_out or p.row_start % had_out):
            raise ValueError(f"{self.name}: its Hadamard blocks of {had_out} output rows cannot be split into "
                             f"shards of {p.rows} rows (had_out must divide the {p.rows} rows of its "
                             f"{e['out_features']}-row matrix a rank holds); use a tensor-parallel size that keeps "
                             f"them whole, or quantize with a smaller hadamard_block")
        return full

    # ---- the rank's tensors ------------------------------------------
    def empty(self, device=None) -> dict[str, torch.Tensor]:
        """The rank's tensors, uninitialised, by checkpoint name."""
        n, k, p = self.out_features, self.in_features, len(self.parts)
        return {"codes": torch.empty(n, k // 4, dtype=torch.uint8, device=device),
                "A": torch.empty(p, 4, 4, dtype=F32, device=device), "b": torch.empty(p, 4, dtype=F32, device=device),
                "su": torch.empty(p, k, dtype=self.su_dtype, device=device),
                "sv": torch.empty(n, dtype=self.sv_dtype, device=device),
                "w_scale": torch.empty(p, dtype=F32, device=device)}

    def part_index(self, shard_id) -> int:
        """The partition a checkpoint tensor belongs to: vLLM's shard id (``"q"/"k"/"v"``, an int,
        or None for an unfused layer)."""
        if shard_id is None:
            if len(self.parts) != 1:
                raise ValueError(f"{self.name}: a tensor without a shard id for a layer fused from "
                                 f"{len(self.parts)} checkpoint matrices")
            return 0
        i = SHARD_IDS.get(shard_id, shard_id)
        if not isinstance(i, int) or isinstance(i, bool) or not 0 <= i < len(self.parts):
            raise ValueError(f"{self.name}: unknown shard id {shard_id!r} ({len(self.parts)} partitions)")
        return i

    def load(self, tensors: dict[str, torch.Tensor], name: str, full: torch.Tensor, shard_id=None) -> None:
        """Copy this rank's slice of the checkpoint tensor ``full`` (``codes``, ``A``, ``b``,
        ``su``, ``sv`` or ``w_scale`` of partition ``shard_id``) into ``tensors``; a layer that
        :meth:`layers` built on them with ``refreshed=True`` (a weight update in place, after the
        load) then refreshes its kernels' copies."""
        i = self.part_index(shard_id)
        p = self.parts[i]
        if name not in PACKED_TENSORS:
            raise ValueError(f"{self.name}: unexpected checkpoint tensor {name!r}")
        want = getattr(self._full[i], name)
        if full.shape != want.shape or full.dtype != want.dtype:
            raise ValueError(f"{self.name}.{name} (partition {shard_id!r}): the checkpoint has {full.dtype} "
                             f"{tuple(full.shape)}, expected {want.dtype} {tuple(want.shape)}")
        c0, c1 = self.col_start, self.col_start + self.in_features
        rows = slice(p.row_start, p.row_start + p.rows)
        dst = slice(p.offset, p.offset + p.rows)
        with torch.no_grad():
            if name == "codes":
                tensors[name][dst].copy_(full[rows, c0 // 4:c1 // 4])
            elif name == "sv":
                tensors[name][dst].copy_(full[rows])
            elif name == "su":
                tensors[name][i].copy_(full[c0:c1])
            else:
                tensors[name][i].copy_(full)
        if self.built:
            self.built[i].refresh((name,))

    def is_whole(self) -> bool:
        """Whether this rank holds every partition whole (tensor parallel size 1)."""
        return self.in_features == self.parts[0].entry["in_features"] and all(
            p.rows == p.entry["out_features"] for p in self.parts)

    def packed(self, tensors: dict[str, torch.Tensor]) -> list[PackedWeight]:
        """Each partition as a :class:`PackedWeight` of views into ``tensors`` (no copy)."""
        out = []
        for i, p in enumerate(self.parts):
            rows = slice(p.offset, p.offset + p.rows)
            out.append(PackedWeight(tensors["codes"][rows], tensors["A"][i], tensors["b"][i], tensors["su"][i],
                                    tensors["sv"][rows], tensors["w_scale"][i], had_in=p.entry.get("had_in") or 0,
                                    had_out=p.entry.get("had_out") or 0, seed=p.entry.get("seed"),
                                    method=p.entry.get("method", "unknown")))
        return out

    def layers(self, tensors: dict[str, torch.Tensor], bias: torch.Tensor | None = None,
               format_version: int | None = None, refreshed: bool = False) -> list[QuantLinear]:
        """The partitions as bias-free ``QuantLinear`` layers sharing ``tensors`` (kernel state
        built now, once). Each is validated; where this rank holds everything (tp = 1) and
        ``format_version`` is given, each partition's checksum is verified too (with its slice of
        the fused ``bias``), so a damaged checkpoint fails at load. ``refreshed=True``: every later
        refill of ``tensors`` goes through :meth:`load`, which refreshes the layers' copies
        (``QuantLinear.from_packed``)."""
        out = []
        for i, (p, pw) in enumerate(zip(self.parts, self.packed(tensors))):
            try:
                if format_version is not None and self.is_whole():
                    state = {n: getattr(pw, n) for n in PACKED_TENSORS}
                    if p.entry.get("bias"):
                        if bias is None:
                            raise ValueError("the checkpoint entry has a bias, the layer has none")
                        state["bias"] = bias[p.offset:p.offset + p.rows].float()
                    verify_checksum_of(state, p.entry, format_version)
                out.append(QuantLinear.from_packed(pw, share=True, refreshed=refreshed))
            except (ValueError, TypeError) as e:
                raise ValueError(f"{self.name} (partition {i}): {e}") from e
        if refreshed:
            self.built = out
        return out


def forward(layers: list[QuantLinear], x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``x [..., K] -> [..., sum N_i]``: each partition's kernel on the same input, concatenated
    along the output, plus the fused bias."""
    y = layers[0](x) if len(layers) == 1 else torch.cat([layer(x) for layer in layers], dim=-1)
    return y if bias is None else y + bias.to(y.dtype)
