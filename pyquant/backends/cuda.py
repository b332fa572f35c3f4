"""The CUDA backend: ``torch.ops.pyquant.cuda_linear`` (``csrc/cuda``) for CUDA layers on sm_80+.

Two paths inside the op, chosen by the number of tokens ``M``:

- ``M <= GEMV_MAX_M`` (default 8, env ``PYQUANT_CUDA_GEMV_MAX_M``, read at import): one fused
  kernel per layer: activation transform, tensor-core GEMV over 128-bit evict-first code loads,
  split-K with a fixed-order reduction, output transform;
- more tokens: transform kernel, tensor-core GEMM with fused code unpacking, and the output kernel.

Both compute ``W_hat x' = w_scale * (z . xt + const)`` (DESIGN.md, "kernel trick") on bf16
tensor cores: the 2-bit levels ``z`` are exact in bf16, and the transformed activations ``xt``
are split into two bf16 limbs (``hi + lo``, ~16 significant bits) with fp32 accumulation, so
results match the fp32 reference to ~1e-5 relative for every input dtype.

Per layer the backend builds once (:class:`State`, when the layer is made, loaded or moved):
the codes reshuffled into mma-fragment order (still 2 bits per weight; the stored format does
not change), fp32 copies of ``su``, ``sv``, ``A``, ``b``, ``w_scale`` and the bias, and a small
int32 counter buffer that the fused kernel's split-K reduction writes and always leaves at zero
(declared ``Tensor(a!)`` in the op; one layer must not run concurrently on two streams). The
forward never synchronises with the host and can be captured in a CUDA graph. The op writes a
buffer, so it has no autograd formula: a layer that needs gradients runs on Triton instead.
"""
from __future__ import annotations

import functools
import os
from dataclasses import dataclass

import torch

from ..format import unpack_codes
from ..ops import CUDA_K_ALIGN as K_ALIGN, CUDA_ROW_ALIGN as ROW_ALIGN, INPUT_DTYPES, _C_cuda

NAME = "cuda"

# Must match csrc/cuda/qlinear_cuda.h.
MAX_HAD = 256      # largest Hadamard block (one warp's span of 8 values per lane)
SMALL_MAX_M = 8    # the fused kernel's token limit

GEMV_MAX_M = max(0, min(SMALL_MAX_M, int(os.environ.get("PYQUANT_CUDA_GEMV_MAX_M", SMALL_MAX_M))))


def available() -> bool:
    return _C_cuda is not None and torch.cuda.is_available()


@functools.lru_cache(maxsize=None)
def _capability(index: int) -> tuple[int, int]:
    return torch.cuda.get_device_capability(index)


def supports(layer, dtype: torch.dtype, needs_grad: bool) -> str | None:
    device = layer.codes.device
    if device.type != "cuda":
        return "the layer is not on a CUDA device"
    if dtype not in INPUT_DTYPES:
        return f"input dtype {dtype} is not float32, float16 or bfloat16"
    if needs_grad:
        return "the CUDA kernels have no backward (they write a scratch buffer); gradients run on Triton"
    cap = _capability(device.index if device.index is not None else torch.cuda.current_device())
    if cap < (8, 0):
        return f"compute capability {cap[0]}.{cap[1]} < 8.0 (the kernels need bf16 tensor cores)"
    for name in ("had_in", "had_out"):
        if getattr(layer, name) > MAX_HAD:
            return f"{name}={getattr(layer, name)} is larger than the kernels' Hadamard block limit {MAX_HAD}"
    return None


