"""DAQ on real fine-tuning deltas: MiniLM (base) and MiniLM after two AdamW steps of
real fine-tuning on real sentences (post)."""
import copy
import json

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import pyquant
from pyquant.fakequant import (FP8_MAX, DequantLinear, absmax_scales, dequantize_codes, expand_scales, parse_grid,
                               quantize_codes)
from pyquant.format import dequantize
from pyquant.nn import QuantLinear
from pyquant.quantizers import daq as daq_mod
from pyquant.quantizers.daq import DAQConfig, daq_quantize

FAMILIES = {"asyncio": 0, "threading": 0, "shutil": 1, "os": 1, "tempfile": 1}
LAYERS = ("encoder.layer.2.attention.self.query", "encoder.layer.2.intermediate.dense")


@pytest.fixture(scope="module")
def base_post(minilm):
    """(base BertModel, post BertModel): post = base after 2 real fine-tuning steps."""
    from pyquant.evaluation import tokenize
    from pyquant.sentences import labelled_sentences

    base, tokenizer = minilm
    pairs = [(s, FAMILIES[m]) for s, m in labelled_sentences() if m in FAMILIES][:16]
    batch = tokenize(tokenizer, [s for s, _ in pairs])
    y = torch.tensor([c for _, c in pairs])
    post = copy.deepcopy(base).train()
    torch.manual_seed(0)
    head = nn.Linear(384, 2)
    opt = torch.optim.AdamW([*post.parameters(), *head.parameters()], lr=1e-4)
    for _ in range(2):
        hidden = post(**batch).last_hidden_state
        mask = batch["attention_mask"].unsqueeze(-1).float()
        loss = F.cross_entropy(head((hidden * mask).sum(1) / mask.sum(1)), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return base, post.eval()


def _weights(base, post, fqn):
    return post.get_submodule(fqn).weight.detach(), base.get_submodule(fqn).weight.detach()


@pytest.mark.parametrize("grid,granularity", [("fp8", "block"), ("int4", "row"), ("pyquant2", "row")])
def test_daq_keeps_at_least_as_much_of_a_real_delta_as_absmax(base_post, grid, granularity):
    base, post = base_post
    improved = False
    for fqn in LAYERS[:1] if grid == "pyquant2" else LAYERS:  # pyquant2's exact-path search is the slow one
        w, wb = _weights(base, post, fqn)
        assert (w - wb).abs().gt(1e-5).float().mean() > 0.5  # a real, dense fine-tuning delta
        by_sign = daq_quantize(w, wb, grid=grid, granularity=granularity, metric="sign")
        by_cos = daq_quantize(w, wb, grid=grid, granularity=granularity, metric="cosine")
        assert by_sign.plain == by_cos.plain  # the same plain baseline
        assert by_sign.chosen["sign"] >= by_sign.plain["sign"], fqn
        assert by_cos.chosen["cosine"] >= by_cos.plain["cosine"], fqn
        improved |= by_sign.chosen["sign"] > by_sign.plain["sign"] and by_cos.chosen["cosine"] > by_cos.plain["cosine"]
    assert improved  # the search does find better scales on real deltas


class _Holder(nn.Module):
    def __init__(self, linear):
        super().__init__()
        self.layer = linear


@pytest.mark.parametrize("grid,granularity", [("fp8", "block"), ("int3", "row"), ("pyquant2", "row"),
                                              ("pyquant2", "tensor")])
def test_the_tensor_scored_in_the_search_is_bit_identical_to_the_deployed_one(base_post, monkeypatch, grid,
                                                                              granularity):
    base, post = base_post
    fqn = LAYERS[0]
    w, wb = _weights(base, post, fqn)
    seen = []
    original = daq_mod._Scorer.__call__

    def recording(self, deq):
        score = original(self, deq)
        seen.append((deq.clone(), score.clone(), self.block))
        return score

    monkeypatch.setattr(daq_mod._Scorer, "__call__", recording)
    model = _Holder(copy.deepcopy(post.get_submodule(fqn)))
    pyquant.quantize_model(model, DAQConfig(base={"layer.weight": wb}, grid=grid, granularity=granularity),
                           progress=False)
    layer = model.layer
    deployed = dequantize(layer.packed) if isinstance(layer, QuantLinear) else layer.dequantize_weight()
    assert isinstance(layer, QuantLinear if grid == "pyquant2" else DequantLinear)

    # replay the search from what the scorer saw: the plain scales, 5 coarse, 10 fine candidates; per
    # block the first best fine candidate, or the plain scales where it scores below them
    assert len(seen) == 1 + 5 + 10
    block = seen[0][2]
    plain_deq, plain_score = seen[0][0], seen[0][1]
    fine_scores = torch.stack([score for _, score, _ in seen[6:]])
    pick = fine_scores.argmax(0)
    best_score = fine_scores.gather(0, pick[None])[0]
    best_deq = plain_deq.clone()
    for i, (deq, _, _) in enumerate(seen[6:]):
        best_deq = torch.where(expand_scales(pick == i, tuple(w.shape), block), deq, best_deq)
    keep = (best_score < plain_score) | plain_score.isnan()
    best_deq = torch.where(expand_scales(keep, tuple(w.shape), block), plain_deq, best_deq)
    assert torch.equal(deployed, best_deq)
    assert not torch.equal(deployed, seen[0][0])  # not simply the plain scales
    if isinstance(layer, DequantLinear):
        x = torch.randn(5, w.shape[1])
        assert torch.equal(layer(x), F.linear(x, deployed, layer.bias))


def _block_sums(x, block):
    n, k = x.shape
    gr, gc = -(-n // block), -(-k // block)
    return F.pad(x, (0, gc * block - k, 0, gr * block - n)).reshape(gr, block, gc, block).sum(dim=(1, 3))


def _reference_multipliers(w, wb, grid, metric, block=128):
    """Tencent/AngelSlim's blockwise scale search (daq/scale_search.py), written again from its
    description: 5 ratios in [0.8, 1.5], the first best; 10 in [max(c - step/2, 0.8), min(c + step/2,
    1.5)], the first best; the default scale where that scores below it. Scored on the tensor the
    deployed layer computes with (fakequant's codes and scales). The one change pyquant makes: a
    block with no delta keeps 1.0."""
    g = parse_grid(grid)
    s0 = absmax_scales(w, g, (block, block))
    delta = w - wb
    sig = delta.abs() > 1e-5

    def deployed(scales):
        full = expand_scales(scales, tuple(w.shape), (block, block))
        return dequantize_codes(quantize_codes(w, full, g), full)

    def score(ratio):
        dq = deployed(s0 * ratio) - wb
        if metric == "sign":
            kept = (sig & (torch.sign(dq) == torch.sign(delta))).float()
            return _block_sums(kept, block) / _block_sums(sig.float(), block).clamp(min=1)
        dot = _block_sums(delta * dq, block)
        return dot / (_block_sums(delta.square(), block).sqrt().clamp(min=1e-10)
                      * _block_sums(dq.square(), block).sqrt().clamp(min=1e-10))

    lo, hi, n_coarse, n_fine = 0.8, 1.5, 5, 10
    ratios = torch.linspace(lo, hi, n_coarse)
    coarse = torch.stack([score(torch.full(s0.shape, float(r))) for r in ratios])
    best_coarse = ratios[coarse.argmax(0)]
    step = (hi - lo) / max(n_coarse - 1, 1)
    f_min, f_max = torch.clamp(best_coarse - step / 2, min=lo), torch.clamp(best_coarse + step / 2, max=hi)
    fine_ratios = torch.stack([f_min + t * (f_max - f_min) for t in torch.linspace(0, 1, n_fine)])
    fine = torch.stack([score(r) for r in fine_ratios])
    idx = fine.argmax(0, keepdim=True)
    ratio, best = fine_ratios.gather(0, idx)[0], fine.gather(0, idx)[0]
    ratio = torch.where(best < score(torch.ones(s0.shape)), torch.ones_like(ratio), ratio)
    return torch.where(_block_sums(sig.float(), block) > 0, ratio, torch.ones_like(ratio))


@pytest.mark.parametrize("grid,metric", [("fp8", "sign"), ("fp8", "cosine"), ("int4", "sign"), ("int3", "cosine")])
def test_chosen_multipliers_equal_the_reference_search(grid, metric):
    gen = torch.Generator().manual_seed(7)
    for trial in range(3):
        wb = torch.randn(300, 400, generator=gen) * 0.02  # ragged blocks at both edges
        delta = torch.randn(300, 400, generator=gen) * 0.002 * (trial + 1)
        delta *= torch.rand(300, 400, generator=gen) < 0.6  # sparse, like a fine-tuning delta
        delta[128:256, 128:256] = 0  # one block that post-training left alone
        w = wb + delta
        got = daq_quantize(w, wb, grid=grid, granularity="block", metric=metric).multipliers
        want = _reference_multipliers(w, wb, grid, metric)
        assert torch.equal(got, want), (trial, got, want)
        assert got[1, 1] == 1.0 and (got != 1).any()
        assert ((got == 1) | ((got >= 0.8) & (got <= 1.5))).all()


def test_plain_scales_are_kept_when_there_is_no_delta(base_post):
    base, _ = base_post
    w = base.get_submodule(LAYERS[0]).weight.detach()
    r = daq_quantize(w, w.clone(), grid="fp8", granularity="block")
    assert torch.equal(r.multipliers, torch.ones_like(r.multipliers))
    scales = absmax_scales(w, parse_grid("fp8"), (128, 128))
    full = expand_scales(scales, tuple(w.shape), (128, 128))
    assert torch.equal(r.scales, scales)
    assert torch.equal(r.codes.float(), (w / full).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn).float())
    assert r.codes.dtype == torch.float8_e4m3fn


def test_pyquant2_plain_scales_are_rtn(base_post):
    base, _ = base_post
    w = base.get_submodule(LAYERS[1]).weight.detach()
    for granularity, rtn in (("tensor", pyquant.RTNConfig()), ("row", pyquant.RTNConfig(hadamard=False))):
        got = daq_quantize(w, None, grid="pyquant2", granularity=granularity, hadamard=rtn.hadamard).packed
        want = rtn.quantize_weight(w)
        for name in ("codes", "su", "sv", "w_scale", "A", "b"):
            assert torch.equal(getattr(got, name), getattr(want, name)), (granularity, name)
        assert (got.had_in, got.had_out) == (want.had_in, want.had_out)


def test_daq_through_quantize_model_on_minilm_layers(base_post):
    base, post = base_post
    model = copy.deepcopy(post)
    config = DAQConfig(base=base, grid="fp8", granularity="block")
    pyquant.quantize_model(model, config, filter_fn=lambda m, fqn: fqn.startswith("encoder.layer.2."), progress=False)
    swapped = [n for n, m in model.named_modules() if isinstance(m, DequantLinear)]
    assert len(swapped) == 6 and set(model.pyquant_daq) == set(swapped)
    for fqn, rep in model.pyquant_daq.items():
        assert rep["chosen"]["sign"] >= rep["plain"]["sign"], fqn
    ids = torch.tensor([[101, 7592, 2088, 2003, 1037, 3231, 102]])
    ref, out = post(input_ids=ids).last_hidden_state, model(input_ids=ids).last_hidden_state
    assert F.cosine_similarity(ref, out, dim=-1).min() > 0.99
    json.dumps(config.to_dict())  # the config serialises (the base model is described, not dumped)


def test_errors(base_post):
    base, post = base_post
    with pytest.raises(ValueError, match="base is required"):
        DAQConfig()
    with pytest.raises(ValueError, match="grid"):
        DAQConfig(base=base, grid="fp16")
    with pytest.raises(ValueError, match="pyquant2"):
        DAQConfig(base=base, grid="pyquant2", granularity="block")
    with pytest.raises(ValueError, match="metric"):
        DAQConfig(base=base, metric="l1")
    other = nn.Linear(384, 384)
    with pytest.raises(ValueError, match="another model"):
        pyquant.quantize_model(_Holder(copy.deepcopy(post.get_submodule(LAYERS[1]))),
                               DAQConfig(base={"layer.weight": other.weight}), progress=False)
    with pytest.raises(ValueError, match="no weight for layer"):
        pyquant.quantize_model(_Holder(nn.Linear(8, 8)), DAQConfig(base={"x.weight": torch.zeros(8, 8)}),
                               progress=False)
    codes = torch.zeros(4, 8, dtype=torch.int8)
    with pytest.raises(TypeError, match="codes"):
        DequantLinear(codes, torch.ones(1, 1), (4, 8), "fp8")
    layer = DequantLinear(codes, torch.ones(4, 1), (1, 8), "int4")
    with pytest.raises(ValueError, match=r"\[\.\.\., 8\]"):
        layer(torch.zeros(2, 7))
