"""Causal language models from transformers (small random configs of each family): quantize with RTN
and UniSVQ, generate, save and load. GPT-2's projections are transformers' ``Conv1D``."""
import pytest
import torch

import pyquant
from pyquant import kernels

from conftest import rel_err

VOCAB = 256


def make(family: str, **overrides):
    import transformers as tf

    torch.manual_seed(0)
    ids = dict(vocab_size=VOCAB, pad_token_id=0, bos_token_id=1, eos_token_id=2, **overrides)
    common = {**dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                     num_key_value_heads=2, max_position_embeddings=128), **ids}  # overrides win
    if family == "gpt2":
        model = tf.GPT2LMHeadModel(tf.GPT2Config(n_embd=64, n_layer=2, n_head=4, n_positions=128, **ids))
    else:
        cls, cfg = {"llama": (tf.LlamaForCausalLM, tf.LlamaConfig), "qwen2": (tf.Qwen2ForCausalLM, tf.Qwen2Config),
                    "mistral": (tf.MistralForCausalLM, tf.MistralConfig),
                    "phi3": (tf.Phi3ForCausalLM, tf.Phi3Config)}[family]
        model = cls(cfg(**common))
    return model.eval()


# projections per decoder block: q, k, v, o, gate, up, down; Phi-3 fuses qkv and gate_up; GPT-2 has 4 Conv1D
PER_BLOCK = {"llama": 7, "qwen2": 7, "mistral": 7, "phi3": 4, "gpt2": 4}
FAMILIES = list(PER_BLOCK)


