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

from conftest import random_packed, rehash_checkpoint


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
    with pytest.raises(ValueError, match=r"checkpoint layer '0' is invalid: in_features must be a positive int, got None"):
        pyquant.load_quantized(_skeleton(), path)


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_a_non_finite_bias_in_a_checkpoint_is_refused(tmp_path, value):
    _, path = _checkpoint(tmp_path)
    tensors = load_file(path / "model.safetensors")
    tensors["1.bias"][3] = value
    save_file(tensors, path / "model.safetensors")
    rehash_checkpoint(path)  # written so (the checksum would catch an edit): validation refuses it
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


# ---- checkpoint entries and headers ---------------------------------------------------------

def _edit_config(path, edit):
    cfg = path / "quantization_config.json"
    config = json.loads(cfg.read_text())
    edit(config)
    cfg.write_text(json.dumps(config))


def _daq_checkpoint(tmp_path):
    torch.manual_seed(0)
    base, post = _skeleton(), _skeleton()
    model = pyquant.quantize_model(post, pyquant.DAQConfig(base=base, grid="int4", granularity="row"),
                                   progress=False)
    return pyquant.save_quantized(model, tmp_path / "daq")


@pytest.mark.parametrize("block", [[128, 0], [], [128], [-1, 128], [1e9, 1e9], [1, 1e-12], [True, 1], "64x64"])
def test_a_bad_dequant_block_is_a_clear_error(tmp_path, block):
    path = _daq_checkpoint(tmp_path)
    _edit_config(path, lambda c: c["layers"]["0"].update(block=block))
    with pytest.raises(ValueError, match="checkpoint layer '0' is invalid: block must be two positive ints"):
        pyquant.load_quantized(_skeleton(), path)


def test_a_huge_dequant_block_allocates_nothing(tmp_path):
    # 10**9 rows per block is one block: the scale grid is [1, 1], which the file's scales are not
    path = _daq_checkpoint(tmp_path)
    _edit_config(path, lambda c: c["layers"]["0"].update(block=[10**9, 10**9]))
    with pytest.raises(ValueError, match=r"tensor '0.scales' has shape \[128, 1\] in the checkpoint, expected \[1, 1\]"):
        pyquant.load_quantized(_skeleton(), path)


def test_a_deeply_nested_config_is_a_clear_error(tmp_path):
    _, path = _checkpoint(tmp_path)
    (path / "quantization_config.json").write_text("[" * 100_000 + "]" * 100_000)
    with pytest.raises(ValueError, match="is not valid JSON \\(RecursionError\\)"):
        pyquant.load_quantized(_skeleton(), path)


@pytest.mark.parametrize("key,value", [("sv_dtype", "int2"), ("su_dtype", "Tensor"), ("su_dtype", 5)])
def test_an_unknown_scale_dtype_is_a_clear_error(tmp_path, key, value):
    _, path = _checkpoint(tmp_path)
    _edit_config(path, lambda c: c["layers"]["1"].update({key: value}))
    with pytest.raises(ValueError, match=f"{key} must be one of \\['float16', 'float32'\\], got {value!r}"):
        pyquant.load_quantized(_skeleton(), path)


@pytest.mark.parametrize("key,value,message", [
    ("kind", "sparse", "kind must be 'packed' or 'dequant'"), ("bias", "yes", "bias must be true or false"),
    ("seed", "7", "seed must be an int or null"), ("method", None, "method must be a string"),
    ("had_in", True, "had_in must be 0 or a power of two"), ("out_features", 128.0, "out_features must be a positive int")])
def test_a_mistyped_entry_field_is_named(tmp_path, key, value, message):
    _, path = _checkpoint(tmp_path)
    _edit_config(path, lambda c: c["layers"]["0"].update({key: value}))
    with pytest.raises(ValueError, match=message):
        pyquant.load_quantized(_skeleton(), path)


def _edit_header(path, edit):
    """Rewrite the safetensors header of a checkpoint (the data stays as it is)."""
    f = path / "model.safetensors"
    raw = f.read_bytes()
    n = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8:8 + n])
    edit(header)
    new = json.dumps(header).encode()
    f.write_bytes(len(new).to_bytes(8, "little") + new + raw[8 + n:])


