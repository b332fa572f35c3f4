"""Quantization vectors: extraction, patching, lambda search, storage, QAT.

The FT/QAT pair is a real (if small) training run: a backbone initialised from
MiniLM's last feed-forward block, with a fresh head, trained on MiniLM sentence
embeddings of real standard-library docstring sentences to tell two module
families apart.
"""
import copy

import pytest
import torch
from torch import nn

from pyquant import patching
from pyquant.fakequant import fake_quantize_rows, fake_quantize_rows_ste

FAMILIES = {"asyncio": 0, "threading": 0, "subprocess": 0, "shutil": 1, "os": 1, "tempfile": 1, "pathlib": 1}


class Net(nn.Module):
    def __init__(self, fc1: nn.Linear, fc2: nn.Linear, n_classes: int):
        super().__init__()
        self.backbone = nn.Sequential(fc1, nn.GELU(), fc2, nn.LayerNorm(fc2.out_features))
        self.head = nn.Linear(fc2.out_features, n_classes)

    def forward(self, x):
        return self.head(self.backbone(x))


@pytest.fixture(scope="module")
def task(minilm):
    from pyquant.evaluation import embed
    from pyquant.sentences import labelled_sentences

    model, tokenizer = minilm
    pairs = [(s, FAMILIES[m]) for s, m in labelled_sentences() if m in FAMILIES][:192]
    x = embed(model, tokenizer, [s for s, _ in pairs], batch_size=64) * 384 ** 0.5  # LayerNorm-like scale
    y = torch.tensor([c for _, c in pairs])
    ffn = model.encoder.layer[5]
    return x, y, copy.deepcopy(ffn.intermediate.dense), copy.deepcopy(ffn.output.dense)


def _batches(x, y, bs=32):
    return [(x[i:i + bs], y[i:i + bs]) for i in range(0, len(x) - bs + 1, bs)]


@pytest.fixture(scope="module")
def ft_qat(task):
    x, y, fc1, fc2 = task
    runs = {}
    for kind, bits in (("ft", None), ("qat", 3)):
        torch.manual_seed(0)  # same init for both runs
        net = Net(copy.deepcopy(fc1), copy.deepcopy(fc2), 2)
        losses = patching.finetune(net, _batches(x, y), steps=12, lr=3e-4, warmup=2, bits=bits, seed=0)
        runs[kind] = (net, losses)
    return runs


def test_finetune_leaves_plain_modules_with_latent_weights(ft_qat):
    qat, losses = ft_qat["qat"]
    assert len(losses) == 12 and all(torch.isfinite(torch.tensor(losses)))
    names = set(qat.state_dict())
    assert not any("parametrizations" in n for n in names)
    assert names == set(ft_qat["ft"][0].state_dict())
    # latent weights are float, not snapped to the 3-bit grid
    w = qat.backbone[0].weight.detach()
    assert not torch.equal(w, fake_quantize_rows(w, 3))


def test_qat_differs_from_ft_and_trains_through_the_quantizer(ft_qat):
    ft, ft_losses = ft_qat["ft"]
    qat, qat_losses = ft_qat["qat"]
    # identical first step input and init: the first losses differ only by the fake quantization
    assert ft_losses[0] != qat_losses[0]
    v = patching.quantization_vector(qat, ft)
    # the reference's scope: every floating backbone tensor, the LayerNorm (backbone.3) too
    assert set(v) == {f"backbone.{i}.{p}" for i in (0, 2, 3) for p in ("weight", "bias")}
    assert all(t.abs().max() > 0 for t in v.values())
    assert set(patching.quantization_vector(qat, ft, scope="quantizable")) == {
        "backbone.0.weight", "backbone.0.bias", "backbone.2.weight", "backbone.2.bias"}
    with pytest.raises(ValueError, match="scope"):
        patching.quantization_vector(qat, ft, scope="linear")


