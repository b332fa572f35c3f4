import json
import os

import pytest
import torch
from torch import nn

import pyquant
from pyquant import io as pio

from conftest import random_packed, rehash_checkpoint, status_mib


class Net(nn.Module):
    def __init__(self, width=64):
        super().__init__()
        self.up = nn.Linear(32, width)
        self.norm = nn.LayerNorm(width)
        self.down = nn.Linear(width, 16, bias=False)
        self.odd = nn.Linear(16, 5)  # quantizable too (K=16), odd N

    def forward(self, x):
        return self.odd(self.down(self.norm(self.up(x))))


def quantized_net(seed=0, width=64):
    torch.manual_seed(seed)
    return pyquant.quantize_model(Net(width), pyquant.RTNConfig(), progress=False)


def test_save_load_forward_bit_identical(tmp_path):
    model = quantized_net()
    x = torch.randn(4, 32)
    y = model(x)
    path = pyquant.save_quantized(model, tmp_path / "ckpt")
    assert sorted(os.listdir(path)) == ["model.safetensors", "quantization_config.json"]
    torch.manual_seed(123)
    loaded = pyquant.load_quantized(Net(), path)
    assert isinstance(loaded.up, pyquant.QuantLinear)
    assert torch.equal(loaded(x), y)
    for name, t in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], t), name


def test_config_json_is_readable(tmp_path):
    path = pyquant.save_quantized(quantized_net(), tmp_path / "ckpt")
    config = json.loads((path / "quantization_config.json").read_text())
    assert config["format_version"] == pyquant.FORMAT_VERSION
    assert config["quant_method"] == "pyquant"
    assert set(config["layers"]) == {"up", "down", "odd"}
    assert all(entry["method"] == "rtn" for entry in config["layers"].values())
    assert config["layers"]["up"]["had_in"] == 32


def test_save_overwrites_a_checkpoint_but_not_other_directories(tmp_path):
    path = pyquant.save_quantized(quantized_net(0), tmp_path / "ckpt")
    model = quantized_net(1)
    pyquant.save_quantized(model, path)
    x = torch.randn(2, 32)
    assert torch.equal(pyquant.load_quantized(Net(), path)(x), model(x))
    other = tmp_path / "mine"
    other.mkdir()
    (other / "notes.txt").write_text("keep me")
    with pytest.raises(ValueError, match="refusing to overwrite"):
        pyquant.save_quantized(model, other)
    assert (other / "notes.txt").read_text() == "keep me"


def test_interrupted_save_leaves_no_half_checkpoint(tmp_path, monkeypatch):
    good = quantized_net(0)
    path = pyquant.save_quantized(good, tmp_path / "ckpt")

    def crash(model, filename, *a, **k):
        with open(filename, "wb") as f:
            f.write(b"partial")
        raise KeyboardInterrupt

    monkeypatch.setattr(pio, "save_model", crash)
    with pytest.raises(KeyboardInterrupt):
        pyquant.save_quantized(quantized_net(1), path)
    with pytest.raises(KeyboardInterrupt):
        pyquant.save_quantized(quantized_net(1), tmp_path / "fresh")
    assert sorted(os.listdir(tmp_path)) == ["ckpt"]  # no temp dirs, no half 'fresh'
    x = torch.randn(2, 32)
    assert torch.equal(pyquant.load_quantized(Net(), path)(x), good(x))  # old checkpoint intact


