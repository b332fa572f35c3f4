"""Checkpoints. A transformers model is saved as a Hugging Face directory (``save_pretrained``:
``config.json`` with the ``quantization_config``, sharded safetensors; see :mod:`pyquant.hf`)
and loaded with ``from_pretrained``; ``save_quantized`` / ``load_quantized`` are thin wrappers
there. Any other model is saved as a directory with ``model.safetensors`` (plain packed tensors,
every other parameter and buffer as is) and ``quantization_config.json`` (format version, and
per quantized layer its kind, method, shapes and Hadamard blocks or grid), which also is what
pyquant wrote for every model before (format version 1: it keeps loading).

Two kinds of quantized layer are saved: ``packed`` (:class:`QuantLinear`, the 2-bit
format) and ``dequant`` (:class:`pyquant.fakequant.DequantLinear`, DAQ's fp8 / int-n
grids with block scales).

Format version 2 stores with every quantized layer the sha256 of its tensors; loading checks it
(and every tensor's dtype and shape against the header) before anything of the model changes, so a
damaged checkpoint raises ``ValueError`` instead of computing something else. Tensors that are
not quantized (embeddings, norms) are only checked for dtype and shape.

Saving builds the directory under a temporary name beside the target and swaps it into place
atomically, so at every instant the target holds a complete checkpoint, the old or the new.
"""
from __future__ import annotations

import contextlib
import ctypes
import errno
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_model
from torch import nn

from .fakequant import DequantLinear, check_scale_block, parse_grid, scale_grid_shape
from .format import FORMAT_VERSION, READABLE_FORMAT_VERSIONS, SCALE_DTYPE_NAMES, checksum
from .nn import QuantLinear, is_transformers_model, quantized_modules, set_submodule

WEIGHTS_NAME = "model.safetensors"
CONFIG_NAME = "quantization_config.json"
FORMAT_NAME = "pyquant-affine-int2-d4"


def layer_entry(layer: QuantLinear | DequantLinear) -> dict:
    entry = {"method": layer.method, "in_features": layer.in_features, "out_features": layer.out_features,
             "bias": layer.bias is not None}
    if isinstance(layer, DequantLinear):
        entry.update(kind="dequant", grid=layer.grid, block=list(layer.block))
    else:
        entry.update(kind="packed", had_in=layer.had_in, had_out=layer.had_out, seed=layer.seed,
                     su_dtype=str(layer.su.dtype).removeprefix("torch."),
                     sv_dtype=str(layer.sv.dtype).removeprefix("torch."))
    return {**entry, "sha256": checksum(layer.state_dict(), checksum_fields(entry))}


def checksum_fields(entry: dict) -> dict:
    """The entry's fields that change what its tensors compute: covered by its checksum (the
    shapes and dtypes are the tensors' own; method and seed are records)."""
    return {k: entry.get(k) for k in ("kind", "had_in", "had_out", "grid", "block")}


def _field(entry: dict, key: str, types: tuple, what: str):
    value = entry.get(key)
    if not isinstance(value, types) or (isinstance(value, bool) and bool not in types):
        raise ValueError(f"{key} must be {what}, got {value!r}")
    return value


def _scale_dtype(entry: dict, key: str) -> torch.dtype:
    name = entry.get(key)
    if name not in SCALE_DTYPE_NAMES:
        raise ValueError(f"{key} must be one of {sorted(SCALE_DTYPE_NAMES)}, got {name!r}")
    return SCALE_DTYPE_NAMES[name]


