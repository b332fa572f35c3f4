"""The packed 2-bit affine-codebook format (UniSVQ-style, d = 4) and its reference math.

A weight ``W`` of shape ``[N, K]`` (out, in) is stored as

====================  ======================  ==========================================
tensor                shape / dtype           meaning
====================  ======================  ==========================================
``codes``             ``[N, K/4]`` uint8      ``64*z0 + 16*z1 + 4*z2 + z3``, ``z_i`` in 0..3
``A``                 ``[4, 4]`` fp32         codebook matrix
``b``                 ``[4]`` fp32            codebook offset
``su``                ``[K]`` fp16/fp32       input scale, random signs folded in
``sv``                ``[N]`` fp16/fp32       output scale, random signs folded in
``w_scale``           ``[]`` fp32             global scale
``had_in/had_out``    int                     Hadamard block (power of two) or 0 = none
====================  ======================  ==========================================

Codeword of ``z``: ``c(z) = A @ z + b``; rotated weight
``W_hat[n, 4j:4j+4] = w_scale * c(z[n, j])``; the layer computes
``y = sv * H_out(W_hat @ H_in(su * x)) + bias``. :func:`dequantize` gives the
equivalent dense ``W`` and is the ground truth every kernel is tested against.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from typing import Mapping

import torch

from .hadamard import blockwise_hadamard

__all__ = [
    "FORMAT_VERSION",
    "READABLE_FORMAT_VERSIONS",
    "PackedWeight",
    "checksum",
    "pack_codes",
    "unpack_codes",
    "code_vectors",
    "codebook",
    "dequantize",
    "dequantize_rotated",
    "bits_per_weight",
]

# 2: every saved layer carries the sha256 of its tensors (``checksum``); 1 (no checksum) still loads.
FORMAT_VERSION = 2
READABLE_FORMAT_VERSIONS = (1, 2)
VECTOR_DIM = 4
SCALE_DTYPES = (torch.float16, torch.float32)
SCALE_DTYPE_NAMES = {"float16": torch.float16, "float32": torch.float32}  # as a checkpoint spells them
PACKED_TENSORS = ("codes", "A", "b", "su", "sv", "w_scale")  # a PackedWeight's tensors, as a layer stores them
# A layer that could make a weight larger than this is refused: no trained network has one, and its
# outputs would overflow fp32 (3.4e38) for ordinary inputs. Such values come from damaged files.
MAX_WEIGHT = 1e30


def pack_codes(z: torch.Tensor) -> torch.Tensor:
    """Pack integer levels ``z`` (``[N, K]``, values in 0..3, ``K % 4 == 0``) into
    ``[N, K/4]`` uint8 codes, ``z0`` in the two high bits."""
    if z.dim() != 2 or z.shape[1] % VECTOR_DIM:
        raise ValueError(f"z must be 2-D [N, K] with K % 4 == 0, got shape {tuple(z.shape)}")
    if z.is_floating_point() or z.is_complex():
        raise TypeError(f"z must be an integer tensor, got {z.dtype}")
    if z.numel() and (int(z.min()) < 0 or int(z.max()) > 3):
        raise ValueError("z must hold values in 0..3")
    z4 = z.to(torch.uint8).reshape(z.shape[0], z.shape[1] // VECTOR_DIM, VECTOR_DIM)  # explicit: N may be 0
    return (z4[..., 0] << 6) | (z4[..., 1] << 4) | (z4[..., 2] << 2) | z4[..., 3]


def unpack_codes(codes: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`pack_codes`: ``[N, K/4]`` uint8 -> ``[N, K]`` uint8 levels."""
    if codes.dtype != torch.uint8:
        raise TypeError(f"codes must be uint8, got {codes.dtype}")
    shifts = torch.tensor([6, 4, 2, 0], dtype=torch.uint8, device=codes.device)
    z = (codes.unsqueeze(-1) >> shifts) & 3
    return z.reshape(*codes.shape[:-1], codes.shape[-1] * VECTOR_DIM)


def code_vectors(device=None) -> torch.Tensor:
    """``[256, 4]`` fp32: the level vector ``z`` of every code, in code order."""
    return unpack_codes(torch.arange(256, dtype=torch.uint8, device=device).unsqueeze(1)).float()


