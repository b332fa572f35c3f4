import sys
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import pyquant
from pyquant import kernels

from conftest import random_packed, rel_err, status_mib

# (backend, C++ CPU mode, tolerance). The fp32 paths (torch reference, C++ "float" mode) must match
# dense dequantize + F.linear to 1e-5; the C++ default "int" mode rounds the transformed activations
# to 16-bit fixed point (measured 3e-5..1e-4), so it gets its own, still tight, bound.
PATHS = [("torch", None, 1e-5)]
if "cpu" in kernels.available_backends():
    PATHS += [("cpu", "float", 1e-5), ("cpu", "int", 3e-4)]


@pytest.mark.parametrize("backend,mode,tol", PATHS, ids=[f"{b}-{m}" for b, m, _ in PATHS])
@pytest.mark.parametrize("k", [384, 1536, 4096])
@pytest.mark.parametrize("hadamard", [True, False])
@pytest.mark.parametrize("bias", [True, False])
def test_forward_equals_dequantize_linear(backend, mode, tol, k, hadamard, bias, cpu_mode):
    if mode is not None:
        cpu_mode(mode)
    n = 97 if k == 4096 else 131  # odd N
    pw = random_packed(n, k, hadamard=hadamard, seed=k + hadamard)
    layer = pyquant.QuantLinear.from_packed(pw, torch.randn(n) if bias else None)
    dense = layer.dequantize()
    for x in (torch.randn(7, k), torch.randn(2, 3, k)):  # 2-D and 3-D
        with kernels.force_backend(backend):
            y = layer(x)
        assert layer.last_backend == backend
        assert y.shape == (*x.shape[:-1], n) and y.dtype == torch.float32
        ref = F.linear(x.double(), dense.weight.double(), None if dense.bias is None else dense.bias.double())
        assert rel_err(y, ref) < tol


def test_from_linear_rtn_is_a_good_approximation():
    torch.manual_seed(0)
    lin = nn.Linear(256, 64)
    q = pyquant.QuantLinear.from_linear(lin, pyquant.RTNConfig(hadamard=False))
    # uniform weights on a uniform 4-level grid: relative error about 1/(2*sqrt(3)*1.5) ~ 0.2-0.3
    assert rel_err(q.dequantize().weight, lin.weight) < 0.3
    assert torch.equal(q.bias, lin.bias)
    back = q.dequantize()
    assert isinstance(back, nn.Linear) and back.weight.shape == lin.weight.shape


def test_hadamard_rtn_beats_plain_rtn_on_real_weights(minilm):
    model, _ = minilm
    for name in ("encoder.layer.0.attention.self.query", "encoder.layer.3.intermediate.dense",
                 "encoder.layer.5.output.dense"):
        lin = model.get_submodule(name)
        errs = [rel_err(pyquant.QuantLinear.from_linear(lin, pyquant.RTNConfig(hadamard=h)).dequantize().weight,
                        lin.weight) for h in (True, False)]
        assert errs[0] < errs[1], (name, errs)


def test_last_backend_and_explain():
    layer = pyquant.QuantLinear.from_packed(random_packed(8, 16))
    x = torch.randn(2, 16)
    layer(x)
    info = kernels.explain(x, layer.packed)
    assert info[layer.last_backend] == "selected"
    assert info["torch"] in ("selected", "usable")
    with kernels.force_backend("torch"):
        layer(x)
        assert layer.last_backend == "torch" and layer.last_backend_reason == "forced"
    with pytest.raises(ValueError, match="backend"):
        with kernels.force_backend("tpu"):
            pass


def test_forced_backend_that_cannot_run_raises():
    layer = pyquant.QuantLinear.from_packed(random_packed(8, 16))
    with kernels.force_backend("cuda"):  # no CUDA here
        for _ in range(2):  # not cached: every call says so
            with pytest.raises(ValueError, match="cuda"):
                layer(torch.randn(2, 16))
    assert layer(torch.randn(2, 16)).shape == (2, 8)


