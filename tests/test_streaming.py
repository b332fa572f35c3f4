"""Streaming quantization of a sharded checkpoint (pyquant.streaming, issue 20): the output loads
with from_pretrained and computes exactly what quantize_model's does on the model in memory."""
import json

import pytest
import torch

import pyquant
from pyquant.streaming import quantize_checkpoint

from test_causal_lm import make, prompt


@pytest.mark.parametrize("family", ["llama", "gpt2", "phi3"])
def test_a_sharded_checkpoint_quantizes_tensor_by_tensor(family, tmp_path):
    from transformers import AutoModelForCausalLM

    model = make(family)
    model.save_pretrained(tmp_path / "src", max_shard_size="100KB")  # several shards
    assert len(list((tmp_path / "src").glob("*.safetensors"))) > 2
    out = quantize_checkpoint(tmp_path / "src", tmp_path / "dst", shard_bytes=40_000, progress=False)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    streamed = AutoModelForCausalLM.from_pretrained(out)
    in_memory = pyquant.quantize_model(make(family), pyquant.RTNConfig(bits=2), progress=False)
    assert sorted(pyquant.nn.quantized_layers(streamed)) == sorted(pyquant.nn.quantized_layers(in_memory))
    ids = prompt()
    with torch.no_grad():
        assert torch.equal(streamed(ids).logits, in_memory(ids).logits)
        assert "lm_head" in streamed.pyquant_skipped


def test_the_head_is_quantized_when_the_filter_takes_it(tmp_path):
    from transformers import AutoModelForCausalLM

    make("llama", tie_word_embeddings=False).save_pretrained(tmp_path / "src")
    out = quantize_checkpoint(tmp_path / "src", tmp_path / "dst", filter_fn=lambda m, fqn: True, progress=False)
    assert isinstance(AutoModelForCausalLM.from_pretrained(out).lm_head, pyquant.QuantLinear)


def test_bad_arguments_are_refused_before_any_work(tmp_path):
    make("llama").save_pretrained(tmp_path / "src")
    (tmp_path / "file").write_text("x")
    with pytest.raises(ValueError, match="unisvq needs calibration data"):
        quantize_checkpoint(tmp_path / "src", tmp_path / "dst", pyquant.UniSVQConfig())
    with pytest.raises(ValueError, match="e2e_epochs=2: end-to-end fine-tuning needs the whole model"):
        quantize_checkpoint(tmp_path / "src", tmp_path / "dst", pyquant.UniSVQConfig(e2e_epochs=2),
                            calibration_data=[{"input_ids": torch.ones(1, 4, dtype=torch.long)}])
    with pytest.raises(ValueError, match="not a Hugging Face model directory"):
        quantize_checkpoint(tmp_path, tmp_path / "dst")
    with pytest.raises(ValueError, match="exists and is not a pyquant checkpoint"):
        quantize_checkpoint(tmp_path / "src", tmp_path / "file")
    with pytest.raises(ValueError, match="shard_bytes must be a positive int"):
        quantize_checkpoint(tmp_path / "src", tmp_path / "dst", shard_bytes=0)
    assert not (tmp_path / "dst").exists()


def test_the_cli_streams_a_checkpoint(tmp_path, capsys):
    from transformers import AutoModelForCausalLM

    from pyquant import cli

    make("qwen2").save_pretrained(tmp_path / "src", max_shard_size="100KB")
    assert cli.main(["quantize", str(tmp_path / "src"), "--stream", "--method", "rtn", "--out", str(tmp_path / "q")]) == 0
    assert len(pyquant.nn.quantized_layers(AutoModelForCausalLM.from_pretrained(tmp_path / "q"))) == 14
    # UniSVQ tokenizes its calibration texts with the checkpoint's tokenizer: this one has none
    assert cli.main(["quantize", str(tmp_path / "src"), "--stream", "--method", "unisvq", "--out",
                     str(tmp_path / "u")]) == 2
    assert "tokenizer, and" in capsys.readouterr().err
    assert cli.main(["quantize", str(tmp_path / "src"), "--stream", "--vector", __file__, "--out",
                     str(tmp_path / "u")]) == 2
    assert "--stream takes" in capsys.readouterr().err
    assert not (tmp_path / "u").exists()
    # DAQ to the FP8 block-scaled layout, against a base checkpoint
    make("qwen2").save_pretrained(tmp_path / "base")
    assert cli.main(["quantize", str(tmp_path / "src"), "--stream", "--method", "daq", "--base", str(tmp_path / "base"),
                     "--out", str(tmp_path / "d")]) == 2
    assert "--grid fp8" in capsys.readouterr().err
    assert cli.main(["quantize", str(tmp_path / "src"), "--stream", "--method", "daq", "--base", str(tmp_path / "base"),
                     "--grid", "fp8", "--out", str(tmp_path / "d")]) == 0
    qc = json.loads((tmp_path / "d" / "config.json").read_text())["quantization_config"]
    assert qc["quant_method"] == "fp8" and qc["weight_block_size"] == [128, 128]


