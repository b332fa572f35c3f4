"""The C++ CPU kernels (csrc/cpu, ``torch.ops.pyquant.cpu_linear``) against the torch reference.

Every instruction set this CPU runs is forced in turn; int mode (16-bit fixed-point activations,
exact integer dot products, the default) and float mode (fp32 activations) both; on AVX-512 both
the GEMV and the GEMM algorithm.
"""
import pytest
import torch
import torch.nn.functional as F

import pyquant
from pyquant import kernels
from pyquant.format import PackedWeight, dequantize, transform_activations

from conftest import rel_err

from pyquant.ops import _C

ISAS = _C.supported_isas()
TOL = 1e-3


def make_packed(n, k, *, hadamard, seed, scale_dtype=torch.float32):
    """Random codes, codebook, scales and block sizes (a format test case, not a fitted weight)."""
    g = torch.Generator().manual_seed(seed)
    pow2 = lambda d: d & -d  # noqa: E731  (largest power of two dividing d)
    return PackedWeight(
        codes=torch.randint(0, 256, (n, k // 4), generator=g, dtype=torch.uint8),
        A=torch.randn(4, 4, generator=g), b=torch.randn(4, generator=g),
        su=(torch.randn(k, generator=g).abs() + 0.5).mul(torch.randint(0, 2, (k,), generator=g) * 2 - 1).to(scale_dtype),
        sv=(torch.rand(n, generator=g) + 0.5).to(scale_dtype),
        w_scale=torch.tensor(0.01 + torch.rand((), generator=g).item()),
        had_in=min(pow2(k), 256) if hadamard else 0,
        had_out=min(pow2(n), 64) if hadamard and n % 4 == 0 else 0,
    ).validate()


def qlinear(x, codes, A, b, su, sv, w_scale, had_in, had_out, bias=None, **kw):
    return torch.ops.pyquant.cpu_linear(x, codes, A, b, su, sv, w_scale, bias, had_in, had_out, **kw)


def run(x, pw, bias=None, **kw):
    return qlinear(x, pw.codes, pw.A, pw.b, pw.su, pw.sv, pw.w_scale, pw.had_in, pw.had_out, bias, **kw)


def reference(x, pw, bias):
    """format.dequantize + F.linear in fp64, rounded to the input dtype as a kernel's output is."""
    y = F.linear(x.double(), dequantize(pw).double(), None if bias is None else bias.double())
    return y.to(x.dtype)


def kernel_paths():
    """(isa, mode, algo) for every path this CPU can run."""
    paths = []
    for isa in ISAS:
        paths += [(isa, "int", "auto"), (isa, "float", "auto")]
        if isa == "avx512":
            paths += [(isa, "int", "gemv"), (isa, "int", "gemm")]
    return paths


# (K, N, batch, input dtype, hadamard, bias, scale dtype): every K of the spec, odd and even N,
# batches from 1 to 512 on both sides of the GEMV/GEMM switch at 8 tokens (and of the tile
# kernel's: GEMV up to 2, narrow tiles 3-8, blocks of 16 above).
CASES = [
    (384, 131, 1, torch.float32, True, True, torch.float16),
    (384, 97, 512, torch.bfloat16, False, False, torch.float32),
    (384, 96, 40, torch.float32, True, False, torch.float32),
    (1536, 33, 9, torch.float32, False, True, torch.float32),
    (1536, 255, 3, torch.bfloat16, True, True, torch.float16),
    (1536, 64, 128, torch.float32, True, True, torch.float32),
    (4096, 67, 2, torch.bfloat16, True, False, torch.float32),
    (4096, 129, 33, torch.float32, False, True, torch.float16),
    (11008, 31, 1, torch.float32, True, True, torch.float32),
    (11008, 45, 17, torch.bfloat16, False, True, torch.float16),
    (11008, 40, 5, torch.float32, True, False, torch.float32),
    (11008, 33, 2, torch.float32, True, False, torch.float32),  # (avx512: two tokens past kPairActBytes)
    (4096, 70, 8, torch.float16, True, True, torch.float16),
    (2048, 80, 2, torch.float32, True, True, torch.float32),  # (avx512: 16-row blocks, reduce16, up to K = 2048)
    (512, 48, 4, torch.float32, False, False, torch.float32),  # (avx512: short rows, 4 tokens in pairs)
]


@pytest.mark.parametrize("k,n,m,dtype,hadamard,has_bias,scale_dtype", CASES)
def test_every_path_matches_the_reference(k, n, m, dtype, hadamard, has_bias, scale_dtype):
    seed = k + n + m
    pw = make_packed(n, k, hadamard=hadamard, seed=seed, scale_dtype=scale_dtype)
    g = torch.Generator().manual_seed(seed + 1)
    x = torch.randn(m, k, generator=g).to(dtype)
    bias = torch.randn(n, generator=g) if has_bias else None
    ref = reference(x, pw, bias)
    ints = []
    for isa, mode, algo in kernel_paths():
        y = run(x, pw, bias, isa=isa, mode=mode, algo=algo)
        assert y.dtype == dtype and y.shape == (m, n)
        err = rel_err(y, ref)
        assert err < TOL, (isa, mode, algo, err)
        if mode == "int":
            ints.append(((isa, algo), y))
    # int mode computes exact integer dot products around one shared transform: the same bits on
    # every ISA and for both algorithms
    for path, y in ints[1:]:
        assert torch.equal(y, ints[0][1]), (path, ints[0][0])


def test_strided_scale_vectors_give_the_same_bits():
    pw = make_packed(40, 384, hadamard=True, seed=3, scale_dtype=torch.float16)
    x = torch.randn(4, 384)
    # su / sv as every other element of a twice-longer tensor: read through their stride
    su2 = torch.stack([pw.su, torch.zeros_like(pw.su)], dim=1).reshape(-1)[::2]
    sv2 = torch.stack([pw.sv, torch.zeros_like(pw.sv)], dim=1).reshape(-1)[::2]
    assert not su2.is_contiguous()
    args = (pw.codes, pw.A, pw.b)
    want = qlinear(x, *args, pw.su, pw.sv, pw.w_scale, pw.had_in, pw.had_out, None)
    got = qlinear(x, *args, su2, sv2, pw.w_scale, pw.had_in, pw.had_out, None)
    assert torch.equal(got, want)


@pytest.mark.parametrize("k", [21928, 21932])
def test_largest_dot_products_do_not_overflow(k):
    """All levels 3 against activations all at the top of the fixed-point range: the largest
    |sum z * q| there is. K = 21928 is the last one kept in int32, 21932 goes to int64."""
    n = 20
    pw = PackedWeight(codes=torch.full((n, k // 4), 255, dtype=torch.uint8), A=torch.eye(4), b=torch.zeros(4),
                      su=torch.ones(k), sv=torch.ones(n), w_scale=torch.tensor(1.0)).validate()
    for m in (1, 4, 9):
        x = torch.ones(m, k)
        x[-1] = -1
        expect = torch.full((m, n), 3.0 * k)
        expect[-1] = -3.0 * k
        for isa, mode, algo in kernel_paths():
            assert torch.equal(run(x, pw, isa=isa, mode=mode, algo=algo), expect), (isa, mode, algo, m)


@pytest.mark.parametrize("isa", ISAS)
def test_results_are_identical_run_to_run(isa):
    pw = make_packed(100, 1536, hadamard=True, seed=3)
    bias = torch.randn(100)
    for m, mode in ((1, "int"), (7, "float"), (64, "int"), (20, "float")):
        x = torch.randn(m, 1536)
        first = run(x, pw, bias, isa=isa, mode=mode)
        for _ in range(3):
            assert torch.equal(run(x, pw, bias, isa=isa, mode=mode), first), (isa, mode, m)


def split_cases():
    """Layers and token counts that take every way a call splits over threads: one thread; by
    tokens (codes that fit in cache, enough tokens: 40 for 2 and 3 threads); by rows (codes from
    memory: 1100 x 4096 is 1.1 MB of codes)."""
    return [(make_packed(300, 1536, hadamard=True, seed=4), (1, 5, 17, 40)),
            (make_packed(1100, 4096, hadamard=True, seed=5), (1, 5, 40))]


def at_thread_counts(run_all, counts=(1, 2, 3)) -> list:
    """run_all()'s result at each of torch's thread counts in ``counts`` (the count put back after)."""
    before = torch.get_num_threads()
    try:
        outs = []
        for threads in counts:
            torch.set_num_threads(threads)
            outs.append(run_all())
        return outs
    finally:
        torch.set_num_threads(before)


@pytest.mark.parametrize("isa", ISAS)
def test_results_do_not_depend_on_the_thread_count(isa):
    """split_cases, int and float mode; with the tile kernel's operands made once per call."""
    cases = split_cases()
    outs = at_thread_counts(lambda: [
        run(torch.randn(m, pw.su.shape[0], generator=torch.Generator().manual_seed(m)), pw, isa=isa, mode=mode)
        for pw, ms in cases for m in ms for mode in ("int", "float")])
    for other in outs[1:]:
        assert all(torch.equal(a, b) for a, b in zip(outs[0], other))
    # ... and the single-thread results are right (the splits are only worth testing on them)
    pw, ms = cases[0]
    x = torch.randn(40, 1536, generator=torch.Generator().manual_seed(40))
    assert rel_err(outs[0][2 * ms.index(40)], reference(x, pw, None)) < TOL


def test_int_mode_error_is_far_inside_the_tolerance_and_float_mode_is_near_fp32():
    """The measurement behind int mode being the default: its error against the fp64 reference,
    next to float mode's, on heavy-tailed activations without a Hadamard transform to tame them."""
    pw = make_packed(256, 4096, hadamard=False, seed=11)
    g = torch.Generator().manual_seed(12)
    x = torch.randn(16, 4096, generator=g) * torch.randn(16, 4096, generator=g).exp()  # log-normal scales
    ref = reference(x.double(), pw, None)
    e_int = rel_err(run(x, pw, mode="int"), ref)
    e_float = rel_err(run(x, pw, mode="float"), ref)
    assert e_float < 1e-5
    assert e_int < 2e-4, e_int


def test_nan_and_inf_inputs_give_nan_rows_like_the_reference():
    pw = make_packed(40, 512, hadamard=True, seed=8)
    for m in (1, 12):
        x = torch.randn(m, 512)
        x[0, 7] = float("nan")
        x[-1, 3] = float("inf") if m > 1 else x[-1, 3]
        for isa, mode, algo in kernel_paths():
            y = run(x, pw, isa=isa, mode=mode, algo=algo)
            assert y[0].isnan().all(), (isa, mode, algo)
            if m > 1:
                assert not y[-1].isfinite().any(), (isa, mode, algo)
                assert y[1:-1].isfinite().all(), (isa, mode, algo)


def test_activation_transform_matches_the_format_reference():
    for k, hadamard in ((384, True), (4096, False), (11008, True)):
        pw = make_packed(8, k, hadamard=hadamard, seed=k)
        x = torch.randn(5, k)
        xt, const = _C.transform_activations(x, pw.su, pw.A, pw.b, pw.had_in)
        ref_xt, ref_const = transform_activations(x, pw)
        assert rel_err(xt, ref_xt) < 1e-6
        assert rel_err(const, ref_const) < 1e-5


def test_bad_inputs_raise_clear_errors():
    pw = make_packed(16, 64, hadamard=True, seed=0)
    x = torch.randn(3, 64)
    with pytest.raises(ValueError, match="contiguous"):
        run(torch.randn(64, 3).t(), pw)
    with pytest.raises(ValueError, match="contiguous"):
        run(torch.randn(3, 128)[:, ::2], pw)
    with pytest.raises(TypeError, match="x must be float32, bfloat16 or float16"):
        run(x.double(), pw)
    with pytest.raises(ValueError, match=r"x must have shape \[M, 64\]"):
        run(torch.randn(3, 60), pw)
    with pytest.raises(TypeError, match="codes must be uint8"):
        qlinear(x, pw.codes.int(), pw.A, pw.b, pw.su, pw.sv, pw.w_scale, pw.had_in, pw.had_out, None)
    with pytest.raises(ValueError, match="had_in"):
        qlinear(x, pw.codes, pw.A, pw.b, pw.su, pw.sv, pw.w_scale, 3, 0, None)
    with pytest.raises(ValueError, match="sv must have shape"):
        qlinear(x, pw.codes, pw.A, pw.b, pw.su, pw.sv[:5], pw.w_scale, pw.had_in, pw.had_out, None)
    with pytest.raises(ValueError, match="bias must have shape"):
        run(x, pw, torch.randn(15))
    with pytest.raises(ValueError, match="isa must be one of"):
        run(x, pw, isa="sse9")
    with pytest.raises(ValueError, match="mode must be"):
        run(x, pw, mode="int4")
    with pytest.raises(ValueError, match="algo"):
        run(x, pw, algo="fast")
    for isa in sorted({"scalar", "avx2", "avx512", "amx", "neon"} - set(ISAS)):
        # a set this build has but this CPU lacks, or one of another architecture
        with pytest.raises(ValueError, match=f"isa '{isa}' is not supported by this CPU|in this build, got '{isa}'"):
            run(x, pw, isa=isa)
    with pytest.raises(ValueError, match="algo 'gemm' needs mode 'int' and an isa with a GEMM"):
        run(x, pw, isa="scalar", algo="gemm")


def test_set_isa_forces_the_default_path():
    pw = make_packed(32, 256, hadamard=True, seed=5)
    x = torch.randn(2, 256)
    ref = reference(x, pw, None)
    try:
        for isa in ISAS:
            _C.set_isa(isa)
            assert _C.get_isa() == isa
            assert rel_err(run(x, pw), ref) < TOL
    finally:
        _C.set_isa("auto")
    assert _C.get_isa() == ISAS[-1]


def test_fp16_input_and_empty_batch():
    pw = make_packed(24, 128, hadamard=True, seed=9)
    x = torch.randn(4, 128).half()
    y = run(x, pw)
    assert y.dtype == torch.float16
    assert rel_err(y, reference(x, pw, None)) < TOL
    assert run(torch.empty(0, 128), pw).shape == (0, 24)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("m", [1, 29])
def test_half_precision_outputs_are_the_fp32_path_rounded_as_torch_rounds(dtype, m):
    """bf16 / fp16 inputs run the fp32 path on the same values, then round its outputs (vectorized,
    transform.h narrow_*) as torch's conversion does: to nearest even, past the half range to Inf."""
    layer = pyquant.QuantLinear.from_packed(make_packed(1536, 384, hadamard=True, seed=m, scale_dtype=torch.float16),
                                            torch.randn(1536))
    x = torch.randn(m, 384, generator=torch.Generator().manual_seed(m))
    x[0, :64] = 6e4  # inputs inside fp16's range, outputs past it
    if m > 1:
        x[1, 3] = float("nan")  # a NaN token: every output NaN
    x = x.to(dtype)
    with torch.no_grad():
        got, want = layer(x), layer(x.float()).to(dtype)
    assert got.dtype == dtype and (dtype == torch.bfloat16 or got.isinf().any())
    torch.testing.assert_close(got, want, rtol=0, atol=0, equal_nan=True)


def test_dispatcher_runs_the_cpu_backend_by_default_on_cpu_tensors():
    pw = make_packed(20, 128, hadamard=False, seed=2)
    layer = pyquant.QuantLinear.from_packed(pw, torch.randn(20))
    for dtype in (torch.float32, torch.bfloat16):
        x = torch.randn(2, 3, 128).to(dtype)
        y = layer(x)
        assert layer.last_backend == "cpu" and y.dtype == dtype and y.shape == (2, 3, 20)
        with kernels.force_backend("torch"):
            ref = layer(x)
        assert rel_err(y.float(), ref.float()) < (TOL if dtype == torch.float32 else 1e-2)
    from pyquant.backends import cpu

    # the op reads fp16 scales as they are: in-place updates show in the next call
    layer16 = pyquant.QuantLinear.from_packed(make_packed(20, 128, hadamard=True, seed=6, scale_dtype=torch.float16))
    x = torch.randn(3, 128)
    layer16(x)
    with torch.no_grad():
        layer16.sv.mul_(2)
    assert rel_err(layer16(x), reference(x, layer16.packed, None)) < TOL
    assert cpu.available()
    assert cpu.supports(layer, torch.float32, False) is None
    assert cpu.supports(layer, torch.float32, True) is None  # the op has a gradient
    assert "dtype" in cpu.supports(layer, torch.float64, False)
    assert "not the CPU" in cpu.supports(layer.to("meta"), torch.float32, False)
