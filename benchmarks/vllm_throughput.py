"""vLLM on CPU: a pyquant 2-bit checkpoint against the same model in bf16 (issue 14, acceptance 4).

    bash scripts/setup_vllm.sh && .venv-vllm/bin/python benchmarks/vllm_throughput.py [--layers 4]

The model: Llama-2-7B-shaped (hidden 4096, MLP 11008, 32 heads, vocab 32000) with ``--layers``
decoder layers and random bf16 weights (``benchmarks/streaming_quantize.py`` writes it, and its
RTN output is made here with ``python -m pyquant quantize --stream --method rtn``, lm_head and
embeddings bf16; and with ``quantize_checkpoint`` taking lm_head too; where the CPU's kernel set has
table-lookup kernels, both RTN checkpoints once more in CPU mode "lut", ``PYQUANT_CPU_MODE=lut``).
Each model runs in its own child process with vLLM's defaults (bf16
activations, its torch.compile, continuous batching); the load and compile are not timed. Timed,
after one warm-up request, per batch size: ``LLM.generate`` on ``batch`` requests of 128 random
prompt tokens with 1 new token (the prefill), then on ``batch`` fresh ones with 64 new tokens
each (``ignore_eos``). Output tok/s = batch * 64 / wall; decode tok/s = batch * 63 / (wall -
prefill wall); prefill tok/s = batch * 128 / prefill wall.

Writes ``NAME.{md,json}`` to ``--out`` (``--name``, default ``vllm_throughput``).
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from streaming_quantize import cpu_name, write_checkpoint  # noqa: E402

import pyquant  # noqa: E402
from pyquant.streaming import quantize_checkpoint  # noqa: E402

CHILD = r"""
import json, os, resource, sys, time
if __name__ == "__main__":
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt
    import random
    path, batches, prompt_len, new = sys.argv[1], [int(b) for b in sys.argv[2].split(",")], int(sys.argv[3]), int(sys.argv[4])
    t0 = time.perf_counter()
    llm = LLM(model=path, skip_tokenizer_init=True, max_model_len=512, gpu_memory_utilization=0.5, seed=0,
              max_num_seqs=max(batches))
    load = time.perf_counter() - t0
    rng = random.Random(0)
    params = SamplingParams(max_tokens=new, min_tokens=new, temperature=0.0, ignore_eos=True, detokenize=False)
    def prompts(n):
        return [TokensPrompt(prompt_token_ids=[rng.randrange(3, 32000) for _ in range(prompt_len)]) for _ in range(n)]
    llm.generate(prompts(1), params, use_tqdm=False)  # warm-up
    out = {"load_s": load}
    first = SamplingParams(max_tokens=1, temperature=0.0, ignore_eos=True, detokenize=False)
    for b in batches:
        t0 = time.perf_counter()
        llm.generate(prompts(b), first, use_tqdm=False)  # the prefill alone (fresh prompts: no prefix cache)
        t_prefill = time.perf_counter() - t0
        t0 = time.perf_counter()
        res = llm.generate(prompts(b), params, use_tqdm=False)
        wall = time.perf_counter() - t0
        assert all(len(r.outputs[0].token_ids) == new for r in res)
        out[f"tok_s_b{b}"] = b * new / wall
        out[f"prefill_tok_s_b{b}"] = b * prompt_len / t_prefill
        out[f"decode_tok_s_b{b}"] = b * (new - 1) / max(wall - t_prefill, 1e-9)
    out["peak_rss_gib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    print("RESULT " + json.dumps(out), flush=True)
    os._exit(0)
"""


def run(path: Path, batches: list[int], prompt_len: int, new: int, cpu_mode: str = "int") -> dict:
    env = {**os.environ, "VLLM_ENABLE_V1_MULTIPROCESSING": "0", "VLLM_CPU_KVCACHE_SPACE": "2",
           "HF_HUB_OFFLINE": "1", "PYQUANT_CPU_MODE": cpu_mode}
    log = Path("/tmp") / f"vllm_throughput_{path.name}_{cpu_mode}.log"
    with open(log, "w") as f:  # a file: vLLM's helper processes may outlive the child
        rc = subprocess.run([sys.executable, "-c", CHILD, str(path), ",".join(map(str, batches)), str(prompt_len),
                             str(new)], env=env, stdout=f, stderr=subprocess.STDOUT).returncode
    text = log.read_text()
    if rc or "RESULT " not in text:
        raise SystemExit(f"vLLM on {path} failed (log {log}):\n{text[-3000:]}")
    return json.loads(text.rsplit("RESULT ", 1)[1].splitlines()[0])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--work", type=Path, default=Path.home() / ".cache" / "pyquant" / "streaming")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    parser.add_argument("--batches", default="1,8")
    parser.add_argument("--prompt", type=int, default=128)
    parser.add_argument("--new", type=int, default=64)
    parser.add_argument("--name", default="vllm_throughput", help="the result files' name (NAME.md, NAME.json)")
    args = parser.parse_args()
    src = args.work / f"llama7b-{args.layers}l-bf16"
    dst = args.work / f"llama7b-{args.layers}l-pyquant-rtn"
    write_checkpoint(src, args.layers)
    if not (dst / "config.json").is_file():
        subprocess.run([sys.executable, "-m", "pyquant", "quantize", str(src), "--stream", "--method", "rtn",
                        "--out", str(dst)], check=True)
    head = args.work / f"llama7b-{args.layers}l-pyquant-rtn-head"  # lm_head quantized too
    if not (head / "config.json").is_file():
        quantize_checkpoint(src, head, pyquant.RTNConfig(), filter_fn=lambda module, fqn: True)
    batches = [int(b) for b in args.batches.split(",")]
    models = [("bf16", src, "int"), ("pyquant 2-bit (RTN)", dst, "int"), ("pyquant 2-bit, 2-bit lm_head", head, "int")]
    if pyquant.ops._C.has_lut_kernel():  # (every kernel set but the portable one)
        models += [("pyquant 2-bit (RTN), CPU mode lut", dst, "lut"), ("pyquant 2-bit, 2-bit lm_head, CPU mode lut", head, "lut")]
    rows = {}
    for name, path, mode in models:
        rows[name] = run(path, batches, args.prompt, args.new, mode)
        print(name, rows[name], flush=True)
    gb = {name: sum(f.stat().st_size for f in p.glob("*.safetensors")) / 1e9 for name, p, _ in models}
    base = rows["bf16"]
    result = {"date": datetime.date.today().isoformat(), "machine": cpu_name(), "cpus": os.cpu_count(),
              "layers": args.layers, "prompt_tokens": args.prompt, "new_tokens": args.new, "rows": rows,
              "checkpoint_gb": gb}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"{args.name}.json").write_text(json.dumps(result, indent=2))
    kinds = [("tok_s", "output tok/s"), ("decode_tok_s", "decode tok/s"), ("prefill_tok_s", "prefill tok/s")]
    cols = [(f"{k}_b{b}", f"batch {b} {what} (× bf16)") for b in batches for k, what in kinds]
    md = ["| model | checkpoint GB | " + " | ".join(c for _, c in cols) + " | load + compile s | peak RSS GiB |",
          "|---|---:|" + "---:|" * len(cols) + "---:|---:|"]
    for name, r in rows.items():
        cells = " | ".join(f"{r[k]:.2f} ({r[k] / base[k]:.2f}×)" for k, _ in cols)
        md.append(f"| {name} | {gb[name]:.2f} | {cells} | {r['load_s']:.0f} | {r['peak_rss_gib']:.2f} |")
    (args.out / f"{args.name}.md").write_text(
        f"vLLM {__import__('vllm').__version__} (CPU build), Llama-2-7B-shaped, {args.layers} layers, random weights, "
        f"{args.prompt} prompt + {args.new} new tokens a request; {result['date']}, {result['machine']}, "
        f"{os.cpu_count()} CPUs\n\n" + "\n".join(md) + "\n")
    print("\n".join(md))


if __name__ == "__main__":
    main()