def prompt(seed=0):
    return torch.randint(3, VOCAB, (2, 7), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("family", FAMILIES)
def test_rtn_quantizes_every_projection_and_keeps_the_head(family, tmp_path):
    model = make(family)
    head = model.get_output_embeddings()
    tied = head.weight is model.get_input_embeddings().weight
    pyquant.quantize_model(model, pyquant.RTNConfig(bits=2), progress=False)
    layers = pyquant.nn.quantized_layers(model)
    assert len(layers) == 2 * PER_BLOCK[family], sorted(layers)
    assert model.get_output_embeddings() is head and "lm_head" in model.pyquant_skipped
    assert (head.weight is model.get_input_embeddings().weight) == tied  # a tied head stays tied
    ids = prompt()
    with torch.no_grad():
        logits = model(ids).logits
        assert next(iter(layers.values())).last_backend == "cpu"
        with kernels.force_backend("torch"):
            reference = model(ids).logits
        assert rel_err(logits, reference) < 1e-3  # the C++ kernels' int mode against the reference math
        tokens = model.generate(ids, max_new_tokens=32, do_sample=False, pad_token_id=0)
    assert tokens.shape == (2, 7 + 32)
    model.save_pretrained(tmp_path)
    from transformers import AutoModelForCausalLM

    loaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert len(pyquant.nn.quantized_layers(loaded)) == len(layers)
    with torch.no_grad():
        assert torch.equal(loaded.generate(ids, max_new_tokens=32, do_sample=False, pad_token_id=0), tokens)


def test_gpt2_conv1d_layers_become_quantlinear_computing_the_same():
    model = make("gpt2")
    conv = model.transformer.h[0].attn.c_attn
    x = torch.randn(3, 64)
    with torch.no_grad():
        want = conv(x)
        layer = pyquant.nn.linear_view(conv)
        assert torch.equal(layer.weight, conv.weight.t()) and layer.weight.data_ptr() == conv.weight.data_ptr()
        assert torch.allclose(layer(x), want, atol=1e-6)
    pyquant.quantize_model(model, pyquant.RTNConfig(bits=2), progress=False)
    q = model.transformer.h[0].attn.c_attn
    assert isinstance(q, pyquant.QuantLinear) and (q.in_features, q.out_features) == (64, 192)
    assert torch.equal(q.bias.detach(), conv.bias.detach())


def test_a_filter_quantizes_the_head_and_a_failure_restores_conv1d():
    model = make("llama")
    pyquant.quantize_model(model, pyquant.RTNConfig(bits=2), filter_fn=lambda m, fqn: True, progress=False)
    assert isinstance(model.lm_head, pyquant.QuantLinear)

    gpt2 = make("gpt2")
    with torch.no_grad():
        gpt2.transformer.h[1].mlp.c_fc.weight[0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        pyquant.quantize_model(gpt2, pyquant.RTNConfig(bits=2), progress=False)
    import transformers

    kinds = {type(gpt2.get_submodule(f"transformer.h.{i}.mlp.c_fc")) for i in (0, 1)}
    assert transformers.pytorch_utils.Conv1D in kinds  # the layer that failed is a Conv1D again


@pytest.mark.parametrize("family", FAMILIES)
def test_unisvq_quantizes_decoders_and_they_generate(family):
    model = make(family)
    g = torch.Generator().manual_seed(1)
    data = [{"input_ids": torch.randint(3, VOCAB, (2, 16), generator=g),
             "attention_mask": torch.ones(2, 16, dtype=torch.long)} for _ in range(4)]
    data[0]["attention_mask"][1, 10:] = 0  # padding honoured
    pyquant.quantize_model(model, pyquant.UniSVQConfig(ft_epochs=1, refine_passes=1), calibration_data=data,
                           progress=False)
    assert len(pyquant.nn.quantized_layers(model)) == 2 * PER_BLOCK[family]
    with torch.no_grad():
        tokens = model.generate(prompt(), max_new_tokens=32, do_sample=False, pad_token_id=0)
    assert tokens.shape == (2, 39)


def _block_inputs(model, blocks, batch):
    """Each decoder block's call (args, kwargs) on ``batch``, captured from ``model``."""
    seen = {}
    hooks = [b.register_forward_pre_hook(lambda m, a, k, i=i: seen.__setitem__(i, (a, dict(k))), with_kwargs=True)
             for i, b in enumerate(blocks)]
    try:
        with torch.no_grad():
            model(**batch, use_cache=False)
    finally:
        for h in hooks:
            h.remove()
    return [seen[i] for i in range(len(blocks))]


def _blocks(model):
    return model.transformer.h if hasattr(model, "transformer") else model.model.layers


@pytest.mark.parametrize("family", FAMILIES)
def test_unisvq_blocks_beat_rtn_on_the_same_inputs(family):
    g = torch.Generator().manual_seed(2)
    # 2048 calibration tokens: with a few hundred the 64- to 128-wide Hessians are too rough for LDLQ to win
    data = [{"input_ids": torch.randint(3, VOCAB, (4, 32), generator=g),
             "attention_mask": torch.ones(4, 32, dtype=torch.long)} for _ in range(16)]
    # Larger weights than the 0.02 default, so that the blocks (not the residual path) make the output.
    fp = make(family, initializer_range=0.1)
    rtn = pyquant.quantize_model(make(family, initializer_range=0.1), pyquant.RTNConfig(bits=2), progress=False)
    svq = pyquant.quantize_model(make(family, initializer_range=0.1), pyquant.UniSVQConfig(ft_epochs=2),
                                 calibration_data=data, progress=False)
    held_out = {"input_ids": torch.randint(3, VOCAB, (8, 32), generator=g),
                "attention_mask": torch.ones(8, 32, dtype=torch.long)}
    for i, (args, kwargs) in enumerate(_block_inputs(fp, _blocks(fp), held_out)):
        def out(model):
            y = _blocks(model)[i](*args, **kwargs)
            return y[0] if isinstance(y, tuple) else y

        with torch.no_grad():
            want = out(fp)
            err_rtn, err_svq = (float((out(m) - want).square().mean()) for m in (rtn, svq))
        assert err_svq < err_rtn, (family, i, err_svq, err_rtn)


def test_bad_inputs_fail_before_any_work():
    model = make("llama")
    bad = [{"input_ids": torch.full((1, 8), VOCAB + 5), "attention_mask": torch.ones(1, 8, dtype=torch.long)}]
    with pytest.raises(ValueError, match=r"calibration_data\[0\] holds token ids in \[261, 261\], outside the "
                                         r"model's vocabulary of 256"):
        pyquant.quantize_model(model, pyquant.UniSVQConfig(), calibration_data=bad, progress=False)
    assert not pyquant.nn.quantized_layers(model)
    # blocks that are not a ModuleList of one class: a clear error naming what was searched
    flat = make("llama")
    flat.model.layers = torch.nn.ModuleList([flat.model.layers[0], torch.nn.Identity()])
    good = [{"input_ids": torch.randint(3, VOCAB, (1, 8)), "attention_mask": torch.ones(1, 8, dtype=torch.long)}]
    with pytest.raises(ValueError, match=r"cannot find the transformer blocks .* model.layers \(2: Identity, Llama"):
        pyquant.quantize_model(flat, pyquant.UniSVQConfig(), calibration_data=good, progress=False)
    assert not pyquant.nn.quantized_layers(flat)


def test_cli_quantizes_a_causal_lm_directory_with_a_calibration_file(tmp_path, capsys):
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast

    from pyquant import cli
    from pyquant.sentences import labelled_sentences

    texts = [s for s, _ in labelled_sentences()][:400]
    bpe = Tokenizer(models.BPE(unk_token="<unk>"))
    bpe.pre_tokenizer = pre_tokenizers.Whitespace()
    specials = ["<pad>", "<s>", "</s>", "<unk>"]
    bpe.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=VOCAB, special_tokens=specials))
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=bpe, bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    assert len(tokenizer) <= VOCAB and tokenizer.pad_token is None  # the CLI must cope without a pad token
    src = tmp_path / "llama"
    make("llama").save_pretrained(src)
    tokenizer.save_pretrained(src)
    calib = tmp_path / "calibration.txt"
    calib.write_text("\n\n".join(texts[200:232]))  # blank lines are skipped
    assert cli.main(["quantize", str(src), "--method", "unisvq", "--calibration-file", str(calib),
                     "--calibration", "16", "--out", str(tmp_path / "out")]) == 0
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    assert len(pyquant.nn.quantized_layers(model)) == 14 and model.config.quantization_config.method == "unisvq"
    ids = tokenizer(["The module provides"], return_tensors="pt")["input_ids"]
    with torch.no_grad():
        assert model.generate(ids, max_new_tokens=8, do_sample=False, pad_token_id=0).shape[1] == ids.shape[1] + 8
    # the same, streamed block by block from the checkpoint: the same model
    assert cli.main(["quantize", str(src), "--stream", "--method", "unisvq", "--calibration-file", str(calib),
                     "--calibration", "16", "--out", str(tmp_path / "streamed")]) == 0
    streamed = AutoModelForCausalLM.from_pretrained(tmp_path / "streamed")
    with torch.no_grad():
        torch.testing.assert_close(streamed(ids).logits, model(ids).logits, rtol=0, atol=0)
    (tmp_path / "empty.txt").write_text("\n \n")
    assert cli.main(["quantize", str(src), "--method", "rtn", "--calibration-file", str(tmp_path / "empty.txt"),
                     "--out", str(tmp_path / "out2")]) == 2
    assert "no non-empty line" in capsys.readouterr().err


