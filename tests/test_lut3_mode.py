"""Mode "lut3" of the CPU kernels (``pyquant::lut3_linear``, csrc/cpu/kernel_api.h's triple-lookup
kernels): activations cut to ~12 bits, one table lookup per three weights, on codes in the LUT3
layout.

The layout, the same bits at any batch (GEMV and GEMM), bad input, the backend's use of it, and the
real MiniLM's layers and embeddings; what both table modes must pass (accuracy against fp64 on
random layers, the same bits on every instruction set and thread count, bf16/fp16, NaN, extreme
magnitudes, layers built in the mode running its op eager and compiled) is in test_lut_mode.py.
"""
import copy

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
from test_cpu_kernels import make_packed
from test_lut_mode import ISAS, TOL, isa  # noqa: F401 (isa: the kernel-set fixture)


def lut3_args(pw, x, bias=None):
    layer = pyquant.QuantLinear.from_packed(pw, bias)
    return (x, pw.codes, _C.pack_lut3_codes(pw.codes), cpu_backend.frozen_params(layer), pw.had_in, pw.had_out)


def lut3_word(n, groups, chunks, c):
    """kernel_api.h lut3_word: row n's word 0 of chunk c (uint16 offset), groups of 128 rows in
    bands of 4, chunks in ranges of 16, per band and range each group's chunks of the range."""
    group, lane = divmod(n, 128)
    band, in_band = divmod(group, 4)
    band_groups = min(4, groups - 4 * band)
    rng, c_in = divmod(c, 16)
    range_chunks = min(16, chunks - 16 * rng)
    chunk = 4 * band * chunks + 16 * rng * band_groups + in_band * range_chunks + c_in
    return chunk * 384 + lane // 32 * 96 + lane % 32


