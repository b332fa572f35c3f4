"""UniSVQ: exact codeword search, LDLQ vs nearest rounding on real MiniLM layers with
real calibration Hessians, codebook least squares, determinism, and the model pipeline
(block fine-tuning, interruption)."""
import os

import pytest
import torch
from torch import nn

import pyquant
from pyquant.calibration import collect_hessians
from pyquant.format import codebook, dequantize
from pyquant.quantizers.blockwise import find_blocks
from pyquant.quantizers.rtn import RTNConfig
from pyquant.quantizers.unisvq import (UniSVQConfig, _TrainableQuant, block_ldl, fit_codebook, ldlq,
                                       nearest_codeword, proxy_loss, refine, rotate_weight,
                                       round_to_nearest, _input_groups)

os.environ.setdefault("HF_HUB_OFFLINE", "1")

# Every weight shape of the encoder (384->384, 384->1536, 1536->384), first and last block.
MINILM_LAYERS = ["encoder.layer.0.attention.self.query", "encoder.layer.0.attention.output.dense",
                 "encoder.layer.0.intermediate.dense", "encoder.layer.5.attention.self.value",
                 "encoder.layer.5.output.dense"]


@pytest.fixture(scope="module")
def minilm_hessians():
    """Real weights and real Hessians: 64 calibration sentences through the bundled MiniLM."""
    from pyquant.evaluation import batches, load_minilm
    from pyquant.sentences import split_sentences

    model, tok = load_minilm()
    sentences, _ = split_sentences(64, 0, seed=1)
    mods = {n: model.get_submodule(n) for n in MINILM_LAYERS}
    hess = collect_hessians(model, mods, batches(tok, sentences))
    return {n: (mods[n].weight.detach().clone(), hess[n]) for n in MINILM_LAYERS}


def _brute_force(w, cb, metric):
    d = w[:, None, :] - cb[None, :, :]  # [M, C, 4]
    return torch.einsum("mcp,pq,mcq->mc", d, metric, d)


@pytest.mark.parametrize("with_metric", [False, True])
def test_nearest_codeword_equals_brute_force(with_metric):
    gen = torch.Generator().manual_seed(0)
    for trial in range(5):
        a, b = torch.randn(4, 4, generator=gen), torch.randn(4, generator=gen)
        cb = codebook(a, b)
        w = torch.randn(3000, 4, generator=gen) * (trial + 1)  # inside and far outside the codebook
        if with_metric:
            r = torch.randn(4, 4, generator=gen)
            metric = r @ r.T + 0.1 * torch.eye(4)
        else:
            metric = torch.eye(4)
        got = nearest_codeword(w, cb, metric if with_metric else None)
        dist = _brute_force(w.double(), cb.double(), metric.double())
        best = dist.min(1)
        # Same distance everywhere; same index wherever the minimum is not a near tie.
        torch.testing.assert_close(dist.gather(1, got[:, None]).squeeze(1), best.values, rtol=1e-5, atol=1e-5)
        second = dist.topk(2, dim=1, largest=False).values[:, 1]
        clear = second - best.values > 1e-4 * (1 + best.values)
        assert clear.float().mean() > 0.99
        assert torch.equal(got[clear], best.indices[clear])


def test_nearest_codeword_rejects_bad_shapes():
    with pytest.raises(ValueError, match="w must be"):
        nearest_codeword(torch.randn(5, 3), torch.randn(256, 4))


def test_block_ldl_factorises_hessian():
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(200, 32, generator=gen, dtype=torch.float64)
    h = x.T @ x / 200 + 0.01 * torch.eye(32, dtype=torch.float64)
    mdot, d = block_ldl(h)
    full_d = torch.block_diag(*d)
    eye = torch.eye(32, dtype=torch.float64)
    torch.testing.assert_close((eye + mdot) @ full_d @ (eye + mdot).T, h)
    # Strictly block-lower: zero on and above the 4x4 diagonal blocks.
    blocks = torch.arange(32) // 4
    assert torch.all(mdot[blocks[:, None] <= blocks[None, :]] == 0)