def repack_codes(codes: torch.Tensor, rows_per_step: int = 4096) -> torch.Tensor:
    """Reshuffle ``[N, K/4]`` uint8 codes into the kernels' mma-fragment order.

    Returns int32 ``[Np/32, Kp/64, 32, 4]`` (``Np``/``Kp``: ``N``/``K`` padded to
    multiples of 256/64 with level 0). Entry ``[G, kb, lane, w]`` is the 32-bit
    word whose register ``q`` holds the levels at bits ``2q`` (even ``k``) and
    ``2q + 16`` (odd ``k``) of row ``32G + 16h + g + 8(r & 1)`` and column
    ``64kb + 32c + 16s + 2t + 8(r >> 1)``, with ``lane = 4g + t``, ``w = 2h + c``,
    ``q = 4s + r`` (see csrc/cuda/qlinear_cuda.h). Works on any device; done in
    row blocks to bound the temporary memory.
    """
    if not isinstance(codes, torch.Tensor) or codes.dtype != torch.uint8:
        raise TypeError(f"codes must be a uint8 tensor, got {getattr(codes, 'dtype', type(codes).__name__)}")
    if codes.dim() != 2:
        raise ValueError(f"codes must be 2-D [N, K/4], got shape {tuple(codes.shape)}")
    n, k = codes.shape[0], codes.shape[1] * 4
    np_, kp = -(-n // ROW_ALIGN) * ROW_ALIGN, -(-k // K_ALIGN) * K_ALIGN
    kb = kp // 64
    out = torch.empty(np_ // 32, kb, 32, 4, dtype=torch.int32, device=codes.device)
    # shift of (q, parity) inside a word; q = 4s + 2(r >> 1) + (r & 1)
    q = torch.arange(8, device=codes.device)
    shift = (2 * q[:, None] + 16 * torch.arange(2, device=codes.device)[None, :]).to(torch.int64)
    step = max(ROW_ALIGN, rows_per_step // ROW_ALIGN * ROW_ALIGN)
    for r0 in range(0, np_, step):
        rows = min(step, np_ - r0)
        z = torch.zeros(rows, kp, dtype=torch.uint8, device=codes.device)
        if r0 < n:
            part = codes[r0:min(n, r0 + rows)]
            z[: part.shape[0], :k] = unpack_codes(part)
        # row = 32G + 16h + 8 r0 + g ; k = 64kb + 32c + 16s + 8 r1 + 2t + e  (r = 2 r1 + r0)
        zv = z.view(rows // 32, 2, 2, 8, kb, 2, 2, 2, 4, 2)  # G h r0 g kb c s r1 t e
        zp = zv.permute(0, 4, 3, 8, 1, 5, 6, 7, 2, 9)       # G kb g t h c s r1 r0 e
        zp = zp.reshape(rows // 32, kb, 32, 4, 8, 2).to(torch.int64)
        words = (zp << shift).sum(dim=(-1, -2))             # distinct bits: the sum is an OR
        words = torch.where(words >= 2**31, words - 2**32, words)
        out[r0 // 32: (r0 + rows) // 32] = words.to(torch.int32)
    return out


@dataclass
class State:
    """What the kernels read besides the input, built once per layer and device."""
    codes: torch.Tensor          # int32 [Np/32, Kp/64, 32, 4], mma-fragment order
    su: torch.Tensor             # fp32 [K]
    sv: torch.Tensor             # fp32 [N]
    A: torch.Tensor              # fp32 [16]
    b: torch.Tensor              # fp32 [4]
    w_scale: torch.Tensor        # fp32 [1]
    bias: torch.Tensor | None    # fp32 [N]
    counters: torch.Tensor       # int32 [Np/256] zeros, written (and left zero) by the fused kernel


def build(layer) -> State:
    with torch.no_grad():
        f32 = lambda t: t.detach().to(torch.float32).contiguous()  # noqa: E731
        codes = repack_codes(layer.codes)
        return State(codes=codes, su=f32(layer.su), sv=f32(layer.sv), A=f32(layer.A).reshape(16), b=f32(layer.b),
                     w_scale=f32(layer.w_scale).reshape(1), bias=None if layer.bias is None else f32(layer.bias),
                     counters=torch.zeros(codes.shape[0] * 32 // ROW_ALIGN, dtype=torch.int32, device=codes.device))


def forward(x: torch.Tensor, layer, st: State) -> torch.Tensor:
    # (the op copies an x whose rows the kernels cannot load 4 at a time: a strided or odd-offset view)
    return torch.ops.pyquant.cuda_linear.default(x, st.codes, st.su, st.sv, st.A, st.b, st.w_scale, st.bias,
                                                 st.counters, layer.out_features, layer.had_in, layer.had_out,
                                                 GEMV_MAX_M)


def transform(x: torch.Tensor, pw) -> tuple[torch.Tensor, torch.Tensor]:
    """The kernels' activation transform alone, decoded for comparison with
    :func:`pyquant.format.transform_activations`: ``(xt [M, K] fp32, const [M] fp32)``,
    where ``xt`` is the sum of the two bf16 limbs the tensor cores consume."""
    m, k = x.shape
    act, const_ws = torch.ops.pyquant.cuda_transform(
        x.contiguous(), pw.su.float().contiguous(), pw.A.float().reshape(16).contiguous(), pw.b.float().contiguous(),
        pw.had_in)
    return decode_activations(act, m, k), const_ws.sum(0)[:m]


def decode_activations(act: torch.Tensor, m: int, k: int) -> torch.Tensor:
    """Inverse of the activation fragment layout: int32 ``[ceil(M/8), Kp/16, 32, 4]``
    holding ``{b0.hi, b1.hi, b0.lo, b1.lo}`` per lane -> fp32 ``[M, K]`` (hi + lo)."""
    tiles, ks = act.shape[0], act.shape[1]
    halves = act.contiguous().view(torch.int16).view(torch.bfloat16).float()  # [tiles, ks, 32, 4, 2]
    halves = halves.view(tiles, ks, 8, 4, 2, 2, 2)  # tile ks g t limb b e   (word = 2*limb + b)
    val = halves[:, :, :, :, 0] + halves[:, :, :, :, 1]  # hi + lo -> tile ks g t b e
    # k = 16 ks + 8 b + 2 t + e, token = 8 tile + g
    xt = val.permute(0, 2, 1, 4, 3, 5).reshape(tiles * 8, ks * 16)
    return xt[:m, :k]
