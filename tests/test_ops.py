"""The op library (``torch.ops.pyquant``, pyquant/ops.py) as compilers, exporters and autograd use it.

- ``torch.library.opcheck`` on every CPU op (schema, fake, autograd registration, AOT dispatch);
- gradients of the input and of ``su``, ``sv``, ``A``, ``b``, ``w_scale``, bias against autograd
  through ``dequantize`` + ``F.linear``;
- ``torch._dynamo.explain`` / ``torch.compile(fullgraph=True)`` on the real MiniLM (RTN and
  UniSVQ) and on a small random Llama; ``torch.export`` of a model and of a reloaded checkpoint;
- clear errors under ``torch.compile``; a LoRA adapter trained on the 2-bit MiniLM.
"""
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import pyquant
from pyquant import kernels
from pyquant.format import codebook
from pyquant.hadamard import blockwise_hadamard
from pyquant.ops import _C

from conftest import random_packed, rel_err

TRAINABLE = ("A", "b", "su", "sv", "w_scale")


def op_args(layer, x):
    return (x, layer.codes, layer.A, layer.b, layer.su, layer.sv, layer.w_scale, layer.bias, layer.had_in,
            layer.had_out)


# ---------------------------------------------------------------------------- opcheck

@pytest.mark.parametrize("n,k,hadamard,bias,dtype", [(37, 384, True, True, torch.float32),
                                                     (64, 128, False, False, torch.float32),
                                                     (40, 256, True, False, torch.bfloat16)])
def test_opcheck_linear(n, k, hadamard, bias, dtype):
    layer = pyquant.QuantLinear.from_packed(random_packed(n, k, hadamard=hadamard, seed=n),
                                            torch.randn(n) if bias else None)
    for name in TRAINABLE:
        getattr(layer, name).requires_grad_(True)
    for m in (1, 40):
        x = torch.randn(m, k).to(dtype).requires_grad_(True)
        torch.library.opcheck(torch.ops.pyquant.linear.default, op_args(layer, x))


@pytest.mark.parametrize("mode", ["int", "float"])
def test_opcheck_cpu_linear(mode):
    layer = pyquant.QuantLinear.from_packed(random_packed(48, 256, seed=1), torch.randn(48))
    with torch.no_grad():
        for m in (2, 40):
            torch.library.opcheck(torch.ops.pyquant.cpu_linear.default, op_args(layer, torch.randn(m, 256)),
                                  {"mode": mode})


def test_every_registered_cpu_op_is_checked():
    """A new op in the library needs a test here (the CUDA and Triton ones run on a GPU)."""
    # the dispatcher's list (dir(torch.ops.pyquant) holds only the ops some earlier code touched)
    names = {n.split("::", 1)[1] for n in torch._C._dispatch_get_all_op_names() if n.startswith("pyquant::")}
    cpu_ops = {n for n in names if not n.startswith(("cuda_", "triton_"))}
    # (lut_linear and lut3_linear: opcheck in test_lut_mode.py and test_lut3_mode.py)
    assert cpu_ops == {"linear", "frozen_linear", "lut_linear", "lut3_linear", "cpu_linear", "linear_backward",
                       "nearest_codeword"}, names


# ---------------------------------------------------------------------------- frozen_linear

def frozen_args(layer, x):
    return (x, layer.codes, layer._plan.states["cpu"].params, layer.had_in, layer.had_out)


@pytest.mark.parametrize("n,k,hadamard,bias,dtype,scale_dtype", [(37, 384, True, True, torch.float32, torch.float16),
                                                                 (64, 128, False, False, torch.float32, torch.float32),
                                                                 (40, 256, True, False, torch.bfloat16, torch.float16),
                                                                 (48, 512, True, True, torch.float16, torch.float16)])
