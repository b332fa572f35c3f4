"""Streaming quantization of a checkpoint larger than memory (issue 20, acceptance 3).

    python benchmarks/streaming_quantize.py [--layers 32] [--work DIR] [--out benchmarks/results]

1. Writes a Llama-2-7B-shaped checkpoint (hidden 4096, MLP 11008, 32 heads, vocab 32000,
   ``--layers`` decoder layers; 32 = the real depth, 13.5 GB) with random bf16 weights, sharded
   like ``save_pretrained`` (2 GB shards and an index), into ``--work`` (kept: later runs reuse it;
   the quantized output there is replaced by each run).
2. Quantizes it with ``python -m pyquant quantize SRC --stream --method rtn`` in a child process:
   wall time and the child's own peak resident memory (``ru_maxrss``, reported as it exits).
3. Loads the output with ``AutoModelForCausalLM.from_pretrained`` in another child, checks every
   decoder projection is a ``QuantLinear`` and that a forward on 8 tokens gives finite logits:
   wall time and peak memory again.

``--method unisvq`` (with ``--layers 4``): the same with UniSVQ block by block, calibrated on
``--sequences`` random token-id sequences of ``--tokens`` tokens; the time per block is reported.

Writes ``streaming_quantize_<method>.{md,json}`` to ``--out``.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

SHAPE = dict(hidden_size=4096, intermediate_size=11008, num_attention_heads=32, num_key_value_heads=32,
             vocab_size=32000, max_position_embeddings=4096, tie_word_embeddings=False)
SHARD_BYTES = 2 * 2**30


def write_checkpoint(path: Path, layers: int) -> None:
    """Random bf16 weights (std 0.02, norms 1) of every parameter, shard by shard: never more than
    one shard in memory."""
    import torch
    from safetensors.torch import save_file
    from transformers import LlamaConfig, LlamaForCausalLM

    if (path / "model.safetensors.index.json").is_file():
        return
    path.mkdir(parents=True, exist_ok=True)
    config = LlamaConfig(num_hidden_layers=layers, dtype="bfloat16", **SHAPE)
    config.architectures = ["LlamaForCausalLM"]
    with torch.device("meta"):
        names = [(n, tuple(p.shape)) for n, p in LlamaForCausalLM(config).named_parameters()]
    g = torch.Generator().manual_seed(0)
    shard, size, files, weight_map = {}, 0, [], {}

    def flush():
        nonlocal shard, size
        name = f"part-{len(files)}.safetensors"
        save_file(shard, str(path / name), metadata={"format": "pt"})
        files.append((name, list(shard)))
        shard, size = {}, 0

    for name, shape in names:
        t = torch.ones(shape) if name.endswith("norm.weight") else torch.randn(shape, generator=g) * 0.02
        shard[name] = t.to(torch.bfloat16)
        size += shard[name].numel() * 2
        if size >= SHARD_BYTES:
            flush()
    if shard:
        flush()
    for i, (name, keys) in enumerate(files):
        final = f"model-{i + 1:05d}-of-{len(files):05d}.safetensors"
        (path / name).rename(path / final)
        weight_map.update({k: final for k in keys})
    total = sum(f.stat().st_size for f in path.glob("*.safetensors"))
    (path / "model.safetensors.index.json").write_text(json.dumps({"metadata": {"total_size": total},
                                                                     "weight_map": weight_map}))
    config.save_pretrained(path)


# UniSVQ block by block: a few random token-id sequences as calibration (the weights are random too).
UNISVQ = """
import sys, time, torch, pyquant
from pyquant.streaming import quantize_checkpoint
n, tokens = int(sys.argv[3]), int(sys.argv[4])
g = torch.Generator().manual_seed(0)
data = [{"input_ids": torch.randint(0, 32000, (1, tokens), generator=g),
         "attention_mask": torch.ones(1, tokens, dtype=torch.long)} for _ in range(n)]
t0 = time.perf_counter()
quantize_checkpoint(sys.argv[1], sys.argv[2], pyquant.UniSVQConfig(), calibration_data=data)
print(time.perf_counter() - t0)
"""

LOAD = """
import sys, time, torch, pyquant
from transformers import AutoModelForCausalLM
t0 = time.perf_counter()
model = AutoModelForCausalLM.from_pretrained(sys.argv[1])
layers = pyquant.nn.quantized_layers(model)
with torch.no_grad():
    logits = model(torch.arange(8).unsqueeze(0)).logits