def codebook(A: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``[256, 4]``: codeword ``A @ z + b`` for every code, in code order."""
    return code_vectors(A.device).to(A.dtype) @ A.T + b


def check_block(block, dim, name: str, dim_name: str) -> None:
    """A Hadamard block size: 0 (none) or a power of two dividing the dimension (an int, not a bool)."""
    if (not isinstance(block, int) or isinstance(block, bool) or block < 0
            or (block and (block & (block - 1) or dim % block))):
        raise ValueError(f"{name} must be 0 or a power of two dividing {dim_name}={dim}, got {block!r}")


@dataclass
class PackedWeight:
    """One quantized ``[N, K]`` weight in the packed format (see module docstring).

    ``seed`` records the random signs' origin; it belongs to the quantizer and is
    metadata only. ``method`` names the quantizer that produced the codes.
    """

    codes: torch.Tensor
    A: torch.Tensor
    b: torch.Tensor
    su: torch.Tensor
    sv: torch.Tensor
    w_scale: torch.Tensor
    had_in: int = 0
    had_out: int = 0
    seed: int | None = None
    method: str = "unknown"
    extra: dict = field(default_factory=dict)

    @property
    def out_features(self) -> int:
        return self.codes.shape[0]

    @property
    def in_features(self) -> int:
        return self.codes.shape[1] * VECTOR_DIM

    def validate(self) -> "PackedWeight":
        """Raise ``ValueError``/``TypeError`` naming the first inconsistent field."""
        if not isinstance(self.codes, torch.Tensor) or self.codes.dtype != torch.uint8 or self.codes.dim() != 2:
            raise TypeError("codes must be a 2-D uint8 tensor [N, K/4]")
        n, k = self.out_features, self.in_features
        expect = {"A": ((4, 4), (torch.float32,)), "b": ((4,), (torch.float32,)),
                  "su": ((k,), SCALE_DTYPES), "sv": ((n,), SCALE_DTYPES), "w_scale": ((), (torch.float32,))}
        for name, (shape, dtypes) in expect.items():
            t = getattr(self, name)
            if not isinstance(t, torch.Tensor):
                raise TypeError(f"{name} must be a tensor, got {type(t).__name__}")
            if tuple(t.shape) != shape:
                raise ValueError(f"{name} must have shape {shape} for a [{n}, {k}] weight, got {tuple(t.shape)}")
            if t.dtype not in dtypes:
                raise TypeError(f"{name} must have dtype in {dtypes}, got {t.dtype}")
            if t.device != self.codes.device:
                raise ValueError(f"{name} is on {t.device} but codes are on {self.codes.device}")
            if t.device.type != "meta" and not torch.isfinite(t).all():  # meta: a skeleton, no values yet
                raise ValueError(f"{name} holds NaN or Inf")
        check_block(self.had_in, k, "had_in", "K")
        check_block(self.had_out, n, "had_out", "N")
        if self.codes.device.type != "meta":
            self._check_magnitudes()
        return self

    def _check_magnitudes(self) -> None:
        """No scale is all zeros (the layer would be constant: quantizers store even an all-zero
        weight with nonzero scales), and no weight can exceed :data:`MAX_WEIGHT`."""
        for name in ("A", "su", "sv", "w_scale"):
            if not bool(getattr(self, name).any()):
                raise ValueError(f"{name} is all zeros: the layer would ignore its input (a damaged checkpoint?)")
        # |W[n, k]| <= w_scale * max|c(z)| * sqrt(had_in * had_out) * max|su| * max|sv|: an orthonormal
        # Hadamard block of size h grows an entry by at most sqrt(h).
        bound = (self.w_scale.abs().double() * codebook(self.A.double(), self.b.double()).abs().max()
                 * max(self.had_in, 1) ** 0.5 * max(self.had_out, 1) ** 0.5
                 * self.su.abs().max().double() * self.sv.abs().max().double())
        if bound > MAX_WEIGHT:
            raise ValueError(f"w_scale, A, b, su and sv allow weights up to {float(bound):.3g}, above {MAX_WEIGHT:g}: "
                             f"outputs would overflow (a damaged checkpoint?)")

    def to(self, device) -> "PackedWeight":
        move = {k: getattr(self, k).to(device) for k in PACKED_TENSORS}
        return PackedWeight(**move, had_in=self.had_in, had_out=self.had_out, seed=self.seed,
                            method=self.method, extra=dict(self.extra))


def checksum(tensors: Mapping[str, torch.Tensor], fields: Mapping | None = None) -> str:
    """sha256 (hex) of named tensors (names, dtypes, shapes and bytes, in name order) and of the
    JSON ``fields`` that change what they compute (Hadamard blocks, grid). Saved with every layer
    (format version 2) and checked on load, so that a damaged checkpoint (a flipped bit, a zeroed
    scale, an edited header or block size) fails loudly instead of computing something else."""
    h = hashlib.sha256()
    h.update(json.dumps(dict(fields or {}), sort_keys=True).encode())
    for name in sorted(tensors):
        t = tensors[name].detach()
        h.update(f"{name}:{str(t.dtype).removeprefix('torch.')}:{list(t.shape)};".encode())
        h.update(t.cpu().contiguous().reshape(-1).view(torch.uint8).numpy())  # the buffer, no copy
    return h.hexdigest()


def dequantize_rotated(pw: PackedWeight) -> torch.Tensor:
    """``W_hat = w_scale * c(z)`` as ``[N, K]`` fp32 (the weight in the rotated basis)."""
    cb = codebook(pw.A.float(), pw.b.float())
    return pw.w_scale.float() * cb[pw.codes.long()].reshape(pw.out_features, pw.in_features)


def dequantize(pw: PackedWeight) -> torch.Tensor:
    """The dense fp32 ``[N, K]`` weight the layer applies:
    ``diag(sv) @ H_out @ W_hat @ H_in @ diag(su)`` — the reference for every kernel."""
    w = blockwise_hadamard(dequantize_rotated(pw), pw.had_in, dim=1)
    w = blockwise_hadamard(w, pw.had_out, dim=0)
    return pw.sv.float()[:, None] * w * pw.su.float()[None, :]


def stored_bytes(pw: PackedWeight) -> int:
    """Every byte the format stores for this weight (codes, codebook, scales,
    and 3 int32 for the block sizes and format version); bias excluded."""
    tensors = (pw.codes, pw.A, pw.b, pw.su, pw.sv, pw.w_scale)
    return sum(t.numel() * t.element_size() for t in tensors) + 3 * 4


def bits_per_weight(pw: PackedWeight) -> float:
    """Honest storage cost: total stored bytes * 8 / (N * K)."""
    return stored_bytes(pw) * 8 / (pw.out_features * pw.in_features)


def transform_activations(x: torch.Tensor, pw: PackedWeight) -> tuple[torch.Tensor, torch.Tensor]:
    """Reference of the kernels' activation transform (DESIGN.md, "kernel trick").

    For ``x`` of shape ``[M, K]`` returns fp32 ``(xt, const)``: ``xt[m, 4j:4j+4] =
    A.T @ x'[m, 4j:4j+4]`` with ``x' = H_in(su * x)``, and ``const[m] = sum_j
    b . x'[m, 4j:4j+4]``. Then ``W_hat @ x'[m] = w_scale * (z @ xt[m] + const[m])``:
    a plain unsigned INT2 dot product plus one constant per token.
    """
    xp = blockwise_hadamard(x.float() * pw.su.float(), pw.had_in, dim=-1)
    chunks = xp.reshape(*xp.shape[:-1], xp.shape[-1] // VECTOR_DIM, VECTOR_DIM)  # explicit: M may be 0
    xt = (chunks @ pw.A.float()).reshape(xp.shape)
    const = (chunks.sum(-2) @ pw.b.float())
    return xt, const


def finish_output(y_rot: torch.Tensor, pw: PackedWeight, bias: torch.Tensor | None) -> torch.Tensor:
    """Reference of the output transform: ``sv * H_out(y_rot) + bias`` (fp32)."""
    y = blockwise_hadamard(y_rot.float(), pw.had_out, dim=-1) * pw.sv.float()
    return y if bias is None else y + bias.float()