@pytest.mark.parametrize("key,dtype", [("0.A", "I32"), ("1.su", "BF16"), ("1.bias", "I32"), ("0.codes", "I8")])
def test_a_header_dtype_edit_is_refused_not_converted(tmp_path, key, dtype):
    _, path = _checkpoint(tmp_path)
    _edit_header(path, lambda h: h[key].update(dtype=dtype))
    with pytest.raises(ValueError, match=f"tensor '{key}' is {dtype} in the checkpoint, expected"):
        pyquant.load_quantized(_skeleton(), path)


@pytest.mark.parametrize("key,value,message", [
    ("0.w_scale", 0.0, "w_scale is all zeros"), ("0.su", 0.0, "su is all zeros"), ("1.sv", 0.0, "sv is all zeros"),
    ("1.A", 0.0, "A is all zeros"), ("0.w_scale", 3e38, "above 1e\\+30"), ("1.w_scale", 1e36, "above 1e\\+30")])
def test_degenerate_or_huge_scales_are_refused(tmp_path, key, value, message):
    model, path = _checkpoint(tmp_path)
    tensors = load_file(path / "model.safetensors")
    tensors[key] = torch.full_like(tensors[key], value) if value == 0 else tensors[key] * value
    save_file(tensors, path / "model.safetensors")
    with pytest.raises(ValueError, match="checksum"):  # an edit of the file: the checksum sees it
        pyquant.load_quantized(_skeleton(), path)
    rehash_checkpoint(path)  # a checkpoint written so: validation sees it
    with pytest.raises(ValueError, match=message):
        pyquant.load_quantized(_skeleton(), path)


def test_a_flipped_code_byte_is_caught_by_the_checksum(tmp_path):
    _, path = _checkpoint(tmp_path)
    tensors = load_file(path / "model.safetensors")
    tensors["1.codes"][5, 7] ^= 0x10  # still a valid code: only the checksum can tell
    save_file(tensors, path / "model.safetensors")
    with pytest.raises(ValueError, match="checkpoint layer '1' is invalid: .*checksum"):
        pyquant.load_quantized(_skeleton(), path)


def test_a_failed_load_leaves_the_model_as_it_was(tmp_path):
    _, path = _checkpoint(tmp_path)
    tensors = load_file(path / "model.safetensors")
    tensors["1.codes"][0, 0] ^= 1  # the second layer fails, after the first was read
    save_file(tensors, path / "model.safetensors")
    model = _skeleton()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match="checkpoint layer '1'"):
        pyquant.load_quantized(model, path)
    _same(model, before)


def test_version_1_checkpoints_without_checksums_still_load(tmp_path):
    model, path = _checkpoint(tmp_path)
    _edit_config(path, lambda c: [c.update(format_version=1)] + [e.pop("sha256") for e in c["layers"].values()])
    x = torch.randn(3, 64)
    assert torch.equal(pyquant.load_quantized(_skeleton(), path)(x), model(x))
    _edit_config(path, lambda c: c.update(format_version=2))  # version 2 must carry them
    with pytest.raises(ValueError, match="sha256 must be the hex checksum"):
        pyquant.load_quantized(_skeleton(), path)


# ---- kernels ----------------------------------------------------------------------------------

@pytest.mark.parametrize("scale", [1e-35, 1e-37, 1e-40, 1e30])
def test_int_mode_keeps_its_accuracy_at_extreme_magnitudes(scale):
    # kQMax / amax overflowed to +inf below amax ~ 1e-34 (relative error 2.96); a subnormal token
    # scale kept a few bits
    from pyquant.ops import _C

    pw = random_packed(64, 128)
    x = torch.randn(2, 128, generator=torch.Generator().manual_seed(0)) * scale
    want = x.double() @ fmt.dequantize(pw).double().T
    for isa in _C.supported_isas():
        y = torch.ops.pyquant.cpu_linear(x, pw.codes, pw.A, pw.b, pw.su, pw.sv, pw.w_scale, None, pw.had_in,
                                         pw.had_out, isa=isa, mode="int")
        assert ((y.double() - want).norm() / want.norm()) < 1e-4, isa