def _calibration():
    return [{"input_ids": torch.randint(3, 256, (2, 12), generator=torch.Generator().manual_seed(i)),
             "attention_mask": torch.ones(2, 12, dtype=torch.long)} for i in range(3)]


@pytest.mark.parametrize("family", ["llama", "phi3"])
def test_unisvq_streams_block_by_block_as_it_quantizes_in_memory(family, tmp_path):
    from transformers import AutoModelForCausalLM

    make(family).save_pretrained(tmp_path / "src", max_shard_size="100KB")
    config = pyquant.UniSVQConfig(ft_epochs=2)
    out = quantize_checkpoint(tmp_path / "src", tmp_path / "dst", config, calibration_data=_calibration(),
                              progress=False)
    streamed = AutoModelForCausalLM.from_pretrained(out)
    in_memory = pyquant.quantize_model(make(family), config, calibration_data=_calibration(), progress=False)
    ids = prompt()
    with torch.no_grad():
        assert torch.equal(streamed(ids).logits, in_memory(ids).logits)
    assert streamed.config.quantization_config.method == "unisvq"


def test_a_one_layer_decoder_streams_block_by_block(tmp_path):
    from transformers import AutoModelForCausalLM

    make("llama", num_hidden_layers=1).save_pretrained(tmp_path / "src")
    out = quantize_checkpoint(tmp_path / "src", tmp_path / "dst", pyquant.UniSVQConfig(ft_epochs=1),
                              calibration_data=_calibration(), progress=False)
    assert len(pyquant.nn.quantized_layers(AutoModelForCausalLM.from_pretrained(out))) == 7


def test_unisvq_streaming_drops_each_block_once_written(tmp_path, monkeypatch):
    """Memory stays at about one block: when a block is written, neither its quantized layers nor
    the dense layers they replaced (which the block driver still refers to) keep their tensors."""
    import pyquant.streaming as streaming

    seen = {}

    def spy(model, filter_fn=None):
        out = select_targets(model, filter_fn)
        seen.update(out[0])
        return out

    select_targets = streaming.select_targets
    monkeypatch.setattr(streaming, "select_targets", spy)
    written = []
    write = streaming._write_layer
    monkeypatch.setattr(streaming, "_write_layer", lambda layer, fqn, *a: (written.append(fqn), write(layer, fqn, *a)))
    make("llama").save_pretrained(tmp_path / "src")
    quantize_checkpoint(tmp_path / "src", tmp_path / "dst", pyquant.UniSVQConfig(ft_epochs=1),
                        calibration_data=_calibration(), progress=False)
    assert sorted(written) == sorted(seen) and len(seen) == 14
    assert all(linear.weight.device.type == "meta" for linear in seen.values())


def test_unisvq_streaming_refuses_what_it_cannot_do(tmp_path):
    make("gpt2").save_pretrained(tmp_path / "gpt2")
    with pytest.raises(ValueError, match="Conv1D"):
        quantize_checkpoint(tmp_path / "gpt2", tmp_path / "d", pyquant.UniSVQConfig(), calibration_data=_calibration())
    make("llama", tie_word_embeddings=False).save_pretrained(tmp_path / "llama")
    with pytest.raises(ValueError, match="needs calibration data"):
        quantize_checkpoint(tmp_path / "llama", tmp_path / "d", pyquant.UniSVQConfig())
    with pytest.raises(ValueError, match="outside them: \\['lm_head'\\]"):
        quantize_checkpoint(tmp_path / "llama", tmp_path / "d", pyquant.UniSVQConfig(), lambda m, fqn: True,
                            calibration_data=_calibration())
    assert not (tmp_path / "d").exists()
