"""The ``pyquant`` operator library (``torch.ops.pyquant.*``): every kernel is one op.

Compilers, exporters and vLLM see one opaque, shape-checked op per layer call:

==================  ==========================================================================
op                  what
==================  ==========================================================================
``linear``          ``y = sv * H_out(W_hat @ H_in(su * x)) + bias`` on the stored format
                    (``codes [N, K/4]`` uint8, ``A``, ``b``, ``su``, ``sv``, ``w_scale``); the
                    CPU implementation is the C++ kernel (csrc/cpu). Functional; its autograd
                    (in C++, so inference calls stay in C++) calls ``linear_backward``.
``linear_backward`` the gradient formula (below, in torch ops).
``frozen_linear``   ``linear`` for calls that need no gradient, on the layer's ``A``, ``b``,
                    ``w_scale``, ``su``, ``sv`` and bias laid out once in one fp32 ``params`` tensor
                    (``[A | b | w_scale | 0 ... | su | sv | bias]``, ``PARAMS_HEAD`` floats before
                    ``su``, the bias where there is one; :func:`pyquant.backends.cpu.frozen_params`).
                    No autograd.
``lut_linear``      ``frozen_linear`` in the CPU's mode ``"lut"``: on the codes in the LUT layout
                    (``_C.pack_lut_codes``, same shape), activations cut to 14 bits, the products
                    from table lookups (csrc/cpu/kernel_api.h). No autograd.
``lut3_linear``     ``frozen_linear`` in mode ``"lut3"``: the codes also in the LUT3 layout
                    (``_C.pack_lut3_codes``, ``[ceil(N/128), ceil(K/24) * 768]``), activations cut to
                    ~12 bits, one table lookup per three weights (csrc/cpu/kernel_api.h; AVX-512
                    VBMI2 CPUs run their own kernel); past the GEMV's token count the int GEMM on
                    ``codes`` with the same activations, the same result. No autograd.
``cpu_linear``      the same C++ kernel with its instruction set, mode and algorithm selectable
                    (keyword-only ``isa``, ``mode``, ``algo``); for tests and benchmarks.
``nearest_codeword`` UniSVQ's fit: per row of ``lin [M, 4]`` the first ``argmax_c lin . cb2t[:, c]
                    - norms[c]`` (long ``[M]``), the exact nearest codeword (C++, CPU).
``cuda_linear``     the CUDA kernels (csrc/cuda) on their repacked codes; writes its ``counters``
                    scratch (declared ``Tensor(a!)``), so it has no autograd formula: layers that
                    need gradients on a GPU run the Triton op. Present where ``_C_cuda`` is built.
``cuda_transform``  the CUDA activation transform alone (tests).
``triton_linear``   the Triton kernels (``triton_op`` + ``wrap_triton``, so Inductor sees them);
                    defined in :mod:`pyquant.backends.triton`, autograd formula below. Present
                    where the kernels can run (a CUDA GPU, or ``TRITON_INTERPRET=1``).
==================  ==========================================================================

This module loads the extensions (which register the C++ schemas), and registers every
fake (shape) implementation and autograd formula, so importing it is all a process needs.
Fake implementations check shapes, dtypes and devices like the kernels do and raise
``ValueError`` / ``TypeError`` naming the argument, so bad input fails the same way under
``torch.compile`` as in eager.
"""
from __future__ import annotations

import importlib

import torch

from .format import VECTOR_DIM, check_block, codebook, unpack_codes
from .hadamard import blockwise_hadamard

try:
    from . import _C  # noqa: F401  (loading it registers pyquant::linear and pyquant::cpu_linear)
except ImportError as e:  # pragma: no cover - a broken install
    raise ImportError(f"pyquant's C++ extension is not built ({e}); run `pip install --no-build-isolation -e .`")

try:  # built by setup.py only where torch has CUDA and nvcc exists; loading it adds the cuda_* ops
    _C_cuda = importlib.import_module(f"{__package__}._C_cuda")
except ImportError as e:  # pragma: no cover - depends on the build
    _C_cuda = None
    CUDA_IMPORT_ERROR: Exception | None = e
else:
    CUDA_IMPORT_ERROR = None

INPUT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
PARAMS_HEAD = 32  # frozen_linear's params: floats before su (A, b, w_scale, zeros); csrc/cpu/ops.h kParamsHead
_SCALE_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


