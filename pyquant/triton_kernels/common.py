"""Pieces shared by the kernels: in-register Hadamard transform, exact small-int -> float
conversion, and host-side helpers (launch mode, sizes).

Triton decides at decoration time whether a ``@triton.jit`` function is compiled
or interpreted (``TRITON_INTERPRET=1``); :func:`interpreted` reports which one
this process got, so the backend can refuse CPU tensors when the kernels were
compiled for a GPU.
"""
from __future__ import annotations

import math

import triton
import triton.language as tl

# Largest Hadamard block a kernel keeps in registers (4096 fp32 = 16 registers per
# thread at 8 warps); bigger blocks make the backend decline the weight.
MAX_HADAMARD = 4096


# The kernels call only Triton builtins and the jit helpers below, never the
# library's own @jit functions (tl.sum, tl.zeros, tl.cdiv): those are decorated
# when triton is first imported, and if that import happened before
# TRITON_INTERPRET=1 was set (torch._dynamo imports triton, for one), they are
# compiled-mode and an interpreted kernel cannot call them.


# The combine function of ``tl.reduce`` for sums: tl.sum's own, which the interpreter
# recognises (it sums with numpy without calling it; any other function it calls
# element by element: the test file ran 7x slower). Kernels call it by the name its
# source defines, ``_sum_combine``: Inductor re-emits a user kernel's jit helpers from
# their source, under their ``def`` names, so an alias is undefined there (seen on an
# H200: NameError 'sum_combine is not defined' under torch.compile).
try:
    from triton.language.standard import _sum_combine
except ImportError:  # a release renamed it
    @triton.jit
    def _sum_combine(a, b):
        return a + b


@triton.jit
def fwht(x, TOTAL: tl.constexpr, LOG2_BLOCK: tl.constexpr):
    """Unnormalized Walsh-Hadamard transform of every contiguous block of
    ``2**LOG2_BLOCK`` elements of the 1-D tensor ``x`` (``TOTAL`` elements).

    Butterfly stage ``i`` pairs elements ``2**i`` apart: viewing ``x`` as
    ``[TOTAL / 2**(i+1), 2, 2**i]`` puts each pair on the middle axis, and
    split/join (which work on the last axis) combine them into ``(a+b, a-b)``.
    The caller scales by ``1/sqrt(block)``. A 2-D tile flattened row-major works
    too when its row length is a multiple of the block.
    """
    for i in tl.static_range(LOG2_BLOCK):
        y = tl.permute(tl.reshape(x, (TOTAL // (2 << i), 2, 1 << i)), (0, 2, 1))
        a, b = tl.split(y)
        y = tl.permute(tl.join(a + b, a - b), (0, 2, 1))
        x = tl.reshape(y, (TOTAL,))
    return x


@triton.jit
def small_int_to_float(z, DTYPE: tl.constexpr):
    """Exact float of an integer tensor holding 0..3, without an int->float
    conversion instruction (those run at a quarter of the FMA rate): OR the value
    into the mantissa of a power of two and subtract that power (the 0x6400 trick
    of fp16 dequant kernels)."""
    if DTYPE == tl.float32:
        return (z.to(tl.int32) | 0x4B000000).to(tl.float32, bitcast=True) - 8388608.0
    elif DTYPE == tl.float16:
        return (z.to(tl.int16) | 0x6400).to(tl.float16, bitcast=True) - 1024.0
    else:
        tl.static_assert(DTYPE == tl.bfloat16, "small_int_to_float: fp32, fp16 or bf16")
        return (z.to(tl.int16) | 0x4300).to(tl.bfloat16, bitcast=True) - 128.0


def interpreted() -> bool:
    """True when this process's kernels were decorated for the Triton interpreter."""
    return type(fwht).__name__ == "InterpretedFunction"


def launch(kernel):
    """``kernel`` ready to launch from inside ``torch.library.triton_op``: through ``wrap_triton``,
    so that Inductor sees the launch (outside tracing it simply runs the kernel); as it is under
    the interpreter, whose kernels ``wrap_triton`` does not take."""
    if interpreted():
        return kernel
    from torch.library import wrap_triton

    return wrap_triton(kernel)


def next_pow2(n: int) -> int:
    return 1 << max(0, int(n) - 1).bit_length()


def log2(n: int) -> int:
    """log2 of a power of two (0 for 0 or 1, meaning no transform)."""
    return int(math.log2(n)) if n > 1 else 0


TORCH_TO_TL = {}


def tl_dtype(torch_dtype):
    """The Triton dtype for a torch floating dtype."""
    import torch

    if not TORCH_TO_TL:
        TORCH_TO_TL.update({torch.float32: tl.float32, torch.float16: tl.float16, torch.bfloat16: tl.bfloat16})
    return TORCH_TO_TL[torch_dtype]