def test_frozen_linear_is_linear_on_the_layers_frozen_params(n, k, hadamard, bias, dtype, scale_dtype, cpu_mode):
    cpu_mode("int")  # int mode's ops and bits (the default is lut on AVX2 CPUs)
    layer = pyquant.QuantLinear.from_packed(random_packed(n, k, hadamard=hadamard, seed=n, scale_dtype=scale_dtype),
                                            torch.randn(n) if bias else None)
    assert layer._plan.states["cpu"].params.shape == (pyquant.ops.PARAMS_HEAD + k + n + (n if bias else 0),)
    with torch.no_grad():
        for m in (1, 3, 40):
            x = torch.randn(m, k).to(dtype)
            torch.library.opcheck(torch.ops.pyquant.frozen_linear.default, frozen_args(layer, x))
            want = torch.ops.pyquant.linear(*op_args(layer, x))
            assert torch.equal(torch.ops.pyquant.frozen_linear(*frozen_args(layer, x)), want)
            assert torch.equal(layer(x), want)


def test_traced_calls_without_gradients_take_frozen_linear_eager_calls_linear(cpu_mode):
    cpu_mode("int")  # int mode's ops and bits (the default is lut on AVX2 CPUs)
    from pyquant.backends import cpu as cpu_backend

    layer = pyquant.QuantLinear.from_packed(random_packed(24, 128, seed=5), torch.randn(24))
    assert layer._plan.choices[(torch.float32, False, None)].traced is cpu_backend.forward_traced
    assert layer._plan.choices[(torch.float32, True, None)].traced is cpu_backend.forward
    x = torch.randn(3, 128)
    graphs = []  # what Dynamo traces, through a backend that keeps it
    keep = lambda gm, _: (graphs.append(gm), gm)[1]  # noqa: E731
    with torch.no_grad():
        torch.compile(layer, backend=keep, fullgraph=True)(x)
    torch._dynamo.reset()
    torch.compile(layer, backend=keep, fullgraph=True)(x)  # the bias needs its gradient here
    torch._dynamo.reset()
    ops = [{n.target for n in g.graph.nodes if n.op == "call_function"} for g in graphs]
    assert torch.ops.pyquant.frozen_linear.default in ops[0] and torch.ops.pyquant.linear.default in ops[1], ops
    live = lambda: torch.ops.pyquant.linear(*op_args(layer, x)).detach()  # noqa: E731
    with torch.no_grad():
        before = layer(x)
        layer.A.mul_(2)  # changed in place: an eager call reads the tensors as they are
        assert torch.equal(layer(x), live()) and not torch.equal(layer(x), before)
    # an engine's shared tensors may be refilled in place at any time: no frozen copy of them
    shared = pyquant.QuantLinear.from_packed(random_packed(24, 128, seed=5), share=True)
    assert shared._plan.states["cpu"].params is None
    with torch.no_grad():
        assert torch.equal(torch.compile(shared, fullgraph=True)(x), torch.ops.pyquant.linear(*op_args(shared, x)))
    torch._dynamo.reset()


def test_a_compiled_graph_sees_in_place_changes_after_invalidate(cpu_mode):
    cpu_mode("int")  # int mode's ops and bits (the default is lut on AVX2 CPUs)
    layer = pyquant.QuantLinear.from_packed(random_packed(24, 128, seed=6), torch.randn(24))
    compiled = torch.compile(layer, fullgraph=True)
    x = torch.randn(3, 128)
    with torch.no_grad():
        assert torch.equal(compiled(x), layer(x))
        layer.A.mul_(2)
        layer.invalidate()
        assert torch.equal(compiled(x), torch.ops.pyquant.linear(*op_args(layer, x)))
    torch._dynamo.reset()


@pytest.mark.parametrize("bad,exc,match", [
    (dict(params=torch.zeros(10)), ValueError, r"params must be contiguous of shape \[456\] or \[496\]"),
    (dict(params=torch.zeros(457)), ValueError, r"params must be contiguous of shape \[456\] or \[496\]"),
    (dict(params=torch.zeros(2, 248)), ValueError, r"params must be contiguous of shape"),
    (dict(params=torch.zeros(456, dtype=torch.float64)), TypeError, "params must be (a )?float32"),
    (dict(x=torch.randn(3, 100)), ValueError, r"x must have shape \[M, 384\]"),
    (dict(had_in=3), ValueError, "had_in must be 0 or a power of two"),
])
def test_frozen_linear_rejects_bad_input_in_kernel_and_fake(bad, exc, match):
    layer = pyquant.QuantLinear.from_packed(random_packed(40, 384))
    args = dict(zip(("x", "codes", "params", "had_in", "had_out"), frozen_args(layer, torch.randn(3, 384))))
    args.update(bad)
    with pytest.raises(exc, match=match):
        torch.ops.pyquant.frozen_linear(**args)
    with torch._subclasses.FakeTensorMode(allow_non_fake_inputs=True), pytest.raises(exc, match=match):
        torch.ops.pyquant.frozen_linear(**args)