def test_a_nan_in_the_codebook_gives_nan_in_int_mode_too():
    from pyquant.ops import _C

    pw = random_packed(64, 128)
    pw.A[2, 1] = float("nan")  # the reference: every codeword, so every output, is NaN
    assert fmt.dequantize(pw).isnan().all()
    for isa in _C.supported_isas():
        for mode in ("int", "float"):
            y = torch.ops.pyquant.cpu_linear(torch.randn(3, 128), pw.codes, pw.A, pw.b, pw.su, pw.sv, pw.w_scale,
                                             None, pw.had_in, pw.had_out, isa=isa, mode=mode)
            assert y.isnan().all(), (isa, mode)


# ---- meta tensors -----------------------------------------------------------------------------

def test_a_meta_model_is_a_clear_error():
    with torch.device("meta"):
        model = _skeleton()
    with pytest.raises(ValueError, match="0.weight is on the meta device"):
        pyquant.quantize_model(model, pyquant.RTNConfig(bits=2), progress=False)


def test_a_meta_calibration_batch_is_a_clear_error():
    model = _mlp()
    with pytest.raises(ValueError, match=r"calibration_data\[0\] is on the meta device"):
        pyquant.quantize_model(model, pyquant.UniSVQConfig(), calibration_data=[torch.zeros(4, 64, device="meta")],
                               progress=False)
    assert not any(isinstance(m, pyquant.QuantLinear) for m in model.modules())


# ---- saving: a kill at every filesystem step --------------------------------------------------

def _save_killed_at(model, path, step: int, exchange: bool = True) -> int:
    """Fork; the child saves ``model`` to ``path`` and dies (``os._exit``, no cleanup runs) just
    before its ``step``-th filesystem operation. Returns the child's exit status: 17 killed,
    0 the save completed before reaching that step."""
    import shutil
    import tempfile
    from pathlib import Path

    from pyquant import io as pio

    pid = os.fork()
    if pid == 0:  # the child: never returns into pytest
        try:
            count = [0]

            def killing(fn):
                def wrapper(*args, **kwargs):
                    count[0] += 1
                    if count[0] == step:
                        os._exit(17)
                    return fn(*args, **kwargs)
                return wrapper

            pio.save_model = killing(pio.save_model)
            pio._exchange = killing(pio._exchange if exchange else lambda a, b: False)
            for mod, name in ((os, "rename"), (os, "chmod"), (os, "mkdir"), (shutil, "rmtree"),
                              (tempfile, "mkdtemp")):
                setattr(mod, name, killing(getattr(mod, name)))
            Path.write_text = killing(Path.write_text)
            pio.save_quantized(model, path)
            os._exit(0)
        except BaseException:
            os._exit(3)
    return os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])


def _outputs(path):
    x = torch.randn(4, 64, generator=torch.Generator().manual_seed(1))
    return pyquant.load_quantized(_skeleton(), path)(x)


def test_a_kill_at_any_step_of_a_save_leaves_a_complete_checkpoint(tmp_path):
    old, path = _checkpoint(tmp_path)
    torch.manual_seed(1)
    new = pyquant.quantize_model(_skeleton(), pyquant.RTNConfig(bits=2), progress=False)
    old_y, new_y = _outputs(path), _outputs(pyquant.save_quantized(new, tmp_path / "new"))
    assert not torch.equal(old_y, new_y)
    step, outcomes = 1, []
    while (status := _save_killed_at(new, path, step)) == 17:
        y = _outputs(path)  # a complete checkpoint under the name: the old one or the new one
        outcomes.append("old" if torch.equal(y, old_y) else "new" if torch.equal(y, new_y) else "broken")
        pyquant.save_quantized(old, path)  # the next save cleans up what the killed one left
        assert sorted(p.name for p in tmp_path.iterdir()) == ["ck", "new"], step
        step += 1
    assert status == 0 and torch.equal(_outputs(path), new_y)
    assert step > 6 and "broken" not in outcomes and outcomes[0] == "old" and outcomes[-1] == "new", outcomes