assert torch.isfinite(logits).all()
print(len(layers), time.perf_counter() - t0)
"""


# Runs a module or a script in this child and reports the child's own peak RSS when it exits.
PEAK = """
import atexit, resource, runpy, sys
atexit.register(lambda: print(f"PEAK_KIB={resource.getrusage(resource.RUSAGE_SELF).ru_maxrss}", file=sys.stderr))
kind, target, *sys.argv[1:] = sys.argv[1:]
runpy.run_module(target, run_name="__main__") if kind == "-m" else exec(compile(target, "<load>", "exec"))
"""


def child(kind: str, target: str, *argv: str) -> tuple[str, float, float]:
    """(stdout, wall seconds, peak RSS GiB) of ``python -m target argv`` or of the code ``target``."""
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", PEAK, kind, target, *argv], capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if proc.returncode:
        raise SystemExit(f"{target[:40]!r} failed:\n{proc.stderr[-3000:]}")
    peak = int(proc.stderr.rsplit("PEAK_KIB=", 1)[1].split()[0])
    return proc.stdout, wall, peak / 2**20


def cpu_name() -> str:
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
        return next(line.split(":", 1)[1].strip() for line in lines if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.machine()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=32)
    parser.add_argument("--work", type=Path, default=Path.home() / ".cache" / "pyquant" / "streaming")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    parser.add_argument("--method", choices=["rtn", "unisvq"], default="rtn")
    parser.add_argument("--sequences", type=int, default=4, help="unisvq: calibration sequences")
    parser.add_argument("--tokens", type=int, default=128, help="unisvq: tokens per sequence")
    args = parser.parse_args()
    src = args.work / f"llama7b-{args.layers}l-bf16"
    dst = args.work / f"llama7b-{args.layers}l-pyquant-{args.method}"

    t0 = time.perf_counter()
    write_checkpoint(src, args.layers)
    src_gb = sum(f.stat().st_size for f in src.glob("*.safetensors")) / 1e9
    print(f"checkpoint: {src} ({src_gb:.1f} GB) ready after {time.perf_counter() - t0:.0f} s", flush=True)

    if args.method == "rtn":
        _, q_wall, q_peak = child("-m", "pyquant", "quantize", str(src), "--stream", "--method", "rtn", "--out", str(dst))
        what = "`quantize --stream --method rtn`"
    else:
        _, q_wall, q_peak = child("-c", UNISVQ, str(src), str(dst), str(args.sequences), str(args.tokens))
        what = (f"`quantize_checkpoint(..., UniSVQConfig(), calibration_data=...)`, {args.sequences} x {args.tokens} "
                f"tokens, {q_wall / args.layers:.0f} s per block")
    quant = (q_wall, q_peak)
    print(f"quantized in {q_wall:.0f} s, peak {q_peak:.2f} GiB", flush=True)
    out, l_wall, l_peak = child("-c", LOAD, str(dst))
    n_layers = out.split()[-2]
    dst_gb = sum(f.stat().st_size for f in dst.glob("*.safetensors")) / 1e9
    result = {"method": args.method, "date": datetime.date.today().isoformat(), "machine": cpu_name(),
              "cpus": os.cpu_count(), "layers": args.layers, "checkpoint_gb": round(src_gb, 2),
              "output_gb": round(dst_gb, 2), "quantize_wall_s": round(quant[0], 1),
              "quantize_peak_rss_gib": round(quant[1], 2), "load_wall_s": round(l_wall, 1),
              "load_peak_rss_gib": round(l_peak, 2), "quantized_layers": int(n_layers)}
    args.out.mkdir(parents=True, exist_ok=True)
    stem = f"streaming_quantize_{args.method}"
    (args.out / f"{stem}.json").write_text(json.dumps(result, indent=2))
    md = ["| step | wall (s) | peak RSS (GiB) |", "|---|---:|---:|",
          f"| {what} ({src_gb:.1f} GB bf16 -> {dst_gb:.2f} GB) | {quant[0]:.0f} | {quant[1]:.2f} |",
          f"| `from_pretrained` + forward ({n_layers} QuantLinear) | {l_wall:.0f} | {l_peak:.2f} |"]
    (args.out / f"{stem}.md").write_text(
        f"Llama-2-7B-shaped, {args.layers} layers, random bf16; {result['date']}, {result['machine']}, "
        f"{os.cpu_count()} CPUs\n\n"
        + "\n".join(md) + "\n")
    print("\n".join(md))


if __name__ == "__main__":
    main()