@pytest.mark.parametrize("name", MINILM_LAYERS)
def test_ldlq_beats_nearest_rounding_on_real_layers(minilm_hessians, name):
    """Acceptance 2: proxy loss tr((W − Ŵ) H (W − Ŵ)ᵀ) with the real (undamped) Hessian."""
    w, h = minilm_hessians[name]
    pw = UniSVQConfig().quantize_weight(w, h)
    loss_ldlq = proxy_loss(w, dequantize(pw), h)
    loss_nearest = proxy_loss(w, dequantize(round_to_nearest(w, pw)), h)  # same format, same codebook and scales
    loss_rtn = proxy_loss(w, dequantize(RTNConfig().quantize_weight(w)), h)  # the RTN 2-bit baseline
    assert loss_ldlq < 0.7 * loss_nearest, (loss_ldlq, loss_nearest)
    assert loss_ldlq < 0.7 * loss_rtn, (loss_ldlq, loss_rtn)


def test_refine_and_codebook_fit_never_increase_the_loss(minilm_hessians):
    w, h = minilm_hessians["encoder.layer.0.attention.output.dense"]
    wr, hr = w[:64].float(), (h / h.diagonal().mean() + 0.01 * torch.eye(h.shape[0], dtype=h.dtype)).float()
    cb = (wr.square().mean().sqrt() / 0.9) * codebook(torch.eye(4) / 1.25**0.5, torch.full((4,), -1.5 / 1.25**0.5))
    codes = nearest_codeword(wr.reshape(-1, 4), cb).reshape(64, -1)
    loss0 = proxy_loss(wr, cb[codes].reshape(wr.shape), hr)
    codes_ldlq = ldlq(wr, hr, cb)
    loss1 = proxy_loss(wr, cb[codes_ldlq].reshape(wr.shape), hr)
    codes_ref = refine(wr, hr, cb, codes_ldlq, passes=3)
    loss2 = proxy_loss(wr, cb[codes_ref].reshape(wr.shape), hr)
    assert loss1 < loss0 and loss2 <= loss1 * (1 + 1e-6)
    # Refinement from plain rounding also only goes down.
    assert proxy_loss(wr, cb[refine(wr, hr, cb, codes, 1)].reshape(wr.shape), hr) < loss0
    # The least-squares codebook is a stationary point (gradient ~0 next to the gradient
    # at the starting grid codebook), and no worse than the starting one.
    def loss_and_grad(a, b):
        theta = torch.cat([a, b[:, None]], 1).double().requires_grad_(True)
        w_hat = codebook(theta[:, :4], theta[:, 4])[codes_ref].reshape(wr.shape)
        loss = ((w_hat - wr.double()) @ hr.double() * (w_hat - wr.double())).sum()
        loss.backward()
        return float(loss.detach()), theta.grad.abs().max()

    scale = wr.square().mean().sqrt() / 0.9
    loss_grid, grad_grid = loss_and_grad(scale * torch.eye(4) / 1.25**0.5, scale * torch.full((4,), -1.5 / 1.25**0.5))
    loss_fit, grad_fit = loss_and_grad(*fit_codebook(wr, hr, codes_ref))
    assert abs(loss_grid - loss2) < 1e-4 * loss2
    assert loss_fit <= loss2 * (1 + 1e-9)
    assert grad_fit < 1e-4 * grad_grid


def test_quantize_weight_is_deterministic_and_valid(minilm_hessians):
    w, h = minilm_hessians["encoder.layer.0.attention.self.query"]
    cfg = UniSVQConfig(refine_passes=1, codebook_iters=1)
    p1, p2, p3 = cfg.quantize_weight(w, h), cfg.quantize_weight(w, h), cfg.quantize_weight(w, h, seed=5)
    for name in ("codes", "A", "b", "su", "sv", "w_scale"):
        assert torch.equal(getattr(p1, name), getattr(p2, name)), name
    assert not torch.equal(p1.su, p3.su)
    assert p1.method == "unisvq" and p1.had_in == 128 and p1.had_out == 128
    assert p1.su.dtype == torch.float16 and pyquant.format.bits_per_weight(p1) < 2.1
    # The codebook is stored normalised; its scale lives in w_scale.
    assert abs(float(codebook(p1.A, p1.b).square().mean()) - 1) < 1e-4
    layer = pyquant.QuantLinear.from_packed(p1)
    x = torch.randn(3, w.shape[1])
    with pyquant.kernels.force_backend("torch"):  # the packed tensors' consistency, not a kernel's rounding
        torch.testing.assert_close(layer(x), x @ dequantize(p1).T, rtol=1e-4, atol=1e-4)


