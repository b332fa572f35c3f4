"""Import checkpoints of the UniSVQ public release (GitHub ``AI9Stars/UniSVQ``) into pyquant's format.

The release writes two kinds of checkpoint for its quantized ``*_proj`` layers. For a module
``p`` of shape ``[N, K]`` (out, in), with ``N % 128 == 0`` and ``K % 128 == 0``:

**Compressed inference checkpoints** (LC-QAT stage; written by
``Qwen3LCQATForCompression.save_pretrained`` in ``model/modeling_qwen3_vq.py``, read by
``model/hadaquant_infer_model.py``; file ``model.safetensors`` or ``model.compressed.safetensors``)

- ``p.weight``: ``[N, K/4]`` uint8, codes ``z0<<6 | z1<<4 | z2<<2 | z3``, ``z0`` = column ``4j``
  (``model/compress_utils.py``: ``pack_2bit``), levels ``z`` in ``0..max_var``;
- ``p.SU``: ``[K]``, model dtype (bf16), input scale with the random signs folded in;
- ``p.SV``: ``[N]``, model dtype, output scale;
- ``p.code_generator.codebook_scale`` (``cb_s``) and ``p.code_generator.codebook_zero_point``
  (``cb_z``): ``[]``, model dtype;
- optional ``p.code_generator.max_var``: ``[]``, the highest level (3; 2 for ternary layers);
- optional ``p.bias``: ``[N]``, added last.

Rotated weight ``W_hat[n, k] = cb_s * z[n, k] + cb_z``; the layer computes
``y = SV * H(W_hat @ H(SU * x)) + bias`` with ``H`` the Sylvester Hadamard matrix of size 128
over each contiguous block, normalised by ``1/sqrt(128)`` (``hadaquant/csrc/v1_cuda_kernel.cu``:
``FusedSUHad128Kernel``, ``FusedHad128SVKernel``, ``unpack_dequant4``). That is pyquant's format
exactly: ``A = cb_s * I``, ``b = cb_z * 1``, ``w_scale = 1``, ``had_in = had_out = 128``.

**PTQ-stage checkpoints** (``quantize/hfize.py`` over ``lib/linear/quantized_linear.py``):
``p.Qidxs`` ``[N, K/4]`` uint8 (index into the grid), ``p.SU`` ``[K]`` fp16, ``p.SV`` ``[N]``
fp16 (``Wscale`` already fused in by ``lib/algo/quip.py``), ``p.Wscale`` ``[]`` fp32 (multiplied
into ``SV`` at run time), optional ``p.scaleWH`` ``[K]`` (the input is divided by it before
``SU``), ``p.codebook_id`` ``[]`` int32 (20 ``identical``, 21 ``linear_guassian``) and the
codebook buffers ``p.codebook_class.codebook.{grid [256, 4], grid_norm [256],
linear_proj_weight [4, 4], linear_proj_bias [4]}`` in bf16. ``grid`` is
``linear_proj(z)`` evaluated *in bf16* with ``z`` in ``torch.cartesian_prod`` order (index
``64*z0 + 16*z1 + 4*z2 + z3``, pyquant's code order), so it is affine only up to bf16 rounding:
:func:`convert_unisvq_ptq_state_dict` fits ``A``, ``b`` by least squares and reports the weight
error it measures.
"""
from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
from pathlib import Path

import torch

from .format import FORMAT_VERSION, PackedWeight, code_vectors, codebook, dequantize
from .io import layer_entry
from .nn import QuantLinear

__all__ = [
    "RELEASE_HADAMARD_BLOCK",
    "convert_unisvq_state_dict",
    "convert_unisvq_ptq_state_dict",
    "decode_reference",
    "fit_affine_codebook",
    "reference_hadamard",
    "load_unisvq_checkpoint",
]

RELEASE_HADAMARD_BLOCK = 128  # hadaquant's kernels and matmul_hadU_cuda_blockwise hard-code it

