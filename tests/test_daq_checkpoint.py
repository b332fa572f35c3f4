"""DAQ from checkpoint to checkpoint (pyquant.streaming.daq_checkpoint, issue 17): FP8 block-scaled and
sharded bases and posts read one tensor at a time, the Hugging Face FP8 block-scaled output, and errors
before anything is written."""
import json
import math

import pytest
import torch
from safetensors.torch import load_file, save_file

import pyquant
from pyquant.fakequant import FP8_MAX
from pyquant.quantizers.daq import DAQConfig, daq_quantize
from pyquant.streaming import CheckpointTensors, daq_checkpoint

from test_causal_lm import make, prompt

SHAPE = dict(hidden_size=256, intermediate_size=384, num_attention_heads=4, num_key_value_heads=2)


def _models():
    """(base, post): a small random Llama and the same model after a sparse "fine-tuning" delta."""
    base = make("llama", **SHAPE)
    post = make("llama", **SHAPE)
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for p in post.parameters():
            p += 0.002 * torch.randn(p.shape, generator=gen) * (torch.rand(p.shape, generator=gen) < 0.5)
    return base, post


def _to_fp8(w: torch.Tensor, block=128):
    """DeepSeek-V3's layout: float8_e4m3fn weight and its per-block dequantization scale."""
    n, k = w.shape
    gr, gc = math.ceil(n / block), math.ceil(k / block)
    padded = torch.nn.functional.pad(w.float(), (0, gc * block - k, 0, gr * block - n))
    scale = padded.reshape(gr, block, gc, block).abs().amax(dim=(1, 3)).clamp_min(1e-12) / FP8_MAX
    full = scale.repeat_interleave(block, 0)[:n].repeat_interleave(block, 1)[:, :k]
    return (w.float() / full).to(torch.float8_e4m3fn), scale


