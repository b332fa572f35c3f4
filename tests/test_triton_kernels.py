"""Triton kernels against the torch reference (``pyquant.format``).

Without a GPU the kernels run on CPU tensors through the Triton interpreter
(``TRITON_INTERPRET=1``, set here before ``pyquant.triton_kernels`` is imported, and only
while this module's tests run so other modules keep their CPU backends); shapes
are small to keep the interpreter fast. With a GPU the same tests run compiled
on CUDA tensors, plus the ``cuda``-marked tests at real sizes and in bf16.
Run on a GPU with ``pytest tests -k "triton or cuda"``.
"""
from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

HAS_CUDA = torch.cuda.is_available()
DEVICE = "cuda" if HAS_CUDA else "cpu"

_prev_interpret = os.environ.get("TRITON_INTERPRET")
if not HAS_CUDA:
    os.environ["TRITON_INTERPRET"] = "1"  # must precede the kernels' decoration
try:
    triton = pytest.importorskip("triton")
    from pyquant.triton_kernels import autotune
    from pyquant.triton_kernels.common import interpreted
    from pyquant.triton_kernels.gemm_dequant import GemmConfig, gemm_dequant
    from pyquant.triton_kernels.gemv_splitk import GemvConfig, fuses_output, gemv_fused, gemv_partials, split_layout
    from pyquant.triton_kernels.transform import input_transform, output_transform
finally:
    if _prev_interpret is None:
        os.environ.pop("TRITON_INTERPRET", None)
    else:
        os.environ["TRITON_INTERPRET"] = _prev_interpret

if not HAS_CUDA and not interpreted():
    # Something imported the kernels before this module could set TRITON_INTERPRET=1:
    # say so rather than fail deep inside Triton. (triton itself being imported
    # earlier is fine: the kernels avoid its compiled-mode library functions.)
    raise RuntimeError("pyquant.triton_kernels was imported (compiled mode) before this module set TRITON_INTERPRET=1")

import pyquant.backends.triton as tb  # noqa: E402
from pyquant import QuantLinear, kernels  # noqa: E402
from pyquant.format import PackedWeight, dequantize, dequantize_rotated, transform_activations, unpack_codes  # noqa: E402
from pyquant.hadamard import blockwise_hadamard  # noqa: E402

cuda_only = pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU (run by benchmarks/gpu_check.sh)")


@pytest.fixture(autouse=True)
def _triton_env(monkeypatch, tmp_path):
    if not HAS_CUDA:
        monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert tb.available()  # (which registers pyquant::triton_linear, where an earlier import could not)
    # Correctness tests use the default configs; the autotune tests turn tuning on.
    monkeypatch.setenv("PYQUANT_TRITON_AUTOTUNE", "0")
    monkeypatch.setenv("PYQUANT_TRITON_CACHE_DIR", str(tmp_path / "autotune"))