def test_truncated_checkpoint_is_rejected(tmp_path):
    path = pyquant.save_quantized(quantized_net(), tmp_path / "ckpt")
    f = path / "model.safetensors"
    data = f.read_bytes()
    for cut in (len(data) // 2, 20):
        f.write_bytes(data[:cut])
        with pytest.raises(ValueError, match="truncated or corrupt"):
            pyquant.load_quantized(Net(), path)


def test_checkpoint_from_another_model_is_rejected(tmp_path):
    path = pyquant.save_quantized(quantized_net(width=64), tmp_path / "ckpt")
    with pytest.raises(ValueError, match="another model"):
        pyquant.load_quantized(Net(width=128), path)  # same names, other shapes

    class Other(nn.Module):
        def __init__(self):
            super().__init__()
            self.up = nn.Linear(32, 64)

    with pytest.raises(ValueError, match="another model"):
        pyquant.load_quantized(Other(), path)  # missing names

    class Bigger(Net):
        def __init__(self):
            super().__init__()
            self.extra = nn.Linear(4, 4)

    with pytest.raises(ValueError, match="does not match"):
        pyquant.load_quantized(Bigger(), path)  # same quantized layers, extra parameters


def test_unknown_format_version_is_rejected(tmp_path):
    path = pyquant.save_quantized(quantized_net(), tmp_path / "ckpt")
    cfg = path / "quantization_config.json"
    config = json.loads(cfg.read_text())
    config["format_version"] = 99
    cfg.write_text(json.dumps(config))
    with pytest.raises(ValueError, match="format_version"):
        pyquant.load_quantized(Net(), path)
    cfg.write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        pyquant.load_quantized(Net(), path)
    with pytest.raises(ValueError, match="missing"):
        pyquant.load_quantized(Net(), tmp_path / "nowhere")


def test_save_requires_a_quantized_model(tmp_path):
    with pytest.raises(ValueError, match="no quantized layers"):
        pyquant.save_quantized(Net(), tmp_path / "x")
    with pytest.raises(ValueError, match="no quantized"):
        pyquant.bits_per_weight(Net())


@pytest.mark.parametrize("grid, granularity", [("fp8", "block"), ("int4", "row")])
def test_daq_grids_save_and_load_bit_identical(tmp_path, grid, granularity):
    from pyquant.fakequant import DequantLinear
    torch.manual_seed(0)
    base = Net()
    post = Net()
    post.load_state_dict({k: v + 0.01 * torch.randn_like(v) for k, v in base.state_dict().items()})
    config = pyquant.DAQConfig(base=base, grid=grid, granularity=granularity, block=16)
    model = pyquant.quantize_model(post, config, progress=False)
    assert isinstance(model.up, DequantLinear)
    x = torch.randn(3, 32)
    y = model(x)
    path = pyquant.save_quantized(model, tmp_path / "daq")
    entry = json.loads((path / "quantization_config.json").read_text())["layers"]["up"]
    assert entry["kind"] == "dequant" and entry["grid"] == grid
    loaded = pyquant.load_quantized(Net(), path)
    assert isinstance(loaded.up, DequantLinear) and loaded.up.grid == model.up.grid
    assert loaded.up.codes.dtype == model.up.codes.dtype
    assert torch.equal(loaded(x), y)


def test_daq_checkpoint_with_bad_scales_is_rejected(tmp_path):
    from safetensors.torch import load_file, save_file
    torch.manual_seed(0)
    base, post = Net(), Net()
    model = pyquant.quantize_model(post, pyquant.DAQConfig(base=base, grid="int4", granularity="row"), progress=False)
    path = pyquant.save_quantized(model, tmp_path / "daq")
    tensors = load_file(path / "model.safetensors")
    tensors["up.scales"] = -tensors["up.scales"]
    save_file(tensors, path / "model.safetensors")
    with pytest.raises(ValueError, match="'up'.*checksum"):
        pyquant.load_quantized(Net(), path)
    rehash_checkpoint(path)  # a checkpoint written with these scales: validation catches them
    with pytest.raises(ValueError, match="'up'.*scales must be finite and positive"):
        pyquant.load_quantized(Net(), path)


@pytest.mark.skipif(not os.path.exists("/proc/self/status") or "cpu" not in pyquant.kernels.available_backends(),
                    reason="resident memory as Linux reports it; the C++ CPU backend places the codes")
@pytest.mark.parametrize("mode", ["int", "lut"])
def test_a_loaded_checkpoint_holds_its_codes_once(tmp_path, cpu_mode, mode):
    # The layers take the file's tensors; the CPU backend copies the large codes into 2 MB pages
    # (int) or packs them (lut) and hands the file's pages back: resident once, in either mode
    # (lut mode held them twice: the codes and their LUT layout).
    from pyquant import _C

    cpu_mode(mode)
    if mode == "lut" and not _C.has_lut_kernel():
        pytest.skip("this CPU's kernel set has no table-lookup kernels")
    n, k, count = 4096, 4096, 8  # 4 MiB of codes a layer
    layers = [pyquant.QuantLinear.from_packed(random_packed(n, k, seed=s)) for s in range(count)]
    x = torch.randn(2, k)
    with torch.no_grad():
        want = [q(x) for q in layers]
    path = pyquant.save_quantized(nn.Sequential(*layers), tmp_path / "ckpt")
    del layers
    codes_mib = count * n * k / 4 / 2**20
    skeleton = nn.Sequential(*[nn.utils.skip_init(nn.Linear, k, n, bias=False) for _ in range(count)])
    before = status_mib("VmRSS")
    model = pyquant.load_quantized(skeleton, path)
    grew = status_mib("VmRSS") - before
    assert grew < 1.15 * codes_mib, f"{codes_mib:.0f} MiB of codes took {grew:.1f} MiB resident ({mode})"
    with torch.no_grad():
        for q, y in zip(model, want):
            assert torch.equal(q(x), y)
    # the layers view the file's mapping: saving over it (a new file renamed in place) keeps them
    pyquant.save_quantized(model, path)
    again = pyquant.load_quantized(nn.Sequential(*[nn.Linear(k, n, bias=False) for _ in range(count)]), path)
    with torch.no_grad():
        for a, b, y in zip(model, again, want):
            assert torch.equal(a(x), y) and torch.equal(b(x), y)
