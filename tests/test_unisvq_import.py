"""Import of UniSVQ release checkpoints (AI9Stars/UniSVQ): synthetic state dicts in the release's
key names, converted and checked against the paper's formula decoded independently."""
import json
import math

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

import pyquant
from pyquant import kernels
from pyquant.format import dequantize, dequantize_rotated
from pyquant.unisvq_import import (
    convert_unisvq_ptq_state_dict, convert_unisvq_state_dict, decode_reference, load_unisvq_checkpoint,
    reference_hadamard,
)

from conftest import rel_err

# (name, N, K): q_proj with a bias (attention_bias models), down_proj with K = 3 blocks of 128
SHAPES = [("self_attn.q_proj", 256, 256), ("mlp.down_proj", 128, 384)]
LAYERS = 2
GRID_KEY = "codebook_class.codebook.grid"
CB_S, CB_Z = "code_generator.codebook_scale", "code_generator.codebook_zero_point"


def _modules():
    return [(f"model.layers.{i}.{m}", n, k) for i in range(LAYERS) for m, n, k in SHAPES]


def _scales(g, n, k, dtype):
    """SU with random signs folded in, SV positive: what the release stores."""
    su = (torch.rand(k, generator=g) + 0.5) * torch.where(torch.rand(k, generator=g) < 0.5, -1.0, 1.0)
    sv = torch.rand(n, generator=g) * 0.02 + 0.01
    return su.to(dtype), sv.to(dtype)


def _plain_tensors(g, dtype=torch.bfloat16):
    sd = {"model.embed_tokens.weight": torch.randn(100, 256, generator=g).to(dtype),
          "model.norm.weight": (1 + 0.1 * torch.randn(256, generator=g)).to(dtype)}
    for i in range(LAYERS):
        sd[f"model.layers.{i}.input_layernorm.weight"] = (1 + 0.1 * torch.randn(256, generator=g)).to(dtype)
    return sd