def test_frozen_linear_refuses_a_call_that_needs_a_gradient():
    layer = pyquant.QuantLinear.from_packed(random_packed(40, 384), torch.randn(40))
    x = torch.randn(3, 384, requires_grad=True)
    with pytest.raises(ValueError, match="frozen_linear has no gradient"):
        torch.ops.pyquant.frozen_linear(*frozen_args(layer, x))
    with torch.no_grad():
        torch.ops.pyquant.frozen_linear(*frozen_args(layer, x))  # the same call without gradients runs


def _nearest_reference(lin, cb2t, norms):
    return torch.addmm(norms, lin, cb2t, beta=-1).argmax(1)


@pytest.mark.parametrize("m,c", [(1, 256), (37, 256), (4096, 256), (33, 7)])
def test_nearest_codeword_op_equals_torch(m, c):
    gen = torch.Generator().manual_seed(m + c)
    lin, cb2t, norms = torch.randn(m, 4, generator=gen), torch.randn(4, c, generator=gen), torch.randn(c, generator=gen)
    torch.library.opcheck(torch.ops.pyquant.nearest_codeword.default, (lin, cb2t, norms))
    got = torch.ops.pyquant.nearest_codeword(lin, cb2t, norms)
    want = _nearest_reference(lin, cb2t, norms)
    scores = torch.addmm(norms.double(), lin.double(), cb2t.double(), beta=-1)
    # The same index, or (float rounding of a near tie) one whose exact score is as good.
    same = got == want
    assert same.float().mean() > 0.999
    torch.testing.assert_close(scores.gather(1, got[:, None]), scores.gather(1, want[:, None]), rtol=1e-5, atol=1e-5)


def test_nearest_codeword_op_ties_and_non_finite_scores_follow_torch():
    cb2t = torch.zeros(4, 40)
    norms = torch.zeros(40)
    norms[[5, 9, 30]] = -1.0  # three equal best scores: the first wins
    lin = torch.zeros(20, 4)
    lin[3, 0] = float("nan")  # every score NaN: index 0, as torch's argmax
    lin[4] = float("inf")  # inf * 0 = NaN
    norms2 = norms.clone()
    got = torch.ops.pyquant.nearest_codeword(lin, cb2t, norms)
    assert torch.equal(got, _nearest_reference(lin, cb2t, norms))
    assert got[0] == 5 and got[3] == 0
    norms2[17] = float("nan")  # one NaN codeword wins every row
    assert torch.equal(torch.ops.pyquant.nearest_codeword(torch.randn(20, 4), torch.randn(4, 40), norms2),
                       torch.full((20,), 17))
    norms3 = torch.randn(40)
    norms3[12] = float("-inf")  # an infinite best score
    assert torch.equal(torch.ops.pyquant.nearest_codeword(torch.randn(20, 4), torch.randn(4, 40), norms3),
                       torch.full((20,), 12))


@pytest.mark.parametrize("args,exc,match", [
    ((torch.randn(5, 3), torch.randn(4, 256), torch.randn(256)), ValueError, r"lin must"),
    ((torch.randn(5, 4), torch.randn(3, 256), torch.randn(256)), ValueError, r"cb2t must"),
    ((torch.randn(5, 4), torch.randn(4, 256), torch.randn(255)), ValueError, r"norms must"),
    ((torch.randn(5, 4).double(), torch.randn(4, 256), torch.randn(256)), TypeError, r"float32"),
])
def test_nearest_codeword_op_rejects_bad_input(args, exc, match):
    with pytest.raises(exc, match=match):
        torch.ops.pyquant.nearest_codeword(*args)
    with torch._subclasses.FakeTensorMode(allow_non_fake_inputs=True), pytest.raises(exc, match=match):
        torch.ops.pyquant.nearest_codeword(*args)