# key suffixes of the compressed (LC-QAT inference) layout
_CODES = "weight"
_SU, _SV, _BIAS = "SU", "SV", "bias"
_CB_SCALE = "code_generator.codebook_scale"
_CB_ZERO = "code_generator.codebook_zero_point"
_MAX_VAR = "code_generator.max_var"
_COMPRESSED_KEYS = (_CODES, _SU, _SV, _CB_SCALE, _CB_ZERO, _MAX_VAR, _BIAS)

# key suffixes of the PTQ (hfize) layout
_QIDXS, _WSCALE, _SCALE_WH, _CODEBOOK_ID = "Qidxs", "Wscale", "scaleWH", "codebook_id"
_GRID = "codebook_class.codebook.grid"
_GRID_NORM = "codebook_class.codebook.grid_norm"
_PROJ_W = "codebook_class.codebook.linear_proj_weight"
_PROJ_B = "codebook_class.codebook.linear_proj_bias"
_PTQ_KEYS = (_QIDXS, _SU, _SV, _WSCALE, _SCALE_WH, _CODEBOOK_ID, _GRID, _GRID_NORM, _PROJ_W, _PROJ_B, _BIAS)
_PTQ_CODEBOOK_IDS = {20: "identical", 21: "linear_guassian"}  # lib/codebook/__init__.py


# ---------------------------------------------------------------------------------------------
# checks shared by both layouts
# ---------------------------------------------------------------------------------------------
def _scalar(sd: dict, key: str) -> float:
    t = sd[key]
    if not isinstance(t, torch.Tensor) or t.numel() != 1 or not t.is_floating_point():
        raise ValueError(f"{key} must be a one-element floating tensor, got "
                         f"{getattr(t, 'dtype', type(t).__name__)} of shape {tuple(getattr(t, 'shape', ()))}")
    v = float(t.reshape(()))
    if not math.isfinite(v):
        raise ValueError(f"{key} is not finite ({v})")
    return v


def _vector(sd: dict, key: str, length: int, what: str) -> torch.Tensor:
    if key not in sd:
        raise ValueError(f"missing {key} (the {what}, shape [{length}])")
    t = sd[key]
    if not isinstance(t, torch.Tensor) or not t.is_floating_point():
        raise ValueError(f"{key} must be a floating tensor, got {getattr(t, 'dtype', type(t).__name__)}")
    if tuple(t.shape) != (length,):
        raise ValueError(f"{key} must have shape ({length},) (the {what}), got {tuple(t.shape)}")
    if not torch.isfinite(t).all():
        raise ValueError(f"{key} holds NaN or Inf")
    return t


def _codes(sd: dict, key: str, block: int) -> torch.Tensor:
    t = sd[key]
    if not isinstance(t, torch.Tensor) or t.dtype != torch.uint8:
        raise ValueError(f"{key} must hold packed uint8 codes [N, K/4], got "
                         f"{getattr(t, 'dtype', type(t).__name__)} (a float weight here is LC-QAT's latent "
                         f"training weight, an int16 Qidxs a 3-bit codebook: neither is this 2-bit format)")
    if t.dim() != 2 or t.shape[0] == 0 or t.shape[1] == 0:
        raise ValueError(f"{key} must be a non-empty 2-D [N, K/4] tensor, got shape {tuple(t.shape)}")
    n, k = t.shape[0], 4 * t.shape[1]
    for dim, size in (("out_features N", n), ("in_features K", k)):
        if size % block:
            raise ValueError(f"{key}: {dim} = {size} is not divisible by the release's {block}-wide Hadamard block")
    return t


def _check_block(block: int) -> None:
    if not isinstance(block, int) or block < 1 or block & (block - 1):
        raise ValueError(f"hadamard_block must be a positive power of two, got {block!r}")


def _modules(sd: dict, marker: str, allowed: tuple[str, ...]) -> dict[str, list[str]]:
    """Module name -> its keys, for every module holding ``<name>.<marker>``; a key under such a
    module that the layout does not define is an error (it would be silently dropped)."""
    names = sorted(k[: -len(marker) - 1] for k in sd if k.endswith("." + marker))
    owned: dict[str, list[str]] = {n: [] for n in names}
    for key in sd:
        for name in names:
            if key.startswith(name + "."):
                suffix = key[len(name) + 1:]
                if suffix not in allowed:
                    raise ValueError(f"unexpected key {key} under quantized module {name} "
                                     f"(the layout defines {', '.join(allowed)})")
                owned[name].append(key)
    return owned


