"""Mode "lut" of the CPU kernels (and, where both table modes must pass them, the checks of mode "lut3") (``pyquant::lut_linear``, csrc/cpu/kernel_api.h's table-lookup
kernels; the default, "auto", on the avx2 kernel set): activations cut to 14 bits, products from
table lookups, on codes in the LUT layout.

Against the fp64 reference (relative error <= 2e-3 per layer, on random layers and on the real
MiniLM's layers with its real activations), bit-identical on every instruction set, the MiniLM
embeddings against int mode's, and the backend's use of it.
"""
import dataclasses

import pytest
import torch
import torch.nn.functional as F

import pyquant
from pyquant.backends import cpu as cpu_backend
from pyquant.evaluation import compare_embeddings, embed, encoder_filter
from pyquant.format import dequantize
from pyquant.ops import _C
from pyquant.sentences import split_sentences

from conftest import random_packed, rel_err
from test_cpu_kernels import at_thread_counts, make_packed, split_cases

ISAS = _C.supported_isas()
TOL = 2e-3  # the line for any faster mode, per layer, against fp64


@pytest.fixture
def isa():
    yield _C.set_isa
    _C.set_isa("auto")


def lut_args(pw, x, bias=None):
    layer = pyquant.QuantLinear.from_packed(pw, bias)
    return (x, _C.pack_lut_codes(pw.codes), cpu_backend.frozen_params(layer), pw.had_in, pw.had_out)


# The checks both table modes must pass, "lut" and "lut3" (test_lut3_mode.py: the rest of lut3's).
MODES = ("lut", "lut3")


def table_args(mode, pw, x, bias=None):
    """The op's arguments in that mode: lut_linear(x, lut_codes, params, had_in, had_out),
    lut3_linear(x, codes, lut3_codes, params, had_in, had_out)."""
    if mode == "lut":
        return lut_args(pw, x, bias)
    params = cpu_backend.frozen_params(pyquant.QuantLinear.from_packed(pw, bias))
    return (x, pw.codes, _C.pack_lut3_codes(pw.codes), params, pw.had_in, pw.had_out)


def table_linear(mode, *args):
    with torch.no_grad():
        return (torch.ops.pyquant.lut_linear if mode == "lut" else torch.ops.pyquant.lut3_linear)(*args)


def reference(x, pw, bias=None):
    return F.linear(x.double(), dequantize(pw).double(), None if bias is None else bias.double())


# N: whole blocks of 32 rows (lut3: groups of 128) and a partial one, lut3's bands of 512 rows
# whole and partial; K: partial groups of 64 code bytes, of the lut table builder's 16, of lut3's
# chunks of 24 and ranges of 16 chunks, K above the int32 output limit; tokens past int mode's GEMV
# count (lut3 past its own, its GEMM: test_lut3_mode).
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("n,k,hadamard", [(37, 384, True), (64, 256, False), (130, 100, True), (96, 4096, True),
                                          (33, 1028, False), (300, 1028, False), (40, 22016, True),
                                          (700, 424, False)])
def test_table_modes_are_within_2e_3_of_fp64_and_the_same_bits_on_every_isa(isa, mode, n, k, hadamard):
    pw = make_packed(n, k, hadamard=hadamard, seed=n + k)
    bias = torch.randn(n)
    for m in (1, 2, 5, 9, 29):
        x = torch.randn(m, k)
        outs = {}
        for name in ISAS:
            isa(name)
            outs[name] = table_linear(mode, *table_args(mode, pw, x, bias))
        for name, y in outs.items():
            assert torch.equal(y, outs["scalar"]), (name, m)
        err = rel_err(outs["scalar"], reference(x, pw, bias))
        assert err <= TOL, (n, k, m, err)


@pytest.mark.parametrize("mode", MODES)
def test_table_modes_do_not_depend_on_the_thread_count(mode):
    """Every way a call splits over threads (test_cpu_kernels' split_cases); a split by tokens gives
    each thread an odd count (its last token through the one-token kernel)."""
    cases = split_cases()
    outs = at_thread_counts(lambda: [
        table_linear(mode, *table_args(mode, pw, torch.randn(m, pw.su.shape[0], generator=torch.Generator().manual_seed(m))))
        for pw, ms in cases for m in ms])
    for other in outs[1:]:
        assert all(torch.equal(a, b) for a, b in zip(outs[0], other))
    pw, ms = cases[0]
    x = torch.randn(40, 1536, generator=torch.Generator().manual_seed(40))
    assert rel_err(outs[0][ms.index(40)], reference(x, pw)) <= TOL