def test_pyquant_backend_env_is_read_at_import():
    import subprocess
    import sys

    code = "import pyquant"
    env = {**__import__("os").environ, "PYQUANT_BACKEND": "bogus"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert out.returncode != 0 and "PYQUANT_BACKEND" in out.stderr
    env["PYQUANT_BACKEND"] = "torch"
    code = ("import torch, pyquant; l = pyquant.QuantLinear(16, 8); l(torch.randn(1, 16)); "
            "assert l.last_backend == 'torch', l.last_backend")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr


# ---- bad input ------------------------------------------------------------
def test_from_linear_rejects_in_features_not_divisible_by_4():
    with pytest.raises(ValueError, match="in_features"):
        pyquant.QuantLinear.from_linear(nn.Linear(10, 8))


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_from_linear_rejects_non_finite_weights(bad):
    lin = nn.Linear(8, 4)
    with torch.no_grad():
        lin.weight[1, 2] = bad
    with pytest.raises(ValueError, match="NaN or Inf"):
        pyquant.QuantLinear.from_linear(lin)


def test_from_linear_rejects_wrong_types():
    with pytest.raises(TypeError, match="nn.Linear"):
        pyquant.QuantLinear.from_linear(nn.Conv1d(4, 4, 1))
    with pytest.raises(TypeError, match="QuantConfig"):
        pyquant.QuantLinear.from_linear(nn.Linear(8, 4), config="rtn")
    with pytest.raises(ValueError, match="bits"):
        pyquant.RTNConfig(bits=3)


def test_forward_rejects_bad_inputs():
    layer = pyquant.QuantLinear.from_packed(random_packed(8, 16))
    with pytest.raises(TypeError, match="dtype"):
        layer(torch.ones(2, 16, dtype=torch.int32))
    with pytest.raises(TypeError, match="dtype"):
        layer(torch.ones(2, 16, dtype=torch.float64))
    with pytest.raises(ValueError, match=r"\[\.\.\., 16\]"):
        layer(torch.ones(2, 12))
    with pytest.raises(ValueError, match="is on meta"):
        layer(torch.ones(2, 16, device="meta"))
    with pytest.raises(TypeError, match="torch.Tensor"):
        layer([1.0] * 16)


def test_bf16_and_fp16_inputs_keep_their_dtype():
    layer = pyquant.QuantLinear.from_packed(random_packed(24, 64))
    x = torch.randn(3, 64)
    ref = layer(x)
    for dt in (torch.bfloat16, torch.float16):
        y = layer(x.to(dt))
        assert y.dtype == dt and rel_err(y.float(), ref) < 2e-2


def test_non_contiguous_input():
    layer = pyquant.QuantLinear.from_packed(random_packed(24, 64))
    x = torch.randn(64, 6).T  # non-contiguous [6, 64]
    assert not x.is_contiguous()
    assert rel_err(layer(x), layer(x.contiguous())) == 0.0


def test_deepcopy_and_pickle_rebuild_the_kernel_plan():
    import copy
    import io

    layer = pyquant.QuantLinear.from_packed(random_packed(40, 384, hadamard=True, seed=2), torch.randn(40))
    x = torch.randn(3, 384)
    want = layer(x)
    buf = io.BytesIO()
    torch.save(layer, buf)
    buf.seek(0)
    for other in (copy.deepcopy(layer), torch.load(buf, weights_only=False)):
        assert other.codes.data_ptr() != layer.codes.data_ptr()
        assert torch.equal(other(x), want)


@pytest.mark.skipif(sys.platform != "linux" or "cpu" not in kernels.available_backends(),
                    reason="transparent huge pages are Linux's; the C++ CPU backend places the codes")
def test_large_codes_move_into_huge_pages_once_and_stay_correct(cpu_mode):
    cpu_mode("int")  # int mode moves the codes themselves (lut mode: their LUT layout)
    from pyquant import _C

    pw = random_packed(2048, 4096, hadamard=True, seed=5)  # 2 MiB of codes: the threshold
    small = pyquant.QuantLinear.from_packed(random_packed(40, 384, hadamard=True, seed=2))
    assert not _C.is_in_huge_pages(small.codes)
    layer = pyquant.QuantLinear.from_packed(pw)
    assert _C.is_in_huge_pages(layer.codes) and layer.codes.data_ptr() % (2 << 20) == 0
    assert torch.equal(layer.codes, pw.codes)
    placed = layer.codes.data_ptr()
    layer.invalidate()  # already there: not copied again
    assert layer.codes.data_ptr() == placed
    x = torch.randn(2, 4096)
    assert rel_err(layer(x), F.linear(x, layer.dequantize().weight)) < 3e-4
    # built under inference_mode, the codes are still a plain tensor (a backward can save them)
    with torch.inference_mode():
        inferred = pyquant.QuantLinear.from_packed(pw)
    assert _C.is_in_huge_pages(inferred.codes) and not inferred.codes.is_inference()
    # a state dict loads into the placed memory, and what it saves reads back the same
    layer.load_state_dict(pyquant.QuantLinear.from_packed(random_packed(2048, 4096, hadamard=True, seed=6)).state_dict())
    assert layer.codes.data_ptr() == placed
    # a layer sharing a serving engine's tensors keeps them
    shared = pyquant.QuantLinear.from_packed(pw, share=True)
    assert shared.codes.data_ptr() == pw.codes.data_ptr() and not _C.is_in_huge_pages(shared.codes)


@pytest.mark.skipif(sys.platform != "linux" or "cpu" not in kernels.available_backends(),
                    reason="MADV_PAGEOUT is Linux's")
def test_paging_out_loses_nothing(tmp_path):
    from pyquant import _C

    path = tmp_path / "bytes.bin"
    data = torch.randint(0, 256, (4 << 20,), dtype=torch.uint8)
    data.numpy().tofile(path)
    mapped = torch.from_file(str(path), shared=False, size=data.numel(), dtype=torch.uint8)  # copy-on-write
    assert torch.equal(mapped, data)
    mapped[: 1 << 20].fill_(7)  # these pages are the process's own now, the rest the file's
    assert _C.page_out(mapped)
    assert torch.equal(mapped[: 1 << 20], torch.full((1 << 20,), 7, dtype=torch.uint8))
    assert torch.equal(mapped[1 << 20:], data[1 << 20:])
    # anonymous memory, torch's or the 2 MB pages the kernels stream: left alone
    assert not _C.page_out(torch.zeros(4 << 20, dtype=torch.uint8))
    assert not _C.page_out(_C.zeros_in_huge_pages([4 << 20], torch.uint8))


@pytest.mark.skipif(sys.platform != "linux" or "cpu" not in kernels.available_backends(),
                    reason="resident memory as Linux reports it; the C++ CPU backend places the codes")
@pytest.mark.parametrize("mode", ["int", "lut"])
def test_layers_take_the_memory_of_their_codes_once_loaded(cpu_mode, mode):
    # A new layer's zero codes (and their LUT layout) are pages never written: a skeleton costs no
    # memory until it loads. Loaded, a layer holds its codes once (mode lut: plus their LUT
    # layout), not also the heap blocks of the zeros and copies its state was built from.
    cpu_mode(mode)
    from pyquant import _C

    if mode == "lut" and not _C.has_lut_kernel():
        pytest.skip("this CPU's kernel set has no table-lookup kernels")
    n, k, count = 4096, 4096, 8  # 4 MiB of codes a layer
    sources = [random_packed(n, k, seed=s) for s in range(count)]  # made before the baseline
    sources = [{name: getattr(pw, name) for name in ("codes", "A", "b", "su", "sv", "w_scale")} for pw in sources]
    codes_mib = count * n * k / 4 / 2**20
    before = status_mib("RssAnon")
    layers = [pyquant.QuantLinear(k, n, bias=False) for _ in range(count)]
    assert all(_C.is_in_huge_pages(q.codes) for q in layers)
    made = status_mib("RssAnon")
    assert made - before < 0.1 * codes_mib, f"{count} new layers took {made - before:.1f} MiB"
    for q, tensors in zip(layers, sources):
        q.load_state_dict(tensors)
    copies = 2 if mode == "lut" else 1
    loaded = status_mib("RssAnon")
    assert loaded - before < (copies + 0.1) * codes_mib, \
        f"{count} layers with {codes_mib:.0f} MiB of codes took {loaded - before:.1f} MiB ({mode})"
    x = torch.randn(1, k)
    with torch.no_grad():
        for q in layers:
            assert rel_err(q(x), F.linear(x, q.dequantize().weight)) < 1e-3