def _save_fp8(model, path, shards=3):
    """``model`` as an FP8 block-scaled checkpoint in ``shards`` files with an index, its linear
    weights in FP8 (the head too, as DeepSeek-V3 does not: here every 2-D projection)."""
    path.mkdir()
    model.config.save_pretrained(path)
    qc = {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic", "weight_block_size": [128, 128]}
    cfg = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps({**cfg, "architectures": [type(model).__name__],
                                                  "quantization_config": qc}))
    tensors = {}
    for name, t in model.state_dict().items():
        if name.endswith("proj.weight"):
            tensors[name], tensors[name + "_scale_inv"] = _to_fp8(t)
        else:
            tensors[name] = t.to(torch.bfloat16)
    names = list(tensors)
    weight_map = {}
    for i in range(shards):
        part = {n: tensors[n].contiguous() for n in names[i::shards]}
        fname = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
        save_file(part, str(path / fname), metadata={"format": "pt"})
        weight_map.update({n: fname for n in part})
    (path / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return path


def _dequant(w8, scale, block=128):
    n, k = w8.shape
    return w8.float() * scale.repeat_interleave(block, 0)[:n].repeat_interleave(block, 1)[:, :k]


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("daq")
    base, post = _models()
    _save_fp8(base, root / "base_fp8")
    post.save_pretrained(root / "post", max_shard_size="300KB")  # sharded bf16/fp32 post
    assert len(list((root / "post").glob("*.safetensors"))) > 1
    return root, base, post


def test_checkpoint_tensors_reads_fp8_dequantized_and_one_at_a_time(checkpoints):
    root, base, _ = checkpoints
    t = CheckpointTensors(root / "base_fp8")
    key = "model.layers.0.mlp.down_proj.weight"
    assert key in t and key + "_scale_inv" not in t and t.block_scaled(key)
    assert t.where[key] != t.where[key + "_scale_inv"]  # the weight and its scale in different shards
    torch.testing.assert_close(t[key], _dequant(t.raw(key), t.raw(key + "_scale_inv")), rtol=0, atol=0)
    # FP8 is a lossy copy of the base: close, not equal
    w = base.get_submodule(key[:-len(".weight")]).weight
    assert (t[key] - w).abs().max() <= w.abs().max() / 16
    assert set(t) == set(base.state_dict())


def test_fp8_base_and_sharded_post_to_an_fp8_checkpoint(checkpoints, tmp_path):
    root, _, post = checkpoints
    out = daq_checkpoint(root / "post", tmp_path / "out", DAQConfig(base=str(root / "base_fp8")),
                         shard_bytes=200_000, progress=False)
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    assert qc["quant_method"] == "fp8" and qc["fmt"] == "e4m3" and qc["weight_block_size"] == [128, 128]
    assert "lm_head" in qc["modules_to_not_convert"]
    assert len(json.loads((out / "model.safetensors.index.json").read_text())["weight_map"]) > 0
    got = CheckpointTensors(out)
    base_t = CheckpointTensors(root / "base_fp8")
    changed = 0
    for fqn in ("model.layers.0.self_attn.q_proj", "model.layers.1.mlp.down_proj"):
        key = f"{fqn}.weight"
        w8, scale = got.raw(key), got.raw(key + "_scale_inv")
        assert w8.dtype == torch.float8_e4m3fn and scale.dtype == torch.float32
        n, k = w8.shape
        assert tuple(scale.shape) == (math.ceil(n / 128), math.ceil(k / 128))
        # exactly what DAQ in memory gives on the dequantized base (the FP8 base read correctly)
        want = daq_quantize(post.get_submodule(fqn).weight.detach(), base_t[key], grid="fp8", granularity="block")
        assert torch.equal(w8.view(torch.uint8), want.codes.view(torch.uint8)) and torch.equal(scale, want.scales)
        changed += int((want.multipliers != 1).sum())
    assert changed  # the search moved some block scales
    # the rest as the post stores it
    assert torch.equal(got.raw("model.norm.weight"), post.model.norm.weight.detach())
    assert json.loads((out / "daq_report.json").read_text())


def test_transformers_loads_the_fp8_output(checkpoints, tmp_path):
    from transformers import AutoModelForCausalLM

    root, _, post = checkpoints
    out = daq_checkpoint(root / "post", tmp_path / "out", DAQConfig(base=str(root / "base_fp8")), progress=False)
    model = AutoModelForCausalLM.from_pretrained(out)  # on CPU transformers' FP8 quantizer dequantizes
    got = CheckpointTensors(out)
    key = "model.layers.0.mlp.gate_proj.weight"
    w = model.get_submodule(key[:-len(".weight")]).weight
    torch.testing.assert_close(w.float(), got[key].to(w.dtype).float(), rtol=0, atol=0)
    with torch.no_grad():
        want = post(prompt()).logits
        logits = model(prompt()).logits.float()
    assert torch.isfinite(logits).all()
    assert torch.nn.functional.cosine_similarity(logits.flatten(), want.flatten(), dim=0) > 0.99


def test_an_fp8_sharded_base_serves_quantize_model(checkpoints):
    """DAQConfig(base=<FP8 sharded directory>) in memory: the same result as the dequantized base."""
    root, _, _ = checkpoints
    fqn = "model.layers.1.self_attn.o_proj"
    dense = {f"{fqn}.weight": CheckpointTensors(root / "base_fp8")[f"{fqn}.weight"]}
    by_path, by_dict = _models()[1], _models()[1]
    only = lambda m, n: n == fqn  # noqa: E731
    pyquant.quantize_model(by_path, DAQConfig(base=str(root / "base_fp8")), filter_fn=only, progress=False)
    pyquant.quantize_model(by_dict, DAQConfig(base=dense), filter_fn=only, progress=False)
    assert torch.equal(by_path.get_submodule(fqn).dequantize_weight(), by_dict.get_submodule(fqn).dequantize_weight())
    assert by_path.pyquant_daq[fqn]["blocks_changed"] > 0


@pytest.mark.parametrize("method", ["rtn", "unisvq"])
def test_an_fp8_source_streams_dequantized(checkpoints, tmp_path, method):
    """RTN / UniSVQ streaming of an FP8 block-scaled checkpoint: what quantize_model gives on the
    dequantized model (FP8 weights are never taken for their raw float8 values)."""
    from transformers import AutoModelForCausalLM

    from pyquant.streaming import quantize_checkpoint

    root, _, _ = checkpoints
    src = CheckpointTensors(root / "base_fp8")
    dense = make("llama", **SHAPE)
    dense.load_state_dict({k: src[k].float() for k in src}, strict=False)
    data = [{"input_ids": torch.randint(3, 256, (2, 12), generator=torch.Generator().manual_seed(i)),
             "attention_mask": torch.ones(2, 12, dtype=torch.long)} for i in range(3)]
    config = pyquant.RTNConfig() if method == "rtn" else pyquant.UniSVQConfig(ft_epochs=1)
    kw = {} if method == "rtn" else {"calibration_data": data}
    out = quantize_checkpoint(root / "base_fp8", tmp_path / "q", config, progress=False, **kw)
    pyquant.quantize_model(dense, config, progress=False, **kw)
    streamed = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    assert not any(k.endswith("_scale_inv") for k in CheckpointTensors(out).header)
    with torch.no_grad():
        torch.testing.assert_close(streamed(prompt()).logits, dense(prompt()).logits, rtol=0, atol=0)


def _variant(src, dst, edit):
    """A copy of the checkpoint ``src`` with ``edit(tensors)`` applied to every file's tensors."""
    dst.mkdir()
    for f in src.iterdir():
        if f.suffix == ".safetensors":
            tensors = load_file(str(f))
            edit(tensors)
            save_file(tensors, str(dst / f.name), metadata={"format": "pt"})
        else:
            (dst / f.name).write_bytes(f.read_bytes())
    return dst


@pytest.mark.parametrize("edit,match", [
    (lambda t: t.pop("model.layers.0.mlp.up_proj.weight", None), "lacks model.layers.0.mlp.up_proj.weight"),
    (lambda t: t.update({k: v[:128] for k, v in t.items() if k == "model.layers.1.mlp.down_proj.weight"}),
     "another model"),
    (lambda t: t.pop("model.layers.0.self_attn.k_proj.weight_scale_inv", None), "without its"),
    (lambda t: t.update({k: v.view(torch.int8) for k, v in t.items() if k == "model.layers.0.self_attn.v_proj.weight"}),
     "not floating point"),
])
def test_bad_bases_fail_before_anything_is_written(checkpoints, tmp_path, edit, match):
    root, _, _ = checkpoints
    bad = _variant(root / "base_fp8", tmp_path / "bad", edit)
    with pytest.raises(ValueError, match=match):
        daq_checkpoint(root / "post", tmp_path / "out", DAQConfig(base=str(bad)), progress=False)
    assert not (tmp_path / "out").exists()


def test_daq_checkpoint_rejects_other_grids_and_in_memory_bases(checkpoints, tmp_path):
    root, base, _ = checkpoints
    with pytest.raises(ValueError, match="grid='fp8'"):
        daq_checkpoint(root / "post", tmp_path / "o", DAQConfig(base=str(root / "base_fp8"), grid="int4"))
    with pytest.raises(TypeError, match="reads the base from disk"):
        daq_checkpoint(root / "post", tmp_path / "o", DAQConfig(base=base))
    assert not (tmp_path / "o").exists()