@pytest.mark.parametrize("bad,exc,match", [
    (dict(x=torch.randn(3, 100)), ValueError, r"x must have shape \[M, 384\]"),
    (dict(x=torch.randn(3, 384).double()), TypeError, "x must be float32"),
    (dict(A=torch.eye(4).double()), TypeError, "A must have dtype"),
    (dict(b=torch.zeros(5)), ValueError, r"b must have shape \[4\]"),
    (dict(sv=torch.ones(39)), ValueError, r"sv must have shape \[40\]"),
    (dict(bias=torch.ones(3)), ValueError, r"bias must have shape \[40\]"),
    (dict(had_in=3), ValueError, "had_in must be 0 or a power of two"),
    (dict(had_out=16), ValueError, "had_out must be 0 or a power of two dividing N=40"),
])
def test_fake_and_kernel_raise_the_same_clear_errors(bad, exc, match):
    pw = random_packed(40, 384)
    args = dict(x=torch.randn(3, 384), codes=pw.codes, A=pw.A, b=pw.b, su=pw.su, sv=pw.sv, w_scale=pw.w_scale,
                bias=None, had_in=pw.had_in, had_out=pw.had_out)
    args.update(bad)
    with pytest.raises(exc):
        torch.ops.pyquant.linear(**args)
    with torch._subclasses.FakeTensorMode(allow_non_fake_inputs=True), pytest.raises(exc, match=match):
        torch.ops.pyquant.linear(**args)


# ---------------------------------------------------------------------------- gradients

def reference_grads(layer, x, g, w_scale_terms: list | None = None):
    """Autograd through the dense weight (format.dequantize's math) in fp64, on copies. With
    ``w_scale_terms``, appends the sum of the magnitudes of the terms whose sum is w_scale's gradient."""
    params = {name: getattr(layer, name).detach().double().requires_grad_(True) for name in TRAINABLE}
    bias = None if layer.bias is None else layer.bias.detach().double().requires_grad_(True)
    xr = x.detach().double().requires_grad_(True)
    levels = codebook(params["A"], params["b"])[layer.codes.long()].reshape(layer.codes.shape[0], -1)
    w_rot = params["w_scale"] * levels
    w_rot.retain_grad()
    w = blockwise_hadamard(blockwise_hadamard(w_rot, layer.had_in, dim=1), layer.had_out, dim=0)
    y = F.linear(xr, params["sv"][:, None] * w * params["su"][None, :], bias)
    (y * g.double()).sum().backward()
    if w_scale_terms is not None:  # dL/dw_scale = sum over every weight of dL/dw_rot * level
        w_scale_terms.append((w_rot.grad * levels).abs().sum().item())
    return {"x": xr.grad, **{n: p.grad for n, p in params.items()}, **({"bias": bias.grad} if bias is not None else {})}


@pytest.mark.parametrize("k", [384, 4096])
@pytest.mark.parametrize("n", [37, 64])
@pytest.mark.parametrize("hadamard", [True, False])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("mode,tol", [("float", 1e-4), ("int", 1e-4)])
def test_gradients_equal_autograd_through_dequantize(k, n, hadamard, bias, mode, tol, cpu_mode):
    cpu_mode(mode)
    layer = pyquant.QuantLinear.from_packed(random_packed(n, k, hadamard=hadamard, seed=k + n),
                                            torch.randn(n) if bias else None)
    codes = layer.codes.clone()
    for name in TRAINABLE:
        getattr(layer, name).requires_grad_(True)
    x = torch.randn(2, 3, k, requires_grad=True)
    y = layer(x)
    assert layer.last_backend == "cpu"
    g = torch.randn_like(y)
    (y * g).sum().backward()
    terms = []
    want = reference_grads(layer, x, g, terms)
    got = {"x": x.grad, **{name: getattr(layer, name).grad for name in TRAINABLE}}
    if bias:
        got["bias"] = layer.bias.grad
    for name, ref in want.items():
        assert got[name] is not None and got[name].shape == ref.shape, name
        if name == "w_scale":
            # One sum over all N * K weights that can nearly cancel (a result of ~0.5 from terms of
            # ~1e3 in magnitude): from fp32 inputs its error is ~1e-7 of its terms' magnitudes, not
            # of itself, and a bound relative to the result alone failed ~1 run in 15 (1.4e-4 to 2e-3).
            err = (got[name].double() - ref).abs().item()
            assert err <= tol * ref.abs().item() + 1e-6 * terms[0], (name, err, ref.item(), terms[0])
        else:
            assert rel_err(got[name], ref) <= tol, (name, rel_err(got[name], ref))
    assert torch.equal(layer.codes, codes)