def test_quantize_weight_rejects_bad_hessian():
    w = torch.randn(8, 16)
    with pytest.raises(ValueError, match="hessian must have shape"):
        UniSVQConfig().quantize_weight(w, torch.eye(8))
    with pytest.raises(ValueError, match="NaN"):
        UniSVQConfig().quantize_weight(w, torch.full((16, 16), float("nan")))
    with pytest.raises(TypeError, match="hessian"):
        UniSVQConfig().quantize_weight(w, torch.eye(16, dtype=torch.long))
    with pytest.raises(ValueError, match="ft_holdout"):
        UniSVQConfig(ft_holdout=1.5)
    with pytest.raises(ValueError, match="ft_target"):
        UniSVQConfig(ft_target="teacher")
    with pytest.raises(ValueError, match="recipe"):
        UniSVQConfig(recipe="quip")
    with pytest.raises(ValueError, match="codebook_iters must be 0 with recipe='reference'"):
        UniSVQConfig(recipe="reference", codebook_iters=2)
    with pytest.raises(ValueError, match="e2e_epochs"):
        UniSVQConfig(e2e_epochs=-1)


def test_recipes_fill_in_their_defaults_and_keep_what_is_given():
    ours, ref = UniSVQConfig(), UniSVQConfig(recipe="reference")
    assert (ours.refine_passes, ours.codebook_iters, ours.ft_epochs, ours.ft_lr, ours.ft_norm_lr) == (3, 2, 4, 5e-3, 1e-4)
    assert (ref.refine_passes, ref.codebook_iters, ref.ft_epochs, ref.ft_lr, ref.ft_norm_lr) == (10, 0, 1, 5e-4, 5e-5)
    assert UniSVQConfig(recipe="reference", ft_epochs=3).ft_epochs == 3
    assert ref.to_dict()["recipe"] == "reference" and ref.to_dict()["refine_passes"] == 10
    best = UniSVQConfig.best(seed=3)
    assert best.ft_sequential and best.ft_norm_lr == 1e-3 and best.seed == 3 and best.recipe == "pyquant"
    from pyquant import cli
    assert cli._config("best") == UniSVQConfig.best() and cli._config("unisvq") == UniSVQConfig()


def test_reference_recipe_uses_the_fixed_grid_and_sign_scales(minilm_hessians):
    w, h = minilm_hessians["encoder.layer.0.intermediate.dense"]
    p = UniSVQConfig(recipe="reference").quantize_weight(w, h)
    torch.testing.assert_close(p.A, torch.eye(4) / 1.25**0.5, rtol=0, atol=1e-6)
    torch.testing.assert_close(p.b, torch.full((4,), -1.5 / 1.25**0.5), rtol=0, atol=1e-6)
    assert torch.equal(p.su.abs(), torch.ones_like(p.su)) and torch.equal(p.sv.abs(), torch.ones_like(p.sv))
    w_rot = rotate_weight(w, p.su, p.sv, p.had_in, p.had_out)
    assert abs(float(p.w_scale) - float(w_rot.square().mean().sqrt()) / 0.83) < 1e-6 * float(p.w_scale)
    # Its own LDLQ + 10 passes still beat nearest rounding on the same grid.
    assert proxy_loss(w, dequantize(p), h) < proxy_loss(w, dequantize(round_to_nearest(w, p)), h)


# ---- the whole-model pipeline, on a small random BERT -----------------------

def _tiny_bert():
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    # Larger initial weights than BERT's 0.02, so the blocks (not the residual path) matter.
    cfg = BertConfig(vocab_size=120, hidden_size=64, num_hidden_layers=3, num_attention_heads=4,
                     intermediate_size=128, max_position_embeddings=64, initializer_range=0.1)
    return BertModel(cfg).eval()


def _tiny_data(n_batches=6):
    gen = torch.Generator().manual_seed(0)
    out = []
    for _ in range(n_batches):
        ids = torch.randint(5, 120, (4, 12), generator=gen)
        lengths = torch.randint(4, 13, (4,), generator=gen)
        mask = (torch.arange(12)[None] < lengths[:, None]).long()
        out.append({"input_ids": ids * mask, "attention_mask": mask})
    return out