def test_extract_then_apply_reproduces_qat_exactly_and_spares_the_head(ft_qat):
    ft, _ = ft_qat["ft"]
    qat, _ = ft_qat["qat"]
    v = patching.quantization_vector(qat, ft)
    assert not any(patching.is_head(n) for n in v)
    patched = patching.apply_vector(copy.deepcopy(ft), v, lam=1.0)
    ps, qs, fs = patched.state_dict(), qat.state_dict(), ft.state_dict()
    for n in v:
        assert torch.equal(ps[n], qs[n]), n
    for n in ("head.weight", "head.bias"):  # the head: not in v
        assert torch.equal(ps[n], fs[n]), n
    assert not torch.equal(qs["head.weight"], fs["head.weight"])  # so "untouched" is a real check


def test_state_dicts_work_like_modules(ft_qat):
    ft, _ = ft_qat["ft"]
    qat, _ = ft_qat["qat"]
    v_mod = patching.quantization_vector(qat, ft)
    v_sd = patching.quantization_vector(qat.state_dict(), ft.state_dict())
    assert set(v_mod) == set(v_sd) and all(torch.equal(v_mod[n], v_sd[n]) for n in v_mod)
    state = {k: t.clone() for k, t in ft.state_dict().items()}
    patching.apply_vector(state, v_sd)
    assert torch.equal(state["backbone.0.weight"], qat.state_dict()["backbone.0.weight"])


def test_quantizable_names_of_minilm_from_module_and_state_dict_agree(minilm):
    model, _ = minilm
    names = patching.quantizable_names(model)
    assert len(names) == 2 * 37  # 36 encoder Linear layers + the pooler, weight and bias each
    assert names == patching.quantizable_names(model.state_dict())
    assert not any("embeddings" in n or "LayerNorm" in n for n in names)
    backbone = patching.backbone_names(model)
    assert names < backbone and backbone == patching.backbone_names(model.state_dict())
    assert {"embeddings.word_embeddings.weight", "embeddings.LayerNorm.weight",
            "encoder.layer.0.attention.output.LayerNorm.bias"} <= backbone
    assert backbone == {n for n, t in model.state_dict().items() if t.is_floating_point()}  # no head to drop


def test_mismatched_vectors_raise_and_leave_the_model_untouched(ft_qat, task):
    ft, _ = ft_qat["ft"]
    qat, _ = ft_qat["qat"]
    v = patching.quantization_vector(qat, ft)
    other = Net(nn.Linear(384, 64), nn.Linear(64, 384), 2)  # another shape, same names
    before = copy.deepcopy(other.state_dict())
    with pytest.raises(ValueError, match=r"backbone\.0\.(weight|bias).*shape"):
        patching.apply_vector(other, v)
    assert all(torch.equal(before[k], t) for k, t in other.state_dict().items())

    renamed = {"encoder." + k: t for k, t in v.items()}
    target = copy.deepcopy(ft)
    with pytest.raises(ValueError, match="missing"):
        patching.apply_vector(target, renamed)
    assert torch.equal(target.backbone[0].weight, ft.backbone[0].weight)

    with pytest.raises(ValueError, match="shape"):
        patching.quantization_vector(qat, other)
    with pytest.raises(ValueError, match="missing"):
        patching.quantization_vector(qat, {"head.weight": ft.head.weight})
    with pytest.raises(TypeError, match="lam"):
        patching.apply_vector(copy.deepcopy(ft), v, lam=float("nan"))