@pytest.mark.parametrize("mode", MODES)
def test_table_modes_take_bf16_and_fp16_inputs(mode):
    pw = make_packed(48, 512, hadamard=True, seed=3)
    for dtype in (torch.bfloat16, torch.float16):
        x = torch.randn(7, 512).to(dtype)
        y = table_linear(mode, *table_args(mode, pw, x))
        assert y.dtype == dtype and rel_err(y, reference(x, pw)) < 1e-2  # the output's own rounding: ~4e-3 in bf16


def test_lut_linear_opcheck_and_bad_input():
    pw = make_packed(40, 256, hadamard=True, seed=1)
    with torch.no_grad():
        for m in (1, 3, 40):
            torch.library.opcheck(torch.ops.pyquant.lut_linear.default, lut_args(pw, torch.randn(m, 256)))
    x, lut, params, had_in, had_out = lut_args(pw, torch.randn(2, 256))
    with pytest.raises(ValueError, match="x must have shape"):
        torch.ops.pyquant.lut_linear(torch.randn(2, 128), lut, params, had_in, had_out)
    with pytest.raises(ValueError, match="params must be"):
        torch.ops.pyquant.lut_linear(x, lut, params[:-1], had_in, had_out)
    with pytest.raises(TypeError, match="codes must be uint8"):
        torch.ops.pyquant.lut_linear(x, lut.int(), params, had_in, had_out)
    with pytest.raises(TypeError, match="codes must be uint8"):
        _C.pack_lut_codes(pw.codes.int())
    with pytest.raises(ValueError, match="codes must be non-empty 2-D"):
        _C.pack_lut_codes(pw.codes[0])
    with pytest.raises(ValueError, match="lut_linear has no gradient"):
        torch.ops.pyquant.lut_linear(x.requires_grad_(), lut, params, had_in, had_out)
    with pytest.raises(ValueError, match="mode 'lut' needs codes in the LUT layout"):
        torch.ops.pyquant.cpu_linear(x.detach(), pw.codes, pw.A, pw.b, pw.su, pw.sv, pw.w_scale, None, had_in,
                                     had_out, mode="lut")


@pytest.mark.parametrize("mode", MODES)
def test_nan_and_inf_tokens_give_nan_rows_as_in_int_mode(mode):
    pw = make_packed(32, 256, hadamard=True, seed=2)
    x = torch.randn(3, 256)
    x[1, 5] = float("nan")
    x[2, 7] = float("inf")
    y = table_linear(mode, *table_args(mode, pw, x))
    assert torch.isnan(y[1:]).all() and torch.isfinite(y[0]).all()
    assert rel_err(y[:1], reference(x[:1], pw)) <= TOL


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("scale", [1e-35, 1e-37, 1e-40, 1e30])
def test_table_modes_keep_their_accuracy_at_extreme_magnitudes(mode, scale):
    pw = make_packed(64, 128, hadamard=True, seed=4)
    x = torch.randn(2, 128, generator=torch.Generator().manual_seed(0)) * scale
    y = table_linear(mode, *table_args(mode, pw, x))
    assert rel_err(y, reference(x, pw)) <= TOL, scale


@pytest.mark.parametrize("mode", MODES)
def test_a_nan_in_the_codebook_gives_nan_in_the_table_modes_too(mode):
    pw = make_packed(64, 128, hadamard=True, seed=4)
    args = list(table_args(mode, pw, torch.randn(3, 128)))
    args[-3] = args[-3].clone()  # params
    args[-3][4 * 2 + 1] = float("nan")  # A[2, 1] (a layer refuses it; the op takes what it is given)
    assert table_linear(mode, *args).isnan().all()


def use_a_table_kernel_set(isa, mode):
    """The CPU's own kernel set where it has its own kernels for `mode` ("lut" or "lut3"), else the
    first that has them; skips where none has."""
    has = _C.has_lut_kernel if mode == "lut" else _C.has_lut3_kernel
    for name in ("auto", *ISAS):
        isa(name)
        if has():
            return
    pytest.skip(f"no kernel set with its own {mode} kernels on this CPU")