def _encoder(m, fqn):
    return isinstance(m, nn.Linear) and fqn.startswith("encoder.")


def _output_error(model, ref_model, data):
    with torch.no_grad():
        errs = []
        for b in data:
            m = b["attention_mask"].bool()
            errs.append((model(**b).last_hidden_state[m] - ref_model(**b).last_hidden_state[m]).square().mean())
    return float(torch.stack(errs).mean())


@pytest.fixture(scope="module")
def tiny_runs():
    """The tiny BERT quantized without and with block fine-tuning (shared by several tests)."""
    ref, data = _tiny_bert(), _tiny_data()
    runs = {}
    for key, kw in (("none", {"finetune": False}), ("model", {}), ("block", {"ft_target": "block"})):
        model = _tiny_bert()
        pyquant.quantize_model(model, UniSVQConfig(ft_epochs=3, **kw), filter_fn=_encoder, calibration_data=data,
                               progress=False)
        runs[key] = model
    return ref, data, runs


@pytest.mark.parametrize("scale_dtype", [torch.float16, torch.float32])
def test_trainable_stand_in_matches_the_layer_and_writes_back(scale_dtype):
    gen = torch.Generator().manual_seed(4)
    w = torch.randn(32, 64, generator=gen)
    q = pyquant.QuantLinear.from_packed(UniSVQConfig(scale_dtype=scale_dtype).quantize_weight(w),
                                        torch.randn(32, generator=gen))
    wrap = _TrainableQuant(q)
    x = torch.randn(5, 64, generator=gen)
    with pyquant.kernels.force_backend("torch"):  # the reference math, not a kernel's rounding
        torch.testing.assert_close(wrap(x), q(x), rtol=1e-4, atol=1e-4)
    wrap(x).square().sum().backward()
    for name, p in wrap.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    with torch.no_grad():
        for p in wrap.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=gen))
    expected = wrap(x).detach()
    wrap.write_back()
    # The learned values, stored in the layer's own dtypes.
    assert q.su.dtype == scale_dtype and q.sv.dtype == scale_dtype and q.A.dtype == torch.float32
    assert torch.equal(q.su, (wrap.su0 * wrap.gu).detach().to(scale_dtype))
    assert torch.equal(q.sv, (wrap.sv0 * wrap.gv).detach().to(scale_dtype))
    assert torch.equal(q.A, wrap.A.detach()) and torch.equal(q.b, wrap.b.detach())
    assert torch.equal(q.w_scale, (wrap.ws0 * wrap.gs).detach())
    if scale_dtype == torch.float32:
        with pyquant.kernels.force_backend("torch"):
            torch.testing.assert_close(q(x), expected, rtol=1e-4, atol=1e-4)


def test_find_blocks_finds_the_transformer_layers():
    model = _tiny_bert()
    targets = {n: m for n, m in model.named_modules() if _encoder(m, n)}
    name, blocks = find_blocks(model, targets)
    assert name == "encoder.layer" and len(blocks) == 3
    assert all(type(b).__name__ == "BertLayer" for b in blocks)


def test_pipeline_quantizes_every_selected_layer_and_finetuning_helps(tiny_runs):
    ref, data, runs = tiny_runs
    for model in runs.values():
        layers = pyquant.nn.quantized_layers(model)
        assert len(layers) == 3 * 6 and all(f.startswith("encoder.") for f in layers)
        assert all(layer.method == "unisvq" for layer in layers.values())
        assert isinstance(model.pooler.dense, nn.Linear)
        assert not any(isinstance(m, _TrainableQuant) for m in model.modules())
        assert all(p.requires_grad for p in model.parameters())  # flags restored after fine-tuning
    err = {k: _output_error(m, ref, data) for k, m in runs.items()}
    assert err["model"] < err["none"] and err["block"] < err["none"], err
    # The first block (same inputs and Hessians in every run) has the same codes; fine-tuning
    # moved codebooks, scales and norms.
    none, tuned = runs["none"], runs["model"]
    assert torch.equal(none.encoder.layer[0].output.dense.codes, tuned.encoder.layer[0].output.dense.codes)
    q_none, q_tuned = pyquant.nn.quantized_layers(none), pyquant.nn.quantized_layers(tuned)
    assert any(not torch.equal(q_none[f].A, q_tuned[f].A) for f in q_none)
    assert any(not torch.equal(q_none[f].w_scale, q_tuned[f].w_scale) for f in q_none)
    assert any(not torch.equal(a.weight, b.weight) for a, b in zip(none.modules(), tuned.modules())
               if isinstance(a, nn.LayerNorm))


