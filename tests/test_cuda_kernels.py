"""CUDA backend (csrc/cuda, pyquant/backends/cuda.py).

The GPU tests compare the kernels with the torch reference (``format.dequantize``
+ ``F.linear`` in fp32, output cast to the input dtype as the torch backend
returns it) and are skipped where the extension or a GPU is absent. The CPU tests
check what can be checked without a GPU: the code reshuffle against the layout
documented in csrc/cuda/qlinear_cuda.h (decoded with independent index
arithmetic), the activation-fragment decoder, and the number format the kernels
use (two bf16 limbs) against the accuracy target.
"""
import functools

import pytest
import torch
import torch.nn.functional as F

from conftest import random_packed, rel_err
from pyquant import kernels
from pyquant.backends import cuda as cuda_backend
from pyquant.format import PackedWeight, dequantize, finish_output, transform_activations, unpack_codes
from pyquant.nn import QuantLinear

needs_gpu = pytest.mark.skipif(not cuda_backend.available(),
                               reason="needs the built pyquant._C_cuda extension and a CUDA GPU")
DTYPES = [torch.float16, torch.bfloat16, torch.float32]


def reference(x: torch.Tensor, pw: PackedWeight, bias: torch.Tensor | None) -> torch.Tensor:
    """fp32 reference, cast to x's dtype (what the torch backend returns)."""
    return F.linear(x.float(), dequantize(pw), None if bias is None else bias.float()).to(x.dtype)