@pytest.mark.parametrize("mode", MODES)
def test_layers_built_under_a_table_mode_run_its_op_without_gradients(cpu_mode, isa, mode):
    use_a_table_kernel_set(isa, mode)
    cpu_mode(mode)
    layer = pyquant.QuantLinear.from_packed(random_packed(64, 256, seed=5), torch.randn(64))
    state = layer._plan.states["cpu"]
    pack, op = ((_C.pack_lut_codes, torch.ops.pyquant.lut_linear) if mode == "lut"
                else (_C.pack_lut3_codes, torch.ops.pyquant.lut3_linear))
    assert state.lut3 == (mode == "lut3") and torch.equal(state.lut_codes, pack(layer.codes))
    x = torch.randn(3, 256)
    codes = (layer.codes,) if mode == "lut3" else ()
    want = op(x, *codes, state.lut_codes, state.params, layer.had_in, layer.had_out)
    with torch.no_grad():
        assert torch.equal(layer(x), want)
        graphs = []
        keep = lambda gm, _: (graphs.append(gm), gm)[1]  # noqa: E731
        assert torch.equal(torch.compile(layer, backend=keep, fullgraph=True)(x), want)
        torch._dynamo.reset()
    assert op.default in {n.target for n in graphs[0].graph.nodes}
    # a call that needs gradients runs pyquant::linear (int mode) and has them
    y = layer(x.requires_grad_())
    y.sum().backward()
    assert x.grad is not None and rel_err(y.detach(), want) <= TOL
    # built under int mode: int mode whatever the mode at the call
    cpu_mode("int")
    plain = pyquant.QuantLinear.from_packed(random_packed(64, 256, seed=5), layer.bias.detach())
    assert plain._plan.states["cpu"].lut_codes is None
    cpu_mode(mode)
    with torch.no_grad():
        assert torch.equal(plain(x.detach()), torch.ops.pyquant.linear(x.detach(), *plain.op_tensors(), plain.had_in,
                                                                        plain.had_out))


def test_an_engines_shared_layers_run_lut_when_it_refreshes_them(cpu_mode, isa):
    """vLLM's layers (pyquant.tp shards, sharing the engine's tensors): with refreshed=True they run
    lut_linear like any layer, and a weight update in place through Shard.load reaches them, eager
    and in a graph compiled before it; without it they keep no copy and run int mode."""
    from pyquant import tp
    from pyquant.io import layer_entry
    from test_tp import TENSORS, load_all, quantized

    use_a_table_kernel_set(isa, "lut")
    cpu_mode("lut")
    old, new = [[quantized(256, n, seed=s + i) for i, n in enumerate((128, 64))] for s in (40, 50)]
    entries = [layer_entry(m) for m in old]
    x = torch.randn(3, 256)

    def lut_of(layers):  # what unshared layers built in mode lut give: the reference
        with torch.no_grad():
            return torch.cat([pyquant.QuantLinear.from_packed(m.packed)(x) for m in layers], dim=-1)

    shard = tp.Shard.column("gate_up_proj", entries, [128, 64], [0, 0])
    tensors = load_all(shard, old, [0, 1])
    layers = shard.layers(tensors, refreshed=True)
    assert all(m._plan.states["cpu"].lut_codes is not None for m in layers)
    compiled = torch.compile(lambda t: tp.forward(layers, t), fullgraph=True)
    with torch.no_grad():
        assert torch.equal(tp.forward(layers, x), lut_of(old))
        assert torch.equal(compiled(x), lut_of(old))
        for m, sid in zip(new, [0, 1]):  # the engine refills its tensors in place
            for name in TENSORS:
                shard.load(tensors, name, getattr(m, name), sid)
        assert torch.equal(tp.forward(layers, x), lut_of(new))
        assert torch.equal(compiled(x), lut_of(new))
    torch._dynamo.reset()
    # not refreshed: no copies, int mode on the shared tensors
    plain = tp.Shard.column("gate_up_proj", entries, [128, 64], [0, 0])
    shared = plain.layers(load_all(plain, old, [0, 1]))
    assert all(m._plan.states["cpu"] == cpu_backend.State(None, None) for m in shared)
    with torch.no_grad():
        assert torch.equal(tp.forward(shared, x), torch.cat(
            [torch.ops.pyquant.linear(x, *m.op_tensors(), m.had_in, m.had_out) for m in shared], dim=-1))


