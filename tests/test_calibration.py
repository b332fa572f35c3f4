"""Calibration Hessians: exact value, padding excluded, streaming, and clear errors on bad input."""
import pytest
import torch
from torch import nn

import pyquant
from pyquant.calibration import CalibrationError, collect_hessians, materialize, select_rows


class Toy(nn.Module):
    """Token model with a dict interface like a Hugging Face encoder."""

    def __init__(self, vocab=50, dim=8):
        super().__init__()
        torch.manual_seed(0)
        self.emb = nn.Embedding(vocab, dim)
        self.fc1 = nn.Linear(dim, 16)
        self.fc2 = nn.Linear(16, 8)

    def forward(self, input_ids, attention_mask=None):
        return self.fc2(torch.relu(self.fc1(self.emb(input_ids))))


def _batch(ids, lengths):
    ids = torch.as_tensor(ids)
    mask = (torch.arange(ids.shape[1])[None, :] < torch.as_tensor(lengths)[:, None]).long()
    return {"input_ids": ids, "attention_mask": mask}


@pytest.fixture
def toy():
    return Toy().eval()


def test_hessian_is_second_moment_of_real_tokens(toy):
    gen = torch.Generator().manual_seed(1)
    b1 = _batch(torch.randint(1, 50, (3, 6), generator=gen), [6, 2, 4])
    b2 = _batch(torch.randint(1, 50, (2, 5), generator=gen), [1, 5])
    h = collect_hessians(toy, {"fc1": toy.fc1, "fc2": toy.fc2}, [b1, b2])
    rows = torch.cat([toy.emb(b["input_ids"])[b["attention_mask"].bool()] for b in (b1, b2)]).double()
    assert rows.shape[0] == 6 + 2 + 4 + 1 + 5
    torch.testing.assert_close(h["fc1"], rows.T @ rows / rows.shape[0], rtol=1e-5, atol=1e-7)
    assert h["fc1"].dtype == torch.float64
    hid = torch.relu(toy.fc1(rows.float())).double()
    torch.testing.assert_close(h["fc2"], hid.T @ hid / hid.shape[0], rtol=1e-5, atol=1e-7)