def _check_bias(sd: dict, name: str, n: int) -> str | None:
    key = f"{name}.{_BIAS}"
    if key in sd:
        _vector(sd, key, n, "bias")
        return key
    return None


# ---------------------------------------------------------------------------------------------
# compressed inference checkpoints: exact
# ---------------------------------------------------------------------------------------------
def convert_unisvq_state_dict(state_dict: dict[str, torch.Tensor], *, hadamard_block: int = RELEASE_HADAMARD_BLOCK,
                              ) -> tuple[dict[str, PackedWeight], dict[str, torch.Tensor], dict]:
    """Map a compressed inference state dict of the release (module docstring) exactly onto pyquant.

    Every module ``p`` holding ``p.code_generator.codebook_scale`` is quantized; it must have
    ``p.weight`` uint8 ``[N, K/4]``, ``p.SU`` ``[K]``, ``p.SV`` ``[N]``,
    ``p.code_generator.codebook_zero_point``, and ``N``, ``K`` divisible by ``hadamard_block``.
    It becomes ``PackedWeight(codes = p.weight (same bytes), A = cb_s*I, b = cb_z*1, su, sv as
    fp32 (exact from bf16/fp16), w_scale = 1, had_in = had_out = hadamard_block,
    method="unisvq-release")``. ``p.bias`` is not part of the packed weight and is returned with
    the other tensors.

    Returns ``(packed, rest, report)``: packed weights by module name; every tensor that is not
    one of those modules' packed fields, unchanged (the same objects: norms, embeddings,
    ``lm_head``, biases); a report (counts, bias keys, scale dtypes). Raises ``ValueError``
    naming the key for anything inconsistent, including a PTQ-stage dict (use
    :func:`convert_unisvq_ptq_state_dict`) or one without any quantized module.
    """
    _check_block(hadamard_block)
    for key in state_dict:
        if key.endswith("." + _QIDXS):
            raise ValueError(f"{key}: this is the release's PTQ (hfize) layout; use convert_unisvq_ptq_state_dict")
    modules = _modules(state_dict, _CB_SCALE, _COMPRESSED_KEYS)
    for key, t in state_dict.items():
        # the release's loader takes every uint8 "*_proj.weight" as codes: one without its
        # codebook would be loaded with cb_s = cb_z = 0 there and is an error here
        owner = key[: -len(_CODES) - 1] if key.endswith("." + _CODES) else None
        if owner is not None and isinstance(t, torch.Tensor) and t.dtype == torch.uint8 and owner not in modules:
            raise ValueError(f"{key} holds uint8 codes but {owner}.{_CB_SCALE} is missing")
        for orphan in (_CB_ZERO, _MAX_VAR):
            if key.endswith("." + orphan) and key[: -len(orphan) - 1] not in modules:
                raise ValueError(f"{key} has no {key[: -len(orphan)]}{_CB_SCALE}")
    if not modules:
        raise ValueError(f"no quantized module found: no key ends with '.{_CB_SCALE}'")

    packed: dict[str, PackedWeight] = {}
    consumed: set[str] = set()
    biases: list[str] = []
    scale_dtypes: set[str] = set()
    for name, keys in modules.items():
        codes_key = f"{name}.{_CODES}"
        if codes_key not in state_dict:
            raise ValueError(f"missing {codes_key} (the uint8 codes [N, K/4] of {name})")
        codes = _codes(state_dict, codes_key, hadamard_block)
        n, k = codes.shape[0], 4 * codes.shape[1]
        su = _vector(state_dict, f"{name}.{_SU}", k, "input scale SU")
        sv = _vector(state_dict, f"{name}.{_SV}", n, "output scale SV")
        zero_key = f"{name}.{_CB_ZERO}"
        if zero_key not in state_dict:
            raise ValueError(f"missing {zero_key} (the codebook zero point of {name})")
        cb_s, cb_z = _scalar(state_dict, f"{name}.{_CB_SCALE}"), _scalar(state_dict, zero_key)
        max_var = None
        if f"{name}.{_MAX_VAR}" in state_dict:
            max_var = _check_max_var(state_dict, f"{name}.{_MAX_VAR}", codes, codes_key)
        bias_key = _check_bias(state_dict, name, n)
        if bias_key is not None:
            biases.append(bias_key)

        dev = codes.device
        pw = PackedWeight(
            codes=codes.contiguous(),
            A=cb_s * torch.eye(4, device=dev), b=torch.full((4,), cb_z, device=dev),
            # bf16 and fp16 widen to fp32 exactly
            su=su.to(torch.float32), sv=sv.to(torch.float32), w_scale=torch.ones((), device=dev),
            had_in=hadamard_block, had_out=hadamard_block, method="unisvq-release",
            extra={"source_layout": "unisvq-compressed", "codebook_scale": cb_s, "codebook_zero_point": cb_z,
                   "max_var": max_var, "scale_dtype": str(su.dtype).removeprefix("torch.")},
        ).validate()
        packed[name] = pw
        scale_dtypes.add(pw.extra["scale_dtype"])
        consumed.update(key for key in keys if key != bias_key)

    rest = {key: t for key, t in state_dict.items() if key not in consumed}
    report = {
        "layout": "unisvq-compressed", "exact": True, "quantized_modules": len(packed),
        "passthrough_tensors": len(rest), "biases": biases, "hadamard_block": hadamard_block,
        "scale_dtypes": sorted(scale_dtypes),
        "weights": sum(pw.out_features * pw.in_features for pw in packed.values()),
    }
    return packed, rest, report