def test_only_the_inputs_that_require_grad_get_one():
    layer = pyquant.QuantLinear.from_packed(random_packed(24, 128, seed=2), torch.randn(24))
    layer.bias.requires_grad_(False)
    layer.sv.requires_grad_(True)
    x = torch.randn(4, 128, requires_grad=True)
    layer(x).sum().backward()
    assert x.grad is not None and layer.sv.grad is not None
    assert all(getattr(layer, n).grad is None for n in ("A", "b", "su", "w_scale", "bias"))
    with torch.no_grad():
        assert layer(x).grad_fn is None


def test_bf16_input_gradient_keeps_its_dtype():
    layer = pyquant.QuantLinear.from_packed(random_packed(24, 128, seed=4))
    x = torch.randn(4, 128, dtype=torch.bfloat16, requires_grad=True)
    layer(x).float().sum().backward()
    assert x.grad.dtype == torch.bfloat16


# ---------------------------------------------------------------------------- compile and export

def _minilm_quantized(method: str):
    from pyquant.evaluation import batches, encoder_filter, load_minilm
    from pyquant.sentences import split_sentences

    model, tok = load_minilm()
    cal, held = split_sentences(16, 8)
    if method == "rtn":
        config, data = pyquant.RTNConfig(bits=2), None
    else:  # the quickest UniSVQ fit: what matters here is the layers it makes (fp16 scales, blocks)
        config = pyquant.UniSVQConfig(refine_passes=0, codebook_iters=0, finetune=False)
        data = batches(tok, cal, 8)
    pyquant.quantize_model(model, config, filter_fn=encoder_filter, calibration_data=data, progress=False)
    return model, batches(tok, held, 8)[0]


@pytest.fixture(scope="module", params=["rtn", "unisvq"])
def minilm_2bit(request):
    return request.param, *_minilm_quantized(request.param)


def test_minilm_has_no_graph_breaks_and_compiles_fullgraph(minilm_2bit):
    method, model, batch = minilm_2bit
    explained = torch._dynamo.explain(model)(**batch)
    assert explained.graph_break_count == 0 and explained.graph_count == 1, (method, explained.break_reasons)
    torch._dynamo.reset()
    compiled = torch.compile(model, fullgraph=True)
    with torch.no_grad():
        got = compiled(**batch).last_hidden_state
        want = model(**batch).last_hidden_state
    # The same kernels; Inductor only reorders the fp32 math around them.
    assert rel_err(got, want) < 1e-3, method


def _tiny_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
    return LlamaForCausalLM(cfg).eval()


def test_llama_rtn_has_no_graph_breaks_and_compiles_fullgraph():
    model = _tiny_llama()
    pyquant.quantize_model(model, pyquant.RTNConfig(bits=2), progress=False)
    assert isinstance(model.model.layers[0].self_attn.q_proj, pyquant.QuantLinear)
    ids = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(1))
    explained = torch._dynamo.explain(model)(ids)
    assert explained.graph_break_count == 0, explained.break_reasons
    torch._dynamo.reset()
    compiled = torch.compile(model, fullgraph=True)
    with torch.no_grad():
        assert rel_err(compiled(ids).logits, model(ids).logits) < 1e-3


def test_compiled_training_step_matches_eager():
    layer = pyquant.QuantLinear.from_packed(random_packed(32, 128, seed=6), torch.randn(32))
    layer.sv.requires_grad_(True)
    x = torch.randn(5, 128)

    def step(module, x):
        xr = x.clone().requires_grad_(True)
        module(xr).square().sum().backward()
        grads = (xr.grad, layer.sv.grad.clone(), layer.bias.grad.clone())
        layer.sv.grad = layer.bias.grad = None
        return grads

    eager = step(layer, x)
    torch._dynamo.reset()
    compiled = step(torch.compile(layer, fullgraph=True), x)
    for a, b in zip(compiled, eager):
        assert rel_err(a, b) < 1e-5


