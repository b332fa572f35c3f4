"""Edge cases and damaged checkpoints (issue 18, the items fixed so far): each test reproduces one."""
import json
import os
import stat

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

import pyquant
from pyquant import format as fmt

from conftest import random_packed


def _checkpoint(tmp_path):
    model = nn.Sequential(nn.Linear(64, 128), nn.Linear(128, 64))
    pyquant.quantize_model(model, pyquant.RTNConfig(bits=2), progress=False)
    return model, pyquant.save_quantized(model, tmp_path / "ck")


def _skeleton():
    return nn.Sequential(nn.Linear(64, 128), nn.Linear(128, 64))


def test_zero_row_inputs_to_the_reference_math():
    assert fmt.pack_codes(torch.zeros(0, 8, dtype=torch.uint8)).shape == (0, 2)
    xt, const = fmt.transform_activations(torch.zeros(0, 16), random_packed(8, 16))
    assert xt.shape == (0, 16) and const.shape == (0,)


def test_a_bool_hadamard_block_is_refused():
    pw = random_packed(8, 16)
    pw.had_in = True
    with pytest.raises(ValueError, match="had_in must be 0 or a power of two"):
        pw.validate()


def test_missing_in_features_in_the_config_is_a_clear_error(tmp_path):
    _, path = _checkpoint(tmp_path)
    config = json.loads((path / "quantization_config.json").read_text())
    del config["layers"]["0"]["in_features"]
    (path / "quantization_config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"checkpoint entry for '0' is invalid: KeyError\('in_features'\)"):
        pyquant.load_quantized(_skeleton(), path)


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_a_non_finite_bias_in_a_checkpoint_is_refused(tmp_path, value):
    _, path = _checkpoint(tmp_path)
    tensors = load_file(path / "model.safetensors")
    tensors["1.bias"][3] = value
    save_file(tensors, path / "model.safetensors")
    with pytest.raises(ValueError, match="checkpoint layer '1' is invalid: bias holds NaN or Inf"):
        pyquant.load_quantized(_skeleton(), path)


def test_saving_honours_the_umask(tmp_path):
    old = os.umask(0o022)
    try:
        _, path = _checkpoint(tmp_path)
    finally:
        os.umask(old)
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o755
    assert {stat.S_IMODE(os.stat(f).st_mode) for f in path.iterdir()} == {0o644}


def _mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 64), nn.ReLU(), nn.Linear(64, 32))


def _same(model, before):
    """Bit for bit (NaN included) the state before."""
    after = model.state_dict()
    bits = lambda t: t.detach().contiguous().flatten().view(torch.uint8)  # noqa: E731
    assert before.keys() == after.keys() and all(torch.equal(bits(before[k]), bits(after[k])) for k in before)
    assert not any(isinstance(m, pyquant.QuantLinear) for m in model.modules())


def test_a_non_finite_weight_fails_before_any_layer_is_swapped():
    model = _mlp()
    with torch.no_grad():
        model[4].weight[0, 0] = float("nan")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match=r"4\.weight holds NaN or Inf"):
        pyquant.quantize_model(model, pyquant.RTNConfig(bits=2), progress=False)
    _same(model, before)


def test_a_failure_midway_puts_every_layer_back(monkeypatch):
    model = _mlp()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    real, calls = pyquant.QuantLinear.from_packed, {"n": 0}

    def failing(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 3:  # two layers are already swapped
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(pyquant.QuantLinear, "from_packed", failing)
    with pytest.raises(KeyboardInterrupt):
        pyquant.quantize_model(model, pyquant.RTNConfig(bits=2), progress=False)
    _same(model, before)
    assert [type(m) for m in model] == [nn.Linear, nn.ReLU, nn.Linear, nn.ReLU, nn.Linear]


def test_empty_layers_are_skipped_and_no_target_is_said():
    model = nn.Sequential(nn.Linear(64, 0), nn.Linear(64, 64))
    pyquant.quantize_model(model, pyquant.RTNConfig(bits=2), progress=False)
    assert "empty" in model.pyquant_skipped["0"] and isinstance(model[1], pyquant.QuantLinear)


def test_no_layer_to_quantize_is_logged(caplog):
    with caplog.at_level("WARNING"):
        pyquant.quantize_model(nn.Sequential(nn.ReLU()), pyquant.RTNConfig(bits=2), progress=False)
    assert "found no layer to quantize" in caplog.text