# ---------------------------------------------------------------------------- shape checks

def _check_tensor(t, name: str, shape: tuple, dtypes: tuple, device: torch.device) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a tensor, got {type(t).__name__}")
    if t.dtype not in dtypes:
        raise TypeError(f"{name} must have dtype in {dtypes}, got {t.dtype}")
    if tuple(t.shape) != shape:
        raise ValueError(f"{name} must have shape {list(shape)}, got {list(t.shape)}")
    if t.device != device:
        raise ValueError(f"{name} is on {t.device} but x is on {device}")


def check_linear_args(x, codes, A, b, su, sv, w_scale, bias, had_in, had_out) -> tuple[int, int, int]:
    """What the kernels check, on metadata only (fake tensors too); returns ``(M, N, K)``."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x must be a tensor, got {type(x).__name__}")
    if x.dtype not in INPUT_DTYPES:
        raise TypeError(f"x must be float32, bfloat16 or float16, got {x.dtype}")
    if not isinstance(codes, torch.Tensor) or codes.dtype != torch.uint8 or codes.dim() != 2:
        raise TypeError(f"codes must be a 2-D uint8 tensor [N, K/4], got "
                        f"{getattr(codes, 'dtype', type(codes).__name__)} of shape {list(getattr(codes, 'shape', []))}")
    n, k = codes.shape[0], codes.shape[1] * VECTOR_DIM
    if x.dim() != 2 or x.shape[1] != k:
        raise ValueError(f"x must have shape [M, {k}], got {list(x.shape)}")
    if not x.is_contiguous():
        raise ValueError(f"x must be contiguous (got strides {x.stride()}); call .contiguous() first")
    if not codes.is_contiguous():
        raise ValueError("codes must be contiguous")
    if codes.device != x.device:
        raise ValueError(f"codes is on {codes.device} but x is on {x.device}")
    _check_tensor(A, "A", (4, 4), (torch.float32,), x.device)
    _check_tensor(b, "b", (4,), (torch.float32,), x.device)
    _check_tensor(w_scale, "w_scale", (), (torch.float32,), x.device)
    _check_tensor(su, "su", (k,), _SCALE_DTYPES, x.device)
    _check_tensor(sv, "sv", (n,), _SCALE_DTYPES, x.device)
    if bias is not None:
        _check_tensor(bias, "bias", (n,), _SCALE_DTYPES, x.device)
    check_block(had_in, k, "had_in", "K")
    check_block(had_out, n, "had_out", "N")
    return x.shape[0], n, k


# ---------------------------------------------------------------------------- pyquant::linear

@torch.library.register_fake("pyquant::linear")
def _linear_fake(x, codes, A, b, su, sv, w_scale, bias, had_in, had_out):
    m, n, _ = check_linear_args(x, codes, A, b, su, sv, w_scale, bias, had_in, had_out)
    return x.new_empty((m, n))


@torch.library.register_fake("pyquant::frozen_linear")
def _frozen_linear_fake(x, codes, params, had_in, had_out):
    if not isinstance(codes, torch.Tensor) or codes.dim() != 2:
        raise TypeError(f"codes must be a 2-D uint8 tensor [N, K/4], got {type(codes).__name__} "
                        f"of shape {list(getattr(codes, 'shape', []))}")
    n, k = codes.shape[0], codes.shape[1] * VECTOR_DIM
    plain = PARAMS_HEAD + k + n  # without a bias
    if not isinstance(params, torch.Tensor) or params.dtype != torch.float32:
        raise TypeError(f"params must be a float32 tensor, got {getattr(params, 'dtype', type(params).__name__)}")
    if tuple(params.shape) not in ((plain,), (plain + n,)) or not params.is_contiguous():
        raise ValueError(f"params must be contiguous of shape [{plain}] or [{plain + n}] ({PARAMS_HEAD} + K + N, "
                         f"+ N with a bias), got {list(params.shape)}")
    # checked as the tensors they hold
    A, b, w_scale = params[:16].view(4, 4), params[16:20], params[20]
    su, sv = params[PARAMS_HEAD:PARAMS_HEAD + k], params[PARAMS_HEAD + k:plain]
    bias = params[plain:] if params.shape[0] > plain else None
    return _linear_fake(x, codes, A, b, su, sv, w_scale, bias, had_in, had_out)


@torch.library.register_fake("pyquant::lut3_linear")
def _lut3_linear_fake(x, codes, lut3_codes, params, had_in, had_out):
    out = _frozen_linear_fake(x, codes, params, had_in, had_out)  # (checks x, codes and params)
    n, k4 = codes.shape
    shape = (-(-n // 128), -(-4 * k4 // 24) * 768)
    if not isinstance(lut3_codes, torch.Tensor) or lut3_codes.dtype != torch.uint8 or tuple(lut3_codes.shape) != shape:
        raise ValueError(f"lut3_codes must be uint8 {list(shape)} (_C.pack_lut3_codes of codes [{n}, {k4}]), got "
                         f"{getattr(lut3_codes, 'dtype', type(lut3_codes).__name__)} {list(getattr(lut3_codes, 'shape', []))}")
    return out


@torch.library.register_fake("pyquant::lut_linear")
def _lut_linear_fake(x, lut_codes, params, had_in, had_out):
    # lut_codes: the codes' bytes permuted (_C.pack_lut_codes), same shape and dtype
    return _frozen_linear_fake(x, lut_codes, params, had_in, had_out)


@torch.library.register_fake("pyquant::cpu_linear")
def _cpu_linear_fake(x, codes, A, b, su, sv, w_scale, bias, had_in, had_out, *, isa="", mode="", algo="auto"):
    return _linear_fake(x, codes, A, b, su, sv, w_scale, bias, had_in, had_out)


@torch.library.register_fake("pyquant::nearest_codeword")
def _nearest_codeword_fake(lin, cb2t, norms):
    for name, t in (("lin", lin), ("cb2t", cb2t), ("norms", norms)):
        if not isinstance(t, torch.Tensor) or t.dtype != torch.float32:
            raise TypeError(f"{name} must be a float32 tensor, got {getattr(t, 'dtype', type(t).__name__)}")
    if lin.dim() != 2 or lin.shape[1] != VECTOR_DIM:
        raise ValueError(f"lin must have shape [M, {VECTOR_DIM}], got {list(lin.shape)}")
    if cb2t.dim() != 2 or cb2t.shape[0] != VECTOR_DIM or cb2t.shape[1] == 0:
        raise ValueError(f"cb2t must have shape [{VECTOR_DIM}, C] with C > 0, got {list(cb2t.shape)}")
    if norms.dim() != 1 or norms.shape[0] != cb2t.shape[1]:
        raise ValueError(f"norms must have shape [{cb2t.shape[1]}], got {list(norms.shape)}")
    return lin.new_empty((lin.shape[0],), dtype=torch.long)


# ---------------------------------------------------------------------------- autograd

@torch.library.impl("pyquant::linear_backward", "CompositeImplicitAutograd")
def _linear_backward(grad, x, codes, A, b, su, sv, w_scale, bias, had_in, had_out, needs):
    """Exact gradients of ``y = sv * H_out(W_hat @ H_in(su * x)) + bias``, in fp32:
    ``[dx, dA, db, dsu, dsv, dw_scale, dbias]`` for the inputs flagged in ``needs`` (that
    order), empty tensors for the others. ``pyquant::linear``'s C++ autograd and the Triton
    op's Python one both call it; in torch ops, so compilers trace it into the backward graph.

    With ``x' = H_in(su * x)`` and ``g_r = H_out(sv * dy)`` (the Hadamard blocks are symmetric
    and orthogonal): ``dx = su * H_in(g_r @ W_hat)``, ``dsu = sum_m x * H_in(g_r @ W_hat)``,
    ``dsv = sum_m dy * H_out(x' @ W_hat^T)``, ``dW_hat = g_r^T @ x'``, and through
    ``W_hat[n, 4j + i] = w_scale * c(z[n, j])_i``: ``dA = w_scale * sum dW_hat_i z_l``,
    ``db = w_scale * sum dW_hat_i``, ``dw_scale = sum dW_hat * c(z)`` (summed directly: the
    equal ``sum A * dA / w_scale + ...`` cancels badly in fp32). Costs one dense fp32 copy of
    the layer's weight at a time (the kernels have no transposed product); codes never get a
    gradient.
    """
    need_x, need_A, need_b, need_su, need_sv, need_ws, need_bias = needs
    n, k = codes.shape[0], codes.shape[1] * VECTOR_DIM
    g = grad.float()
    g_rot = blockwise_hadamard(g * sv.float(), had_out, dim=-1)
    cb = codebook(A.float(), b.float())
    w_rot = w_scale.float() * cb[codes.long()].reshape(n, k)
    empty = g.new_empty(0)
    dx = dA = db = dsu = dsv = dws = dbias = empty
    if need_x or need_su:
        u = blockwise_hadamard(g_rot @ w_rot, had_in, dim=-1)
        if need_x:
            dx = (u * su.float()).to(x.dtype)
        if need_su:
            dsu = (u * x.float()).sum(0).to(su.dtype)
    if need_sv or need_A or need_b or need_ws:
        xp = blockwise_hadamard(x.float() * su.float(), had_in, dim=-1)
        if need_sv:
            dsv = (g * blockwise_hadamard(xp @ w_rot.T, had_out, dim=-1)).sum(0).to(sv.dtype)
        del w_rot  # at most one dense [N, K] at a time
        if need_A or need_b or need_ws:
            d_hat = (g_rot.T @ xp).reshape(-1, VECTOR_DIM)                   # dL/dW_hat per 4-vector
            if need_A:
                z = unpack_codes(codes).reshape(-1, VECTOR_DIM).float()
                dA = (w_scale.float() * (d_hat.T @ z)).to(A.dtype)
            if need_b:
                db = (w_scale.float() * d_hat.sum(0)).to(b.dtype)
            if need_ws:
                dws = (d_hat * cb[codes.long()].reshape(-1, VECTOR_DIM)).sum().to(w_scale.dtype)
    if need_bias:
        dbias = g.sum(0).to(bias.dtype)
    return [dx, dA, db, dsu, dsv, dws, dbias]


def _setup_context(ctx, inputs, output) -> None:
    x, codes, A, b, su, sv, w_scale, bias, had_in, had_out = inputs
    ctx.save_for_backward(x, codes, A, b, su, sv, w_scale, bias)
    ctx.had_in, ctx.had_out = had_in, had_out


def _backward(ctx, grad: torch.Tensor):
    x, codes, A, b, su, sv, w_scale, bias = ctx.saved_tensors
    nx, _, nA, nb, nsu, nsv, nws, nbias = ctx.needs_input_grad[:8]
    needs = [nx, nA, nb, nsu, nsv, nws, nbias and bias is not None]
    grads = torch.ops.pyquant.linear_backward(grad, x, codes, A, b, su, sv, w_scale, bias, ctx.had_in,
                                              ctx.had_out, needs)
    dx, dA, db, dsu, dsv, dws, dbias = (gr if need else None for gr, need in zip(grads, needs))
    return dx, None, dA, db, dsu, dsv, dws, dbias, None, None


def register_autograd(op: str) -> None:
    """Give a functional Python op with ``pyquant::linear``'s signature its gradient formula
    (``pyquant::linear`` itself has its autograd in C++, calling the same backward op)."""
    torch.library.register_autograd(op, _backward, setup_context=_setup_context)


# ---------------------------------------------------------------------------- CUDA ops

# Must match csrc/cuda/qlinear_cuda.h.
CUDA_ROW_ALIGN = 256      # repacked rows are padded to a multiple of this
CUDA_K_ALIGN = 64         # repacked inputs are padded to a multiple of this
CUDA_TRANSFORM_SLICE = 2048

if _C_cuda is not None:
    @torch.library.register_fake("pyquant::cuda_linear")
    def _cuda_linear_fake(x, codes, su, sv, A, b, w_scale, bias, counters, N, had_in, had_out, small_max_m):
        if x.dim() != 2:
            raise ValueError(f"x must be 2-D [M, K], got shape {list(x.shape)}")
        if codes.dtype != torch.int32 or codes.dim() != 4:
            raise TypeError("codes must be the int32 repacked codes [Np/32, Kp/64, 32, 4]")
        return x.new_empty((x.shape[0], N))

    @torch.library.register_fake("pyquant::cuda_transform")
    def _cuda_transform_fake(x, su, A, b, had_in):
        m, k = x.shape
        kp = -(-k // CUDA_K_ALIGN) * CUDA_K_ALIGN
        tiles = -(-m // 8)
        return (x.new_empty((tiles, kp // 16, 32, 4), dtype=torch.int32),
                x.new_empty((-(-kp // CUDA_TRANSFORM_SLICE), 8 * tiles), dtype=torch.float32))