def _export_and_check(model, x, tmp_path=None):
    ep = torch.export.export(model, (x,))
    assert any(n.target is torch.ops.pyquant.linear.default for n in ep.graph.nodes)
    with torch.no_grad():
        want = model(x)
        assert torch.equal(ep.module()(x), want)
    return ep, want


def _mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(128, 96), nn.GELU(), nn.Linear(96, 37), nn.Tanh(), nn.Linear(37, 16))


def test_export_runs_and_matches_eager(tmp_path, cpu_mode):
    cpu_mode("int")  # int mode's ops and bits (the default is lut on AVX2 CPUs)
    model = pyquant.quantize_model(_mlp(), pyquant.RTNConfig(bits=2), progress=False)
    assert sum(isinstance(m, pyquant.QuantLinear) for m in model.modules()) == 2  # 37 inputs: not divisible by 4
    x = torch.randn(6, 128)
    ep, want = _export_and_check(model, x)
    # A saved program loads and runs in a fresh process that imports pyquant.
    path = tmp_path / "model.pt2"
    torch.export.save(ep, path)
    torch.save(x, tmp_path / "x.pt")
    torch.save(want, tmp_path / "want.pt")
    code = ("import torch, pyquant, sys; d = sys.argv[1]; ep = torch.export.load(d + '/model.pt2'); "
            "x = torch.load(d + '/x.pt'); assert torch.equal(ep.module()(x), torch.load(d + '/want.pt')); print('ok')")
    out = subprocess.run([sys.executable, "-c", code, str(tmp_path)], capture_output=True, text=True, timeout=300,
                         env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-2000:]


def test_export_of_a_reloaded_checkpoint(tmp_path, cpu_mode):
    cpu_mode("int")  # int mode's ops and bits (the default is lut on AVX2 CPUs)
    model = pyquant.quantize_model(_mlp(), pyquant.RTNConfig(bits=2), progress=False)
    pyquant.save_quantized(model, tmp_path / "ckpt")
    reloaded = pyquant.load_quantized(_mlp(), tmp_path / "ckpt")
    x = torch.randn(3, 128)
    _, want = _export_and_check(reloaded, x)
    with torch.no_grad():
        assert torch.equal(want, model(x))


# ---------------------------------------------------------------------------- errors under compile

def _raised(fn):
    """The exception ``fn()`` raises and every exception it chains."""
    with pytest.raises(Exception) as info:
        fn()
    chain = [info.value]
    while chain[-1].__cause__ is not None or chain[-1].__context__ is not None:
        chain.append(chain[-1].__cause__ or chain[-1].__context__)
    return chain


def test_layer_errors_under_compile_are_the_eager_ones():
    model = nn.Sequential(pyquant.QuantLinear.from_packed(random_packed(40, 384)))
    compiled = torch.compile(model)
    with pytest.raises(ValueError, match=r"input must have shape \[..., 384\]"):
        compiled(torch.randn(3, 100))
    with pytest.raises(TypeError, match="input dtype must be one of"):
        compiled(torch.randn(3, 384).double())
    torch._dynamo.reset()
    # fullgraph=True cannot leave the graph to raise: Dynamo reports the same error inside its own.
    compiled = torch.compile(model, fullgraph=True)
    chain = _raised(lambda: compiled(torch.randn(3, 100)))
    assert any("input must have shape [..., 384], got (3, 100)" in str(e) for e in chain), chain
    torch._dynamo.reset()


def test_op_errors_under_compile_name_the_argument():
    pw = random_packed(40, 384)
    f = torch.compile(lambda x, A: torch.ops.pyquant.linear(x, pw.codes, A, pw.b, pw.su, pw.sv, pw.w_scale, None,
                                                            pw.had_in, pw.had_out), fullgraph=True)
    chain = _raised(lambda: f(torch.randn(3, 384), pw.A.double()))  # raised by the fake implementation
    assert any("A must have dtype in (torch.float32,), got torch.float64" in str(e) for e in chain), chain
    torch._dynamo.reset()


# ---------------------------------------------------------------------------- kernel state