def compressed_state_dict(seed=0, dtype=torch.bfloat16, bias=True):
    """The LC-QAT compressed inference layout (model/modeling_qwen3_vq.py, save_pretrained)."""
    g = torch.Generator().manual_seed(seed)
    sd = _plain_tensors(g, dtype)
    for name, n, k in _modules():
        su, sv = _scales(g, n, k, dtype)
        sd[f"{name}.weight"] = torch.randint(0, 256, (n, k // 4), generator=g, dtype=torch.uint8)
        sd[f"{name}.SU"], sd[f"{name}.SV"] = su, sv
        cb_s, cb_z = 0.6 + 0.5 * torch.rand((), generator=g).item(), -1.5 + torch.rand((), generator=g).item()
        sd[f"{name}.{CB_S}"], sd[f"{name}.{CB_Z}"] = torch.tensor(cb_s).to(dtype), torch.tensor(cb_z).to(dtype)
        if bias and name.endswith("q_proj"):
            sd[f"{name}.bias"] = (0.1 * torch.randn(n, generator=g)).to(dtype)
    return sd


def release_grid(Q=None):
    """The PTQ grid as lib/codebook/index_codebook.py builds it: bf16 nn.Linear of the index
    vectors in cartesian_prod order, weight Q/sqrt(1.25), bias -1.5*Q@1/sqrt(1.25)."""
    Q = torch.eye(4) if Q is None else Q
    z = torch.cartesian_prod(*[torch.arange(4)] * 4).to(torch.bfloat16)
    scale = 1 / math.sqrt(1.25)
    weight = (Q * scale).to(torch.bfloat16)
    bias = (-(Q @ torch.ones(4)) * scale * 1.5).to(torch.bfloat16)
    return F.linear(z, weight, bias), weight, bias


def ptq_state_dict(seed=0, Q=None, codes=None, scale_wh=True):
    """The PTQ hfize layout (lib/linear/quantized_linear.py buffers, fp16 SU/SV)."""
    g = torch.Generator().manual_seed(seed)
    sd = _plain_tensors(g, torch.float16)
    grid, weight, bias = release_grid(Q)
    for j, (name, n, k) in enumerate(_modules()):
        su, sv = _scales(g, n, k, torch.float16)
        sd[f"{name}.Qidxs"] = (torch.randint(0, 256, (n, k // 4), generator=g, dtype=torch.uint8)
                               if codes is None else codes(g, n, k))
        sd[f"{name}.SU"], sd[f"{name}.SV"] = su, sv
        sd[f"{name}.Wscale"] = torch.tensor(0.5 + torch.rand((), generator=g).item())
        sd[f"{name}.codebook_id"] = torch.tensor(20 if Q is None else 21, dtype=torch.int32)
        sd[f"{name}.{GRID_KEY}"] = grid.clone()
        sd[f"{name}.codebook_class.codebook.grid_norm"] = grid.float().norm(dim=-1).square().to(torch.bfloat16)
        sd[f"{name}.codebook_class.codebook.linear_proj_weight"] = weight.clone()
        sd[f"{name}.codebook_class.codebook.linear_proj_bias"] = bias.clone()
        if scale_wh and j == 0:
            sd[f"{name}.scaleWH"] = torch.rand(k, generator=g) + 0.5
        if name.endswith("q_proj"):
            sd[f"{name}.bias"] = (0.1 * torch.randn(n, generator=g)).half()
    return sd


def random_orthogonal(seed):
    q, r = torch.linalg.qr(torch.randn(4, 4, generator=torch.Generator().manual_seed(seed), dtype=torch.float64))
    return (q * torch.sign(torch.diagonal(r))).float()


def bits_equal(a, b):
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(
        a.contiguous().reshape(-1).view(torch.uint8), b.contiguous().reshape(-1).view(torch.uint8))


# ---- the reference itself --------------------------------------------------------------------
def _fwht(x):
    """Unnormalised Walsh-Hadamard transform of the last dim by butterflies on (i, i + h),
    the way fast_hadamard_transform computes it: a construction separate from the Kronecker one."""
    x = x.clone()
    n, h = x.shape[-1], 1
    while h < n:
        v = x.reshape(*x.shape[:-1], n // (2 * h), 2, h)
        a, b = v[..., 0, :].clone(), v[..., 1, :].clone()
        v[..., 0, :], v[..., 1, :] = a + b, a - b
        x = v.reshape(x.shape)
        h *= 2
    return x


def _blocks(x, fn, block=128):
    return fn(x.reshape(*x.shape[:-1], -1, block)).reshape(x.shape) / math.sqrt(block)


def test_reference_hadamard_is_the_normalised_sylvester_matrix():
    h = reference_hadamard(128)
    assert torch.allclose(h @ h, torch.eye(128, dtype=torch.float64), atol=1e-12)
    assert torch.equal(h, h.T)
    assert torch.allclose(h, _fwht(torch.eye(128, dtype=torch.float64)) / math.sqrt(128), atol=1e-15)
    i = torch.arange(128)
    popcount = torch.zeros(128, 128, dtype=torch.long)
    for bit in range(7):
        popcount += ((i[:, None] & i[None, :]) >> bit) & 1
    assert torch.equal(h * math.sqrt(128), (1 - 2 * (popcount % 2)).double())


@pytest.mark.parametrize("layout", ["compressed", "ptq"])
def test_decode_reference_matches_the_release_forward(layout):
    """decode_reference's W applied to x equals the release's forward order, transcribed step by
    step: (x / scaleWH) * SU -> 128-block Hadamard -> @ W_hat^T -> 128-block Hadamard -> * SV (* Wscale)."""
    sd = compressed_state_dict(1) if layout == "compressed" else ptq_state_dict(1)
    name, n, k = _modules()[1]
    x = torch.randn(3, k, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    if layout == "compressed":
        codes = sd[f"{name}.weight"].long()
        z = torch.stack([(codes >> s) & 3 for s in (6, 4, 2, 0)], -1).reshape(n, k).double()
        w_hat = sd[f"{name}.{CB_S}"].double() * z + sd[f"{name}.{CB_Z}"].double()
        xs = x * sd[f"{name}.SU"].double()
        sv = sd[f"{name}.SV"].double()
    else:
        w_hat = sd[f"{name}.{GRID_KEY}"].double()[sd[f"{name}.Qidxs"].long()].reshape(n, k)
        xs = x / sd[f"{name}.scaleWH"].double() if f"{name}.scaleWH" in sd else x
        xs = xs * sd[f"{name}.SU"].double()
        sv = sd[f"{name}.SV"].double() * sd[f"{name}.Wscale"].double()
    y = _blocks(_blocks(xs, _fwht) @ w_hat.T, _fwht) * sv
    assert rel_err(x @ decode_reference(sd, name).T, y) < 1e-12


# ---- compressed layout: exact ----------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_compressed_import_is_exact(dtype):
    sd = compressed_state_dict(0, dtype)
    packed, rest, report = convert_unisvq_state_dict(sd)
    assert sorted(packed) == sorted(name for name, _, _ in _modules())
    assert report["quantized_modules"] == len(_modules()) and report["exact"] is True
    for name, n, k in _modules():
        pw = packed[name]
        assert (pw.out_features, pw.in_features) == (n, k)
        assert pw.had_in == pw.had_out == 128 and pw.method == "unisvq-release"
        assert pw.su.dtype == pw.sv.dtype == torch.float32
        assert torch.equal(pw.codes, sd[f"{name}.weight"])  # the byte layout is the same: no repacking
        cb_s = sd[f"{name}.code_generator.codebook_scale"].float()
        assert torch.equal(pw.A, cb_s * torch.eye(4)) and float(pw.w_scale) == 1.0
        assert rel_err(dequantize(pw), decode_reference(sd, name)) <= 1e-6


def _cpu_paths():
    paths = [("torch", None)]
    if "cpu" in kernels.available_backends():
        paths += [("cpu", "int"), ("cpu", "float")]
    return paths


@pytest.mark.parametrize("backend,mode", _cpu_paths(), ids=[f"{b}-{m}" for b, m in _cpu_paths()])
def test_quantlinear_forward_matches_reference_linear(backend, mode):
    sd = compressed_state_dict(2)
    packed, rest, _ = convert_unisvq_state_dict(sd)
    x = torch.randn(5, 256, generator=torch.Generator().manual_seed(3))
    before = None
    if mode is not None:
        from pyquant import _C
        before = _C.get_mode(resolve=False)
        _C.set_mode(mode)
    try:
        for name, n, k in _modules():
            bias = rest.get(f"{name}.bias")
            layer = pyquant.QuantLinear.from_packed(packed[name], None if bias is None else bias.float())
            xk = x if k == 256 else torch.randn(5, k, generator=torch.Generator().manual_seed(k))
            with kernels.force_backend(backend):
                y = layer(xk)
            assert layer.last_backend == backend
            ref = F.linear(xk.double(), decode_reference(sd, name), None if bias is None else bias.double())
            assert rel_err(y, ref) <= 1e-4, (name, rel_err(y, ref))
    finally:
        if before is not None:
            _C.set_mode(before)


def test_other_tensors_are_passed_through_bit_exactly():
    sd = compressed_state_dict(3)
    packed, rest, report = convert_unisvq_state_dict(sd)
    packed_keys = {f"{name}.{s}" for name in packed for s in
                   ("weight", "SU", "SV", "code_generator.codebook_scale", "code_generator.codebook_zero_point")}
    assert set(rest) == set(sd) - packed_keys
    assert {k for k in rest if k.endswith(".bias")} == set(report["biases"]) == {
        f"model.layers.{i}.self_attn.q_proj.bias" for i in range(LAYERS)}
    assert "model.embed_tokens.weight" in rest and "model.norm.weight" in rest
    assert report["passthrough_tensors"] == len(rest)
    for key, t in rest.items():
        assert bits_equal(t, sd[key]), key


def test_ternary_max_var_is_accepted_and_checked():
    sd = compressed_state_dict(4)
    name = _modules()[0][0]
    z = torch.randint(0, 3, (256, 256), generator=torch.Generator().manual_seed(0))
    sd[f"{name}.weight"] = ((z[:, 0::4] << 6) | (z[:, 1::4] << 4) | (z[:, 2::4] << 2) | z[:, 3::4]).to(torch.uint8)
    sd[f"{name}.code_generator.max_var"] = torch.tensor(2.0)
    packed, rest, _ = convert_unisvq_state_dict(sd)
    assert packed[name].extra["max_var"] == 2 and f"{name}.code_generator.max_var" not in rest
    assert rel_err(dequantize(packed[name]), decode_reference(sd, name)) <= 1e-6
    sd[f"{name}.weight"][7, 3] = 0b00110000  # one level 3 in a max_var = 2 layer
    with pytest.raises(ValueError, match=f"{name}.weight holds level 3"):
        convert_unisvq_state_dict(sd)


# ---- PTQ layout: approximate, with the error it states ---------------------------------------
@pytest.mark.parametrize("codebook", ["identical", "linear_guassian"])
def test_ptq_import_states_the_error_it_measures(codebook):
    Q = None if codebook == "identical" else random_orthogonal(0)
    sd = ptq_state_dict(5, Q)
    packed, rest, report = convert_unisvq_ptq_state_dict(sd)
    assert report["exact"] is False and report["quantized_modules"] == len(_modules())
    for name, n, k in _modules():
        pw = packed[name]
        assert pw.had_in == pw.had_out == 128 and pw.method == "unisvq-release-ptq"
        assert pw.extra["codebook"] == codebook
        measured = rel_err(dequantize(pw), decode_reference(sd, name))
        stated = report["rel_err"][name]
        assert stated == pw.extra["rel_err"]
        assert abs(stated - measured) <= 1e-6 * measured
        # the bf16 grid is not affine, so there is an error, and it is bf16-sized
        assert 1e-5 < measured < 5e-3, measured
    assert report["max_rel_err"] == max(report["rel_err"].values())
    outside = {k for k in sd if not any(k.startswith(name + ".") for name, _, _ in _modules())}
    assert set(rest) == outside | set(report["biases"])


def test_ptq_import_of_an_affine_grid_is_exact():
    """With a grid that is affine in fp32, the least-squares fit recovers it: the only error
    left is fp32 rounding, so the approximation is the grid's bf16 rounding and nothing else."""
    sd = ptq_state_dict(6, random_orthogonal(1))
    A, b = random_orthogonal(2) * 0.9, torch.tensor([-1.2, 0.3, 0.1, -0.5])
    z = torch.cartesian_prod(*[torch.arange(4)] * 4).float()
    for name, _, _ in _modules():
        sd[f"{name}.{GRID_KEY}"] = z @ A.T + b
    packed, _, report = convert_unisvq_ptq_state_dict(sd)
    assert report["max_rel_err"] < 1e-6
    for name, _, _ in _modules():
        assert torch.allclose(packed[name].A, A, atol=1e-5) and torch.allclose(packed[name].b, b, atol=1e-5)


def test_usage_weighting_minimises_the_rotated_weight_error():
    """Skewed codes (mostly the inner levels 1 and 2, as LDLQ on bell-shaped weights gives):
    the usage-weighted fit is the least-squares optimum of the rotated weight, so it can only beat
    the uniform one there."""
    def skewed(g, n, k):
        z = torch.where(torch.rand(n, k, generator=g) < 0.85, torch.randint(1, 3, (n, k), generator=g),
                        torch.randint(0, 4, (n, k), generator=g))
        return ((z[:, 0::4] << 6) | (z[:, 1::4] << 4) | (z[:, 2::4] << 2) | z[:, 3::4]).to(torch.uint8)

    sd = ptq_state_dict(7, random_orthogonal(3), codes=skewed)
    by_usage, _, _ = convert_unisvq_ptq_state_dict(sd, weighting="usage")
    uniform, _, _ = convert_unisvq_ptq_state_dict(sd, weighting="uniform")
    for name, n, k in _modules():
        w_hat = sd[f"{name}.{GRID_KEY}"].double()[sd[f"{name}.Qidxs"].long()].reshape(n, k)
        e_usage = rel_err(dequantize_rotated(by_usage[name]), w_hat)
        e_uniform = rel_err(dequantize_rotated(uniform[name]), w_hat)
        assert e_usage <= e_uniform * (1 + 1e-6), (e_usage, e_uniform)


# ---- bad inputs ------------------------------------------------------------------------------
Q0 = "model.layers.0.self_attn.q_proj"
D1 = "model.layers.1.mlp.down_proj"


def _drop(key):
    return lambda sd: sd.pop(key)


def _set(key, value):
    return lambda sd: sd.__setitem__(key, value(sd) if callable(value) else value)


COMPRESSED_BAD = [
    ("missing SU", _drop(f"{Q0}.SU"), f"{Q0}.SU"),
    ("missing SV", _drop(f"{D1}.SV"), f"{D1}.SV"),
    ("missing codes", _drop(f"{Q0}.weight"), f"{Q0}.weight"),
    ("missing zero point", _drop(f"{Q0}.{CB_Z}"), f"{Q0}.{CB_Z}"),
    ("orphan codes", _drop(f"{Q0}.code_generator.codebook_scale"), f"{Q0}.weight"),
    ("SU wrong length", _set(f"{Q0}.SU", lambda sd: sd[f"{Q0}.SU"][:128]), f"{Q0}.SU"),
    ("SV 2-D", _set(f"{D1}.SV", lambda sd: sd[f"{D1}.SV"][None]), f"{D1}.SV"),
    ("SU NaN", _set(f"{Q0}.SU", lambda sd: torch.full_like(sd[f"{Q0}.SU"], float("nan"))), f"{Q0}.SU"),
    ("latent float weight", _set(f"{Q0}.weight", lambda sd: torch.randn(256, 256).bfloat16()), f"{Q0}.weight"),
    ("codes int8", _set(f"{Q0}.weight", lambda sd: sd[f"{Q0}.weight"].to(torch.int8)), f"{Q0}.weight"),
    ("K not a multiple of 128", lambda sd: sd.update({f"{Q0}.weight": sd[f"{Q0}.weight"][:, :24].contiguous(),
                                                      f"{Q0}.SU": sd[f"{Q0}.SU"][:96]}), f"{Q0}.weight"),
    ("N not a multiple of 128", lambda sd: sd.update({f"{Q0}.weight": sd[f"{Q0}.weight"][:200].contiguous(),
                                                      f"{Q0}.SV": sd[f"{Q0}.SV"][:200],
                                                      f"{Q0}.bias": sd[f"{Q0}.bias"][:200]}), f"{Q0}.weight"),
    ("scale not a scalar", _set(f"{Q0}.{CB_S}", torch.ones(4)), f"{Q0}.{CB_S}"),
    ("bias wrong length", _set(f"{Q0}.bias", torch.zeros(7)), f"{Q0}.bias"),
    ("unknown codebook key", _set(f"{Q0}.code_generator.g1.weight", torch.eye(4)), f"{Q0}.code_generator.g1.weight"),
    ("max_var out of range", _set(f"{Q0}.code_generator.max_var", torch.tensor(5.0)), f"{Q0}.code_generator.max_var"),
]


@pytest.mark.parametrize("mutate,key", [c[1:] for c in COMPRESSED_BAD], ids=[c[0] for c in COMPRESSED_BAD])
def test_compressed_bad_inputs_name_the_key(mutate, key):
    sd = compressed_state_dict(8)
    mutate(sd)
    with pytest.raises(ValueError, match=key.replace(".", r"\.")):
        convert_unisvq_state_dict(sd)


PTQ_BAD = [
    ("missing Wscale", _drop(f"{Q0}.Wscale"), f"{Q0}.Wscale"),
    ("missing grid", _drop(f"{Q0}.{GRID_KEY}"), f"{Q0}.{GRID_KEY}"),
    ("missing SU", _drop(f"{D1}.SU"), f"{D1}.SU"),
    ("3-bit grid", _set(f"{Q0}.{GRID_KEY}", torch.zeros(4096, 4)), f"{Q0}.{GRID_KEY}"),
    ("int16 Qidxs", _set(f"{Q0}.Qidxs", lambda sd: sd[f"{Q0}.Qidxs"].to(torch.int16)), f"{Q0}.Qidxs"),
    ("scaleWH wrong length", _set(f"{Q0}.scaleWH", torch.ones(3)), f"{Q0}.scaleWH"),
    ("scaleWH zero", _set(f"{Q0}.scaleWH", torch.zeros(256)), f"{Q0}.scaleWH"),
    ("unknown codebook id", _set(f"{Q0}.codebook_id", torch.tensor(7, dtype=torch.int32)), f"{Q0}.codebook_id"),
    ("low-rank term", _set(f"{Q0}.A", torch.zeros(256, 4)), f"{Q0}.A"),
]


@pytest.mark.parametrize("mutate,key", [c[1:] for c in PTQ_BAD], ids=[c[0] for c in PTQ_BAD])
def test_ptq_bad_inputs_name_the_key(mutate, key):
    sd = ptq_state_dict(9)
    mutate(sd)
    with pytest.raises(ValueError, match=key.replace(".", r"\.")):
        convert_unisvq_ptq_state_dict(sd)


def test_wrong_converter_or_no_quantized_module_is_an_error():
    with pytest.raises(ValueError, match=r"q_proj\.Qidxs.*convert_unisvq_ptq_state_dict"):
        convert_unisvq_state_dict(ptq_state_dict(0))
    with pytest.raises(ValueError, match=r"codebook_scale.*convert_unisvq_state_dict"):
        convert_unisvq_ptq_state_dict(compressed_state_dict(0))
    plain = _plain_tensors(torch.Generator().manual_seed(0))
    with pytest.raises(ValueError, match="no quantized module"):
        convert_unisvq_state_dict(plain)
    with pytest.raises(ValueError, match="no quantized module"):
        convert_unisvq_ptq_state_dict(plain)


# ---- files -----------------------------------------------------------------------------------
def _assert_same_state(a, b):
    assert set(a) == set(b)
    for key in a:
        assert bits_equal(a[key], b[key]), key


def test_load_single_file_and_folder(tmp_path):
    sd = compressed_state_dict(10)
    save_file(sd, tmp_path / "model.safetensors")
    _assert_same_state(load_unisvq_checkpoint(tmp_path / "model.safetensors"), sd)
    _assert_same_state(load_unisvq_checkpoint(tmp_path), sd)
    other = tmp_path / "compressed"
    other.mkdir()
    save_file(sd, other / "model.compressed.safetensors")  # the release's inference loader's fallback name
    loaded = load_unisvq_checkpoint(other)
    _assert_same_state(loaded, sd)
    packed, _, _ = convert_unisvq_state_dict(loaded)
    for name, _, _ in _modules():
        assert rel_err(dequantize(packed[name]), decode_reference(sd, name)) <= 1e-6
    with pytest.raises(FileNotFoundError):
        load_unisvq_checkpoint(tmp_path / "nothing_here")


def _write_sharded(folder, sd, shards=3):
    folder.mkdir()
    keys = sorted(sd)
    weight_map = {}
    for i in range(shards):
        name = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
        part = {k: sd[k] for k in keys[i::shards]}
        save_file(part, folder / name)
        weight_map.update({k: name for k in part})
    index = folder / "model.safetensors.index.json"
    index.write_text(json.dumps({"metadata": {"total_size": 0}, "weight_map": weight_map}))
    return index, weight_map


@pytest.mark.parametrize("layout", ["compressed", "ptq"])
def test_load_sharded_round_trip(tmp_path, layout):
    sd = compressed_state_dict(11) if layout == "compressed" else ptq_state_dict(11)
    index, _ = _write_sharded(tmp_path / "ckpt", sd)
    for path in (index, tmp_path / "ckpt"):
        loaded = load_unisvq_checkpoint(path)
        _assert_same_state(loaded, sd)
    convert = convert_unisvq_state_dict if layout == "compressed" else convert_unisvq_ptq_state_dict
    from_disk, rest, _ = convert(loaded)
    in_memory, _, _ = convert(sd)
    for name in in_memory:
        assert torch.equal(dequantize(from_disk[name]), dequantize(in_memory[name]))
    for key, t in rest.items():
        assert bits_equal(t, sd[key])


def test_inconsistent_index_names_the_key(tmp_path):
    sd = compressed_state_dict(12)
    index, weight_map = _write_sharded(tmp_path / "a", sd)
    listed_only = dict(weight_map, **{"model.extra.weight": next(iter(weight_map.values()))})
    index.write_text(json.dumps({"weight_map": listed_only}))
    with pytest.raises(ValueError, match=r"model\.extra\.weight"):
        load_unisvq_checkpoint(index)
    dropped = dict(weight_map)
    del dropped["model.norm.weight"]
    index.write_text(json.dumps({"weight_map": dropped}))
    with pytest.raises(ValueError, match=r"model\.norm\.weight"):
        load_unisvq_checkpoint(index)
