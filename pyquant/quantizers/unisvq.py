"""UniSVQ: Hessian-aware 2-bit vector quantization with a learned affine codebook.

Per layer (``W`` ``[N, K]``, calibration Hessian ``H = E[x xᵀ]``):

1. Incoherence: rows are normalised by their RMS (kept in ``sv``), random signs
   are drawn on both sides (kept in ``su``/``sv``) and both sides are rotated by
   the blockwise Hadamard transform. The rotated weight ``Wr`` is near-Gaussian,
   and its Hessian ``Hr = H_in S H S H_in`` is normalised to unit mean diagonal
   and damped (``+ damp * I``).
2. Rounding: block LDLQ with a block of 4 columns (one code vector). With
   ``Hr = M D Mᵀ`` (``M`` unit block-lower-triangular, ``D`` block-diagonal),
   vectors are chosen from the last column block to the first, each the exact
   best of all 256 codewords in the metric ``D_j`` for the target ``W_j`` plus
   the feedback of the error already made on later columns; the proxy loss
   ``tr(ΔW Hr ΔWᵀ)`` is then ``Σ_j η_j D_j η_jᵀ`` of the per-vector errors.
   Refinement passes follow: block coordinate descent, each vector set to the
   exact best codeword given all the others (the loss never increases).
3. Codebook: with the codes fixed, ``w_scale * (A z + b)`` is linear in its 20
   parameters, so the ``Hr``-weighted least-squares ``A``, ``b`` come from a
   20×20 system; codes and codebook alternate (each step lowers the loss).
   ``A`` starts as ``Q/√1.25``, ``b = −1.5·Q·1/√1.25`` (``Q`` random
   orthogonal): the uniform 2-bit grid, rotated, with unit-variance codewords.

Per model (:meth:`UniSVQConfig.apply`, driven by :mod:`.blockwise`): one full-precision pass over
the calibration data checks every selected layer's input (bad data fails before
any work) and records the first block's inputs. The transformer blocks, found
generically (the repeated children of a ``ModuleList``), are then processed in
order, each fed the outputs of the already-quantized blocks before it: its
layers' Hessians are collected on those inputs, the layers are quantized and
swapped in, and the block is fine-tuned (``su``, ``sv``, ``A``, ``b``,
``w_scale`` of its layers and its norms; codes frozen; Adam; early stopping on
held-out calibration batches) to minimise the MSE between its output and the
full-precision output (by default the fp model's output of that block, so a
block also corrects the error that reaches it; ``ft_target="block"``: the fp
block on the same inputs). With ``ft_sequential`` the block is instead quantized
group by group (layers sharing an input), fine-tuned after each group with the
later groups' full-precision weights trained too. Selected layers outside the
blocks are quantized last, from Hessians of the full-precision model. With
``e2e_epochs`` the whole quantized model is then fine-tuned towards the fp
model's final hidden states. ``recipe="reference"`` feeds every block the fp
model's inputs instead (the UniSVQ release's order). While fitting, quantized
layers run on the torch reference math, so results do not depend on the kernels.

References: QuIP# (LDLQ, incoherence) and the UniSVQ release (AI9Stars/UniSVQ).
"""
from __future__ import annotations

import contextlib
import logging
import math
import zlib
from dataclasses import dataclass
from typing import Iterable

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint
from tqdm.auto import tqdm

from .. import calibration as cal
from .. import kernels
from .. import ops  # noqa: F401  (registers pyquant::nearest_codeword)
from ..format import PackedWeight, code_vectors, codebook, dequantize
from ..hadamard import blockwise_hadamard, default_block, random_signs
from . import blockwise
from .base import QuantConfig, SwapFn, check_weight

log = logging.getLogger(__name__)

__all__ = [
    "UniSVQConfig",
    "nearest_codeword",
    "block_ldl",
    "ldlq",
    "refine",
    "fit_codebook",
    "proxy_loss",
    "rotate_weight",
    "round_to_nearest",
]

_VEC = 4
_CHUNK = 32  # vectors per lazy-update chunk (128 columns) in LDLQ / refinement
_GRID_VAR = 1.25  # variance of the levels z - 1.5, z in 0..3
_SLAB = 1024  # columns of a [K, K] Hessian handled at a time where a full float64 copy would be large


# --------------------------------------------------------------------------
# Per-layer math
# --------------------------------------------------------------------------

@contextlib.contextmanager
def _num_threads(n: int | None):
    """torch's intra-op thread count set to ``n`` for a while (None: unchanged)."""
    prev = torch.get_num_threads()
    if n is not None:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(prev)


def _one_thread():
    """For the sequential per-vector loops: their ops are tiny, and intra-op
    threads would spend longer waiting for each other than computing."""
    return _num_threads(1)


def nearest_codeword(w: torch.Tensor, cb: torch.Tensor, metric: torch.Tensor | None = None) -> torch.Tensor:
    """Index of the codeword nearest to each row of ``w`` (``[M, 4]``) among
    ``cb`` (``[C, 4]``): ``argmin (w − c) G (w − c)ᵀ = argmax 2 w G cᵀ − c G cᵀ``
    with ``G`` the symmetric positive-definite ``metric`` (identity when None:
    ``argmax 2 w·cᵀ − ‖c‖²``). Exact: every codeword is scored."""
    if w.dim() != 2 or cb.dim() != 2 or w.shape[1] != cb.shape[1]:
        raise ValueError(f"w must be [M, d] and cb [C, d], got {tuple(w.shape)} and {tuple(cb.shape)}")
    if metric is None:
        return _best_codeword(w, 2 * cb.T, (cb * cb).sum(1))
    return _best_codeword(w @ metric, 2 * cb.T, ((cb @ metric) * cb).sum(1))