def skeleton_layer(entry: dict, device: torch.device) -> nn.Module:
    """An empty layer of the entry's kind and shapes, to be filled from the file. Raises
    ``ValueError`` naming the first field that is missing or of the wrong kind."""
    if not isinstance(entry, dict):
        raise ValueError(f"a layer entry must be a JSON object, got {type(entry).__name__}")
    n, k = _field(entry, "out_features", (int,), "a positive int"), _field(entry, "in_features", (int,), "a positive int")
    if n <= 0 or k <= 0:
        raise ValueError(f"in_features and out_features must be positive, got {k} and {n}")
    has_bias = _field(entry, "bias", (bool,), "true or false")
    method = _field(entry, "method", (str,), "a string")
    kind = entry.get("kind", "packed")
    if kind == "dequant":
        grid, block = parse_grid(entry.get("grid")), check_scale_block(entry.get("block"))
        codes = torch.zeros(n, k, device=device).to(grid.code_dtype)
        scales = torch.ones(scale_grid_shape((n, k), block), device=device)
        bias = torch.zeros(n, device=device) if has_bias else None
        return DequantLinear(codes, scales, block, grid.name, bias, method=method)
    if kind != "packed":
        raise ValueError(f"kind must be 'packed' or 'dequant', got {kind!r}")
    seed = entry.get("seed")
    if seed is not None and (not isinstance(seed, int) or isinstance(seed, bool)):
        raise ValueError(f"seed must be an int or null, got {seed!r}")
    layer = QuantLinear(k, n, has_bias, had_in=entry.get("had_in"), had_out=entry.get("had_out"),
                        scale_dtype=_scale_dtype(entry, "su_dtype"), method=method, seed=seed, device=device)
    layer.sv = layer.sv.to(_scale_dtype(entry, "sv_dtype"))
    return layer


def verify_checksum_of(tensors: dict, entry: dict, version: int) -> None:
    """Raise ``ValueError`` unless a layer's tensors (``{name: tensor}`` as in its state_dict) are
    the ones that were saved (format version 2 stores their sha256; version 1 has none to check)."""
    expected = entry.get("sha256")
    if expected is None and version < 2:
        return
    if not isinstance(expected, str):
        raise ValueError(f"sha256 must be the hex checksum of the layer's tensors, got {expected!r}")
    if checksum(tensors, checksum_fields(entry)) != expected:
        raise ValueError("its tensors and block sizes do not match the checksum saved with them: the checkpoint "
                         "is damaged")


def quantization_config_of(path: str | os.PathLike) -> dict | None:
    """The ``quantization_config`` of a Hugging Face directory's ``config.json`` (any method), if any."""
    cfg = Path(path) / "config.json"
    try:
        qc = json.loads(cfg.read_text()).get("quantization_config") if cfg.is_file() else None
    except (json.JSONDecodeError, UnicodeDecodeError, AttributeError, RecursionError) as e:
        raise ValueError(f"{cfg} is not a valid config.json ({type(e).__name__}: {e})") from None
    return qc if isinstance(qc, dict) else None


def hf_quantization_config(path: str | os.PathLike) -> dict | None:
    """The ``quantization_config`` of a Hugging Face directory, if it is a pyquant one."""
    qc = quantization_config_of(path)
    return qc if qc is not None and qc.get("quant_method") == "pyquant" else None


# The safetensors header's names of the dtypes a checkpoint holds.
SAFETENSORS_DTYPES = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16", torch.float64: "F64",
                      torch.uint8: "U8", torch.int8: "I8", torch.int16: "I16", torch.int32: "I32",
                      torch.int64: "I64", torch.bool: "BOOL", torch.float8_e4m3fn: "F8_E4M3",
                      torch.float8_e5m2: "F8_E5M2"}


def read_header(files) -> dict[str, tuple[str, tuple]]:
    """``{tensor name: (dtype, shape)}`` from safetensors headers (no tensor data is read);
    ``ValueError`` for a file that is truncated or not safetensors."""
    out = {}
    for f in files:
        try:
            with safe_open(str(f), framework="pt") as h:
                for key in h.keys():
                    sl = h.get_slice(key)
                    out[key] = (sl.get_dtype(), tuple(sl.get_shape()))
        except Exception as e:  # safetensors raises its own error types, and OSError
            raise ValueError(f"{f} is truncated or corrupt: {e}") from e
    return out


def check_tensor(key: str, expected: torch.Tensor, found: tuple[str, tuple] | None) -> None:
    """The file holds ``key`` with the dtype and shape the model expects (``load_state_dict``
    would convert another dtype silently: an F32 -> I32 header edit reinterprets the bytes)."""
    if found is None:
        raise ValueError(f"the checkpoint lacks tensor {key!r}")
    dtype = SAFETENSORS_DTYPES.get(expected.dtype)
    if dtype is not None and found[0] != dtype:
        raise ValueError(f"tensor {key!r} is {found[0]} in the checkpoint, expected {dtype}")
    if found[1] != tuple(expected.shape):
        raise ValueError(f"tensor {key!r} has shape {list(found[1])} in the checkpoint, expected {list(expected.shape)}")