def test_pipeline_is_deterministic(tiny_runs):
    ref, data, runs = tiny_runs
    again = _tiny_bert()
    pyquant.quantize_model(again, UniSVQConfig(ft_epochs=3), filter_fn=_encoder, calibration_data=data,
                           progress=False)
    sd1, sd2 = runs["model"].state_dict(), again.state_dict()
    assert sd1.keys() == sd2.keys()
    for k in sd1:
        assert torch.equal(sd1[k], sd2[k]), k


def test_end_to_end_finetuning_lowers_the_held_out_error_and_keeps_the_codes(tiny_runs):
    ref, data, runs = tiny_runs
    held_out = _tiny_data(9)[6:]  # same generator: batches 6-8 are not calibration batches
    model = _tiny_bert()
    pyquant.quantize_model(model, UniSVQConfig(ft_epochs=3, e2e_epochs=6), filter_fn=_encoder,
                           calibration_data=data, progress=False)
    block_only = runs["model"]  # the same block stage, without the end-to-end one
    assert _output_error(model, ref, held_out) < _output_error(block_only, ref, held_out)
    q_e2e, q_block = pyquant.nn.quantized_layers(model), pyquant.nn.quantized_layers(block_only)
    assert q_e2e.keys() == q_block.keys()
    assert all(torch.equal(q_e2e[f].codes, q_block[f].codes) for f in q_e2e)  # codes frozen
    for name in ("su", "sv", "A", "w_scale"):
        assert any(not torch.equal(getattr(q_e2e[f], name), getattr(q_block[f], name)) for f in q_e2e), name
    assert not torch.equal(model.embeddings.LayerNorm.weight, block_only.embeddings.LayerNorm.weight)
    assert not any(isinstance(m, _TrainableQuant) for m in model.modules())
    assert all(p.requires_grad for p in model.parameters())


def test_sequential_finetuning_quantizes_groups_in_order_and_beats_one_finetuning(tiny_runs):
    ref, data, runs = tiny_runs
    held_out = _tiny_data(9)[6:]
    model = _tiny_bert()
    linears = {n: m for n, m in model.encoder.layer[0].named_modules() if isinstance(m, nn.Linear)}
    hess = collect_hessians(model.encoder.layer[0], linears, [torch.randn(2, 5, 64) for _ in range(2)])
    assert _input_groups(list(linears), hess) == [
        ["attention.self.query", "attention.self.key", "attention.self.value"], ["attention.output.dense"],
        ["intermediate.dense"], ["output.dense"]]
    pyquant.quantize_model(model, UniSVQConfig(ft_epochs=3, ft_sequential=True), filter_fn=_encoder,
                           calibration_data=data, progress=False)
    assert _output_error(model, ref, held_out) < _output_error(runs["model"], ref, held_out)
    # The layers after the first group were trained in full precision before being quantized:
    # their codes differ from the one-fine-tuning run's, the first group's do not.
    first, last = "encoder.layer.0.attention.self.query", "encoder.layer.0.output.dense"
    q_seq, q_one = pyquant.nn.quantized_layers(model), pyquant.nn.quantized_layers(runs["model"])
    assert torch.equal(q_seq[first].codes, q_one[first].codes)
    assert not torch.equal(q_seq[last].codes, q_one[last].codes)