def _best_codeword(lin: torch.Tensor, cb2t: torch.Tensor, norms: torch.Tensor) -> torch.Tensor:
    """``argmax_c lin·2c − norms[c]``: with ``lin = w G`` and ``norms = c G cᵀ`` the
    nearest codeword in metric ``G`` (``cb2t`` is ``2 cbᵀ``, ``[4, C]``). On CPU the C++ search
    (csrc/cpu/codebook_search.cpp, ~12x torch's score matrix and argmax on one core)."""
    if lin.device.type == "cpu" and lin.dtype == cb2t.dtype == norms.dtype == torch.float32:
        return torch.ops.pyquant.nearest_codeword(lin, cb2t, norms)
    return torch.addmm(norms, lin, cb2t, beta=-1).argmax(1)


def _metric_norms(cb: torch.Tensor, metrics: torch.Tensor) -> torch.Tensor:
    """``[J, C]``: ``c G_j cᵀ`` for every metric ``G_j`` (``[J, 4, 4]``) and codeword."""
    return torch.einsum("cp,jpq,cq->jc", cb, metrics, cb)


def proxy_loss(w: torch.Tensor, w_hat: torch.Tensor, h: torch.Tensor) -> float:
    """``tr((W − Ŵ) H (W − Ŵ)ᵀ)``: the expected squared output error for inputs with ``E[x xᵀ] = H``.
    In float64, over slabs of ``H``'s columns (no float64 copy of a wide ``H``)."""
    d = w.detach().double().sub_(w_hat.detach())
    return float(sum(((d @ h[:, c:c + _SLAB].double()) * d[:, c:c + _SLAB]).sum() for c in range(0, h.shape[1], _SLAB)))