def test_refresh_rewrites_only_the_copies_of_the_tensors_it_is_told_changed(cpu_mode, isa):
    """A loader writes one tensor at a time and refreshes after each: the LUT-layout codes are
    repacked only after a write of the codes, the fp32 params only after the others'."""
    use_a_table_kernel_set(isa, "lut")
    cpu_mode("lut")
    old, new = random_packed(64, 256, seed=7), random_packed(64, 256, seed=8)
    layer = pyquant.QuantLinear.from_packed(old, share=True, refreshed=True)
    state = layer._plan.states["cpu"]
    lut_before, params_before = state.lut_codes.clone(), state.params.clone()
    with torch.no_grad():
        layer.codes.copy_(new.codes)
        layer.su.copy_(new.su)
    layer.refresh(("su",))
    assert torch.equal(state.lut_codes, lut_before) and not torch.equal(state.params, params_before)
    want = pyquant.QuantLinear.from_packed(dataclasses.replace(old, su=new.su))
    assert torch.equal(state.params, cpu_backend.frozen_params(want))
    params_now = state.params.clone()
    layer.refresh(("codes",))
    assert torch.equal(state.lut_codes, _C.pack_lut_codes(new.codes)) and torch.equal(state.params, params_now)
    with pytest.raises(TypeError, match="changed must be a collection"):
        layer.refresh("codes")
    with pytest.raises(ValueError, match=r"changed: unknown tensor names \['weight'\]"):
        layer.refresh(("codes", "weight"))


def test_set_cpu_mode_switches_a_built_model_in_and_out_of_lut_mode(cpu_mode, isa):
    use_a_table_kernel_set(isa, "lut")
    cpu_mode("int")
    model = torch.nn.Sequential(pyquant.QuantLinear.from_packed(random_packed(64, 256, seed=9)), torch.nn.ReLU(),
                                pyquant.QuantLinear.from_packed(random_packed(32, 64, seed=10)))
    layers = [model[0], model[2]]
    x = torch.randn(5, 256)
    with torch.no_grad():
        int_out = model(x)
        assert pyquant.kernels.set_cpu_mode("lut", model) == "int"
        for layer in layers:
            assert torch.equal(layer._plan.states["cpu"].lut_codes, _C.pack_lut_codes(layer.codes))
        h = F.relu(torch.ops.pyquant.lut_linear(*lut_args(layers[0].packed, x)))
        assert torch.equal(model(x), torch.ops.pyquant.lut_linear(*lut_args(layers[1].packed, h)))
        assert pyquant.kernels.set_cpu_mode("int", model) == "lut"
        assert all(layer._plan.states["cpu"].lut_codes is None for layer in layers)
        assert torch.equal(model(x), int_out)
    assert pyquant.kernels.set_cpu_mode("float") == "int" and _C.get_mode() == "float"
    with pytest.raises(ValueError, match="mode must be one of"):
        pyquant.kernels.set_cpu_mode("fast")
    with pytest.raises(TypeError, match="model must be a torch.nn.Module"):
        pyquant.kernels.set_cpu_mode("lut", model=layers[0].packed)
    assert _C.get_mode() == "float"  # (a refused call changes nothing)


def test_eager_calls_see_in_place_changes_of_the_layers_tensors(cpu_mode, isa):
    """The LUT copies are rewritten before an eager call that finds a tensor changed in place (an
    optimizer step, a fill), as int mode reads the tensors as they are; layers made under
    inference_mode, whose tensors have no version counter, still run."""
    use_a_table_kernel_set(isa, "lut")
    cpu_mode("lut")
    layer = pyquant.QuantLinear.from_packed(random_packed(64, 256, seed=11), torch.randn(64))
    x = torch.randn(3, 256)
    with torch.no_grad():
        before = layer(x)
        layer.sv.mul_(2)
        layer.codes.copy_(layer.codes.roll(1, 0))
        assert torch.equal(layer(x), torch.ops.pyquant.lut_linear(*lut_args(layer.packed, x, layer.bias)))
        assert not torch.equal(layer(x), before)
        assert torch.equal(layer._plan.states["cpu"].lut_codes, _C.pack_lut_codes(layer.codes))
        layer.bias.zero_()
        assert torch.equal(layer(x), torch.ops.pyquant.lut_linear(*lut_args(layer.packed, x, layer.bias)))
    with torch.inference_mode():
        made = pyquant.QuantLinear.from_packed(random_packed(64, 256, seed=12))
        assert torch.equal(made(x), torch.ops.pyquant.lut_linear(*lut_args(made.packed, x)))