def _check_max_var(sd: dict, key: str, codes: torch.Tensor, codes_key: str) -> int:
    t = sd[key]
    if not isinstance(t, torch.Tensor) or t.numel() != 1:
        raise ValueError(f"{key} must be a one-element tensor, got shape {tuple(getattr(t, 'shape', ()))}")
    v = float(t.reshape(()))
    if v not in (1.0, 2.0, 3.0):
        raise ValueError(f"{key} must be 1, 2 or 3 (the highest 2-bit level), got {v}")
    top = int(v)
    if top < 3:
        # every level of every byte must lie in 0..max_var; the four levels' maxima give that
        # without unpacking the whole matrix at once
        worst = max(int(((codes >> shift) & 3).max()) for shift in (6, 4, 2, 0))
        if worst > top:
            raise ValueError(f"{codes_key} holds level {worst} but {key} = {top}")
    return top


# ---------------------------------------------------------------------------------------------
# PTQ (hfize) checkpoints: least-squares affine fit of the bf16 grid
# ---------------------------------------------------------------------------------------------
def convert_unisvq_ptq_state_dict(state_dict: dict[str, torch.Tensor], *, hadamard_block: int = RELEASE_HADAMARD_BLOCK,
                                  weighting: str = "usage",
                                  ) -> tuple[dict[str, PackedWeight], dict[str, torch.Tensor], dict]:
    """Import a PTQ-stage (``hfize``) state dict of the release, approximately.

    Every module ``p`` holding ``p.Qidxs`` (uint8 ``[N, K/4]``, ``N``, ``K`` divisible by
    ``hadamard_block``) must have ``p.SU`` ``[K]``, ``p.SV`` ``[N]``, ``p.Wscale`` ``[]`` and
    ``p.codebook_class.codebook.grid`` ``[256, 4]``; ``p.scaleWH`` ``[K]``, ``p.bias`` ``[N]``,
    ``p.codebook_id`` (20 or 21) and the other codebook buffers are optional. The grid is not
    exactly affine (bf16), so ``A`` ``[4, 4]`` and ``b`` ``[4]`` are the least-squares fit
    ``grid[c] ~ A @ z(c) + b``: over the codes the layer uses, each counted as often as it
    occurs (``weighting="usage"``, which minimises the error of the rotated weight), or over all
    256 codewords alike (``"uniform"``). ``w_scale = 1``; ``su = SU / scaleWH`` and
    ``sv = SV * Wscale`` in fp32, as the release's forward applies them; had_in = had_out =
    ``hadamard_block``; ``method="unisvq-release-ptq"``.

    Returns ``(packed, rest, report)`` as :func:`convert_unisvq_state_dict`; the report's
    ``rel_err`` maps each module to the measured relative Frobenius error of
    ``dequantize(pw)`` against :func:`decode_reference` of the checkpoint (fp64), also in
    ``pw.extra["rel_err"]``; ``max_rel_err`` is the largest. Raises ``ValueError`` naming the
    key for anything inconsistent.
    """
    _check_block(hadamard_block)
    if weighting not in ("usage", "uniform"):
        raise ValueError(f"weighting must be 'usage' or 'uniform', got {weighting!r}")
    for key in state_dict:
        if key.endswith("." + _CB_SCALE):
            raise ValueError(f"{key}: this is the release's compressed layout; use convert_unisvq_state_dict")
    names = {k[: -len(_QIDXS) - 1] for k in state_dict if k.endswith("." + _QIDXS)}
    for key in state_dict:
        for low_rank in (".A", ".B"):  # QuantizedLinear asserts rank == 0: there is no low-rank term to import
            if key.endswith(low_rank) and key[: -len(low_rank)] in names:
                raise ValueError(f"{key}: low-rank correction terms are not supported (the release requires rank 0)")
    modules = _modules(state_dict, _QIDXS, _PTQ_KEYS)
    if not modules:
        raise ValueError(f"no quantized module found: no key ends with '.{_QIDXS}'")

    packed: dict[str, PackedWeight] = {}
    consumed: set[str] = set()
    errors: dict[str, float] = {}
    biases: list[str] = []
    for name, keys in modules.items():
        codes_key = f"{name}.{_QIDXS}"
        codes = _codes(state_dict, codes_key, hadamard_block)
        n, k = codes.shape[0], 4 * codes.shape[1]
        su = _vector(state_dict, f"{name}.{_SU}", k, "input scale SU").to(torch.float32)
        sv = _vector(state_dict, f"{name}.{_SV}", n, "output scale SV").to(torch.float32)
        wscale_key = f"{name}.{_WSCALE}"
        if wscale_key not in state_dict:
            raise ValueError(f"missing {wscale_key} (the release's QuantizedLinear always stores it)")
        sv = sv * _scalar(state_dict, wscale_key)
        if f"{name}.{_SCALE_WH}" in state_dict:
            scale_wh = _vector(state_dict, f"{name}.{_SCALE_WH}", k, "input rescale scaleWH").to(torch.float32)
            if (scale_wh == 0).any():
                raise ValueError(f"{name}.{_SCALE_WH} holds zeros (the input is divided by it)")
            su = su / scale_wh
        grid = _grid(state_dict, f"{name}.{_GRID}")
        cb_id = _codebook_id(state_dict, f"{name}.{_CODEBOOK_ID}")
        bias_key = _check_bias(state_dict, name, n)
        if bias_key is not None:
            biases.append(bias_key)

        counts = torch.bincount(codes.reshape(-1).long().cpu(), minlength=256).double()
        A, b = fit_affine_codebook(grid, counts if weighting == "usage" else torch.ones(256, dtype=torch.float64))
        dev = codes.device
        pw = PackedWeight(
            codes=codes.contiguous(), A=A.to(dev), b=b.to(dev), su=su, sv=sv, w_scale=torch.ones((), device=dev),
            had_in=hadamard_block, had_out=hadamard_block, method="unisvq-release-ptq",
        ).validate()
        err = _rel_err(dequantize(pw), decode_reference(state_dict, name, block=hadamard_block))
        fitted = codebook(pw.A, pw.b).double().cpu()
        pw.extra = {"source_layout": "unisvq-ptq", "codebook_id": cb_id,
                    "codebook": _PTQ_CODEBOOK_IDS.get(cb_id) if cb_id is not None else None,
                    "weighting": weighting, "rel_err": err,
                    "grid_fit_rel_err": _rel_err(fitted, grid.double().cpu())}
        packed[name] = pw
        errors[name] = err
        consumed.update(key for key in keys if key != bias_key)

    rest = {key: t for key, t in state_dict.items() if key not in consumed}
    report = {
        "layout": "unisvq-ptq", "exact": False, "quantized_modules": len(packed), "passthrough_tensors": len(rest),
        "biases": biases, "hadamard_block": hadamard_block, "weighting": weighting,
        "rel_err": errors, "max_rel_err": max(errors.values()),
        "weights": sum(pw.out_features * pw.in_features for pw in packed.values()),
    }
    return packed, rest, report