def block_ldl(h: torch.Tensor, block: int = _VEC) -> tuple[torch.Tensor, torch.Tensor]:
    """``(Ṁ, D)`` with ``h = (I + Ṁ) D (I + Ṁ)ᵀ``: ``Ṁ`` ``[K, K]`` strictly
    block-lower-triangular (zero diagonal blocks), ``D`` ``[K/block, block, block]``
    the diagonal blocks. From the Cholesky factor ``h = L Lᵀ``: ``I + Ṁ = L B⁻¹``,
    ``D_j = B_j B_jᵀ`` with ``B_j`` the diagonal blocks of ``L``."""
    k = h.shape[0]
    nb = k // block
    lo = torch.linalg.cholesky(h.double())
    idx = torch.arange(nb)
    diag = lo.reshape(nb, block, nb, block)[idx, :, idx, :]  # [nb, block, block], lower-triangular
    inv = torch.linalg.inv(diag)
    # In place, a slab of block columns at a time: no second [K, K] float64 matrix.
    step = max(1, _SLAB // block)
    for j in range(0, nb, step):
        cols = lo[:, j * block:(j + step) * block].reshape(k, -1, block)
        cols.copy_(torch.einsum("knp,npq->knq", cols, inv[j:j + step]))
    lo.reshape(nb, block, nb, block)[idx, :, idx, :] = 0
    return lo, diag @ diag.transpose(1, 2)


def ldlq(w: torch.Tensor, h: torch.Tensor, cb: torch.Tensor) -> torch.Tensor:
    """Block LDLQ: codes ``[N, K/4]`` (long) of ``w`` ``[N, K]`` in codebook ``cb``
    ``[256, 4]`` for Hessian ``h`` (symmetric positive-definite)."""
    n, k = w.shape
    nb = k // _VEC
    mdot, dblk = block_ldl(h)
    mdot, dblk = mdot.to(w.dtype), dblk.to(w.dtype)  # (the float64 factor is freed here)
    codes = torch.empty(n, nb, dtype=torch.long)
    delta = torch.zeros_like(w)  # W − Ŵ on the columns done so far (later columns first)
    with _one_thread():
        _ldlq_loop(w, cb, mdot, dblk, codes, delta)
    return codes


def _ldlq_loop(w, cb, mdot, dblk, codes, delta) -> None:
    n, k = w.shape
    nb = k // _VEC
    cb2t, norms = 2 * cb.T.contiguous(), _metric_norms(cb, dblk)
    for c_end in range(nb, 0, -_CHUNK):
        c_start = max(0, c_end - _CHUNK)
        s, e = c_start * _VEC, c_end * _VEC
        # Feedback from the already-quantized columns beyond this chunk, in one product.
        outer = delta[:, e:] @ mdot[e:, s:e] if e < k else torch.zeros(n, e - s, dtype=w.dtype)
        for j in range(c_end - 1, c_start - 1, -1):
            a, b = j * _VEC, (j + 1) * _VEC
            target = w[:, a:b] + outer[:, a - s:b - s] + delta[:, b:e] @ mdot[b:e, a:b]
            z = _best_codeword(target @ dblk[j], cb2t, norms[j])  # exact nearest in metric D_j
            codes[:, j] = z
            delta[:, a:b] = w[:, a:b] - cb[z]


def refine(w: torch.Tensor, h: torch.Tensor, cb: torch.Tensor, codes: torch.Tensor, passes: int) -> torch.Tensor:
    """Block coordinate descent on ``tr((W − Ŵ) H (W − Ŵ)ᵀ)``: each vector in turn
    becomes the exact best codeword with all others fixed (the best ``c`` for
    ``2 (Ŵ_j H_jj + G_j)·c − c H_jj cᵀ``, ``G = (W − Ŵ) H``). Never increases the loss."""
    return _refine(w, h, cb, codes, passes)[0]


def _refine(w, h, cb, codes, passes, must_beat: float = math.inf) -> tuple[torch.Tensor, float, float] | None:
    """:func:`refine` that also returns the proxy loss before and after (float32 ``G``, summed
    in float64: the loss comes with the gradient the descent needs anyway). None, with nothing
    done past the first product, when the loss before is not below ``must_beat``."""
    n, k = w.shape
    nb = k // _VEC
    codes = codes.clone()
    w_hat = cb[codes].reshape(n, k)
    diff = w - w_hat
    g = diff @ h  # exact once; the passes keep it up to date
    start = float((diff * g).sum(dtype=torch.float64))
    if not start < must_beat:
        return None
    idx = torch.arange(nb)
    hjj = h.reshape(nb, _VEC, nb, _VEC)[idx, :, idx, :].contiguous()  # [nb, 4, 4]
    cb2t, norms = 2 * cb.T.contiguous(), _metric_norms(cb, hjj)
    for _ in range(passes):
        with _one_thread():
            changed_any = _refine_pass(w, h, cb, cb2t, norms, codes, w_hat, g, hjj)
        if not changed_any:
            break
    end = float(((w - w_hat) * g).sum(dtype=torch.float64)) if passes > 0 else start
    return codes, start, end


def _refine_pass(w, h, cb, cb2t, norms, codes, w_hat, g, hjj) -> bool:
    """One in-place coordinate-descent pass; True when some code changed."""
    n, k = w.shape
    nb = k // _VEC
    changed_any = False
    for c_start in range(0, nb, _CHUNK):
        c_end = min(nb, c_start + _CHUNK)
        s, e = c_start * _VEC, c_end * _VEC
        moved = torch.zeros(n, e - s, dtype=w.dtype)  # Ŵ_new − Ŵ_old in this chunk
        rows = torch.zeros(n, dtype=torch.bool)  # the rows where some code of the chunk moved
        for j in range(c_start, c_end):
            a, b = j * _VEC, (j + 1) * _VEC
            old = w_hat[:, a:b]
            # Exact best codeword given the others: the nearest, in metric H_jj, to
            # old + G_j H_jj^-1, scored without the inverse.
            z = _best_codeword(old @ hjj[j] + g[:, a:b], cb2t, norms[j])
            changed = z != codes[:, j]
            if not changed.any():
                continue
            changed_any = True
            rows |= changed
            d = cb[z] - old
            codes[:, j] = z
            w_hat[:, a:b] = cb[z]
            moved[:, a - s:b - s] = d
            g[:, s:e] -= d @ h[a:b, s:e]  # keep this chunk's gradient exact
        if rows.any():  # the rest of G, lazily, once per chunk, on the rows that moved
            # One product over all of G's columns (half the time of two strided ones), the chunk's
            # own columns, already exact, put back.
            own = g[:, s:e].clone()
            if rows.all():
                g.addmm_(moved, h[s:e], alpha=-1)
            else:
                r = rows.nonzero().squeeze(1)
                g.index_add_(0, r, moved[r] @ h[s:e], alpha=-1)
            g[:, s:e] = own
    return changed_any


def fit_codebook(w: torch.Tensor, h: torch.Tensor, codes: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(A', b')`` minimising ``tr((W − Ŵ) H (W − Ŵ)ᵀ)`` over the affine codebook
    ``Ŵ[n, 4j:4j+4] = A' z_nj + b'`` for fixed codes (weighted least squares:
    ``Ŵ`` is linear in the 20 parameters). Returned in float64."""
    n, k = w.shape
    nb = k // _VEC
    z = code_vectors()[codes]  # [N, nb, 4] levels
    feats = torch.cat([z.permute(2, 0, 1), torch.ones(1, n, nb)], 0)  # [5, N, nb]: z0..z3, 1
    # gram[p,q,r,s] = Σ_jl H[4j+p, 4l+r] ff[q,s,j,l] with ff = Σ_n feats[q,n,j] feats[s,n,l], over
    # slabs of j. ff sums products of levels 0..3: exact as an int8 matmul (int32 sums), ~4x fp32.
    f8 = feats.to(torch.int8).permute(1, 0, 2).reshape(n, 5 * nb)  # [N, 5 nb], column q nb + j
    gram = torch.zeros(_VEC, 5, _VEC, 5, dtype=torch.float64)
    step = max(1, _SLAB // _VEC)
    for j in range(0, nb, step):
        fj = feats[:, :, j:j + step].to(torch.int8).transpose(1, 2).reshape(-1, n)  # [5 step, N]
        ff = torch._int_mm(fj, f8).reshape(5, fj.shape[0] // 5, 5, nb).permute(0, 2, 1, 3).double()  # [q,s,j,l]
        hb = h[j * _VEC:(j + step) * _VEC].double().reshape(-1, _VEC, nb, _VEC)
        gram += torch.einsum("jplr,qsjl->pqrs", hb, ff)
    gram = gram.reshape(20, 20)
    wh = (w @ h).reshape(n, nb, _VEC).double()
    rhs = torch.einsum("njp,qnj->pq", wh, feats.double()).reshape(20)
    ridge = 1e-9 * gram.diagonal().mean() * torch.eye(20, dtype=torch.float64)
    theta = torch.linalg.lstsq(gram + ridge, rhs.unsqueeze(1)).solution.reshape(_VEC, 5)
    return theta[:, :4].contiguous(), theta[:, 4].contiguous()


def random_orthogonal(d: int, gen: torch.Generator) -> torch.Tensor:
    """A ``d×d`` orthogonal matrix drawn uniformly (QR of a Gaussian, signs fixed)."""
    q, r = torch.linalg.qr(torch.randn(d, d, generator=gen, dtype=torch.float64))
    return (q * torch.sign(torch.diagonal(r))).float()


def grid_codebook(q: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``A = Q/√1.25``, ``b = −1.5·Q·1/√1.25``: the uniform 2-bit grid rotated by ``Q``, unit-variance levels."""
    a = q / math.sqrt(_GRID_VAR)
    return a, -1.5 * (a @ torch.ones(_VEC))


def rotate_weight(weight: torch.Tensor, su: torch.Tensor, sv: torch.Tensor, had_in: int, had_out: int) -> torch.Tensor:
    """``Wr = H_out diag(1/sv) W diag(1/su) H_in``: the weight in the basis where the
    format stores it (so that ``dequantize`` of an exact ``Wr`` gives back ``W``)."""
    w = weight.float() / sv.float()[:, None] / su.float()[None, :]
    return blockwise_hadamard(blockwise_hadamard(w, had_in, dim=1), had_out, dim=0)


def rotate_hessian(h: torch.Tensor, su: torch.Tensor, had_in: int) -> torch.Tensor:
    """``Hr = H_in diag(su) H diag(su) H_in`` (float64): ``E[x' x'ᵀ]`` of ``x' = H_in(su ⊙ x)``."""
    s = su.double()
    hr = h.double() * s[:, None]
    hr *= s[None, :]
    hr = blockwise_hadamard(hr, had_in, dim=1)
    return blockwise_hadamard(hr, had_in, dim=0)


def round_to_nearest(weight: torch.Tensor, like: PackedWeight) -> PackedWeight:
    """``weight`` rounded vector by vector to the nearest codeword of ``like``'s
    format (same ``su``, ``sv``, ``A``, ``b``, ``w_scale``, Hadamard blocks): the
    Hessian-blind baseline LDLQ is compared against."""
    w = check_weight(weight)
    wr = rotate_weight(w, like.su, like.sv, like.had_in, like.had_out)
    cb = like.w_scale.float() * codebook(like.A.float(), like.b.float())
    z = nearest_codeword(wr.reshape(-1, _VEC), cb).reshape(w.shape[0], -1)
    return PackedWeight(z.to(torch.uint8), like.A.clone(), like.b.clone(), like.su.clone(),
                        like.sv.clone(), like.w_scale.clone(), like.had_in, like.had_out, like.seed,
                        method="nearest").validate()


def _positive_definite(h: torch.Tensor) -> torch.Tensor:
    """``h`` (float64, unit mean diagonal) as float32, with more damping where it is not
    numerically positive-definite (a rank-deficient Hessian with ``damp=0``): LDLQ needs its
    Cholesky factor. The damping is added on the diagonal in float64 before rounding."""
    diag = h.diagonal().clone()
    hf = h.float()
    for extra in (0.0, 1e-6, 1e-4, 1e-2, 1.0):
        hf.diagonal().copy_(diag + extra)
        if torch.linalg.cholesky_ex(hf).info == 0:
            if extra:
                log.warning("unisvq: Hessian not positive-definite; added %g to its diagonal", extra)
            return hf
    raise ValueError("hessian is not positive semi-definite (damping up to 1.0 did not help)")


def _check_hessian(hessian, k: int) -> torch.Tensor | None:
    if hessian is None:
        return None
    if not isinstance(hessian, torch.Tensor) or not hessian.is_floating_point():
        raise TypeError(f"hessian must be a floating-point tensor, got {getattr(hessian, 'dtype', type(hessian))}")
    if tuple(hessian.shape) != (k, k):
        raise ValueError(f"hessian must have shape ({k}, {k}) for in_features={k}, got {tuple(hessian.shape)}")
    if not torch.isfinite(hessian).all():
        raise ValueError("hessian holds NaN or Inf values")
    return hessian.detach().double().cpu()


# --------------------------------------------------------------------------
# Per-model helpers
# --------------------------------------------------------------------------

class _TrainableQuant(nn.Module):
    """Differentiable stand-in for a ``QuantLinear`` during fine-tuning: the
    layer output from the format's reference math (:func:`format.dequantize`)
    with ``su``, ``sv``, ``w_scale`` as learned gains on their quantized values
    (so one learning rate fits scales of any magnitude) and ``A``, ``b`` as
    parameters; codes and bias frozen."""

    def __init__(self, q: nn.Module, train_codebook: bool = True):
        super().__init__()
        self.q = [q]  # a list, so the QuantLinear is not registered as a child
        self.gu = nn.Parameter(torch.ones(q.in_features, device=q.codes.device))
        self.gv = nn.Parameter(torch.ones(q.out_features, device=q.codes.device))
        # train_codebook=False (the reference recipe): A, b and w_scale stay as quantized.
        self.gs = nn.Parameter(torch.ones((), device=q.codes.device), requires_grad=train_codebook)
        self.A = nn.Parameter(q.A.detach().float().clone(), requires_grad=train_codebook)
        self.b = nn.Parameter(q.b.detach().float().clone(), requires_grad=train_codebook)
        # Copies: write_back() overwrites the layer's buffers.
        self.su0, self.sv0, self.ws0 = (q.su.detach().float().clone(), q.sv.detach().float().clone(),
                                        q.w_scale.detach().float().clone())

    def packed(self) -> PackedWeight:
        q = self.q[0]
        return PackedWeight(q.codes, self.A, self.b, self.su0 * self.gu, self.sv0 * self.gv, self.ws0 * self.gs,
                            had_in=q.had_in, had_out=q.had_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Recomputed in the backward rather than saved: the dense weight and its Hadamard stages
        # would otherwise stay in memory for every layer of the block (4 GB at Llama-2-7B width).
        return checkpoint(self._forward, x, use_reentrant=False)

    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        bias = None if self.q[0].bias is None else self.q[0].bias.detach().float()
        return F.linear(x.float(), dequantize(self.packed()), bias).to(x.dtype)

    @torch.no_grad()
    def write_back(self) -> None:
        """Store the learned values into the QuantLinear (in its storage dtypes)."""
        q, pw = self.q[0], self.packed()
        for name in ("A", "b", "su", "sv", "w_scale"):
            buf = getattr(q, name)
            buf.copy_(getattr(pw, name).detach().to(buf.dtype))
        q.invalidate()


def _norm_parameters(block: nn.Module) -> list[nn.Parameter]:
    """The parameters of a block's normalisation layers (LayerNorm, RMSNorm and kin)."""
    norms = [m for m in block.modules() if isinstance(m, (nn.LayerNorm, nn.GroupNorm, nn.RMSNorm))
             or type(m).__name__.lower().endswith(("layernorm", "rmsnorm"))]
    return [p for m in norms for p in m.parameters(recurse=False)]


def _set_child(root: nn.Module, fqn: str, module: nn.Module) -> None:
    parent, _, child = fqn.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, child, module)


# --------------------------------------------------------------------------
# The config
# --------------------------------------------------------------------------

# The two recipes' defaults of the fields left None (UniSVQConfig's docstring).
_RECIPES = {
    "pyquant": {"refine_passes": 3, "codebook_iters": 2, "ft_epochs": 4, "ft_lr": 5e-3, "ft_norm_lr": 1e-4},
    # The UniSVQ release (AI9Stars/UniSVQ): 10 tune passes, one epoch of block fine-tuning at
    # 5e-4 (su, sv) and 5e-5 (the other parameters: norms).
    "reference": {"refine_passes": 10, "codebook_iters": 0, "ft_epochs": 1, "ft_lr": 5e-4, "ft_norm_lr": 5e-5},
}
# The release scales its fixed grid to RMS(W)/0.83 (the grid's unit-variance codewords on a
# near-Gaussian weight).
_REFERENCE_SCALE = 0.83


@dataclass
class UniSVQConfig(QuantConfig):
    """UniSVQ: 2-bit affine-codebook vector quantization fitted with calibration data.

    Args:
        recipe: ``"pyquant"`` (this project's: rows normalised by their RMS into ``sv``, a
            rotated grid whose ``A``, ``b``, ``w_scale`` are fitted by least squares, Hessians
            and block fine-tuning on the outputs of the already-quantized blocks, towards the
            full-precision model's outputs, training scales, codebooks and norms) or
            ``"reference"`` (the UniSVQ release's choices: sign-only ``su``/``sv``, the fixed
            identity grid ``A = I/√1.25``, ``b = −1.5/√1.25``, ``w_scale = RMS(W_rot)/0.83``,
            Hessians and block inputs from the full-precision model, block fine-tuning of
            ``su``/``sv`` and norms only). The fields left None take the recipe's value:
            refine_passes 3 / 10, codebook_iters 2 / 0, ft_epochs 4 / 1, ft_lr 5e-3 / 5e-4,
            ft_norm_lr 1e-4 / 5e-5.
        damp: damping added to the diagonal of the unit-mean-diagonal Hessian.
        hadamard_block: largest Hadamard block (a power of two).
        refine_passes: coordinate-descent passes after LDLQ (and after each codebook update).
        codebook_iters: rounds of (least-squares ``A``, ``b``, ``w_scale``; re-assign codes);
            must be 0 with the reference recipe (its grid is fixed).
        finetune: block-wise fine-tuning after each block is quantized.
        ft_epochs: most fine-tuning epochs over the training calibration batches.
        ft_lr: Adam learning rate of the ``su``/``sv``/``w_scale`` gains and ``A``, ``b``.
        ft_norm_lr: Adam learning rate of the block's norm weights and biases.
        ft_patience: epochs without a better held-out loss before stopping (each
            such epoch rolls back to the best state and halves the learning rates).
            Also for the end-to-end stage.
        ft_holdout: share of the calibration batches held out for early stopping
            (at least one batch; with a single batch, the training batch is used).
            Also for the end-to-end stage.
        ft_target: what a fine-tuned block's output should match on its (quantized-
            prefix) inputs: ``"model"``, the full-precision model's output of that
            block, so each block also corrects the error that reaches it; or
            ``"block"``, the full-precision block applied to the same inputs. (The
            reference recipe feeds each block the full-precision inputs, where both are one.)
        ft_sequential: fine-tune after each group of a block's layers that share an input
            (q/k/v, then o, then up/gate, then down) rather than once after all of them, the
            block's not-yet-quantized layers' full-precision weights and biases trained too (at
            ``ft_weight_lr``), so later layers are quantized after adapting to the earlier ones'
            error (QuIP#'s order). About one block fine-tuning per group.
        ft_weight_lr: Adam learning rate of those full-precision weights and biases.
        e2e_epochs: most epochs of end-to-end fine-tuning after all blocks are quantized
            (0: none): the ``su``/``sv``/``w_scale`` gains, ``A``, ``b`` of every quantized layer
            and every norm of the model trained together, codes frozen, so that the model's
            final hidden states (the input of its output head, or its ``last_hidden_state``)
            match the full-precision model's on the calibration data; the same held-out early
            stopping as the block stage. Needs the whole model in memory (not
            ``pyquant.streaming``).
        e2e_lr: Adam learning rate of the end-to-end stage's gains and codebooks.
        e2e_norm_lr: Adam learning rate of the end-to-end stage's norms.
        seed: seed of the random signs, codebook rotations and batch order.
        scale_dtype: storage dtype of ``su``/``sv`` (float16 or float32).
        threads: torch intra-op threads while fitting (restored afterwards); None
            keeps torch's setting. 1 is the default because on a CPU shared with
            other work, multi-threaded small ops lose far more to waiting than they
            gain (measured 3-4x slower with 2 threads on a busy 2-core machine).
    """

    recipe: str = "pyquant"
    damp: float = 0.01
    hadamard_block: int = 128
    refine_passes: int | None = None
    codebook_iters: int | None = None
    finetune: bool = True
    ft_epochs: int | None = None
    ft_lr: float | None = None
    ft_norm_lr: float | None = None
    ft_patience: int = 2
    ft_holdout: float = 0.125
    ft_target: str = "model"
    ft_sequential: bool = False
    ft_weight_lr: float = 1e-3
    e2e_epochs: int = 0
    e2e_lr: float = 1e-3
    e2e_norm_lr: float = 1e-4
    seed: int = 0
    scale_dtype: torch.dtype = torch.float16
    threads: int | None = 1
    method = "unisvq"

    def __post_init__(self):
        if self.recipe not in _RECIPES:
            raise ValueError(f"UniSVQConfig.recipe must be one of {sorted(_RECIPES)}, got {self.recipe!r}")
        if self.recipe == "reference" and self.codebook_iters:
            raise ValueError(f"UniSVQConfig.codebook_iters must be 0 with recipe='reference' (its grid is fixed), "
                             f"got {self.codebook_iters!r}")
        for name, value in _RECIPES[self.recipe].items():
            if getattr(self, name) is None:
                setattr(self, name, value)
        checks = (("damp", self.damp >= 0), ("refine_passes", self.refine_passes >= 0),
                  ("codebook_iters", self.codebook_iters >= 0), ("ft_epochs", self.ft_epochs >= 0),
                  ("ft_lr", self.ft_lr >= 0), ("ft_norm_lr", self.ft_norm_lr >= 0),
                  ("ft_patience", self.ft_patience >= 1), ("ft_holdout", 0 < self.ft_holdout < 1),
                  ("ft_weight_lr", self.ft_weight_lr >= 0), ("e2e_epochs", self.e2e_epochs >= 0), ("e2e_lr", self.e2e_lr >= 0),
                  ("e2e_norm_lr", self.e2e_norm_lr >= 0))
        for name, ok in checks:
            if not ok:
                raise ValueError(f"UniSVQConfig.{name} is out of range: {getattr(self, name)!r}")
        if not isinstance(self.hadamard_block, int) or self.hadamard_block < 4 or self.hadamard_block & (self.hadamard_block - 1):
            raise ValueError(f"UniSVQConfig.hadamard_block must be a power of two >= 4, got {self.hadamard_block!r}")
        if self.threads is not None and (not isinstance(self.threads, int) or self.threads < 1):
            raise ValueError(f"UniSVQConfig.threads must be None or a positive int, got {self.threads!r}")
        if self.ft_target not in ("model", "block"):
            raise ValueError(f"UniSVQConfig.ft_target must be 'model' or 'block', got {self.ft_target!r}")
        if self.scale_dtype not in (torch.float16, torch.float32):
            raise TypeError(f"UniSVQConfig.scale_dtype must be torch.float16 or torch.float32, got {self.scale_dtype}")

    @classmethod
    def best(cls, **overrides) -> "UniSVQConfig":
        """The recipe of the MiniLM quality table's best row (README, ``benchmarks/minilm_quality.py``):
        sequential block fine-tuning (``ft_sequential``) with the norms at the weights' rate
        (1e-3). About 4x the block fine-tuning time of the defaults. ``overrides``: any field."""
        return cls(**{"ft_sequential": True, "ft_norm_lr": 1e-3, **overrides})

    @property
    def _reference(self) -> bool:
        return self.recipe == "reference"

    # ---- one layer ----------------------------------------------------
    def quantize_weight(self, weight: torch.Tensor, hessian: torch.Tensor | None = None,
                        seed: int | None = None) -> PackedWeight:
        """Quantize one ``[N, K]`` weight with its input Hessian ``E[x xᵀ]``
        (``[K, K]``; None: identity, i.e. plain nearest rounding with a fitted codebook)."""
        with _num_threads(self.threads):
            return self._quantize_weight(weight, hessian, seed)

    def _quantize_weight(self, weight, hessian, seed) -> PackedWeight:
        w = check_weight(weight).cpu()
        n, k = w.shape
        h = _check_hessian(hessian, k)
        seed = self.seed if seed is None else seed
        gen = torch.Generator().manual_seed(seed)
        had_in, had_out = default_block(k, self.hadamard_block), default_block(n, self.hadamard_block)
        s_in, s_out = random_signs(k, gen), random_signs(n, gen)
        if self._reference:
            row_rms = torch.ones(n)
        else:
            row_rms = w.square().mean(dim=1).sqrt()
            row_rms = torch.where(row_rms > 0, row_rms, torch.ones_like(row_rms))
        # su/sv as stored, so that the fit sees exactly the scales the layer will apply.
        su = _storage(s_in, self.scale_dtype)
        sv = _storage(s_out * row_rms, self.scale_dtype)
        wr = rotate_weight(w, su, sv, had_in, had_out)
        if h is None:
            hr = torch.eye(k, dtype=torch.float64)
        else:
            hr = rotate_hessian(h, su, had_in)
            hr /= hr.diagonal().mean().clamp_min(1e-30)
        hr.diagonal().add_(self.damp)
        hr = _positive_definite(hr)  # float32

        rms = float(wr.square().mean().sqrt())
        if self._reference:  # the fixed identity grid at RMS/0.83
            a, b = grid_codebook(torch.eye(_VEC))
            w0 = rms / _REFERENCE_SCALE
        else:
            a, b = grid_codebook(random_orthogonal(_VEC, gen))
            # Start at the scale that suits a unit-variance grid on a Gaussian; the codebook fit corrects it.
            w0 = rms / 0.9
        a, b = (w0 * a).double(), (w0 * b).double()  # the codebook including its scale, until the end
        cb = codebook(a, b).float()
        codes, _, loss = _refine(wr, hr, cb, ldlq(wr, hr, cb), self.refine_passes)
        for _ in range(self.codebook_iters):
            a2, b2 = fit_codebook(wr, hr, codes)
            cb2 = codebook(a2, b2).float()
            # Refined only if the new codebook is better on the current codes (numerically no
            # better: keep what we have).
            step = _refine(wr, hr, cb2, codes, max(1, self.refine_passes), must_beat=loss)
            if step is None:
                break
            a, b, cb = a2, b2, cb2
            codes, _, loss = step
        # Stored: a codebook with unit-RMS codewords, its size in w_scale.
        w_scale = codebook(a, b).square().mean().sqrt().clamp_min(1e-30)
        return PackedWeight(
            codes=codes.to(torch.uint8),  # a codeword's index is its packed byte (format.code_vectors order)
            A=(a / w_scale).float(), b=(b / w_scale).float(), su=su, sv=sv, w_scale=w_scale.float().reshape(()),
            had_in=had_in, had_out=had_out, seed=seed, method=self.method,
            extra={"proxy_loss_rotated": loss},
        ).validate()

    # ---- a whole model ------------------------------------------------
    def apply(self, model: nn.Module, targets: dict[str, nn.Linear], calibration_data: Iterable | None,
              swap: SwapFn, progress: bool = True) -> None:
        with _num_threads(self.threads):
            self._apply(model, targets, calibration_data, swap, progress)

    def mutated_tensors(self, model, targets) -> list[torch.Tensor]:
        """What fine-tuning trains in place: the norms of the blocks (block stage) or of the whole
        model (end to end), and with ``ft_sequential`` the selected layers' own weights and biases."""
        finetune = self.finetune and self.ft_epochs > 0
        out = []
        if finetune and self.ft_sequential:
            out += [p for linear in targets.values() for p in linear.parameters()]
        if self.e2e_epochs > 0:
            return out + _norm_parameters(model)
        if not finetune:
            return out
        return out + [p for block in blockwise.find_blocks(model, targets)[1] for p in _norm_parameters(block)]

    def _apply(self, model, targets, calibration_data, swap, progress) -> None:
        for fqn, linear in targets.items():  # every weight before any work, named
            check_weight(linear.weight, f"{fqn}.weight")
        data = cal.materialize(calibration_data)
        cal.check_token_ids(model, data)
        if not targets:
            return
        if self.finetune and not blockwise.find_blocks(model, targets)[1]:
            log.warning("unisvq: no repeated transformer blocks found; quantizing without block fine-tuning")
        final_fp = _final_hidden_states(model, data, progress) if self.e2e_epochs > 0 else None
        layers = {}

        def swap_and_keep(fqn, packed):
            layers[fqn] = swap(fqn, packed)
            return layers[fqn]

        self.run_blocks(model, targets, data, swap_and_keep, progress)
        if final_fp is not None:
            self._finetune_e2e(model, layers, data, final_fp, progress)

    def run_blocks(self, model, targets, data, swap, progress, **hooks) -> None:
        """:func:`blockwise.run` with UniSVQ's per-block step (``hooks``: its ``load_block`` /
        ``release_block``, for :mod:`pyquant.streaming`)."""
        finetune = self.finetune and self.ft_epochs > 0
        n_hold = _holdout_size(len(data), self.ft_holdout)

        def quantize_block(index, block, names, inputs, y_fp):
            """Hessians on the block's inputs, then quantize and swap its layers one by one, then
            fine-tune the block towards ``y_fp`` (the fp model's outputs of this block) or, when
            None, towards the fp block's outputs on the same inputs. (Collecting each layer's
            Hessian with the layers before it in the block already quantized, GPTQ's "true
            sequential", was measured no better on MiniLM: mean cosine 0.9112 vs 0.9121, and slower.)"""
            hess, y_block = blockwise.block_hessians(block, names, inputs, want_outputs=finetune and y_fp is None)
            y = y_fp if y_fp is not None else y_block
            groups = _input_groups(list(names), hess) if finetune and self.ft_sequential else [list(names)]
            layers = {}
            for g, group in enumerate(groups):
                for fqn in tqdm(group, desc=f"block {index} layers", leave=False, disable=not progress):
                    layers[fqn] = swap(fqn, self.quantize_weight(names[fqn].weight, hess.pop(fqn),
                                                                 seed=self._seed(fqn)))
                if finetune:
                    # the not-yet-quantized layers of the block adapt too (ft_sequential only)
                    later = [p for fqn in sum(groups[g + 1:], []) for p in names[fqn].parameters()]
                    self._finetune(model, block, layers, lambda i: inputs[i](block), y, [inp.mask for inp in inputs],
                                   n_hold, seed=self.seed * 7919 + index + 104729 * g, epochs=self.ft_epochs,
                                   lrs=(self.ft_lr, self.ft_norm_lr, self.ft_weight_lr),
                                   desc=f"block {index} fine-tune", progress=progress, weights=later)

        def quantize_leftover(fqn, linear, hessian):
            swap(fqn, self.quantize_weight(linear.weight, hessian, seed=self._seed(fqn)))

        with _num_threads(self.threads):
            blockwise.run(model, targets, data, quantize_block, quantize_leftover, method="unisvq",
                          fp_trajectory=finetune and self.ft_target == "model", fp_inputs=self._reference,
                          progress=progress, **hooks)

    def _seed(self, fqn: str) -> int:
        """A per-layer seed: layers get independent signs, and a layer's result
        does not depend on which other layers are selected."""
        return (self.seed * 1_000_003 + zlib.crc32(fqn.encode())) % (2**31)

    def _finetune_e2e(self, model, layers, data, final_fp, progress) -> None:
        """The end-to-end stage: every quantized layer on the path to the final hidden states
        (not the output head itself) and every norm of the model, towards ``final_fp``."""
        head = _output_head(model)
        on_path = {fqn: q for fqn, q in layers.items() if q is not head}
        masks = [cal.batch_mask(batch) for batch in data]
        with kernels.force_backend("torch"), _num_threads(self.threads), blockwise.no_kv_cache(model):
            self._finetune(model, model, on_path, lambda i: _final_hidden(model, data[i], i), final_fp, masks,
                           _holdout_size(len(data), self.ft_holdout), seed=self.seed * 7919 - 1,
                           epochs=self.e2e_epochs, lrs=(self.e2e_lr, self.e2e_norm_lr), desc="end-to-end fine-tune",
                           progress=progress)

    def _finetune(self, model, scope, layers, forward, targets_fp, masks, n_hold, *, seed, epochs, lrs, desc,
                  progress, weights=()):
        """Adam on the quantization scales, codebooks (not with the reference recipe) and norms
        of ``scope`` (a block, or the whole model), codes frozen, so that ``forward(i)`` matches
        ``targets_fp[i]`` on calibration batch ``i`` (MSE over real tokens). After each epoch the
        held-out loss decides: a better state is kept; otherwise training goes back to the best
        state with halved learning rates (a rate too high costs an epoch, not the result), and
        stops after ``ft_patience`` such epochs. The model is left consistent (QuantLinears back
        in place, best values written) even when interrupted. ``lrs``: the learning rates of the
        quantized layers' parameters, of the norms and of ``weights`` (full-precision weights of
        ``scope``, trained too)."""
        gen = torch.Generator().manual_seed(seed)
        order = torch.randperm(len(targets_fp), generator=gen).tolist()
        hold, train = (order[:n_hold], order[n_hold:]) if n_hold else (order, order)
        was_training = model.training
        model.eval()  # no dropout: the targets come from the model in eval mode
        norm_params = _norm_parameters(scope)
        weights = list(weights)
        wrappers = {fqn: _TrainableQuant(q, train_codebook=not self._reference) for fqn, q in layers.items()}
        wrap_params = [p for w in wrappers.values() for p in w.parameters() if p.requires_grad]
        trained = wrap_params + norm_params + weights
        flags = {p: p.requires_grad for p in scope.parameters()}

        def loss_on(i):
            return blockwise.masked_mse(forward(i), targets_fp[i], masks[i])

        def snapshot():
            return [p.detach().clone() for p in trained]

        def restore(state):
            with torch.no_grad():
                for p, v in zip(trained, state):
                    p.copy_(v)

        def held_out_loss() -> float:
            with torch.no_grad():
                return sum(float(loss_on(i)) for i in hold) / len(hold)

        best_state = snapshot()
        try:
            for p in scope.parameters():
                p.requires_grad_(False)
            for fqn, wrap in wrappers.items():
                _set_child(model, fqn, wrap)
            for p in norm_params + weights:
                p.requires_grad_(True)
            rates = list(lrs)

            def optimizer():
                groups = [{"params": params, "lr": lr} for params, lr in zip((wrap_params, norm_params, weights), rates)
                          if params]
                return torch.optim.Adam(groups)

            opt = optimizer()
            best = start = held_out_loss()
            bad = 0
            bar = tqdm(range(epochs), desc=desc, leave=False, disable=not progress)
            for _ in bar:
                for i in torch.randperm(len(train), generator=gen).tolist():
                    loss = loss_on(train[i])
                    opt.zero_grad(set_to_none=True)
                    loss.backward()
                    opt.step()
                val = held_out_loss()
                bar.set_postfix(val=f"{val:.3g}", start=f"{start:.3g}")
                if val < best:
                    best, bad, best_state = val, 0, snapshot()
                    continue
                bad += 1
                if bad >= self.ft_patience:
                    break
                restore(best_state)
                rates = [lr / 2 for lr in rates]
                opt = optimizer()
            log.info("unisvq %s: held-out MSE %.4g -> %.4g", desc, start, best)
        finally:
            restore(best_state)
            with torch.no_grad():
                for fqn, wrap in wrappers.items():
                    wrap.write_back()
                    _set_child(model, fqn, layers[fqn])
            for p, flag in flags.items():
                p.requires_grad_(flag)
            model.train(was_training)


def _input_groups(names: list[str], hess: dict[str, torch.Tensor]) -> list[list[str]]:
    """``names`` in order, consecutive layers that read the same input (equal Hessians: q/k/v,
    gate/up) in one group."""
    groups: list[list[str]] = []
    for fqn in names:
        if groups and torch.equal(hess[groups[-1][-1]], hess[fqn]):
            groups[-1].append(fqn)
        else:
            groups.append([fqn])
    return groups


def _holdout_size(batches: int, share: float) -> int:
    """Calibration batches held out for early stopping: at least one, none with a single batch."""
    return max(1, round(batches * share)) if batches > 1 else 0


def _output_head(model: nn.Module) -> nn.Module | None:
    """The model's output head (a transformers model's ``get_output_embeddings()``), if any."""
    get = getattr(model, "get_output_embeddings", None)
    head = get() if callable(get) else None
    return head if isinstance(head, nn.Module) else None


def _final_hidden(model: nn.Module, batch, index: int) -> torch.Tensor:
    """The model's final hidden states on one batch: the input of its output head when it has
    one (a causal LM's logits would be vocabulary-wide), else its ``last_hidden_state``, else the
    output itself (a tensor, or the first tensor of a tuple)."""
    head = _output_head(model)
    if head is not None:
        seen = []
        handle = head.register_forward_pre_hook(lambda module, args: seen.append(args[0]))
        try:
            cal.run_model(model, batch, index)
        finally:
            handle.remove()
        if seen:
            return seen[-1]
    out = cal.run_model(model, batch, index)
    last = getattr(out, "last_hidden_state", None)
    return last if isinstance(last, torch.Tensor) else blockwise.hidden_state(out)


@torch.no_grad()
def _final_hidden_states(model: nn.Module, data: list, progress: bool) -> list[torch.Tensor]:
    """The full-precision model's final hidden states on every calibration batch (eval mode)."""
    was_training = model.training
    model.eval()
    try:
        with blockwise.no_kv_cache(model):
            return [_final_hidden(model, batch, i).detach()
                    for i, batch in enumerate(tqdm(data, desc="unisvq end-to-end targets", leave=False,
                                                   disable=not progress))]
    finally:
        model.train(was_training)


def _storage(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``t`` in ``dtype`` when that keeps it finite and non-zero, else fp32."""
    c = t.to(dtype)
    return c if torch.isfinite(c).all() and bool((c != 0).eq(t != 0).all()) else t.float()