# ------------------------------------------------------------------------------------------------
# CPU: layout and number format
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("n,k", [(300, 100), (32, 64), (513, 200)])
def test_repack_matches_documented_fragment_layout(n, k):
    codes = torch.randint(0, 256, (n, k // 4), generator=torch.Generator().manual_seed(n), dtype=torch.uint8)
    packed = cuda_backend.repack_codes(codes)
    np_, kp = -(-n // 256) * 256, -(-k // 64) * 64
    assert packed.shape == (np_ // 32, kp // 64, 32, 4) and packed.dtype == torch.int32
    z = torch.zeros(np_, kp, dtype=torch.int64)
    z[:n, :k] = unpack_codes(codes).long()
    # Decode every 2-bit field the way the kernel reads it, and compute where it belongs.
    G, KB, L, W, Q, E = torch.meshgrid(*(torch.arange(s) for s in (np_ // 32, kp // 64, 32, 4, 8, 2)), indexing="ij")
    word = packed.long() & 0xFFFFFFFF
    level = (word[G, KB, L, W] >> (2 * Q + 16 * E)) & 3
    g, t, h, c, s, r = L // 4, L % 4, W // 2, W % 2, Q // 4, Q % 4
    row = 32 * G + 16 * h + g + 8 * (r % 2)
    col = 64 * KB + 32 * c + 16 * s + 2 * t + 8 * (r // 2) + E
    assert torch.equal(level, z[row, col])


def test_repack_rejects_bad_codes():
    with pytest.raises(TypeError, match="codes"):
        cuda_backend.repack_codes(torch.zeros(4, 4, dtype=torch.int32))
    with pytest.raises(ValueError, match="codes"):
        cuda_backend.repack_codes(torch.zeros(16, dtype=torch.uint8))


def encode_activations(xt_hi: torch.Tensor, xt_lo: torch.Tensor) -> torch.Tensor:
    """The activation fragment layout written element by element from its definition:
    lane 4g+t of tile T, k step ks holds {b0.hi, b1.hi, b0.lo, b1.lo}, b0 = xt[16ks+2t : +2],
    b1 = the pair 8 further, for token 8T+g (low half of each word = lower k)."""
    m, k = xt_hi.shape
    tiles, kp = -(-m // 8), -(-k // 64) * 64
    bits = torch.zeros(tiles, kp // 16, 32, 4, 2, dtype=torch.int64)
    pad = lambda v: F.pad(v.view(torch.int16).long() & 0xFFFF, (0, kp - k, 0, 8 * tiles - m))  # noqa: E731
    hi, lo = pad(xt_hi), pad(xt_lo)
    for tok in range(8 * tiles):
        for kk in range(kp):
            ks, within = divmod(kk, 16)
            b, rest = divmod(within, 8)
            t, e = divmod(rest, 2)
            lane = 4 * (tok % 8) + t
            bits[tok // 8, ks, lane, b, e] = hi[tok, kk]
            bits[tok // 8, ks, lane, 2 + b, e] = lo[tok, kk]
    words = bits[..., 0] | (bits[..., 1] << 16)
    return torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)


def test_decode_activations_inverts_the_fragment_layout():
    g = torch.Generator().manual_seed(3)
    m, k = 11, 100
    xt = torch.randn(m, k, generator=g) * 10
    hi = xt.bfloat16()
    lo = (xt - hi.float()).bfloat16()
    decoded = cuda_backend.decode_activations(encode_activations(hi, lo), m, k)
    assert torch.equal(decoded, hi.float() + lo.float())


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("n,k", [(257, 512), (384, 1536)])
def test_two_bf16_limbs_meet_the_accuracy_target(dtype, n, k):
    """The kernels' arithmetic, emulated: exact levels z times xt = hi + lo (two bf16
    limbs), fp32 accumulation, then the output transform. Within 1e-3 of the reference
    (with a wide margin), while a single bf16 limb would not be."""
    pw = random_packed(n, k, seed=5)
    x = torch.randn(64, k, generator=torch.Generator().manual_seed(6)).to(dtype)
    xt, const = transform_activations(x, pw)
    z = unpack_codes(pw.codes).float()
    hi = xt.bfloat16().float()
    lo = (xt - hi).bfloat16().float()

    def layer(act):
        return finish_output(pw.w_scale * (act @ z.T + const[:, None]), pw, None).to(dtype)

    ref = reference(x, pw, None)
    two = rel_err(layer(hi + lo), ref)
    one = rel_err(layer(hi), ref)
    assert two < 1e-3 / 3, two
    assert one > two * 3, (one, two)


def test_supports_gives_a_reason_for_cpu_layers():
    layer = QuantLinear.from_packed(random_packed(64, 64))
    reason = cuda_backend.supports(layer, torch.float32, False)
    assert reason is not None and "CUDA" in reason


def cuda_linear(x, layer):
    """The op, as the backend calls it, on the layer's kernel state."""
    return cuda_backend.forward(x, layer, cuda_backend.build(layer))


# ------------------------------------------------------------------------------------------------
# GPU
# ------------------------------------------------------------------------------------------------
def gpu_weight(n, k, *, hadamard=True, seed=0, scale_dtype=torch.float32, had_in=None, had_out=None):
    pw = random_packed(n, k, hadamard=hadamard, seed=seed, scale_dtype=scale_dtype)
    if had_in is not None:
        pw.had_in = had_in
    if had_out is not None:
        pw.had_out = had_out
    return pw.validate().to("cuda")


SHAPES = [  # (N, K, hadamard): odd N, K not a multiple of 64, the largest block, a Llama shape
    (257, 512, True), (300, 100, True), (1000, 768, False), (4096, 4096, True), (11008, 4096, True)]


@functools.lru_cache(maxsize=None)
def shared_weight(n, k, hadamard):
    """(packed weight, its dense fp32 matrix, its layer) shared by the parametrized cases."""
    pw = gpu_weight(n, k, hadamard=hadamard, seed=n + k, scale_dtype=torch.float16)
    return pw, dequantize(pw), QuantLinear.from_packed(pw)


@needs_gpu
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n,k,hadamard", SHAPES)
# 1..4 tokens: packed limbs; 5..8: one mma per limb; then GEMM token tiles of 16, 32, 64, 128
@pytest.mark.parametrize("m", [1, 3, 4, 5, 8, 9, 24, 64, 100, 512])
@pytest.mark.parametrize("with_bias", [False, True])
def test_linear_matches_reference(dtype, n, k, hadamard, m, with_bias):
    pw, w, layer = shared_weight(n, k, hadamard)
    g = torch.Generator(device="cuda").manual_seed(m)
    x = torch.randn(m, k, device="cuda", generator=g).to(dtype)
    bias = torch.randn(n, device="cuda", generator=g) if with_bias else None
    if with_bias:
        layer = QuantLinear.from_packed(pw, bias)
    with torch.no_grad():
        y = layer(x)
    assert layer.last_backend == "cuda"
    assert y.shape == (m, n) and y.dtype == dtype
    ref = F.linear(x.float(), w, bias).to(dtype)
    assert rel_err(y, ref) < 1e-3


@needs_gpu
@pytest.mark.parametrize("had_in,had_out", [(256, 256), (2, 4), (1, 0)])
def test_hadamard_block_sizes(had_in, had_out):
    pw = gpu_weight(512, 1024, had_in=had_in, had_out=had_out)
    x = torch.randn(5, 1024, device="cuda", dtype=torch.bfloat16)
    for m in (5, 40):  # both paths
        xm = torch.randn(m, 1024, device="cuda", dtype=torch.bfloat16)
        assert rel_err(cuda_linear(xm, QuantLinear.from_packed(pw)), reference(xm, pw, None)) < 1e-3
    assert cuda_backend.supports(QuantLinear.from_packed(pw), x.dtype, False) is None


@needs_gpu
@pytest.mark.parametrize("m", [1, 4, 5, 8])  # packed limbs (<= 4 tokens) and one mma per limb
def test_small_and_gemm_paths_agree(m):
    pw = gpu_weight(1024, 2048, seed=1)
    x = torch.randn(m, 2048, device="cuda", dtype=torch.float16)
    st = cuda_backend.build(QuantLinear.from_packed(pw))
    args = (x, st.codes, st.su, st.sv, st.A, st.b, st.w_scale, None, st.counters, 1024, pw.had_in, pw.had_out)
    small = torch.ops.pyquant.cuda_linear(*args, 8)
    gemm = torch.ops.pyquant.cuda_linear(*args, 0)
    assert rel_err(small.float(), gemm.float()) < 2e-3  # both within 1e-3 of the reference


@needs_gpu
@pytest.mark.parametrize("dtype", DTYPES)
def test_transform_kernel_matches_reference(dtype):
    pw = gpu_weight(256, 1000, seed=2)  # K = 1000: had_in = 8, K % 64 != 0
    x = torch.randn(13, 1000, device="cuda").to(dtype)
    xt, const = cuda_backend.transform(x, pw)
    ref_xt, ref_const = transform_activations(x, pw)
    assert rel_err(xt, ref_xt) < 3e-5
    assert rel_err(const, ref_const) < 1e-5


@needs_gpu
def test_deterministic_and_counters_reset():
    layer = QuantLinear.from_packed(gpu_weight(4096, 4096, seed=4))
    st = cuda_backend.build(layer)
    for m in (1, 8, 100):
        x = torch.randn(m, 4096, device="cuda", dtype=torch.bfloat16)
        y1 = cuda_backend.forward(x, layer, st)
        y2 = cuda_backend.forward(x, layer, st)
        assert torch.equal(y1, y2)
    assert int(st.counters.abs().sum()) == 0


@needs_gpu
@pytest.mark.parametrize("m", [1, 4, 32])
@pytest.mark.parametrize("pdl", [False, True])  # programmatic dependent launch (used on sm_90+)
def test_cuda_graph_capture(m, pdl, monkeypatch):
    if pdl:
        monkeypatch.setenv("PYQUANT_CUDA_PDL", "1")
    layer = QuantLinear.from_packed(gpu_weight(2048, 1024, seed=7), torch.randn(2048, device="cuda"))
    static_x = torch.randn(m, 1024, device="cuda", dtype=torch.float16)
    with kernels.force_backend("cuda"), torch.no_grad():
        eager = layer(static_x)
        s = torch.cuda.Stream()
        s.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(s):
            layer(static_x)
        torch.cuda.current_stream().wait_stream(s)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            static_y = layer(static_x)
    assert layer.last_backend == "cuda"
    graph.replay()
    assert torch.equal(static_y, eager)
    new_x = torch.randn(m, 1024, device="cuda", dtype=torch.float16)
    static_x.copy_(new_x)
    graph.replay()
    with kernels.force_backend("cuda"), torch.no_grad():
        assert torch.equal(static_y, layer(new_x))
    assert rel_err(static_y, reference(new_x, layer.packed, layer.bias)) < 1e-3


@needs_gpu
@pytest.mark.parametrize("m", [3, 24])
def test_strided_and_odd_offset_inputs(m):
    """The kernels load 4 inputs at once from contiguous rows; the op copies any other view
    (a column slice, an odd storage offset) itself, so eager and compiled calls need no check."""
    layer = QuantLinear.from_packed(gpu_weight(512, 256, seed=10))
    base = torch.randn(m, 259, device="cuda", dtype=torch.float16)
    views = {"odd offset": base.flatten()[1:1 + m * 256].view(m, 256), "column slice": base[:, 3:],
             "transposed": base[:, :256].t().contiguous().t()}
    with kernels.force_backend("cuda"), torch.no_grad():
        for name, x in views.items():
            y = layer(x)
            assert layer.last_backend == "cuda", name
            assert torch.equal(y, layer(x.contiguous().clone())), name


@needs_gpu
def test_torch_compile_traces_the_ops():
    layer = QuantLinear.from_packed(gpu_weight(1024, 512, seed=8))
    compiled = torch.compile(layer, fullgraph=True)
    with kernels.force_backend("cuda"), torch.no_grad():
        for m in (2, 24):
            x = torch.randn(m, 512, device="cuda", dtype=torch.bfloat16)
            assert torch.equal(compiled(x), layer(x))
            assert layer.last_backend == "cuda"


@needs_gpu
def test_dispatch_and_fallback():
    layer = QuantLinear.from_packed(gpu_weight(512, 512))
    x = torch.randn(2, 512, device="cuda", dtype=torch.float16)
    assert kernels.explain(x, layer)["cuda"] == "selected"
    big = QuantLinear.from_packed(gpu_weight(512, 1024, had_in=512))
    reason = cuda_backend.supports(big, torch.float32, False)
    assert reason is not None and "had_in" in reason
    with torch.no_grad():
        big(torch.randn(2, 1024, device="cuda"))
    assert big.last_backend != "cuda"
    # gradients: the CUDA op has no backward, the layer runs on Triton (or the reference)
    xg = x.clone().requires_grad_(True)
    layer(xg).float().sum().backward()
    assert layer.last_backend != "cuda" and xg.grad is not None
    assert "CUDA" in cuda_backend.supports(layer.to("cpu"), torch.float32, False)


@needs_gpu
@pytest.mark.parametrize("overload", ["default", "packet"])
def test_ops_reject_bad_input(overload):
    pw = gpu_weight(256, 256)
    st = cuda_backend.build(QuantLinear.from_packed(pw))
    rest = (st.codes, st.su, st.sv, st.A, st.b, st.w_scale, None, st.counters, 256, pw.had_in, pw.had_out, 8)
    op = torch.ops.pyquant.cuda_linear.default if overload == "default" else torch.ops.pyquant.cuda_linear
    with pytest.raises(ValueError, match="K"):
        op(torch.randn(2, 128, device="cuda"), *rest)
    with pytest.raises(TypeError, match="float32, float16 or bfloat16"):
        op(torch.randn(2, 256, device="cuda").double(), *rest)


@needs_gpu
def test_cuda_ops_opcheck():
    layer = QuantLinear.from_packed(gpu_weight(512, 256, seed=9), torch.randn(512, device="cuda"))
    st = cuda_backend.build(layer)
    for m in (3, 40):
        x = torch.randn(m, 256, device="cuda", dtype=torch.float16)
        torch.library.opcheck(torch.ops.pyquant.cuda_linear.default,
                              (x, st.codes, st.su, st.sv, st.A, st.b, st.w_scale, st.bias, st.counters, 512,
                               layer.had_in, layer.had_out, 8),
                              test_utils=("test_schema", "test_faketensor"))
        args = (x, layer.codes, layer.A, layer.b, layer.su, layer.sv, layer.w_scale, layer.bias, layer.had_in,
                layer.had_out)
        torch.library.opcheck(torch.ops.pyquant.triton_linear.default, args)


def test_gpu_check_leaves_at_most_eight_files(tmp_path):
    """What a GPU machine returns is at most 8 files: the script packs its step logs."""
    import os
    import subprocess
    import sys
    import tarfile
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    out = tmp_path / "out"
    env = {**os.environ, "OUT": str(out), "GPU_CHECK_STEPS": "env import", "PYTHON": sys.executable}
    proc = subprocess.run(["bash", str(root / "benchmarks" / "gpu_check.sh")], env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    files = sorted(p.name for p in out.rglob("*") if p.is_file())
    assert files == ["logs.tar.gz", "summary.txt"] and not any(p.is_dir() for p in out.iterdir())
    with tarfile.open(out / "logs.tar.gz") as tar:
        assert {"logs/env.log", "logs/import.log"} <= set(tar.getnames())
    assert "import rc=" in (out / "summary.txt").read_text()