def test_unisvq_end_to_end_stage_matches_the_heads_input_and_leaves_a_quantized_head_alone():
    """End-to-end fine-tuning of a causal LM: the target is the input of the output head (the
    final norm's output), so the head, quantized here too, is not trained by it."""
    g = torch.Generator().manual_seed(3)
    data = [{"input_ids": torch.randint(3, VOCAB, (4, 16), generator=g),
             "attention_mask": torch.ones(4, 16, dtype=torch.long)} for _ in range(6)]
    every_linear = lambda module, fqn: isinstance(module, torch.nn.Linear)  # noqa: E731  (lm_head included)
    fp = make("llama", initializer_range=0.1)
    runs = {e2e: pyquant.quantize_model(make("llama", initializer_range=0.1),
                                        pyquant.UniSVQConfig(ft_epochs=1, refine_passes=1, e2e_epochs=e2e),
                                        filter_fn=every_linear, calibration_data=data, progress=False)
            for e2e in (0, 4)}

    def final_hidden_error(model):
        with torch.no_grad():
            return float(sum((model.model(**b).last_hidden_state - fp.model(**b).last_hidden_state).square().mean()
                             for b in data))

    assert final_hidden_error(runs[4]) < final_hidden_error(runs[0])
    heads = [pyquant.nn.quantized_layers(m)["lm_head"] for m in (runs[0], runs[4])]
    for name in ("codes", "A", "b", "su", "sv", "w_scale"):
        assert torch.equal(getattr(heads[0], name), getattr(heads[1], name)), name
    q0, q4 = (pyquant.nn.quantized_layers(m) for m in (runs[0], runs[4]))
    assert any(not torch.equal(q0[f].sv, q4[f].sv) for f in q0 if f != "lm_head")
    assert not torch.equal(runs[0].model.norm.weight, runs[4].model.norm.weight)
