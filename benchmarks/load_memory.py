"""Resident memory of a loaded 2-bit model against the size of its codes, per loader and CPU mode.

    python benchmarks/load_memory.py [--layers 2] [--work DIR] [--out benchmarks/results]

Writes (once, into ``--work``) a Llama-2-7B-shaped model (hidden 4096, MLP 11008, 32 heads, a
1000-token vocabulary so that the decoder's codes dominate) with random weights, quantized with
RTN 2-bit, twice: ``save_quantized`` (pyquant's format) and ``save_pretrained`` (transformers').
Then per loader (``pyquant.load_quantized`` into a skeleton, ``AutoModelForCausalLM.from_pretrained``)
and CPU mode (int, lut) a fresh child process loads it and reports how much its resident memory
(``VmRSS``: anonymous and file-backed) grew over the load and over a first forward, next to the
codes' size. The skeleton's dense weights are never written (``no_init_weights``), so they take
no memory; the other tensors (embeddings, norms, ``lm_head``) load as well and are counted.

Writes ``load_memory.{md,json}`` (or ``--name``) to ``--out``.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
ROOT = Path(__file__).resolve().parent.parent
SHAPE = dict(hidden_size=4096, intermediate_size=11008, num_attention_heads=32, num_key_value_heads=32,
             vocab_size=1000, tie_word_embeddings=False)
sys.path.insert(0, str(ROOT / "benchmarks"))
from decode_cpu import proc_status_mb  # noqa: E402

LOADERS = {"pyquant": "pyquant.load_quantized", "transformers": "AutoModelForCausalLM.from_pretrained"}


def prepare(work: Path, layers: int) -> None:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    import pyquant

    if (work / "hf" / "config.json").exists() and (work / "pyquant" / "quantization_config.json").exists():
        return
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(num_hidden_layers=layers, **SHAPE))
    pyquant.quantize_model(model, pyquant.RTNConfig(bits=2))
    pyquant.save_quantized(model, work / "pyquant")
    model.save_pretrained(work / "hf")


def measure(work: Path, loader: str, mode: str) -> dict:
    """In this (fresh) process: load, then one forward; resident growth of each, MiB."""
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM
    from transformers.initialization import no_init_weights

    import pyquant

    pyquant.kernels.set_cpu_mode(mode)
    before = proc_status_mb("VmRSS")
    if loader == "pyquant":
        with no_init_weights():  # torch.empty: pages never written, no memory (the inv_freq buffers are made)
            skeleton = LlamaForCausalLM(LlamaConfig.from_pretrained(work / "hf"))
        model = pyquant.load_quantized(skeleton, work / "pyquant")
    else:
        model = AutoModelForCausalLM.from_pretrained(work / "hf")
    loaded = proc_status_mb("VmRSS")
    with torch.no_grad():
        model(torch.arange(8)[None])
    layers = pyquant.nn.quantized_layers(model)
    rest = [t for k, t in model.state_dict().items() if k.rpartition(".")[0] not in layers]
    return dict(loader=loader, mode=pyquant.ops._C.get_mode(),
                codes_mib=sum(q.codes.nbytes for q in layers.values()) / 2**20,
                rest_mib=sum(t.nbytes for t in rest) / 2**20, load_mib=loaded - before,
                forward_mib=proc_status_mb("VmRSS") - before)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--layers", type=int, default=2, help="decoder layers")
    p.add_argument("--work", default=str(Path.home() / ".cache" / "pyquant" / "load_memory"))
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    p.add_argument("--name", default="load_memory")
    p.add_argument("--child", nargs=2, help=argparse.SUPPRESS)  # internal: LOADER MODE, measured here
    args = p.parse_args()
    work = Path(args.work) / f"llama2-7b-shape-{args.layers}l"
    if args.child:
        print(json.dumps(measure(work, *args.child)))
        return
    work.mkdir(parents=True, exist_ok=True)
    prepare(work, args.layers)
    rows = []
    for loader in LOADERS:
        for mode in ("int", "lut"):
            out = subprocess.run([sys.executable, __file__, "--layers", str(args.layers), "--work", args.work,
                                  "--child", loader, mode], capture_output=True, text=True, check=True)
            rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
            print(rows[-1], file=sys.stderr)
    import torch

    when = datetime.datetime.now().isoformat(timespec="seconds")
    cpu = platform.processor() or platform.machine()
    with open("/proc/cpuinfo") as f:
        cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    result = dict(when=when, cpu=cpu, torch=torch.__version__, layers=args.layers, rows=rows)
    out = Path(args.out)
    (out / f"{args.name}.json").write_text(json.dumps(result, indent=1) + "\n")
    lines = [f"# Resident memory of a loaded 2-bit model ({cpu}, {when})", "",
             f"Command: `python benchmarks/load_memory.py --layers {args.layers}`; a Llama-2-7B-shaped model "
             f"({args.layers} decoder layers, vocabulary 1000), RTN 2-bit; each row a fresh process; growth of "
             "VmRSS (anonymous and file-backed) from before the model is made (the skeleton for "
             "`load_quantized`) to after the load, and to after a first 8-token forward; other tensors: "
             "the embeddings, norms and `lm_head` (fp32).", "",
             "| loader | CPU mode | codes MiB | other tensors MiB | loaded MiB | × (codes + other) | "
             "after a forward MiB | × (codes + other) |",
             "|---|---|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        size = r["codes_mib"] + r["rest_mib"]
        lines.append(f"| {LOADERS[r['loader']]} | {r['mode']} | {r['codes_mib']:.0f} | {r['rest_mib']:.0f} | "
                     f"{r['load_mib']:.0f} | {r['load_mib'] / size:.2f} | {r['forward_mib']:.0f} | "
                     f"{r['forward_mib'] / size:.2f} |")
    (out / f"{args.name}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