class TwoHeads(nn.Module):
    """Two layers reading the same input (like q/k/v), a third reading another."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.emb = nn.Embedding(50, 8)
        self.q, self.k, self.out = nn.Linear(8, 8), nn.Linear(8, 8), nn.Linear(8, 4)

    def forward(self, input_ids, attention_mask=None):
        x = self.emb(input_ids)
        return self.out(self.q(x) * self.k(x))


def test_layers_with_one_input_share_one_hessian():
    model = TwoHeads().eval()
    gen = torch.Generator().manual_seed(2)
    data = [_batch(torch.randint(1, 50, (2, 5), generator=gen), [5, 3]) for _ in range(3)]
    h = collect_hessians(model, {"q": model.q, "k": model.k, "out": model.out}, data)
    assert h["q"] is h["k"] and h["out"] is not h["q"]  # one [K, K] tensor in memory, not two
    rows = torch.cat([model.emb(b["input_ids"])[b["attention_mask"].bool()] for b in data]).double()
    torch.testing.assert_close(h["q"], rows.T @ rows / rows.shape[0], rtol=1e-5, atol=1e-7)
    alone = collect_hessians(model, {"out": model.out}, data)["out"]
    torch.testing.assert_close(h["out"], alone, rtol=0, atol=0)


def test_padding_does_not_count(toy):
    ids = torch.tensor([[5, 6, 7], [8, 9, 0]])
    short = _batch(ids, [3, 2])
    # The same sentences padded to a longer length, with garbage token ids in the padding.
    long_ids = torch.cat([ids, torch.tensor([[11, 12, 13], [14, 15, 16]])], 1)
    long = _batch(long_ids, [3, 2])
    h_short = collect_hessians(toy, {"fc1": toy.fc1}, [short])["fc1"]
    h_long = collect_hessians(toy, {"fc1": toy.fc1}, [long])["fc1"]
    torch.testing.assert_close(h_short, h_long, rtol=1e-6, atol=1e-8)
    h_nomask = collect_hessians(toy, {"fc1": toy.fc1}, [{"input_ids": long_ids}])["fc1"]
    assert not torch.allclose(h_short, h_nomask)


def test_streaming_over_batches_equals_one_batch(toy):
    gen = torch.Generator().manual_seed(2)
    ids = torch.randint(1, 50, (6, 5), generator=gen)
    lengths = [5, 3, 4, 1, 5, 2]
    whole = collect_hessians(toy, {"fc1": toy.fc1}, [_batch(ids, lengths)])["fc1"]
    parts = collect_hessians(toy, {"fc1": toy.fc1}, (_batch(ids[i:i + 2], lengths[i:i + 2]) for i in range(0, 6, 2)))
    torch.testing.assert_close(whole, parts["fc1"], rtol=1e-6, atol=1e-8)


def test_tensor_batches_and_flat_rows():
    lin = nn.Linear(4, 4)
    x = torch.randn(10, 4, generator=torch.Generator().manual_seed(3))
    h = collect_hessians(lin, {"lin": lin}, [x[:6], x[6:]])["lin"]
    torch.testing.assert_close(h, (x.T @ x / 10).double(), rtol=1e-5, atol=1e-7)
    mask = torch.tensor([[True, False], [True, True]])
    assert select_rows(torch.randn(4, 3), mask).shape == (3, 3)  # [B*T, K] flattened
    assert select_rows(torch.randn(2, 2, 3), mask).shape == (3, 3)
    assert select_rows(torch.randn(5, 3), mask).shape == (5, 3)  # unrelated layout: taken whole


@pytest.mark.parametrize("data, err, match", [
    (None, ValueError, "required"),
    ([], ValueError, "empty"),
    (iter(()), ValueError, "empty"),
    ("some text", TypeError, "string"),
    (torch.ones(2, 3, dtype=torch.long), TypeError, "single Tensor"),
    (42, TypeError, "iterable"),
    ([[1, 2, 3]], TypeError, r"calibration_data\[0\]"),
    ([{"input_ids": torch.ones(1, 3, dtype=torch.long)}, {"text": "x"}], TypeError, r"calibration_data\[1\]"),
    ([{"input_ids": torch.ones(2, 3, dtype=torch.long), "attention_mask": torch.ones(2, 4)}], ValueError, "agree"),
    ([{"input_ids": torch.ones(2, 3, dtype=torch.long), "attention_mask": torch.ones(2, 3, 1)}], ValueError, "2-D"),
    ([{"input_ids": torch.ones(2, 3, dtype=torch.long), "attention_mask": torch.zeros(2, 3)}], ValueError, "every token"),
    ([{"input_ids": torch.ones(0, 3, dtype=torch.long)}], ValueError, "empty"),
    ([torch.tensor([[1.0, float("nan")]])], ValueError, "NaN"),
])
def test_bad_calibration_input(data, err, match):
    with pytest.raises(err, match=match):
        materialize(data)


def test_nan_activation_names_layer_and_batch(toy):
    with torch.no_grad():
        toy.emb.weight[7, 2] = float("nan")
    good = _batch(torch.tensor([[1, 2, 3]]), [3])
    bad = _batch(torch.tensor([[1, 7, 3]]), [3])
    with pytest.raises(ValueError, match=r"calibration_data\[1\].*fc1.*NaN"):
        collect_hessians(toy, {"fc1": toy.fc1}, [good, bad])
    # A NaN token hidden under the padding does not count.
    padded = _batch(torch.tensor([[1, 2, 7]]), [2])
    assert torch.isfinite(collect_hessians(toy, {"fc1": toy.fc1}, [padded])["fc1"]).all()


def test_forward_failure_names_batch(toy):
    wrong = {"input_ids": torch.ones(1, 3, dtype=torch.long), "bogus_argument": torch.ones(1)}
    with pytest.raises(ValueError, match=r"calibration_data\[0\].*forward failed"):
        collect_hessians(toy, {"fc1": toy.fc1}, [wrong])
    with pytest.raises(ValueError, match=r"calibration_data\[0\].*forward failed"):
        collect_hessians(toy, {"fc1": toy.fc1}, [torch.ones(2, 3)])  # float ids: embedding rejects them


def test_unused_layer_is_an_error(toy):
    extra = nn.Linear(8, 8)
    toy.unused = extra
    with pytest.raises(ValueError, match="no calibration token reached"):
        collect_hessians(toy, {"unused": extra}, [_batch(torch.tensor([[1, 2]]), [2])])


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(16, 32), nn.Linear(32, 16)

    def forward(self, x):
        return self.fc2(torch.nn.functional.gelu(self.fc1(x)))


class Blocks(nn.Module):
    """A tiny stack of repeated blocks with a dict interface, for the quantizer."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.emb = nn.Embedding(50, 16)
        self.layers = nn.ModuleList(Block() for _ in range(3))

    def forward(self, input_ids, attention_mask=None):
        x = self.emb(input_ids)
        for layer in self.layers:
            x = x + layer(x)
        return x