def test_the_default_mode_auto_is_lut_on_the_avx2_set_only(cpu_mode, isa):
    """Mode "auto", the initial one, is "lut" on the kernel set whose lut kernel was measured the
    faster (avx2) and "int" on the others, following set_isa; a layer built under it on avx2 runs
    lut_linear, and set_cpu_mode gives back the setting, "auto", not what it resolved to."""
    cpu_mode("auto")
    assert _C.get_mode(resolve=False) == "auto"
    for name in ISAS:
        isa(name)
        assert _C.get_mode() == ("lut" if name == "avx2" else "int"), name
    if "avx2" not in ISAS:
        pytest.skip("no avx2 kernel set on this CPU")
    isa("avx2")
    layer = pyquant.QuantLinear.from_packed(random_packed(64, 256, seed=3))
    x = torch.randn(3, 256)
    with torch.no_grad():
        assert torch.equal(layer(x), torch.ops.pyquant.lut_linear(*lut_args(layer.packed, x)))
    assert pyquant.kernels.set_cpu_mode("int") == "auto" and _C.get_mode() == "int"
    assert pyquant.kernels.set_cpu_mode("auto") == "int" and _C.get_mode() == "lut"
    with pytest.raises(ValueError, match="mode must be 'auto', 'int', 'float', 'lut' or 'lut3'"):
        _C.set_mode("fast")


def test_has_lut_kernel_follows_the_kernel_set(isa):
    isa("scalar")
    assert not _C.has_lut_kernel()
    for name in ISAS:
        isa(name)
        assert _C.has_lut_kernel() == (name in ("avx2", "avx512", "amx", "neon"))


def test_real_minilm_layers_and_embeddings_in_lut_mode(minilm, cpu_mode, isa):
    """Every quantized MiniLM layer on its real activations within 2e-3 of fp64; the embeddings of
    the demo's sentences within cosine 0.9995 of int mode's."""
    import copy

    use_a_table_kernel_set(isa, "lut")
    model, tokenizer = minilm
    _, sentences = split_sentences(0, 32)
    q = pyquant.quantize_model(copy.deepcopy(model), pyquant.RTNConfig(), filter_fn=encoder_filter, progress=False)
    layers = pyquant.nn.quantized_layers(q)
    int_emb = embed(q, tokenizer, sentences)
    cpu_mode("lut")
    for layer in layers.values():
        layer.invalidate()  # rebuilt under lut mode
        assert layer._plan.states["cpu"].lut_codes is not None
    seen = {}

    def keep_first(name):
        def hook(module, inputs, output):
            seen.setdefault(name, (inputs[0], output))
        return hook

    hooks = [layer.register_forward_hook(keep_first(name)) for name, layer in layers.items()]
    lut_emb = embed(q, tokenizer, sentences)
    for h in hooks:
        h.remove()
    assert len(seen) == len(layers) == 36
    for name, (inp, out) in seen.items():
        layer = layers[name]
        want = F.linear(inp.double(), dequantize(layer.packed).double(), layer.bias.double())
        with torch.no_grad():
            direct = torch.ops.pyquant.lut_linear(inp.reshape(-1, inp.shape[-1]).contiguous(),
                                                  _C.pack_lut_codes(layer.codes), cpu_backend.frozen_params(layer),
                                                  layer.had_in, layer.had_out)
        assert rel_err(direct, want.reshape(direct.shape)) <= TOL, name
        assert rel_err(out, want) <= TOL, name
    cos = F.cosine_similarity(lut_emb.double(), int_emb.double(), dim=-1)
    assert cos.min() >= 0.9995, cos.min()
    assert compare_embeddings(int_emb, lut_emb)["mean_cos"] >= 0.9995