def _grid(sd: dict, key: str) -> torch.Tensor:
    if key not in sd:
        raise ValueError(f"missing {key} (the [256, 4] codebook grid)")
    g = sd[key]
    if not isinstance(g, torch.Tensor) or not g.is_floating_point() or tuple(g.shape) != (256, 4):
        raise ValueError(f"{key} must be a floating [256, 4] grid (2-bit, d = 4), got "
                         f"{getattr(g, 'dtype', type(g).__name__)} of shape {tuple(getattr(g, 'shape', ()))}")
    if not torch.isfinite(g).all():
        raise ValueError(f"{key} holds NaN or Inf")
    return g


def _codebook_id(sd: dict, key: str) -> int | None:
    if key not in sd:
        return None
    t = sd[key]
    if not isinstance(t, torch.Tensor) or t.numel() != 1 or int(t.reshape(())) not in _PTQ_CODEBOOK_IDS:
        raise ValueError(f"{key} must be one of {sorted(_PTQ_CODEBOOK_IDS)} (the release's 2-bit d = 4 grids), got "
                         f"{t.reshape(-1).tolist() if isinstance(t, torch.Tensor) else t!r}")
    return int(t.reshape(()))


def fit_affine_codebook(grid: torch.Tensor, weights: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Weighted least squares ``grid[c] ~ A @ z(c) + b`` over the 256 codes.

    ``grid``: ``[256, 4]`` in pyquant's code order; ``weights``: ``[256]``, non-negative (zero
    for a code that never occurs). Returns fp32 ``A`` ``[4, 4]`` and ``b`` ``[4]``. Solved in
    fp64 with a rank-revealing driver, so a layer that uses too few codes to pin the fit down
    still gets the minimiser (any one of them: they agree on the codes it uses)."""
    if tuple(grid.shape) != (256, 4) or tuple(weights.shape) != (256,) or (weights < 0).any():
        raise ValueError("grid must be [256, 4] and weights [256] non-negative")
    z1 = torch.cat([code_vectors().double(), torch.ones(256, 1, dtype=torch.float64)], 1)  # [256, 5]
    w = weights.double().sqrt()[:, None]
    sol = torch.linalg.lstsq(w * z1, w * grid.double().cpu(), driver="gelsd").solution  # [5, 4] = [A^T; b]
    return sol[:4].T.contiguous().float(), sol[4].contiguous().float()


# ---------------------------------------------------------------------------------------------
# the reference decode, independent of pyquant.format and pyquant.hadamard
# ---------------------------------------------------------------------------------------------
def reference_hadamard(n: int) -> torch.Tensor:
    """Sylvester Hadamard matrix of size ``n`` (a power of two) as fp64, normalised by
    ``1/sqrt(n)``: ``H_1 = [1]``, ``H_2m = [[H_m, H_m], [H_m, -H_m]]`` by Kronecker products, the
    natural order the release's butterflies (``fast_hadamard_transform``, ``hadamard128``)
    compute."""
    _check_block(n)
    h2 = torch.tensor([[1.0, 1.0], [1.0, -1.0]], dtype=torch.float64)
    h = torch.ones(1, 1, dtype=torch.float64)
    for _ in range(n.bit_length() - 1):
        h = torch.kron(h2, h)
    return h / math.sqrt(n)


def decode_reference(state_dict: dict[str, torch.Tensor], module: str, *,
                     block: int = RELEASE_HADAMARD_BLOCK) -> torch.Tensor:
    """The dense weight of ``module`` decoded straight from the checkpoint's tensors with the
    paper's formula ``W = SV ⊙ H·Ŵ·H ⊙ SU`` (fp64 ``[N, K]``), for either layout.

    Compressed layout: ``Ŵ[n, 4j+i] = cb_s * z_i + cb_z`` with ``z_i = (code // 4**(3-i)) % 4``.
    PTQ layout: ``Ŵ[n, 4j:4j+4] = grid[code]``, ``SU`` divided by ``scaleWH`` (if present),
    ``SV`` multiplied by ``Wscale``. ``H`` is :func:`reference_hadamard` per contiguous ``block``
    on both sides; ``N`` and ``K`` must be divisible by ``block``. Shapes are not validated
    beyond that: the converters do that.
    """
    _check_block(block)
    sd = state_dict
    if f"{module}.{_QIDXS}" in sd:
        codes = sd[f"{module}.{_QIDXS}"].long()
        n, k = codes.shape[0], 4 * codes.shape[1]
        w_hat = sd[f"{module}.{_GRID}"].double()[codes].reshape(n, k)
        su = sd[f"{module}.{_SU}"].double()
        if f"{module}.{_SCALE_WH}" in sd:
            su = su / sd[f"{module}.{_SCALE_WH}"].double()
        sv = sd[f"{module}.{_SV}"].double() * sd[f"{module}.{_WSCALE}"].double().reshape(())
    elif f"{module}.{_CODES}" in sd and f"{module}.{_CB_SCALE}" in sd:
        codes = sd[f"{module}.{_CODES}"].long()
        n, k = codes.shape[0], 4 * codes.shape[1]
        place = torch.tensor([64, 16, 4, 1], device=codes.device)
        z = torch.div(codes[..., None], place, rounding_mode="floor").remainder(4).reshape(n, k).double()
        w_hat = sd[f"{module}.{_CB_SCALE}"].double().reshape(()) * z + sd[f"{module}.{_CB_ZERO}"].double().reshape(())
        su, sv = sd[f"{module}.{_SU}"].double(), sd[f"{module}.{_SV}"].double()
    else:
        raise ValueError(f"{module} is not a quantized module of either release layout "
                         f"(no {module}.{_QIDXS}, no {module}.{_CODES} with {module}.{_CB_SCALE})")
    if n % block or k % block:
        raise ValueError(f"{module}: [{n}, {k}] is not divisible by the Hadamard block {block}")
    h = reference_hadamard(block).to(w_hat.device)
    left = (h @ w_hat.reshape(n // block, block, k)).reshape(n, k)          # H on the output side
    both = (left.reshape(n, k // block, block) @ h).reshape(n, k)           # H on the input side
    return sv[:, None] * both * su[None, :]


def _rel_err(a: torch.Tensor, ref: torch.Tensor) -> float:
    a, ref = a.double().cpu(), ref.double().cpu()
    return float((a - ref).norm() / ref.norm().clamp_min(1e-300))


# ---------------------------------------------------------------------------------------------
# files
# ---------------------------------------------------------------------------------------------
_SINGLE_NAMES = ("model.safetensors", "model.compressed.safetensors")  # the release's loaders try these, in order


def load_unisvq_checkpoint(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Read a release checkpoint's tensors (CPU) into one state dict.

    ``path``: a ``.safetensors`` file; a ``*.safetensors.index.json`` (sharded: its
    ``weight_map`` names each key's shard, relative to the index's folder); or a folder holding
    one index, else ``model.safetensors``, else ``model.compressed.safetensors``. In a sharded
    checkpoint, a key the index names but its shard lacks, or a shard key the index does not
    name, raises ``ValueError`` naming the key.
    """
    from safetensors.torch import load_file

    path = os.fspath(path)
    if os.path.isdir(path):
        indexes = sorted(f for f in os.listdir(path) if f.endswith(".safetensors.index.json"))
        if len(indexes) > 1:
            raise ValueError(f"{path} holds several index files: {indexes}")
        if indexes:
            return _load_sharded(os.path.join(path, indexes[0]), load_file)
        for name in _SINGLE_NAMES:
            if os.path.isfile(os.path.join(path, name)):
                return load_file(os.path.join(path, name))
        raise FileNotFoundError(f"{path} holds no *.safetensors.index.json, {' or '.join(_SINGLE_NAMES)}")
    if path.endswith(".json"):
        return _load_sharded(path, load_file)
    return load_file(path)


def _load_sharded(index_path: str, load_file) -> dict[str, torch.Tensor]:
    with open(index_path) as f:
        weight_map = json.load(f).get("weight_map")
    if not isinstance(weight_map, dict) or not weight_map:
        raise ValueError(f"{index_path} has no weight_map")
    folder = os.path.dirname(index_path)
    state: dict[str, torch.Tensor] = {}
    for shard in sorted(set(weight_map.values())):
        if os.path.isabs(shard) or ".." in shard.replace("\\", "/").split("/"):
            raise ValueError(f"{index_path}: shard {shard!r} is outside the checkpoint's folder")
        tensors = load_file(os.path.join(folder, shard))
        for key, t in tensors.items():
            if weight_map.get(key) != shard:
                raise ValueError(f"{key} is in shard {shard} but the index puts it in {weight_map.get(key)}")
            state[key] = t
    missing = [key for key in weight_map if key not in state]
    if missing:
        raise ValueError(f"{missing[0]} is in the index ({weight_map[missing[0]]}) but not in its shard"
                         + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""))
    return state