def test_where_the_exchange_is_unavailable_a_killed_save_is_repaired(tmp_path):
    old, path = _checkpoint(tmp_path)
    old_y = _outputs(path)
    step = 1
    while (status := _save_killed_at(old, path, step, exchange=False)) == 17:
        if not path.exists():  # killed between its two renames: the old checkpoint is beside it
            with pytest.raises(ValueError, match="a killed save left the previous checkpoint beside it"):
                pyquant.load_quantized(_skeleton(), path)
            break
        step += 1
    assert not path.exists(), "the fallback's window between the renames was not reached"
    from pyquant import io as pio

    pio._clean_leftovers(path)  # what the next save does first
    assert torch.equal(_outputs(path), old_y) and sorted(p.name for p in tmp_path.iterdir()) == ["ck"]


# ---- the CLI ----------------------------------------------------------------------------------

def _cli(capsys, *argv):
    from pyquant import cli

    code = cli.main(list(argv))
    err = capsys.readouterr().err.strip().splitlines()
    return code, err


def _no_slow_work(monkeypatch):
    from pyquant import cli

    def slow(*a, **k):
        raise AssertionError("slow work started before the paths were checked")
    monkeypatch.setattr(cli, "load_minilm", slow)
    monkeypatch.setattr(cli, "_load_hf", slow)


def test_cli_errors_are_one_line_and_exit_2_before_any_slow_work(tmp_path, capsys, monkeypatch):
    _no_slow_work(monkeypatch)
    (tmp_path / "file").write_text("x")
    _, ck = _checkpoint(tmp_path)
    (ck / "model.safetensors").write_bytes((ck / "model.safetensors").read_bytes()[:100])
    model_dir = tmp_path / "model"
    model_dir.mkdir()
    (model_dir / "config.json").write_text("{}")
    cases = [
        (["eval", str(tmp_path / "nowhere")], "the directory is missing"),
        (["eval", str(tmp_path / "file")], "is a file, not a checkpoint directory"),
        (["eval", str(tmp_path / "model")], "quantization_config.json is missing"),
        (["quantize", str(tmp_path / "nowhere"), "--out", str(tmp_path / "o")], "no such model directory"),
        (["quantize", str(tmp_path / "file"), "--out", str(tmp_path / "o")], "is a file, not model directory"),
        (["quantize", str(tmp_path), "--out", str(tmp_path / "o")], "not a Hugging Face model directory"),
        (["quantize", str(model_dir), "--out", str(tmp_path / "file")], "--out .* is a file"),
        (["quantize", str(model_dir), "--out", str(model_dir)], "exists and is not a pyquant checkpoint"),
        (["quantize", str(model_dir), "--vector", str(tmp_path / "v"), "--out", str(tmp_path / "o")],
         "--vector .*: no such file"),
        (["quantize", str(model_dir), "--method", "daq", "--out", str(tmp_path / "o")], "daq needs --base"),
        (["quantize", str(model_dir), "--method", "gptq", "--out", str(tmp_path / "o")], "unknown --method 'gptq'"),
        (["quantize", str(model_dir), "--calibration-file", str(tmp_path / "nowhere"), "--out", str(tmp_path / "o")],
         "cannot read --calibration-file"),
        (["demo", "--out", str(tmp_path / "file")], "--out .* is a file"),
    ]
    import re

    for argv, message in cases:
        code, err = _cli(capsys, *argv)
        assert code == 2 and len(err) == 1 and err[0].startswith("pyquant: error: "), (argv, err)
        assert re.search(message, err[0]), (argv, err)


def test_cli_reports_a_truncated_checkpoint_in_one_line(tmp_path, capsys):
    _, ck = _checkpoint(tmp_path)
    (ck / "model.safetensors").write_bytes((ck / "model.safetensors").read_bytes()[:100])
    code, err = _cli(capsys, "eval", str(ck), "--sentences", "10")
    assert code == 2 and len(err) == 1 and "truncated or corrupt" in err[0], err


def test_cli_debug_shows_the_traceback(tmp_path, capsys):
    from pyquant import cli

    with pytest.raises(ValueError, match="the directory is missing"):
        cli.main(["eval", str(tmp_path / "nowhere"), "--debug"])
    with pytest.raises(ValueError, match="the directory is missing"):
        cli.main(["--debug", "eval", str(tmp_path / "nowhere")])


def test_the_cli_process_prints_one_line_and_exits_2(tmp_path):
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "-m", "pyquant", "eval", str(tmp_path / "nowhere")],
                          capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1 and proc.stderr.startswith("pyquant: error: ")
