"""Seeded fuzzing (issue 18): damaged checkpoints and edge-case kernel inputs.

Every case must end in a documented exception (``ValueError`` or ``TypeError`` with a message) or
in outputs equal to the undamaged model's (checkpoints) / to the torch reference within the
kernel's tolerance (kernels). Anything else (another exception type, a crash, a silently different
result) is collected and reported with the seed that reproduces it.
"""
import json
import random

import pytest
import torch
from torch import nn

import pyquant
from pyquant import format as fmt
from pyquant.ops import _C

DOCUMENTED = (ValueError, TypeError)
CHECKPOINT_CASES = 2400
KERNEL_CASES = 2400


def _skeleton():
    return nn.Sequential(nn.Linear(64, 128), nn.Linear(128, 64))


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.shape == b.shape and a.dtype == b.dtype and torch.equal(a, b)


# ---- checkpoints ------------------------------------------------------------------------------

JUNK = [None, True, False, 0, -1, 1, 3, 2**40, 1.5, float("1e300"), "", "x", "float16", [], [1, 2], {}, {"a": 1}]


def _mutate_config(rng: random.Random, config: dict) -> str:
    kind = rng.randrange(7)
    layer = config["layers"][rng.choice(sorted(config["layers"]))]
    if kind == 0:  # delete a key, top-level or of a layer
        target = rng.choice([config, layer])
        target.pop(rng.choice(sorted(target)))
    elif kind == 1:  # a value of another type
        target = rng.choice([config, layer, layer])
        target[rng.choice(sorted(target))] = rng.choice(JUNK)
    elif kind == 2:  # versions
        config["format_version"] = rng.choice([0, 1, 3, 99, "2", 2.0, None, True, -1])
    elif kind == 3:  # sizes
        key = rng.choice(["in_features", "out_features", "had_in", "had_out"])
        layer[key] = rng.choice([0, -4, 4, 16, 32, 63, 65, 256, 2**31, layer.get(key, 0) * 2,
                                 max(layer.get(key, 0) // 2, 1)])
    elif kind == 4:  # scale dtypes, kinds, grids
        key = rng.choice(["su_dtype", "sv_dtype", "kind", "grid", "block"])
        layer[key] = rng.choice(["float32", "float16", "bfloat16", "int2", "dequant", "packed", "int4", [1, 1],
                                 [64, 64], [0, 1], "Tensor"])
    elif kind == 5:  # layer names
        name = rng.choice(sorted(config["layers"]))
        config["layers"][rng.choice(["2", "0.weight", "", name + "x", "1"])] = config["layers"].pop(name)
    else:  # an unknown extra key
        rng.choice([config, layer])[rng.choice(["extra", "sha", "layers2"])] = rng.choice(JUNK)
    return json.dumps(config)


def _mutate_header(rng: random.Random, weights: bytes) -> bytes:
    n = int.from_bytes(weights[:8], "little")
    header = json.loads(weights[8:8 + n])
    key = rng.choice([k for k in header if k != "__metadata__"])
    kind = rng.randrange(3)
    if kind == 0:
        header[key]["dtype"] = rng.choice(["F32", "F16", "BF16", "I32", "U8", "I8", "F64", "I64", "BOOL", "F8_E4M3"])
    elif kind == 1:
        shape = header[key]["shape"]
        header[key]["shape"] = rng.choice([[], [0], shape[::-1], [s * 2 for s in shape], shape + [1],
                                           [max(s - 1, 0) for s in shape]])
    else:
        start, end = header[key]["data_offsets"]
        header[key]["data_offsets"] = rng.choice([[start + 1, end + 1], [start, end - 4], [end, start],
                                                  [0, end - start], [start, 10**12], [-1, end]])
    new = json.dumps(header).encode()
    return len(new).to_bytes(8, "little") + new + weights[8 + n:]


def _flip(rng: random.Random, data: bytes, lo: int, hi: int) -> bytes:
    i = rng.randrange(lo, hi)
    return data[:i] + bytes([data[i] ^ (1 << rng.randrange(8))]) + data[i + 1:]


def mutate(rng: random.Random, weights: bytes, config_text: str) -> tuple[bytes, str, str]:
    """One random damage of the two files: (weights, config, what was done)."""
    kind = rng.randrange(8)
    n = int.from_bytes(weights[:8], "little")
    if kind == 0:
        return weights[:rng.randrange(len(weights))], config_text, "truncated weights"
    if kind == 1:
        return _flip(rng, weights, 0, 8 + n), config_text, "bit flip in the header"
    if kind == 2:
        return _flip(rng, weights, 8 + n, len(weights)), config_text, "bit flip in the data"
    if kind == 3:
        return _mutate_header(rng, weights), config_text, "header edit"
    if kind == 4:
        return weights, config_text[:rng.randrange(len(config_text))], "truncated config"
    if kind == 5:
        raw = config_text.encode()
        return weights, _flip(rng, raw, 0, len(raw)).decode("utf-8", "replace"), "bit flip in the config"
    return weights, _mutate_config(rng, json.loads(config_text)), "config edit"


def test_checkpoint_mutations(tmp_path):
    torch.manual_seed(0)
    model = pyquant.quantize_model(_skeleton(), pyquant.RTNConfig(bits=2), progress=False)
    src = pyquant.save_quantized(model, tmp_path / "ck")
    weights, config_text = (src / "model.safetensors").read_bytes(), (src / "quantization_config.json").read_text()
    x = torch.randn(3, 64, generator=torch.Generator().manual_seed(1))
    want = model(x)
    case = tmp_path / "case"
    case.mkdir()
    outcomes, bad = {}, []
    for seed in range(CHECKPOINT_CASES):
        rng = random.Random(seed)
        w, c, what = mutate(rng, weights, config_text)
        (case / "model.safetensors").write_bytes(w)
        (case / "quantization_config.json").write_text(c)
        try:
            y = pyquant.load_quantized(_skeleton(), case)(x)
            result = "loaded, same outputs" if _same(y, want) else "SILENTLY DIFFERENT"
        except DOCUMENTED as e:
            result = "refused" if str(e) else "EMPTY MESSAGE"
        except Exception as e:  # noqa: BLE001 - what the campaign looks for
            result = f"UNDOCUMENTED {type(e).__name__}: {e}"
        outcomes[(what, result.split(":")[0])] = outcomes.get((what, result.split(":")[0]), 0) + 1
        if result not in ("refused", "loaded, same outputs"):
            bad.append((seed, what, result[:200]))
    assert not bad, f"{len(bad)} of {CHECKPOINT_CASES} cases: {bad[:5]}; outcomes {outcomes}"
    # the campaign reached both ends: damage refused, and harmless edits (method, seed) loading
    assert sum(v for (w, r), v in outcomes.items() if r == "refused") > CHECKPOINT_CASES // 2
    assert any(r == "loaded, same outputs" for (w, r) in outcomes), outcomes


# ---- kernels ----------------------------------------------------------------------------------

def kernel_paths():
    paths = []
    for isa in _C.supported_isas():
        paths += [(isa, "int", "auto"), (isa, "float", "auto")]
        if isa == "avx512":
            paths += [(isa, "int", "gemv"), (isa, "int", "gemm")]
    return paths


PATHS = kernel_paths()
RTOL = {torch.float32: 1e-3, torch.float16: 5e-3, torch.bfloat16: 2e-2}
MAGNITUDES = {torch.float32: [1e-40, 1e-35, 1e-3, 1.0, 1e3, 1e30], torch.bfloat16: [1e-38, 1e-3, 1.0, 1e3, 1e30],
              torch.float16: [1e-4, 1e-2, 1.0, 10.0]}


def _layer(rng: random.Random, g: torch.Generator):
    k = rng.choice([4, 8, 12, 64, 132, 256, 384, 1028])
    n = rng.choice([1, 3, 16, 64, 100])
    pow2 = lambda d: d & -d  # noqa: E731
    had_in = rng.choice([0, min(pow2(k), 256)])
    had_out = rng.choice([0, min(pow2(n), 64)]) if pow2(n) > 1 else 0
    pw = fmt.PackedWeight(codes=torch.randint(0, 256, (n, k // 4), generator=g, dtype=torch.uint8),
                          A=torch.randn(4, 4, generator=g), b=torch.randn(4, generator=g),
                          su=(torch.rand(k, generator=g) + 0.5).to(rng.choice([torch.float16, torch.float32])),
                          sv=(torch.rand(n, generator=g) + 0.5).to(rng.choice([torch.float16, torch.float32])),
                          w_scale=torch.tensor(rng.choice([0.01, 0.3, 2.0])), had_in=had_in, had_out=had_out)
    bias = torch.randn(n, generator=g) if rng.random() < 0.5 else None
    return pw, bias


def _input(rng: random.Random, g: torch.Generator, k: int):
    """(x, expectation): 'ok' or the case the op must refuse."""
    dtype = rng.choice([torch.float32, torch.float32, torch.bfloat16, torch.float16, torch.float64, torch.int32,
                        torch.bool])
    m = rng.choice([0, 1, 2, 5, 9, 33])
    shape_kind = rng.choices(["ok", "wrong K", "1-D", "3-D"], [8, 1, 1, 1])[0]
    shape = {"ok": (m, k), "wrong K": (m, k + 4), "1-D": (k,), "3-D": (2, m, k)}[shape_kind]
    mag = rng.choice(MAGNITUDES.get(dtype, [1.0]))
    x = torch.randn(shape, generator=g, dtype=torch.float64) * mag
    if rng.random() < 0.15 and x.numel():  # NaN / Inf sprinkled
        flat = x.view(-1)
        for _ in range(rng.randint(1, 3)):
            flat[rng.randrange(flat.numel())] = rng.choice([float("nan"), float("inf"), float("-inf")])
    x = x.to(dtype)
    if rng.random() < 0.15 and x.dim() == 2 and x.shape[1] >= 8:  # non-contiguous
        x = torch.cat([x, x], dim=1)[:, ::2] if rng.random() < 0.5 else x.t().contiguous().t()
    ok = dtype in RTOL and shape_kind == "ok" and x.is_contiguous()  # the op asks for contiguous x
    return x, ok


def _matches(y: torch.Tensor, x: torch.Tensor, pw, bias) -> str | None:
    """None when ``y`` is the reference (fp64 dequantize + linear) within the kernel's tolerance
    (relative to ``|x| @ |W|^T``);
    rows with a NaN/Inf input must be entirely non-finite, as the reference's are."""
    w = fmt.dequantize(pw).double()
    ref, scale = x.double() @ w.T, x.double().abs() @ w.abs().T  # scale: what the error is relative to
    if bias is not None:
        ref, scale = ref + bias.double(), scale + bias.double().abs()
    if y.shape != ref.shape or y.dtype != x.dtype:
        return f"shape/dtype {tuple(y.shape)} {y.dtype}, expected {tuple(ref.shape)} {x.dtype}"
    bad_rows = ~torch.isfinite(x.double()).all(dim=1)
    if not (~torch.isfinite(y[bad_rows])).all():
        return "a row with a NaN/Inf input has finite outputs"
    yd, rd, sd = y[~bad_rows].double(), ref[~bad_rows], scale[~bad_rows]
    if not torch.isfinite(yd).all():
        return "non-finite outputs from finite inputs"
    fi = torch.finfo(x.dtype)
    atol = 4 * fi.smallest_normal * fi.eps  # a few subnormal steps of the output dtype
    err = (yd - rd).norm(dim=1)
    # relative to sum |x| |w| (the scale of a dot product's rounding error; int mode rounds the
    # activations to 16 bits of their largest element, so an output that cancels keeps less)
    limit = RTOL[x.dtype] * sd.norm(dim=1) + atol * (rd.shape[1] ** 0.5)
    if (err > limit).any():
        worst = (err / limit.clamp_min(1e-300)).max().item()
        return f"error {worst:.2f}x the tolerance"
    return None


def test_kernel_inputs():
    bad, counts = [], {"computed": 0, "refused": 0}
    for seed in range(KERNEL_CASES):
        rng, g = random.Random(seed), torch.Generator().manual_seed(seed)
        pw, bias = _layer(rng, g)
        x, ok = _input(rng, g, pw.in_features)
        isa, mode, algo = rng.choice(PATHS)
        try:
            y = torch.ops.pyquant.cpu_linear(x, pw.codes, pw.A, pw.b, pw.su, pw.sv, pw.w_scale, bias, pw.had_in,
                                             pw.had_out, isa=isa, mode=mode, algo=algo)
            problem = _matches(y, x, pw, bias) if ok else "accepted an input it should refuse"
            counts["computed"] += 1
        except DOCUMENTED as e:
            problem = None if (str(e) and not ok) else f"refused a valid input: {e}"
            counts["refused"] += 1
        except Exception as e:  # noqa: BLE001
            problem = f"UNDOCUMENTED {type(e).__name__}: {e}"
        if problem:
            bad.append((seed, isa, mode, algo, tuple(x.shape), x.dtype, problem[:160]))
    assert not bad, f"{len(bad)} of {KERNEL_CASES} cases: {bad[:5]}"
    assert counts["computed"] > KERNEL_CASES // 4 and counts["refused"] > KERNEL_CASES // 10, counts


@pytest.mark.parametrize("seed", range(4))
def test_the_layer_takes_any_leading_shape_and_stride(seed):
    """``QuantLinear`` (not the raw op) makes inputs contiguous and flattens leading dims."""
    rng, g = random.Random(seed), torch.Generator().manual_seed(seed)
    pw, bias = _layer(rng, g)
    layer = pyquant.QuantLinear.from_packed(pw, bias)
    x = torch.randn(3, 2, 2 * pw.in_features, generator=g)[..., ::2]  # strided, 3-D
    ref = x.double() @ fmt.dequantize(pw).double().T + (0 if bias is None else bias.double())
    with torch.no_grad():
        y = layer(x)
    assert y.shape == (3, 2, pw.out_features)
    assert ((y.double() - ref).norm() / ref.norm()) < 1e-3