def test_kernel_state_is_built_once_and_rebuilt_on_move_and_load(tmp_path):
    layer = pyquant.QuantLinear.from_packed(random_packed(24, 128, seed=3))
    plan = layer._plan
    for _ in range(3):
        layer(torch.randn(2, 128))
    assert layer._plan is plan  # the forward builds nothing
    assert plan.choices[(torch.float32, False, None)].name == "cpu"
    layer.to("cpu")
    assert layer._plan is not plan
    plan = layer._plan
    layer.load_state_dict(layer.state_dict())
    assert layer._plan is not plan
    with kernels.force_backend("torch"):  # a forced backend is a precomputed key too
        layer(torch.randn(2, 128))
        assert layer.last_backend == "torch"


# ---------------------------------------------------------------------------- LoRA

def test_lora_on_2bit_minilm_lowers_the_loss_and_keeps_the_codes():
    from pyquant.evaluation import encoder_filter, load_minilm, tokenize
    from pyquant.sentences import labelled_sentences

    torch.manual_seed(0)
    model, tok = load_minilm()
    pyquant.quantize_model(model, pyquant.RTNConfig(bits=2), filter_fn=encoder_filter, progress=False)
    codes = {n: m.codes.clone() for n, m in model.named_modules() if isinstance(m, pyquant.QuantLinear)}
    names = pyquant.lora.add_lora(model, rank=4, alpha=8)
    assert len(names) == 36
    # A text task: does a standard-library sentence come from a networking module?
    net = {"socket", "http.client", "smtplib", "ftplib", "imaplib", "poplib", "urllib.request", "selectors"}
    pairs = labelled_sentences()
    pos = [s for s, mod in pairs if mod in net][:48]
    neg = [s for s, mod in pairs if mod not in net][:48]
    texts, labels = pos + neg, torch.tensor([1.0] * len(pos) + [0.0] * len(neg))
    head = nn.Linear(384, 1)
    params = pyquant.lora.lora_parameters(model)
    assert len(params) == 72 and all(p.requires_grad for p in params)
    assert not any(p.requires_grad for n, p in model.named_parameters() if "lora_" not in n)
    opt = torch.optim.AdamW(params + list(head.parameters()), lr=2e-3)
    batch = tokenize(tok, texts, max_length=48)

    def loss_fn():
        hidden = model(**batch).last_hidden_state
        mask = batch["attention_mask"].unsqueeze(-1).float()
        pooled = (hidden * mask).sum(1) / mask.sum(1)
        return F.binary_cross_entropy_with_logits(head(pooled).squeeze(-1), labels)

    with torch.no_grad():
        start = float(loss_fn())
    first_a = model.get_submodule(names[0]).lora_A.weight.detach().clone()
    for _ in range(12):
        opt.zero_grad()
        loss = loss_fn()
        loss.backward()
        opt.step()
    with torch.no_grad():
        end = float(loss_fn())
    assert end < 0.7 * start, (start, end)
    # The first layer's adapter trained too: gradients crossed every 2-bit layer above it.
    assert not torch.equal(model.get_submodule(names[0]).lora_A.weight, first_a)
    for n, m in model.named_modules():
        if isinstance(m, pyquant.QuantLinear):
            assert torch.equal(m.codes, codes[n.removesuffix(".base")])


def test_lora_rejects_bad_arguments():
    layer = pyquant.QuantLinear.from_packed(random_packed(8, 16))
    with pytest.raises(ValueError, match="rank"):
        pyquant.lora.LoRALinear(layer, rank=0)
    with pytest.raises(TypeError, match="base"):
        pyquant.lora.LoRALinear(nn.ReLU())
    with pytest.raises(ValueError, match="no QuantLinear"):
        pyquant.lora.add_lora(nn.Sequential(nn.Linear(4, 4)))
    wrapped = pyquant.lora.LoRALinear(layer)
    x = torch.randn(3, 16)
    assert torch.equal(wrapped(x), layer(x))  # B starts at zero


def test_a_scale_made_a_parameter_trains_through_the_op():
    layer = pyquant.QuantLinear.from_packed(random_packed(24, 128, seed=8))
    layer.sv = nn.Parameter(layer.sv.detach().float().clone())  # moves sv from the buffers to the parameters
    assert "sv" in dict(layer.named_parameters())
    x = torch.randn(3, 128)
    y = layer(x)
    assert layer.last_backend == "cpu"
    y.square().sum().backward()
    want = reference_grads(layer, x, 2 * y.detach())["sv"]
    assert rel_err(layer.sv.grad, want) < 1e-4