@pytest.mark.parametrize("n,k", [(150, 100), (700, 424)])
def test_the_lut3_layout_holds_every_level_where_kernel_api_says(n, k):
    """Row n's triple t of chunk c, read back by the layout's own rule, is the levels of elements
    s = 24 c + 3 t + w (the plane order of kernel_api.h), zero past K; rows past N are zero.
    150 x 100: a partial group of rows, a partial group of codes (K4 = 25), a partial chunk, one
    band of 2 groups and one range of 5 chunks; 700 x 424: a full band and a partial one (2 of its
    4 groups), a full range and a partial one (2 of its 16 chunks)."""
    z = torch.randint(0, 4, (n, k), dtype=torch.uint8, generator=torch.Generator().manual_seed(3))
    lut3 = _C.pack_lut3_codes(_C.pack_codes(z))
    chunks, groups = -(-k // 24), -(-n // 128)
    assert lut3.shape == (groups, chunks * 768)
    flat = lut3.view(torch.int16).flatten().to(torch.int64) & 0xFFFF
    k4, fields = k // 4, [(0, 0), (0, 6), (0, 12), (1, 2), (1, 8), (1, 14), (2, 4), (2, 10)]

    def element(s):  # kernel_api.h lut3_element
        g, r = divmod(s, 256)
        p_g = min(64, k4 - 64 * g)
        return 256 * g + 4 * (r % p_g) + r // p_g if s < k else None

    seen = torch.zeros_like(flat, dtype=torch.bool)
    for row in range(groups * 128):
        for c in range(chunks):
            at = lut3_word(row, groups, chunks, c)
            words = [int(flat[at + 32 * w]) for w in range(3)]
            seen[[at, at + 32, at + 64]] = True
            for t, (word, bit) in enumerate(fields):
                v = words[word] >> bit
                if bit > 10:
                    v |= words[word + 1] << (16 - bit)
                for i in range(3):
                    e = element(24 * c + 3 * t + i) if row < n else None
                    assert (v >> 2 * i) & 3 == (0 if e is None else int(z[row, e])), (row, c, t, i)
    assert seen.all()  # every word of the tensor belongs to one row and chunk


@pytest.mark.parametrize("n,k", [(300, 4096), (96, 384), (130, 1028)])
def test_lut3_linear_gives_the_same_bits_at_any_batch(isa, n, k):
    """Past its GEMV's token count (kernel_api.h lut3_gemv_max_tokens: on rows of 4096 and longer
    the tokens' tables over 16 MB, on shorter ones int mode's count) mode lut3 runs the int GEMM on
    its 12-bit activations: every token's output equals that of a call on the token alone, on every
    set; so does a call of 45 tokens, under the count at K = 4096 and past it at 384 and 1028."""
    pw = make_packed(n, k, hadamard=True, seed=n)
    chunks = -(-k // 24)
    table_bytes = 64 + chunks * 1024 + -(-chunks // 512) * 64  # kernel_api.h lut3_table_stride
    for m in (45, (16 << 20) // table_bytes + 1):
        x = torch.randn(m, k, generator=torch.Generator().manual_seed(m))
        for name in ISAS:
            isa(name)
            with torch.no_grad():
                batch = torch.ops.pyquant.lut3_linear(*lut3_args(pw, x))
                alone = torch.cat([torch.ops.pyquant.lut3_linear(*lut3_args(pw, x[i:i + 1])) for i in range(len(x))])
            assert torch.equal(batch, alone), (name, m)


def test_lut3_linear_opcheck_and_bad_input():
    pw = make_packed(40, 256, hadamard=True, seed=1)
    with torch.no_grad():
        for m in (1, 3, 40):
            torch.library.opcheck(torch.ops.pyquant.lut3_linear.default, lut3_args(pw, torch.randn(m, 256)))
    x, codes, lut3, params, had_in, had_out = lut3_args(pw, torch.randn(2, 256))
    with pytest.raises(ValueError, match="x must have shape"):
        torch.ops.pyquant.lut3_linear(torch.randn(2, 128), codes, lut3, params, had_in, had_out)
    with pytest.raises(ValueError, match="lut3_codes must be contiguous"):
        torch.ops.pyquant.lut3_linear(x, codes, lut3[:, :768].contiguous(), params, had_in, had_out)
    with pytest.raises(ValueError, match="lut3_codes must be contiguous"):
        torch.ops.pyquant.lut3_linear(x, codes, _C.pack_lut3_codes(codes[:, :32]), params, had_in, had_out)
    with pytest.raises(ValueError, match="params must be"):
        torch.ops.pyquant.lut3_linear(x, codes, lut3, params[:-1], had_in, had_out)
    with pytest.raises(TypeError, match="lut3_codes must be uint8"):
        torch.ops.pyquant.lut3_linear(x, codes, lut3.int(), params, had_in, had_out)
    with pytest.raises(TypeError, match="codes must be uint8"):
        torch.ops.pyquant.lut3_linear(x, codes.int(), lut3, params, had_in, had_out)
    with pytest.raises(TypeError, match="codes must be uint8"):
        _C.pack_lut3_codes(pw.codes.int())
    with pytest.raises(ValueError, match="codes must be non-empty 2-D"):
        _C.pack_lut3_codes(pw.codes[0])
    with pytest.raises(ValueError, match="lut3_linear has no gradient"):
        torch.ops.pyquant.lut3_linear(x.requires_grad_(), codes, lut3, params, had_in, had_out)
    with pytest.raises(ValueError, match="mode 'lut3' needs codes in the LUT3 layout"):
        torch.ops.pyquant.cpu_linear(x.detach(), pw.codes, pw.A, pw.b, pw.su, pw.sv, pw.w_scale, None, had_in,
                                     had_out, mode="lut3")


def test_has_lut3_kernel_follows_the_kernel_set(isa):
    isa("scalar")
    assert not _C.has_lut3_kernel()
    isa("auto")
    flags = open("/proc/cpuinfo").read() if _C.get_isa() != "scalar" else ""
    assert _C.has_lut3_kernel() == (_C.get_isa() in ("avx512", "amx") and "avx512_vbmi2" in flags)


needs_lut3_kernel = pytest.mark.skipif(not _C.has_lut3_kernel(), reason="this CPU's kernel set has no triple-lookup "
                                       "kernel of its own (AVX-512 VBMI2): mode lut3 runs int mode here")


def test_auto_builds_layers_that_stream_from_memory_in_lut3(isa, cpu_mode):
    """Mode "auto" builds a layer of 1 MB of codes or more (they stream from memory) in lut3 on the
    avx512 set of an AMD CPU where it runs its own lut3 kernel, and every other layer, set, CPU or
    mode as before: a smaller layer, the other sets, Intel CPUs, and an explicit "int"."""
    cpu_mode("auto")
    amd = "AuthenticAMD" in open("/proc/cpuinfo").read() if _C.get_isa() != "scalar" else False
    big, small = random_packed(1024, 4096, seed=12), random_packed(1020, 4096, seed=13)  # 1024 / 1020 KB of codes
    x = torch.randn(3, 4096)
    for name in ISAS:
        isa(name)
        picks_lut3 = name == "avx512" and _C.has_lut3_kernel() and amd
        assert _C.layer_mode(1024, 1024) == ("lut3" if picks_lut3 else _C.get_mode()), name
        assert _C.layer_mode(1020, 1024) == _C.get_mode(), name
        layers = [pyquant.QuantLinear.from_packed(pw) for pw in (big, small)]
        with torch.no_grad():
            for layer, lut3 in zip(layers, (picks_lut3, False)):
                y = layer(x)  # (builds the layer's state)
                assert layer._plan.states["cpu"].lut3 == lut3, name
                if lut3:
                    assert torch.equal(y, torch.ops.pyquant.lut3_linear(*lut3_args(layer.packed, x)))
        cpu_mode("int")
        assert _C.layer_mode(1024, 1024) == "int"
        cpu_mode("auto")
    with pytest.raises(ValueError, match="out_features and k4 must be >= 0"):
        _C.layer_mode(-1, 4)


@needs_lut3_kernel
def test_set_cpu_mode_switches_a_built_model_in_and_out_of_lut3_mode(cpu_mode):
    cpu_mode("int")
    model = torch.nn.Sequential(pyquant.QuantLinear.from_packed(random_packed(64, 256, seed=9)), torch.nn.ReLU(),
                                pyquant.QuantLinear.from_packed(random_packed(32, 64, seed=10)))
    layers = [model[0], model[2]]
    x = torch.randn(5, 256)
    with torch.no_grad():
        int_out = model(x)
        assert pyquant.kernels.set_cpu_mode("lut3", model) == "int" and _C.get_mode() == "lut3"
        for layer in layers:
            assert torch.equal(layer._plan.states["cpu"].lut_codes, _C.pack_lut3_codes(layer.codes))
        h = F.relu(torch.ops.pyquant.lut3_linear(*lut3_args(layers[0].packed, x)))
        assert torch.equal(model(x), torch.ops.pyquant.lut3_linear(*lut3_args(layers[1].packed, h)))
        assert rel_err(model(x), int_out) <= 1e-2
        assert pyquant.kernels.set_cpu_mode("lut", model) == "lut3"  # from one table layout to the other
        assert all(not layer._plan.states["cpu"].lut3 for layer in layers)
        assert pyquant.kernels.set_cpu_mode("int", model) == "lut"
        assert all(layer._plan.states["cpu"].lut_codes is None for layer in layers)
        assert torch.equal(model(x), int_out)


@needs_lut3_kernel
def test_lut3_copies_follow_in_place_changes_and_refreshes(cpu_mode):
    """Eager calls rewrite the LUT3 copy of codes changed in place; an engine's refresh of the codes
    repacks them in the LUT3 layout."""
    cpu_mode("lut3")
    layer = pyquant.QuantLinear.from_packed(random_packed(64, 256, seed=11), torch.randn(64))
    x = torch.randn(3, 256)
    with torch.no_grad():
        before = layer(x)
        layer.codes.copy_(layer.codes.roll(1, 0))
        assert torch.equal(layer(x), torch.ops.pyquant.lut3_linear(*lut3_args(layer.packed, x, layer.bias)))
        assert not torch.equal(layer(x), before)
        assert torch.equal(layer._plan.states["cpu"].lut_codes, _C.pack_lut3_codes(layer.codes))
    old, new = random_packed(64, 256, seed=7), random_packed(64, 256, seed=8)
    shared = pyquant.QuantLinear.from_packed(old, share=True, refreshed=True)
    state = shared._plan.states["cpu"]
    assert state.lut3
    with torch.no_grad():
        shared.codes.copy_(new.codes)
    shared.refresh(("codes",))
    assert torch.equal(state.lut_codes, _C.pack_lut3_codes(new.codes))


def test_real_minilm_layers_and_embeddings_in_lut3_mode(minilm):
    """Every quantized MiniLM layer on its real activations within 2e-3 of fp64; the embeddings of
    the demo's sentences, every layer run by lut3_linear, within cosine 0.9995 of int mode's."""
    model, tokenizer = minilm
    _, sentences = split_sentences(0, 32)
    q = pyquant.quantize_model(copy.deepcopy(model), pyquant.RTNConfig(), filter_fn=encoder_filter, progress=False)
    layers = pyquant.nn.quantized_layers(q)
    int_emb = embed(q, tokenizer, sentences)
    errors = {}

    def run_lut3(name, layer):
        lut3, params = _C.pack_lut3_codes(layer.codes), cpu_backend.frozen_params(layer)

        def hook(module, inputs, output):  # the layer's output, computed by lut3_linear instead
            inp = inputs[0]
            flat = inp.reshape(-1, inp.shape[-1]).contiguous()
            with torch.no_grad():
                y = torch.ops.pyquant.lut3_linear(flat, layer.codes, lut3, params, layer.had_in, layer.had_out)
            if name not in errors:
                want = F.linear(flat.double(), dequantize(layer.packed).double(), layer.bias.double())
                errors[name] = rel_err(y, want)
            return y.reshape(output.shape)
        return hook

    hooks = [layer.register_forward_hook(run_lut3(name, layer)) for name, layer in layers.items()]
    lut3_emb = embed(q, tokenizer, sentences)
    for h in hooks:
        h.remove()
    assert len(errors) == len(layers) == 36
    worst = max(errors, key=errors.get)
    assert errors[worst] <= TOL, (worst, errors[worst])
    cos = F.cosine_similarity(lut3_emb.double(), int_emb.double(), dim=-1)
    assert cos.min() >= 0.9995, cos.min()
    assert compare_embeddings(int_emb, lut3_emb)["mean_cos"] >= 0.9995