def test_unisvq_rejects_nan_in_a_late_block_before_quantizing_anything():
    model = Blocks().eval()
    with torch.no_grad():
        model.layers[2].fc1.weight[0, :] = 3e38  # finite weights; Inf appears only inside the last block
    data = [_batch(torch.randint(1, 50, (2, 5), generator=torch.Generator().manual_seed(i)), [5, 3]) for i in range(3)]
    with pytest.raises(ValueError, match=r"layers\.2\.fc2.*NaN or Inf"):
        pyquant.quantize_model(model, pyquant.UniSVQConfig(), calibration_data=data, progress=False)
    assert not any(isinstance(m, pyquant.QuantLinear) for m in model.modules())
    with torch.no_grad():  # a non-finite weight is named before any calibration pass
        model.layers[2].fc1.weight[0, 0] = float("inf")
    with pytest.raises(ValueError, match=r"layers\.2\.fc1\.weight holds NaN or Inf"):
        pyquant.quantize_model(model, pyquant.UniSVQConfig(), calibration_data=data, progress=False)
    assert not any(isinstance(m, pyquant.QuantLinear) for m in model.modules())


def test_unisvq_rejects_bad_item_at_the_end_before_quantizing_anything():
    model = Blocks().eval()

    def stream():
        yield _batch(torch.tensor([[1, 2, 3]]), [3])
        yield {"input_ids": torch.tensor([[1, 2, 3]]), "attention_mask": torch.ones(1, 4)}

    with pytest.raises(ValueError, match=r"calibration_data\[1\]"):
        pyquant.quantize_model(model, pyquant.UniSVQConfig(), calibration_data=stream(), progress=False)
    assert not any(isinstance(m, pyquant.QuantLinear) for m in model.modules())
    with pytest.raises(ValueError, match="required"):
        pyquant.quantize_model(model, pyquant.UniSVQConfig(), progress=False)


def test_unisvq_rejects_a_selected_layer_the_forward_never_calls():
    data = [_batch(torch.tensor([[1, 2, 3]]), [3])]
    model = Blocks().eval()
    model.layers[1].spare = nn.Linear(16, 16)  # inside a block, selected by the default filter, never called
    with pytest.raises(ValueError, match=r"never calls \['layers\.1\.spare'\]"):
        pyquant.quantize_model(model, pyquant.UniSVQConfig(), calibration_data=data, progress=False)
    assert not any(isinstance(m, pyquant.QuantLinear) for m in model.modules())
    model = Blocks().eval()
    model.side = nn.Linear(16, 16)  # outside the blocks
    with pytest.raises(ValueError, match=r"\['side'\]"):
        pyquant.quantize_model(model, pyquant.UniSVQConfig(), calibration_data=data, progress=False)
    assert not any(isinstance(m, pyquant.QuantLinear) for m in model.modules())


def test_tokenizer_outputs_are_taken_as_they_come():
    """A tokenizer returns a ``BatchEncoding`` (a mapping, not a dict): passed as it is."""
    from transformers import BatchEncoding

    batch = BatchEncoding({"input_ids": torch.ones(2, 3, dtype=torch.long), "attention_mask": torch.ones(2, 3)})
    (got,) = materialize([batch])
    assert isinstance(got, dict) and got["input_ids"] is batch["input_ids"]
    with pytest.raises(TypeError, match="single BatchEncoding"):
        materialize(batch)