def _replaceable(path: Path) -> bool:
    """An empty directory or a pyquant checkpoint (either layout): what a save may replace."""
    files = set(os.listdir(path))
    return not files or files <= {WEIGHTS_NAME, CONFIG_NAME} or _written_by_pyquant(path)


def _written_by_pyquant(path: Path) -> bool:
    """A Hugging Face directory pyquant wrote: its own format, or an FP8 one from ``daq_checkpoint``
    (marked with a ``pyquant`` entry in its ``quantization_config``)."""
    qc = quantization_config_of(path)
    return qc is not None and (qc.get("quant_method") == "pyquant" or isinstance(qc.get("pyquant"), dict))


def _honour_umask(path: Path) -> None:
    """Give a file or directory the permissions a plain ``open``/``mkdir`` would (0666 / 0777 less
    the umask): temporary files are created private."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(path, (0o777 if path.is_dir() else 0o666) & ~umask)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


def _leftovers(path: Path) -> list[Path]:
    """What saves of ``path`` by processes no longer running left beside it:
    ``.<name>.tmp-<pid>-*`` (a new checkpoint being written) and ``.<name>.old-<pid>`` (the
    previous one, moved aside where the exchange below is unavailable)."""
    out = []
    for p in path.parent.glob(f".{path.name}.*-*"):
        kind, _, rest = p.name[len(path.name) + 2:].partition("-")
        pid = rest.split("-")[0]
        if kind in ("tmp", "old") and pid.isdigit() and not _alive(int(pid)):
            out.append(p)
    return out


_libc = None


def _exchange(a: Path, b: Path) -> bool:
    """Atomically swap two paths (Linux ``renameat2(RENAME_EXCHANGE)``); False where the system
    or filesystem lacks it."""
    global _libc
    if not sys.platform.startswith("linux"):
        return False
    if _libc is None:
        _libc = ctypes.CDLL(None, use_errno=True)
    fn = getattr(_libc, "renameat2", None)
    if fn is None:
        return False
    at_fdcwd, rename_exchange = -100, 2
    if fn(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.ENOTSUP):
        return False
    raise OSError(err, os.strerror(err), str(a))


def _put_in_place(new: Path, path: Path) -> None:
    """Make the complete directory ``new`` the checkpoint at ``path``. Over an existing one, the
    two are exchanged in one atomic rename, so ``path`` always names a complete checkpoint (the
    old, then the new); only where that is unavailable is the old one moved aside first (a kill
    in between leaves it as ``.<name>.old-<pid>``, which the next save puts back)."""
    if not path.exists():
        new.rename(path)
        return
    if _exchange(new, path):
        shutil.rmtree(new)  # now the old checkpoint
        return
    old = path.parent / f".{path.name}.old-{os.getpid()}"
    path.rename(old)
    new.rename(path)
    shutil.rmtree(old)


def _clean_leftovers(path: Path) -> None:
    """Remove what killed saves of ``path`` left; first put back a previous checkpoint that a save
    killed between its two renames moved aside (only where the atomic exchange is unavailable)."""
    stale = _leftovers(path)
    old = sorted((p for p in stale if ".old-" in p.name), key=lambda p: p.stat().st_mtime)
    if old and not path.exists():
        old[-1].rename(path)
        stale.remove(old[-1])
    for p in stale:
        shutil.rmtree(p, ignore_errors=True)


def save_quantized(model: nn.Module, path: str | os.PathLike) -> Path:
    """Write ``model`` (with its ``QuantLinear`` / ``DequantLinear`` layers) to the directory ``path``:
    a transformers model through its ``save_pretrained``, any other in the format of this module.

    An existing ``path`` is replaced only if it is an empty directory or a pyquant checkpoint. The
    new checkpoint is written beside it and swapped in atomically: at every instant (a kill
    included) ``path`` holds the old or the new checkpoint, complete; what killed saves left
    beside it is removed by the next save.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    layers = quantized_modules(model)
    if not layers:
        raise ValueError("model has no quantized layers: quantize it first (pyquant.quantize_model)")
    with staged_checkpoint(Path(path)) as tmp:
        if is_transformers_model(model):
            model.save_pretrained(tmp)
        else:
            config = {"quant_method": "pyquant", "format": FORMAT_NAME, "format_version": FORMAT_VERSION,
                      "layers": {fqn: layer_entry(m) for fqn, m in layers.items()},
                      "modules_not_converted": sorted(getattr(model, "pyquant_skipped", {}))}
            save_model(model, str(tmp / WEIGHTS_NAME))
            (tmp / CONFIG_NAME).write_text(json.dumps(config, indent=2, sort_keys=True))
    return Path(path)