# ---------------------------------------------------------------------------------------------
# a Hugging Face directory
# ---------------------------------------------------------------------------------------------
_COPIED_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.json", "merges.txt",
                 "tokenizer.model", "generation_config.json", "chat_template.jinja")


def convert_unisvq_checkpoint(src: str | os.PathLike, dst: str | os.PathLike, *, architecture: str | None = None,
                              ptq: bool | None = None) -> dict:
    """Write the release checkpoint in folder ``src`` as a pyquant Hugging Face directory ``dst``
    that ``AutoModelForCausalLM.from_pretrained(dst)`` loads after ``import pyquant``.

    ``src`` must hold the release's ``config.json`` (copied, with pyquant's ``quantization_config``;
    ``architecture`` replaces its ``architectures``, e.g. ``"Qwen3ForCausalLM"`` where the release
    names its own class) and its safetensors (see :func:`load_unisvq_checkpoint`); tokenizer
    files are copied. ``ptq``: the PTQ-stage layout (approximate import), default: detected.
    Every quantized module becomes the tensors of a :class:`~pyquant.nn.QuantLinear`
    (``codes``, ``A``, ``b``, ``su``, ``sv``, ``w_scale``, ``bias``); every other tensor is copied.
    ``dst`` is built under a temporary name and renamed: an interrupted conversion leaves
    nothing. Returns the converter's report.
    """
    from safetensors.torch import save_file

    src, dst = Path(src), Path(dst)
    if not (src / "config.json").is_file():
        raise ValueError(f"{src} has no config.json (the release's model config)")
    if dst.exists():
        raise ValueError(f"{dst} exists; refusing to overwrite it")
    config = json.loads((src / "config.json").read_text())
    state = load_unisvq_checkpoint(src)
    if ptq is None:
        ptq = any(key.endswith("." + _QIDXS) for key in state)
    packed, rest, report = (convert_unisvq_ptq_state_dict if ptq else convert_unisvq_state_dict)(state)
    tensors, layers = {}, {}
    for name, pw in packed.items():
        bias = rest.pop(f"{name}.bias", None)
        layer = QuantLinear.from_packed(pw, bias)
        layers[name] = layer_entry(layer)
        tensors.update({f"{name}.{key}": t.contiguous() for key, t in layer.state_dict().items()})
    tensors.update({key: t.contiguous() for key, t in rest.items()})
    config["quantization_config"] = {"quant_method": "pyquant", "method": "unisvq-release", "bits": 2,
                                     "hadamard": True, "format_version": FORMAT_VERSION, "layers": layers,
                                     "modules_to_not_convert": []}
    if architecture is not None:
        config["architectures"] = [architecture]
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dst.name}.tmp-", dir=dst.parent))
    try:
        save_file(tensors, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        (tmp / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True))
        for name in _COPIED_FILES:
            if (src / name).is_file():
                shutil.copy2(src / name, tmp / name)
        tmp.rename(dst)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return report
