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
