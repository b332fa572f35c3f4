import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest
import torch

from pyquant.format import PackedWeight


def random_packed(n: int, k: int, *, hadamard: bool = True, seed: int = 0, scale_dtype=torch.float32,
                  device="cpu") -> PackedWeight:
    """A PackedWeight with random codes, codebook and scales (not a quantized weight: a format test case)."""
    from pyquant.hadamard import default_block

    g = torch.Generator().manual_seed(seed)
    return PackedWeight(
        codes=torch.randint(0, 256, (n, k // 4), generator=g, dtype=torch.uint8),
        A=torch.randn(4, 4, generator=g), b=torch.randn(4, generator=g),
        su=(torch.randn(k, generator=g).abs() + 0.5).to(scale_dtype) * torch.where(torch.rand(k, generator=g) < 0.5, -1, 1).to(scale_dtype),
        sv=(torch.rand(n, generator=g) + 0.5).to(scale_dtype),
        w_scale=torch.tensor(0.05),
        had_in=default_block(k) if hadamard else 0, had_out=default_block(n) if hadamard else 0,
    ).validate().to(device)


def rehash_checkpoint(path) -> None:
    """Give every layer of a pyquant directory checkpoint the checksum of the tensors now in its
    file: a checkpoint made damaged by its writer, so that a test reaches the checks behind the
    checksum (validation of values, shapes, dtypes)."""
    import json

    from safetensors.torch import load_file

    from pyquant.format import checksum
    from pyquant.io import checksum_fields

    cfg_file = path / "quantization_config.json"
    config, tensors = json.loads(cfg_file.read_text()), load_file(path / "model.safetensors")
    for fqn, entry in config["layers"].items():
        entry["sha256"] = checksum({k.removeprefix(fqn + "."): v for k, v in tensors.items()
                                    if k.startswith(fqn + ".") and "." not in k.removeprefix(fqn + ".")},
                                   checksum_fields(entry))
    cfg_file.write_text(json.dumps(config))


def status_mib(key: str) -> float:
    """A memory line of ``/proc/self/status`` (Linux: ``VmRSS``, ``RssAnon``, ...), MiB."""
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(key + ":")) / 1024


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


@pytest.fixture
def cpu_mode():
    """The C++ kernels' default mode (``_C.set_mode``) for one test, put back after it."""
    from pyquant.ops import _C

    before = _C.get_mode(resolve=False)
    yield _C.set_mode
    _C.set_mode(before)


@pytest.fixture(scope="session")
def minilm():
    from pyquant.evaluation import load_minilm

    return load_minilm()