def make_weight(n: int, k: int, had_in: int = 0, had_out: int = 0, seed: int = 0, scale_dtype=torch.float32,
                device=DEVICE) -> PackedWeight:
    """Random codes, codebook and scales (a format test case, not a fitted weight)."""
    g = torch.Generator().manual_seed(seed)
    signs = torch.where(torch.rand(k, generator=g) < 0.5, -1.0, 1.0)
    return PackedWeight(
        codes=torch.randint(0, 256, (n, k // 4), generator=g, dtype=torch.uint8),
        A=torch.randn(4, 4, generator=g), b=torch.randn(4, generator=g),
        su=((torch.rand(k, generator=g) + 0.5) * signs).to(scale_dtype),
        sv=(torch.rand(n, generator=g) + 0.5).to(scale_dtype),
        w_scale=torch.tensor(0.05), had_in=had_in, had_out=had_out,
    ).validate().to(device)


def rel_err(y: torch.Tensor, ref: torch.Tensor) -> float:
    y, ref = y.double().cpu(), ref.double().cpu()
    return ((y - ref).norm() / ref.norm().clamp_min(1e-30)).item()


def reference(x: torch.Tensor, pw: PackedWeight, bias: torch.Tensor | None) -> torch.Tensor:
    """``dequantize`` + ``F.linear`` in fp64."""
    return F.linear(x.double(), dequantize(pw).double(), None if bias is None else bias.double())


def tolerance(dtype: torch.dtype, ref: torch.Tensor) -> float:
    """1e-3, plus for bf16 outputs twice the error of merely rounding the exact
    result to bf16 (~3e-3 by itself: no bf16 kernel, cuBLAS included, can reach 1e-3)."""
    if dtype != torch.bfloat16:
        return 1e-3
    return 1e-3 + 2 * rel_err(ref.to(torch.bfloat16), ref)


def randn(m: int, k: int, dtype=torch.float32, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(m, k, generator=g).to(dtype).to(DEVICE)


def triton_linear(x, pw, bias=None):
    """The op, as the backend calls it."""
    return torch.ops.pyquant.triton_linear(x, pw.codes, pw.A, pw.b, pw.su, pw.sv, pw.w_scale, bias, pw.had_in,
                                           pw.had_out)


# ---------------------------------------------------------------------------- kernels one by one

def test_triton_helpers_are_called_by_their_own_names():
    """Inductor compiles a user kernel (triton_op + wrap_triton) by re-emitting the source of every
    jit helper the kernel names, under the helper's ``def`` name: a helper reached through an alias
    is undefined there (an H200 run failed with NameError 'sum_combine is not defined')."""
    import importlib
    import pkgutil

    import pyquant.triton_kernels as package

    def python_fn(obj):  # JITFunction (compiled mode) or InterpretedFunction: both wrap .fn
        fn = getattr(obj, "fn", None)
        return fn if type(obj).__module__.startswith("triton") and callable(fn) else None

    kernels_seen, aliases = 0, []
    for info in pkgutil.iter_modules(package.__path__):
        module = importlib.import_module(f"{package.__name__}.{info.name}")
        for kernel_name, obj in vars(module).items():
            fn = python_fn(obj)
            if fn is None or fn.__module__ != module.__name__:
                continue
            kernels_seen += 1
            for name in fn.__code__.co_names:
                helper = python_fn(fn.__globals__.get(name))
                if helper is not None and helper.__name__ != name:
                    aliases.append(f"{info.name}.{kernel_name} calls {helper.__name__} as {name}")
    assert kernels_seen >= 5
    assert aliases == []


@pytest.mark.parametrize("k,had", [(100, 0), (100, 1), (100, 4), (96, 32), (24, 8)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_triton_input_transform(k, had, dtype):
    pw = make_weight(8, k, had_in=had)
    x = randn(3, k, dtype)
    xt, cpart = input_transform(x, pw.su, pw.A, pw.b, had)
    ref_xt, ref_const = transform_activations(x.cpu().float(), pw.to("cpu"))
    assert rel_err(xt, ref_xt) < 1e-6
    assert rel_err(cpart.sum(1), ref_const) < 1e-6
    xp, none = input_transform(x, pw.su, pw.A, pw.b, had, apply_a=False, out_dtype=torch.float32)
    assert none is None
    ref_xp = blockwise_hadamard(x.cpu().double() * pw.su.cpu().double(), had)
    assert rel_err(xp, ref_xp) < 1e-6


def test_triton_input_transform_largest_block():
    # had_in = 4096 is the largest block supports() accepts: it must be exact too.
    k = 4096
    pw = make_weight(4, k, had_in=k)
    x = randn(1, k)
    xt, cpart = input_transform(x, pw.su, pw.A, pw.b, k)
    ref_xt, ref_const = transform_activations(x.cpu(), pw.to("cpu"))
    assert rel_err(xt, ref_xt) < 1e-5
    assert rel_err(cpart.sum(1), ref_const) < 1e-5


@pytest.mark.parametrize("n,had", [(37, 0), (64, 16), (2048, 2048)])
@pytest.mark.parametrize("with_const", [True, False])
def test_triton_output_transform(n, had, with_const):
    g = torch.Generator().manual_seed(3)
    part = torch.randn(3, 2, n, generator=g).to(DEVICE)
    sv = (torch.rand(n, generator=g) + 0.5).to(DEVICE)
    bias = torch.randn(n, generator=g).to(DEVICE)
    cpart = torch.randn(2, 5, generator=g).to(DEVICE) if with_const else None
    ws = torch.tensor(0.25, device=DEVICE)
    y = output_transform(part, sv, bias, had, torch.float32, cpart=cpart, w_scale=ws if with_const else None)
    y_rot = part.double().sum(0)
    if with_const:
        y_rot = 0.25 * (y_rot + cpart.double().sum(1, keepdim=True))
    ref = blockwise_hadamard(y_rot.cpu(), had) * sv.double().cpu() + bias.double().cpu()
    assert rel_err(y, ref) < 1e-6


# The tl.dot GEMV splits xt into two halves of the operand dtype: fp16 halves in
# the interpreter (~22 mantissa bits), bf16 halves on a GPU (~16 bits).
GEMV_TOL = 1e-5 if interpreted() else 1e-4

GEMV_CONFIGS = [
    GemvConfig(block_n=16, block_k=64, split_k=1),
    GemvConfig(block_n=16, block_k=64, split_k=3),  # K4=25 not a multiple of the K step: masking
    GemvConfig(block_n=32, block_k=64, split_k=2, use_dot=True),
]


@pytest.mark.parametrize("m", [1, 3, 8, 16])
@pytest.mark.parametrize("cfg", GEMV_CONFIGS, ids=lambda c: f"{'dot' if c.use_dot else 'fma'}-split{c.split_k}")
@pytest.mark.parametrize("deterministic", [True, False], ids=["det", "atomic"])
def test_triton_gemv_partials(m, cfg, deterministic):
    n, k = 37, 100
    pw = make_weight(n, k)
    xt = randn(m, k, seed=m)
    part = gemv_partials(xt, pw.codes, cfg, deterministic, torch.float16 if interpreted() else torch.bfloat16)
    _, n_split = split_layout(k // 4, cfg)
    if deterministic or n_split == 1:
        assert part.shape == (n_split, m, n)
        y = part.sum(0)
    else:
        assert part.shape == (m, n)
        y = part
    ref = xt.cpu().double() @ unpack_codes(pw.codes.cpu()).double().T
    assert rel_err(y, ref) < GEMV_TOL


@pytest.mark.parametrize("m", [1, 5, 16])
@pytest.mark.parametrize("had_out,use_dot", [(0, False), (16, False), (32, True)], ids=["nohad", "had16", "had32-dot"])
@pytest.mark.parametrize("with_bias", [True, False], ids=["bias", "nobias"])
def test_triton_gemv_fused_output(m, had_out, use_dot, with_bias):
    n, k = (37 if had_out == 0 else 64), 100
    pw = make_weight(n, k, had_in=4, had_out=had_out)
    bias = randn(1, n, seed=7)[0] if with_bias else None
    x = randn(m, k, seed=m)
    cfg = GemvConfig(block_n=32, block_k=512, split_k=1, use_dot=use_dot)
    assert fuses_output(k // 4, had_out, cfg)
    y = tb.run_gemv(x, pw, bias, cfg, deterministic=True)
    ref = reference(x.cpu(), pw.to("cpu"), None if bias is None else bias.cpu())
    assert rel_err(y, ref) < GEMV_TOL
    with pytest.raises(ValueError, match="one K split"):
        xt, cpart = input_transform(x, pw.su, pw.A, pw.b, 4)
        gemv_fused(xt, cpart, pw.codes, pw.w_scale, pw.sv, bias, had_out, torch.float32,
                   dataclasses.replace(cfg, block_k=64, split_k=2))


@pytest.mark.parametrize("m", [17, 40])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("had_out,block_n", [(0, 16), (16, 32), (64, 64), (64, 16)],
                         ids=["nohad", "fused16", "fused64", "unfused64"])
@pytest.mark.parametrize("with_bias", [True, False], ids=["bias", "nobias"])
def test_triton_gemm_dequant(m, dtype, had_out, block_n, with_bias):
    n, k = (37 if had_out == 0 else 64), 100
    pw = make_weight(n, k, had_out=had_out)
    bias = randn(1, n, seed=7)[0] if with_bias else None
    xp = randn(m, k, dtype)  # the transformed activations (su = 1, no H_in here)
    cfg = GemmConfig(block_m=16, block_n=block_n, block_k=32)
    y, finished = gemm_dequant(xp, pw.codes, pw.A, pw.b, pw.w_scale, pw.sv, bias, had_out, dtype, cfg)
    assert finished == (had_out <= block_n)
    if not finished:
        assert y.dtype == torch.float32
        y = output_transform(y, pw.sv, bias, had_out, dtype)
    assert y.dtype == dtype
    cpu = pw.to("cpu")
    y_rot = xp.cpu().double() @ dequantize_rotated(cpu).double().T
    ref = blockwise_hadamard(y_rot, had_out) * cpu.sv.double()
    if bias is not None:
        ref += bias.cpu().double()
    assert rel_err(y, ref) < 1e-3


# ---------------------------------------------------------------------------- the backend end to end

SHAPES = {"odd-N": (37, 100, 4, 0), "hadamard": (64, 96, 32, 64), "plain": (48, 64, 0, 0)}


@pytest.mark.parametrize("m", [1, 2, 5, 16, 17, 64])
@pytest.mark.parametrize("shape", list(SHAPES), ids=list(SHAPES))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("with_bias", [True, False], ids=["bias", "nobias"])
def test_triton_linear_matches_reference(m, shape, dtype, with_bias):
    n, k, had_in, had_out = SHAPES[shape]
    pw = make_weight(n, k, had_in, had_out, scale_dtype=torch.float16 if dtype == torch.float16 else torch.float32)
    bias = randn(1, n, dtype, seed=5)[0] if with_bias else None
    x = randn(m, k, dtype, seed=m)
    y = triton_linear(x, pw, bias)
    assert y.shape == (m, n) and y.dtype == dtype and y.device == x.device
    ref = reference(x.cpu(), pw.to("cpu"), None if bias is None else bias.cpu())
    assert rel_err(y, ref) < 1e-3


@pytest.mark.parametrize("m", [1, 16, 40])
def test_triton_linear_bf16(m):
    # bf16 in, bf16 out; in the interpreter the arithmetic runs in fp32.
    pw = make_weight(64, 96, 32, 64)
    x = randn(m, 96, torch.bfloat16)
    y = triton_linear(x, pw)
    ref = reference(x.cpu(), pw.to("cpu"), None)
    assert y.dtype == torch.bfloat16
    assert rel_err(y, ref) < tolerance(torch.bfloat16, ref)


@pytest.mark.parametrize("m", [1, 4, 16])
def test_triton_reductions_deterministic_and_atomic(m, monkeypatch):
    pw = make_weight(37, 512, 128, 0)
    x = randn(m, 512)
    cfg = dataclasses.replace(GEMV_CONFIGS[0], split_k=4)
    assert split_layout(128, cfg)[1] == 4  # really four partial sums to reduce
    det1 = tb.run_gemv(x, pw, None, cfg, deterministic=True)
    det2 = tb.run_gemv(x, pw, None, cfg, deterministic=True)
    assert torch.equal(det1, det2)  # bit-identical between runs
    atomic = tb.run_gemv(x, pw, None, cfg, deterministic=False)
    ref = reference(x.cpu(), pw.to("cpu"), None)
    assert rel_err(det1, ref) < GEMV_TOL and rel_err(atomic, ref) < GEMV_TOL
    # The switch reaches the kernels; deterministic algorithms override it.
    try:
        tb.set_reduction("atomic")
        assert tb.reduction() == "atomic"
        assert rel_err(triton_linear(x, pw), ref) < GEMV_TOL
        torch.use_deterministic_algorithms(True)
        try:
            assert tb.reduction() == "deterministic"
        finally:
            torch.use_deterministic_algorithms(False)
    finally:
        tb.set_reduction("deterministic")
    with pytest.raises(ValueError, match="mode"):
        tb.set_reduction("sometimes")


def test_triton_quantlinear_forward_uses_triton():
    pw = make_weight(37, 100, 4, 0)
    bias = randn(1, 37, seed=9)[0]
    layer = QuantLinear.from_packed(pw, bias)
    x = randn(6, 100).reshape(2, 3, 100)
    with kernels.force_backend("triton"):
        y = layer(x)
    assert layer.last_backend == "triton"
    ref = reference(x.reshape(6, 100).cpu(), pw.to("cpu"), bias.cpu()).reshape(2, 3, 37)
    assert rel_err(y, ref) < 1e-3
    with kernels.force_backend("triton"):
        assert kernels.explain(x.reshape(6, 100), pw)["triton"] == "selected"


def test_triton_zero_tokens():
    pw = make_weight(37, 100)
    y = triton_linear(randn(0, 100), pw)
    assert y.shape == (0, 37)


# ---------------------------------------------------------------------------- supports() and errors

def test_triton_supports_reasons(monkeypatch):
    layer = QuantLinear.from_packed(make_weight(16, 64))
    assert tb.available()
    assert tb.supports(layer, torch.float32, False) is None
    assert tb.supports(layer, torch.float32, True) is None  # the op has a gradient
    assert "dtype" in tb.supports(layer, torch.float64, False)
    assert "dtype" in tb.supports(layer, torch.int32, False)
    big = QuantLinear.from_packed(make_weight(4, 8192, had_in=8192))
    assert "had_in=8192" in tb.supports(big, torch.float32, False)
    if not HAS_CUDA:
        monkeypatch.delenv("TRITON_INTERPRET")
        assert not tb.available()
        assert "TRITON_INTERPRET" in tb.supports(layer, torch.float32, False)
        # The dispatcher then falls back instead of failing.
        layer.invalidate()
        layer(randn(2, 64))
        assert layer.last_backend != "triton"


@pytest.mark.parametrize("bad,exc,match", [
    (lambda x, b: (x[:, :60].contiguous(), b), ValueError, r"shape \[M, 64\]"),
    (lambda x, b: (x.reshape(2, 2, 64), b), ValueError, r"shape \[M, 64\]"),
    (lambda x, b: (torch.cat([x, x], 1)[:, ::2], b), ValueError, "contiguous"),
    (lambda x, b: (x.to(torch.int64), b), TypeError, "float32, bfloat16 or float16"),
    (lambda x, b: (x, b[:5]), ValueError, "bias must have shape"),
])
def test_triton_bad_input_raises(bad, exc, match):
    pw = make_weight(16, 64)
    x, bias = bad(randn(4, 64), randn(1, 16)[0])
    with pytest.raises(exc, match=match):
        triton_linear(x, pw, bias)


def test_triton_invalid_weight_raises():
    pw = make_weight(16, 64)
    pw.had_in = 48  # not a power of two
    with pytest.raises(ValueError, match="had_in"):
        triton_linear(randn(1, 64), pw)


def test_triton_op_gradients_match_the_reference():
    pw = make_weight(24, 64, had_in=16, had_out=8)
    params = {name: getattr(pw, name).clone().requires_grad_(True) for name in ("A", "b", "su", "sv", "w_scale")}
    bias = randn(1, 24, seed=3)[0].requires_grad_(True)
    x = randn(5, 64).requires_grad_(True)
    live = PackedWeight(pw.codes, **params, had_in=pw.had_in, had_out=pw.had_out)
    y = triton_linear(x, live, bias)
    g = randn(5, 24, seed=4)
    got = torch.autograd.grad((y * g).sum(), [x, bias, *params.values()])
    ref_y = F.linear(x, dequantize(live), bias)
    want = torch.autograd.grad((ref_y * g).sum(), [x, bias, *params.values()])
    for name, a, b in zip(["x", "bias", *params], got, want):
        assert rel_err(a, b) < 1e-4, name


# ---------------------------------------------------------------------------- autotune

class FakeBench:
    """Stands in for do_bench: a fixed time per config, and a record of what was timed."""

    def __init__(self, times: dict):
        self.times, self.ran, self.timed = times, [], []

    def run(self, cfg):
        self.ran.append(cfg)

    def __call__(self, fn):
        fn()
        self.timed.append(self.ran[-1])
        return self.times[self.ran[-1]]


def test_triton_autotune_cache_roundtrip(tmp_path):
    path = tmp_path / "NVIDIA_Test_GPU.json"
    gemv = {GemvConfig(block_n=16): 3.0, GemvConfig(block_n=32): 1.0, GemvConfig(block_n=64): 2.0}
    fake = FakeBench(gemv)
    tuner = autotune.Autotuner(path, bench=fake)
    best = tuner.choose("gemv", "N=37|K=100|M=1", list(gemv), fake.run)
    assert best == GemvConfig(block_n=32) and tuner.tunings == 1
    assert sorted(c.block_n for c in fake.timed) == [16, 32, 64]
    assert json.loads(path.read_text()) == {"gemv|N=37|K=100|M=1": dataclasses.asdict(GemvConfig(block_n=32))}
    # A second process (a fresh tuner on the same file) reuses the choice without timing.
    fake.timed.clear()
    again = autotune.Autotuner(path, bench=fake)
    assert again.choose("gemv", "N=37|K=100|M=1", list(gemv), fake.run) == best
    assert fake.timed == [] and again.tunings == 0
    # A new key is tuned and merged into the same file.
    gemm = {c: float(10 - i) for i, c in enumerate(autotune.gemm_space(64))}
    again.bench = FakeBench(gemm)
    assert again.choose("gemm", "N=37|K=100|M=64", list(gemm), again.bench.run) == list(gemm)[-1]
    assert set(json.loads(path.read_text())) == {"gemv|N=37|K=100|M=1", "gemm|N=37|K=100|M=64"}
    assert autotune.Autotuner(path).lookup("gemm", "N=37|K=100|M=64") == list(gemm)[-1]


def test_triton_autotune_cache_survives_bad_files(tmp_path):
    path = tmp_path / "gpu.json"
    path.write_text("{not json")
    tuner = autotune.Autotuner(path, bench=lambda fn: 1.0)
    assert tuner.choose("gemv", "k", [GemvConfig()], lambda c: None) == GemvConfig()
    assert tuner.tunings == 1 and "gemv|k" in json.loads(path.read_text())
    # An entry from an incompatible config version is ignored and re-tuned.
    path.write_text(json.dumps({"gemv|k": {"block_n": 32, "retired_field": 1}}))
    tuner = autotune.Autotuner(path, bench=lambda fn: 1.0)
    assert tuner.choose("gemv", "k", [GemvConfig(block_n=64)], lambda c: None) == GemvConfig(block_n=64)
    # Failing candidates are skipped; all failing is an error.
    def run(cfg):
        if cfg.block_n == 16:
            raise RuntimeError("out of resources")
    tuner = autotune.Autotuner(tmp_path / "other.json", bench=lambda fn: 1.0)
    assert tuner.choose("gemv", "k", [GemvConfig(block_n=16), GemvConfig(block_n=32)], run).block_n == 32
    with pytest.raises(RuntimeError, match="every candidate"):
        tuner.choose("gemv", "k2", [GemvConfig(block_n=16)], run)


def test_triton_autotune_paths_and_spaces(monkeypatch, tmp_path):
    monkeypatch.setenv("PYQUANT_TRITON_CACHE_DIR", str(tmp_path))
    assert autotune.tuner_for("NVIDIA H100 80GB HBM3").path == tmp_path / "NVIDIA_H100_80GB_HBM3.json"
    monkeypatch.delenv("PYQUANT_TRITON_CACHE_DIR")
    assert autotune.cache_dir() == autotune.Path.home() / ".cache" / "pyquant" / "triton"
    assert [autotune.m_bucket(m) for m in (1, 3, 16, 17, 500, 4096)] == [1, 4, 16, 32, 512, 512]
    for bucket in (1, 2, 4, 8, 16):
        space = autotune.gemv_space(bucket)
        assert space and all(c.use_dot or c.block_n * c.block_k * bucket <= 2048 * c.num_warps for c in space)
        splits = autotune.with_splits(space, 8192, 7168, 132)
        assert all(c.split_k >= 1 for c in splits) and len(splits) >= len(space)
    for bucket in (32, 64, 128, 512):
        assert autotune.gemm_space(bucket)
    # Few output blocks on many SMs: split K; many blocks: don't.
    cfg = GemvConfig(block_n=32, block_k=256)
    assert autotune.heuristic_split(4096, 1024, cfg, 132) > 1
    assert autotune.heuristic_split(28672, 2048, cfg, 132) == 1
    with pytest.raises(ValueError, match="block_n"):
        GemvConfig(block_n=24)
    with pytest.raises(ValueError, match="split_k"):
        GemvConfig(split_k=0)
    with pytest.raises(ValueError, match="block_k"):
        GemmConfig(block_k=8)


@pytest.mark.skipif(HAS_CUDA, reason="about the CPU interpreter")
def test_triton_interpreter_works_when_triton_was_imported_first():
    """torch._dynamo (pulled in by other backends) imports triton before any test can set
    TRITON_INTERPRET=1; kernels decorated afterwards must still run in the interpreter."""
    code = (
        "import os, torch, triton\n"
        "os.environ['TRITON_INTERPRET'] = '1'\n"
        "from pyquant.backends import triton as tb\n"
        "from pyquant.triton_kernels.gemv_splitk import GemvConfig\n"
        "from pyquant.triton_kernels.gemm_dequant import GemmConfig\n"
        "from pyquant.format import PackedWeight, dequantize\n"
        "g = torch.Generator().manual_seed(0)\n"
        "pw = PackedWeight(torch.randint(0, 256, (37, 25), dtype=torch.uint8, generator=g), torch.randn(4, 4, generator=g),\n"
        "    torch.randn(4, generator=g), torch.randn(100, generator=g), torch.randn(37, generator=g), torch.tensor(0.1), had_in=4)\n"
        "for m, run in ((3, lambda x: tb.run_gemv(x, pw, None, GemvConfig(16, 64, 2), True)),\n"
        "               (20, lambda x: tb.run_gemm(x, pw, None, GemmConfig(16, 16, 32)))):\n"
        "    x = torch.randn(m, 100, generator=g)\n"
        "    ref = x.double() @ dequantize(pw).double().T\n"
        "    err = ((run(x).double() - ref).norm() / ref.norm()).item()\n"
        "    assert err < 1e-5, err\n"
        "print('ok')\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    proc = subprocess.run([sys.executable, "-c", code], cwd=root, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stdout[-2000:] + proc.stderr[-3000:]


# ---------------------------------------------------------------------------- GPU compile check

def _ptxas_present() -> bool:
    import pathlib

    import triton as _t

    return (pathlib.Path(_t.__file__).parent / "backends" / "nvidia" / "bin" / "ptxas").exists()


@pytest.mark.skipif(not _ptxas_present(), reason="this triton install has no NVIDIA backend (ptxas)")
def test_triton_kernels_compile_for_sm90():
    """Lower a few variants of every kernel to sm_90 cubins: catches GPU-only compile errors without a GPU."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    proc = subprocess.run([sys.executable, "-m", "pyquant.triton_kernels.aot_check", "--quick", "--arch", "90"],
                          cwd=root, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "0 failure(s)" in proc.stdout


# ---------------------------------------------------------------------------- GPU only

GPU_BATCHES = [1, 4, 8, 16, 32, 64, 128, 512]


@cuda_only
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("n,k", [(4096, 4096), (1376, 2048)])
def test_cuda_triton_linear_large(dtype, n, k):
    pw = make_weight(n, k, had_in=128, had_out=32, scale_dtype=torch.float16)
    bias = randn(1, n, dtype, seed=5)[0]
    w = dequantize(pw).double()
    for m in GPU_BATCHES:
        x = randn(m, k, dtype, seed=m)
        y = triton_linear(x, pw, bias)
        ref = F.linear(x.double(), w, bias.double())
        assert y.dtype == dtype
        assert rel_err(y, ref) < tolerance(dtype, ref), f"batch {m}"


@cuda_only
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32], ids=["fp16", "bf16", "fp32"])
def test_cuda_triton_every_tuning_candidate(dtype):
    """Autotuning may pick any config of the spaces: each one must be right on this GPU."""
    from triton.runtime.errors import OutOfResources

    n, k = 1024, 2048
    pw = make_weight(n, k, had_in=128, had_out=128)
    w = dequantize(pw).double()
    _, sms = tb._device_info(torch.device(DEVICE))

    def check(run, what):
        # A config this GPU cannot launch (shared memory) is one the tuner skips too.
        try:
            y = run()
        except OutOfResources:
            return 0
        assert rel_err(y, ref) < tolerance(dtype, ref), what
        return 1

    for bucket in (1, 2, 4, 8, 16):
        x = randn(bucket, k, dtype, seed=bucket)
        ref = F.linear(x.double(), w)
        ran = sum(check(lambda: tb.run_gemv(x, pw, None, cfg, det), (bucket, cfg, det))
                  for cfg in autotune.with_splits(autotune.gemv_space(bucket), n, k // 4, sms) for det in (True, False))
        assert ran > 0
    for bucket in (32, 64, 128, 512):
        x = randn(bucket, k, dtype, seed=bucket)
        ref = F.linear(x.double(), w)
        assert sum(check(lambda: tb.run_gemm(x, pw, None, cfg), (bucket, cfg)) for cfg in autotune.gemm_space(bucket))


@cuda_only
def test_cuda_triton_deterministic_bitwise():
    pw = make_weight(4096, 4096, had_in=128, had_out=128)
    for m in (1, 4, 16):
        x = randn(m, 4096, torch.float16, seed=m)
        outs = [triton_linear(x, pw) for _ in range(3)]
        assert all(torch.equal(outs[0], o) for o in outs[1:])


@cuda_only
def test_cuda_triton_autotune_writes_and_reuses_disk_cache(monkeypatch, tmp_path):
    monkeypatch.setenv("PYQUANT_TRITON_AUTOTUNE", "1")
    monkeypatch.setenv("PYQUANT_TRITON_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(autotune, "_tuners", {})
    pw = make_weight(2048, 2048, had_in=128, had_out=128)
    layer = QuantLinear.from_packed(pw)
    for m in (1, 64):  # the forward never tunes
        triton_linear(randn(m, 2048, torch.float16), pw)
    gpu = torch.cuda.get_device_name()
    assert autotune.tuner_for(gpu).tunings == 0
    assert kernels.tune(layer, batch_sizes=(1, 64)) == 2
    tuner = autotune.tuner_for(gpu)
    cached = json.loads(tuner.path.read_text())
    assert tuner.path.name == autotune.sanitize(gpu) + ".json" and len(cached) == 2
    # A new process: fresh tuners; the forward finds the tuned configs, tuning again times nothing.
    monkeypatch.setattr(autotune, "_tuners", {})
    for m in (1, 64):
        x = randn(m, 2048, torch.float16)
        y = triton_linear(x, pw)
        assert rel_err(y, reference(x, pw, None)) < 1e-3
    assert kernels.tune(layer, batch_sizes=(1, 64)) == 0
    assert autotune.tuner_for(gpu).lookup("gemv", tb._gemv_key(1, 2048, 2048, torch.float16, True)) is not None


@cuda_only
def test_cuda_triton_op_compiles_fullgraph_and_trains():
    """Inductor sees the Triton kernels (triton_op + wrap_triton); the op's gradient runs on the GPU."""
    layer = QuantLinear.from_packed(make_weight(512, 256, had_in=128, had_out=128), randn(1, 512)[0])
    compiled = torch.compile(layer, fullgraph=True)
    with kernels.force_backend("triton"), torch.no_grad():
        for m in (3, 40):
            x = randn(m, 256, torch.float16, seed=m)
            assert rel_err(compiled(x), layer(x)) < 1e-3
            assert layer.last_backend == "triton"
    x = randn(5, 256, seed=7).requires_grad_(True)
    layer(x).sum().backward()  # needs grad: the CUDA op has no backward, Triton runs
    assert layer.last_backend == "triton"
    xr = x.detach().cpu().requires_grad_(True)
    F.linear(xr, dequantize(layer.packed.to("cpu")), layer.bias.detach().cpu()).sum().backward()
    assert rel_err(x.grad, xr.grad) < 1e-4