def test_reference_recipe_quantizes_each_block_from_full_precision_inputs():
    """recipe='reference': a later block's layer gets the fp model's Hessian (so, without
    fine-tuning, exactly quantize_weight of the fp weight and fp Hessian); its block fine-tuning
    moves su/sv and the norms only, and never the codes (fp inputs: nothing upstream changes them)."""
    fp, data = _tiny_bert(), _tiny_data()
    runs = {}
    for ft in (False, True):
        runs[ft] = pyquant.quantize_model(_tiny_bert(), UniSVQConfig(recipe="reference", finetune=ft),
                                          filter_fn=_encoder, calibration_data=data, progress=False)
    cfg = UniSVQConfig(recipe="reference")
    fqn = "encoder.layer.2.intermediate.dense"
    linear = fp.get_submodule(fqn)
    expected = cfg.quantize_weight(linear.weight, collect_hessians(fp, {fqn: linear}, data)[fqn], seed=cfg._seed(fqn))
    assert torch.equal(runs[False].get_submodule(fqn).codes, expected.codes)
    plain, tuned = pyquant.nn.quantized_layers(runs[False]), pyquant.nn.quantized_layers(runs[True])
    for f in plain:
        for name in ("codes", "A", "b", "w_scale"):
            assert torch.equal(getattr(plain[f], name), getattr(tuned[f], name)), (f, name)
    assert any(not torch.equal(plain[f].su, tuned[f].su) for f in plain)
    assert any(not torch.equal(plain[f].sv, tuned[f].sv) for f in plain)


@pytest.mark.parametrize("config", [UniSVQConfig.best(ft_epochs=2, e2e_epochs=2), UniSVQConfig(recipe="reference")],
                         ids=["best+e2e", "reference"])
def test_every_recipe_is_deterministic(config):
    """The same seed: bit-identical codes, scales, codebooks and norms (sequential and end-to-end
    fine-tuning, the reference recipe)."""
    data = _tiny_data()
    a, b = (pyquant.quantize_model(_tiny_bert(), config, filter_fn=_encoder, calibration_data=data, progress=False)
            for _ in range(2))
    sd1, sd2 = a.state_dict(), b.state_dict()
    assert sd1.keys() == sd2.keys()
    for k in sd1:
        assert torch.equal(sd1[k], sd2[k]), k


def test_checkpoint_round_trip(tiny_runs, tmp_path):
    """A fine-tuned UniSVQ model (fine-tuned norms included) saves and loads exactly."""
    ref, data, runs = tiny_runs
    pyquant.save_quantized(runs["model"], tmp_path / "ckpt")
    loaded = pyquant.load_quantized(_tiny_bert(), tmp_path / "ckpt")
    with torch.no_grad():
        torch.testing.assert_close(loaded(**data[0]).last_hidden_state, runs["model"](**data[0]).last_hidden_state)


@pytest.mark.parametrize("stage", ["block", "sequential", "end-to-end"])
def test_interrupt_during_finetuning_leaves_the_model_as_it_was(monkeypatch, stage):
    model, data = _tiny_bert(), _tiny_data()
    fresh = _tiny_bert()
    calls = {"n": 0}
    real_step = torch.optim.Adam.step

    def step(self, *a, **k):
        calls["n"] += 1
        # 5 training batches per epoch: step 8 is in the second block's fine-tuning, or (sequential)
        # in the first block's second one, after the first trained the fp weights of its o, up and
        # down projections; step 18 is in the end-to-end stage (after 3 blocks x 1 epoch)
        if calls["n"] == at:
            raise KeyboardInterrupt
        return real_step(self, *a, **k)

    at = 18 if stage == "end-to-end" else 8
    monkeypatch.setattr(torch.optim.Adam, "step", step)
    with pytest.raises(KeyboardInterrupt):
        pyquant.quantize_model(model, UniSVQConfig(ft_epochs=1, e2e_epochs=2 if stage == "end-to-end" else 0,
                                                   ft_sequential=stage == "sequential"),
                               filter_fn=_encoder, calibration_data=data, progress=False)
    assert calls["n"] == at
    # All or nothing: the model is exactly as before (block 0 was quantized and its norms fine-tuned)
    assert not any(isinstance(m, (_TrainableQuant, pyquant.QuantLinear)) for m in model.modules())
    assert [type(m) for m in model.modules()] == [type(m) for m in fresh.modules()]
    before, after = fresh.state_dict(), model.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    for m in model.modules():
        assert not m._forward_pre_hooks and not m._forward_hooks
    assert all(p.requires_grad for p in model.parameters())
    with torch.no_grad():
        assert torch.isfinite(model(**data[0]).last_hidden_state).all()