@contextlib.contextmanager
def staged_checkpoint(path: Path):
    """Write a checkpoint directory atomically: yields a new temporary directory beside ``path``
    to write into; when the block completes, it becomes ``path`` (:func:`_put_in_place`), with the
    umask's permissions; on any error (an interrupt included) it is removed and ``path`` is as it
    was. ``path`` may be new, an empty directory or a pyquant checkpoint."""
    if path.exists() and (not path.is_dir() or not _replaceable(path)):
        raise ValueError(f"{str(path)!r} exists and is not a pyquant checkpoint directory; refusing to overwrite")
    path.parent.mkdir(parents=True, exist_ok=True)
    _clean_leftovers(path)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-{os.getpid()}-", dir=path.parent))
    try:
        _honour_umask(tmp)  # mkdtemp makes it 0700: a checkpoint is for sharing like any saved file
        yield tmp
        for f in tmp.rglob("*"):
            _honour_umask(f)
        _put_in_place(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def read_config(path: str | os.PathLike) -> dict:
    """Read and check ``quantization_config.json`` of a checkpoint directory."""
    path = Path(path)
    cfg_file, weights = path / CONFIG_NAME, path / WEIGHTS_NAME
    if path.exists() and not path.is_dir():
        raise ValueError(f"{str(path)!r} is a file, not a checkpoint directory")
    if not path.exists():
        hint = ""
        if any(p.name.startswith(f".{path.name}.old-") for p in _leftovers(path)):
            hint = "; a killed save left the previous checkpoint beside it (the next save_quantized puts it back)"
        raise ValueError(f"{str(path)!r} is not a pyquant checkpoint: the directory is missing{hint}")
    for f in (cfg_file, weights):
        if not f.is_file():
            raise ValueError(f"{str(path)!r} is not a pyquant checkpoint: {f.name} is missing")
    try:
        config = json.loads(cfg_file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as e:
        raise ValueError(f"{cfg_file} is not valid JSON ({type(e).__name__}); the checkpoint is corrupt") from None
    if not isinstance(config, dict) or config.get("format") != FORMAT_NAME:
        raise ValueError(f"{cfg_file} does not describe a {FORMAT_NAME} checkpoint")
    version = config.get("format_version")
    if isinstance(version, bool) or version not in READABLE_FORMAT_VERSIONS:
        raise ValueError(f"unknown format_version {version!r} in {cfg_file}; "
                         f"this pyquant reads versions {list(READABLE_FORMAT_VERSIONS)}")
    if not isinstance(config.get("layers"), dict) or not config["layers"]:
        raise ValueError(f"{cfg_file} has no 'layers' table")
    skipped = config.get("modules_not_converted", [])
    if not isinstance(skipped, list) or not all(isinstance(m, str) for m in skipped):
        raise ValueError(f"{cfg_file}: modules_not_converted must be a list of module names")
    return config


def _read_layer(layer: nn.Module, fqn: str, entry: dict, version: int, weights: Path, header: dict) -> None:
    """Fill ``layer`` with its tensors from the file after checking their dtypes, shapes and
    checksum, and validate it: nothing of the model is touched yet."""
    expected = layer.state_dict()
    for name, t in expected.items():
        check_tensor(f"{fqn}.{name}", t, header.get(f"{fqn}.{name}"))
    with safe_open(str(weights), framework="pt") as f:
        tensors = {name: f.get_tensor(f"{fqn}.{name}") for name in expected}
    verify_checksum_of(tensors, entry, version)
    # The file's own tensors (copy-on-write views of its mapping), not copies: what the kernels
    # repack (large codes into 2 MB pages, mode lut's layout) they then hand back to the OS
    # (backends/cpu.py), and what they read in place stays file-backed memory.
    layer.load_state_dict(tensors, strict=True, assign=True)
    layer.validate()


def load_quantized(model: nn.Module, path: str | os.PathLike) -> nn.Module:
    """Load a checkpoint written by :func:`save_quantized` into ``model``, the unquantized skeleton
    of the same architecture; swaps ``QuantLinear`` in and returns ``model``. The quantized layers
    hold the file's tensors (copy-on-write views of its mapping: changes in place never reach the
    file), not copies. A Hugging Face directory (a transformers ``model``) loads through
    ``type(model).from_pretrained(path)``, which returns a new model. Raises ``ValueError`` for a
    checkpoint that is truncated, damaged (checksum), of an unknown version, or from another model;
    the model is then left as it was."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    if hf_quantization_config(path) is not None:
        if not is_transformers_model(model):
            raise ValueError(f"{str(path)!r} is a Hugging Face directory: load it with transformers' "
                             f"from_pretrained (after import pyquant), not into a {type(model).__name__}")
        return type(model).from_pretrained(path)
    config = read_config(path)
    weights = Path(path) / WEIGHTS_NAME
    header = read_header([weights])
    layers = {}
    for fqn, entry in config["layers"].items():
        try:
            linear = model.get_submodule(fqn)
        except AttributeError:
            raise ValueError(f"checkpoint is from another model: it quantizes {fqn!r}, which this model lacks") from None
        if isinstance(linear, (QuantLinear, DequantLinear)):
            raise ValueError(f"model is already quantized at {fqn!r}; pass the unquantized skeleton")
        shape = tuple(entry.get(k) for k in ("out_features", "in_features")) if isinstance(entry, dict) else ()
        if not isinstance(linear, nn.Linear) or (
                all(type(d) is int for d in shape) and tuple(linear.weight.shape) != shape):
            raise ValueError(f"checkpoint is from another model: {fqn!r} is {linear!r} here, the checkpoint's "
                             f"entry says out_features, in_features = {shape}")
        try:  # (the entry's fields are checked here; a valid shape is the model's: no huge allocation)
            layer = skeleton_layer(entry, linear.weight.device)
            _read_layer(layer, fqn, entry, config["format_version"], weights, header)
        except (TypeError, ValueError) as e:
            raise ValueError(f"checkpoint layer {fqn!r} is invalid: {e}") from e
        layers[fqn] = layer
    originals = {fqn: model.get_submodule(fqn) for fqn in layers}
    try:
        for fqn, layer in layers.items():
            set_submodule(model, fqn, layer)
        _check_rest(model, header, set(layers))
        # The rest only: the quantized layers were read and checked above. Keys absent from the file
        # are the layers' and tied names, which _check_rest allowed.
        with safe_open(str(weights), framework="pt") as f:
            rest = {k: f.get_tensor(k) for k in header if k.rpartition(".")[0] not in layers}
        model.load_state_dict(rest, strict=False)
    except BaseException as e:
        for fqn, linear in originals.items():
            set_submodule(model, fqn, linear)
        if isinstance(e, (SafetensorError, RuntimeError)):  # RuntimeError: load_state_dict's mismatches
            raise ValueError(f"checkpoint does not match this model: {e}") from e
        raise
    model.pyquant_skipped = {name: "not converted" for name in config.get("modules_not_converted", [])}
    return model


def _check_rest(model: nn.Module, header: dict, quantized: set[str]) -> None:
    """Every tensor of the model is in the file with its dtype and shape, and the file holds no
    other: checked from the header before anything is copied. A tensor saved once under a tied
    name (safetensors keeps one of the names that share storage) may be absent."""
    state = model.state_dict(keep_vars=True)
    present = {state[k].data_ptr() for k in header if k in state}
    unexpected = sorted(set(header) - set(state))
    if unexpected:
        raise ValueError(f"checkpoint does not match this model: it holds tensors this model lacks: {unexpected[:5]}")
    for key, t in state.items():
        if key in header:
            check_tensor(key, t, header[key])
        elif t.data_ptr() not in present:
            raise ValueError(f"checkpoint does not match this model: it lacks tensor {key!r}")