def test_save_load_identical_and_atomic(ft_qat, tmp_path):
    ft, _ = ft_qat["ft"]
    qat, _ = ft_qat["qat"]
    v = patching.quantization_vector(qat, ft)
    path = patching.save_vector(v, tmp_path / "qv.safetensors", metadata={"donor": "families"})
    w = patching.load_vector(path)
    assert set(w) == set(v)
    for n in v:
        assert w[n].dtype == v[n].dtype == torch.float64 and torch.equal(w[n], v[n])
    patching.save_vector(patching.scale_vector(v, 2.0), path)  # overwrite in place
    assert torch.equal(patching.load_vector(path)["backbone.0.bias"], 2 * v["backbone.0.bias"])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["qv.safetensors"]  # no temporary file left behind
    (tmp_path / "bad.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(ValueError, match="not a readable"):
        patching.load_vector(tmp_path / "bad.safetensors")
    with pytest.raises(ValueError, match="no vector file"):
        patching.load_vector(tmp_path / "absent.safetensors")


def test_search_lambda_picks_the_best_and_restores_the_model(ft_qat):
    ft, _ = ft_qat["ft"]
    qat, _ = ft_qat["qat"]
    v = patching.quantization_vector(qat, ft)
    model = copy.deepcopy(ft)
    before = copy.deepcopy(model.state_dict())
    target = ft.backbone[0].weight.double() + 0.5 * v["backbone.0.weight"]

    def eval_fn(m):  # best when the patch is exactly half the vector
        return -(m.backbone[0].weight.double() - target).abs().sum().item()

    lam, scores = patching.search_lambda(model, v, eval_fn, grid=patching.PROJECT_LAMBDA_GRID, return_scores=True)
    assert lam == 0.5 and list(scores) == list(patching.PROJECT_LAMBDA_GRID)
    assert all(torch.equal(before[k], t) for k, t in model.state_dict().items())
    # the reference's grid, and its tie rule: the smallest of the best
    assert patching.DEFAULT_LAMBDA_GRID == (0.15, 0.30, 0.45, 0.60, 0.75, 0.90, 1.00, 1.05, 1.20, 1.35, 1.50)
    flat = lambda m: 0.0  # noqa: E731
    assert patching.search_lambda(model, v, flat) == 0.15
    assert patching.search_lambda(model, v, flat, grid=[1.5, 0.25, 1.25]) == 0.25
    assert patching.search_lambda(model, v, flat, grid=[0.25, 1.5, 1.25], ties="closest_to_one") == 1.25
    with pytest.raises(ValueError, match="ties"):
        patching.search_lambda(model, v, flat, ties="largest")
    with pytest.raises(ValueError, match="grid"):
        patching.search_lambda(model, v, eval_fn, grid=[])


def test_vector_arithmetic(ft_qat):
    ft, _ = ft_qat["ft"]
    qat, _ = ft_qat["qat"]
    v = patching.quantization_vector(qat, ft)
    assert patching.cosine(v, patching.scale_vector(v, 3.0)) == pytest.approx(1.0, abs=1e-12)
    assert patching.cosine(v, patching.scale_vector(v, -0.5)) == pytest.approx(-1.0, abs=1e-12)
    zero = patching.add_vectors(v, patching.scale_vector(v, -1.0))
    assert all(t.abs().max() == 0 for t in zero.values())
    assert patching.vector_norm(patching.scale_vector(v, 2.0)) == pytest.approx(2 * patching.vector_norm(v))
    only_w = patching.restrict(v, lambda n: n.endswith(".weight"))
    assert set(only_w) == {"backbone.0.weight", "backbone.2.weight", "backbone.3.weight"}
    with pytest.raises(ValueError, match="other names"):
        patching.add_vectors(v, only_w)
    with pytest.raises(ValueError, match="different names"):
        patching.cosine(v, only_w)


def test_fake_quantize_rows_levels_and_ste(task):
    _, _, fc1, fc2 = task
    for w in (fc1.weight.detach(), fc2.weight.detach()):
        for bits in (2, 3, 4, 8):
            q = fake_quantize_rows(w, bits)
            qmax = 2 ** (bits - 1) - 1
            scale = w.abs().amax(dim=1, keepdim=True) / qmax
            levels = torch.round(q / scale)
            assert levels.abs().max() <= qmax and torch.allclose(levels * scale, q)
            assert ((q - w).abs() <= scale / 2 + 1e-6).all()  # round to nearest
    w = fc1.weight.detach().clone().requires_grad_(True)
    fake_quantize_rows_ste(w, 3).sum().backward()
    assert torch.equal(w.grad, torch.ones_like(w))  # straight-through: identity gradient
