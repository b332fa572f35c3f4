#!/usr/bin/env python
"""CPU modes side by side on decode: the same 2-bit Llama-2-7B-shaped checkpoint loaded twice in one
process, once per CPU mode, greedy decode timed round by round, the modes alternating.

    nice -n 10 python benchmarks/decode_modes.py [--modes int lut3] [--layers 8] [--batches 1 4]
                                                 [--rounds 5] [--new-tokens 32] [--out benchmarks/results]

``decode_cpu.py`` times each column in its own process, minutes apart, and this machine's memory
bandwidth drifts by up to 2x over minutes: two modes a few percent apart cannot be told apart
there. Here both models decode in the same minutes, alternating: per mode and batch, the median
tok/s over the rounds (eager, ``lm_head`` 2-bit, the checkpoint ``decode_cpu.py --prepare-only``
makes) and each round's ratio to the first mode. Writes ``NAME.json`` and ``NAME.md``.
"""
from __future__ import annotations

import argparse
import datetime
import json
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import decode_cpu as dc  # noqa: E402  (its model, checkpoint cache and timing)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--modes", nargs="+", default=["int", "lut3"], choices=["int", "lut", "lut3", "float"])
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--batches", type=int, nargs="+", default=[1, 4])
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--prompt", type=int, default=16)
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--out", default=str(dc.ROOT / "benchmarks" / "results"))
    p.add_argument("--name", default="decode_modes")
    args = p.parse_args(argv)
    if len(args.modes) < 2:
        p.error("--modes needs at least two modes to compare")
    if not (dc.ckpt_dir(args.layers) / "pyquant-rtn2").is_dir():
        p.error(f"no pyquant checkpoint for {args.layers} layers: run benchmarks/decode_cpu.py --layers "
                f"{args.layers} --prepare-only first")
    import pyquant

    torch.set_num_threads(args.threads)
    models = {}
    for mode in args.modes:
        pyquant.kernels.set_cpu_mode(mode)  # the mode of the layers loaded next
        models[mode] = dc.load_pyquant(args, head_2bit=True)
        dc.generate(models[mode], dc.prompt_ids(1, args.prompt), 2, False)  # builds the layers' state
    pyquant.kernels.set_cpu_mode("auto")
    tok_s = {m: {b: [] for b in args.batches} for m in args.modes}
    for r in range(args.rounds):
        for b in args.batches:
            for mode, model in models.items():
                t = dc.time_decode(model, b, args)["tok_s"]
                tok_s[mode][b].append(t)
                dc.log(f"round {r + 1}, batch {b}, mode {mode}: {t:.2f} tok/s")
    first = args.modes[0]
    rows = []
    for b in args.batches:
        for mode in args.modes:
            ratios = [a / f for a, f in zip(tok_s[mode][b], tok_s[first][b])]
            rows.append({"batch": b, "mode": mode, "tok_s": tok_s[mode][b], "median": statistics.median(tok_s[mode][b]),
                         "ratio_median": statistics.median(ratios), "ratio_min": min(ratios), "ratio_max": max(ratios)})
    meta = {**dc.machine(), "date": datetime.datetime.now().isoformat(timespec="seconds"),
            "command": " ".join(["python benchmarks/decode_modes.py"] + (sys.argv[1:] if argv is None else argv)),
            "args": vars(args), "torch": torch.__version__, "kernel_set": pyquant.ops._C.get_isa()}
    lines = [f"# CPU modes on decode, Llama-2-7B-shaped, {args.layers} of 32 layers ({meta['date']})", "",
             f"- CPU: {meta['cpu']}, kernel set `{meta['kernel_set']}`, {args.threads} threads; torch {meta['torch']}",
             f"- command: `{meta['command']}`",
             f"- eager greedy decode, lm_head 2-bit, prompt {args.prompt}, {args.new_tokens} new tokens; "
             f"{args.rounds} rounds, the modes alternating within each", "",
             f"| batch | mode | median tok/s | x {first} (median of rounds) | x {first} (range) | tok/s per round |",
             "|---:|---|---:|---:|---:|---|"]
    for row in rows:
        lines.append(f"| {row['batch']} | {row['mode']} | {row['median']:.2f} | {row['ratio_median']:.3f} | "
                     f"{row['ratio_min']:.3f}-{row['ratio_max']:.3f} | {', '.join(f'{t:.1f}' for t in row['tok_s'])} |")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{args.name}.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    (out / f"{args.name}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
