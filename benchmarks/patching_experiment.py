"""Quantization-vector patching and DAQ on real text tasks, under qat-transfer's text protocol:
``python benchmarks/patching_experiment.py``.

Setting. The bundled MiniLM (all-MiniLM-L6-v2) with a linear head on mean-pooled
tokens. Tasks: six labelings of one pool of real sentences (the standard
library's docstrings, :func:`pyquant.sentences.labelled_sentences`) by the
module each sentence documents: two topical groupings of the modules and four
seeded random ones (2 to 5 classes, balanced by sentence count). One split of
the pool serves every task (55/20/25 train/val/test), so no donor ever trains
on a receiver's test sentences; every test split holds >= 400 sentences.

Protocol (dansolombrino/qat-transfer, text): full fine-tuning of the whole
model, head and embeddings included; AdamW lr 1e-5, weight decay 0.1, linear
warm-up (10 % of the steps) then cosine, gradient clipping 1.0, 5 epochs, batch
32, max length 128; QAT is the same run (same seed, data order and dropout
masks) with straight-through per-channel RTN fake quantization of every encoder
``nn.Linear``; PTQ is RTN per-output-channel absmax of those layers (the head
stays in full precision), at 3 and 2 bits. The vector ``tau_q = QAT - FT`` is
every floating backbone tensor (LayerNorms, embeddings, biases), no head
(:func:`pyquant.patching.backbone_names`); lam is searched on the receiver's
validation split over the reference grid, ties to the smallest.

For every ordered pair donor -> receiver and bit-width: receiver test accuracy
after PTQ unpatched, patched with ``tau_q(donor)`` at lam = 1 and at the
searched lam, and the receiver's own QAT (the ceiling). Summaries give the mean,
median and share of pairs improved with bootstrap 95 % intervals (resampling
the pairs). Patch -> UniSVQ: the receiver, unpatched and patched with the
donor's 2-bit vector at lam = 1, quantized by UniSVQ (2.065 bits/weight,
calibrated on the receiver's training sentences).

DAQ: base = the pre-trained backbone, post = each fine-tuned backbone; absmax
scales vs DAQ scales on the same grid: sign-preservation rate, delta cosine,
weight MSE, task accuracy, and the cosine of the sentence embeddings to the
pre-trained model's on test sentences.

Trained models are cached under ``--cache-dir``; tables go to
``benchmarks/results/patching.{json,md}``.
"""
from __future__ import annotations

import argparse
import copy
import contextlib
import hashlib
import json
import os
import platform
import random
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from pyquant import patching
from pyquant.evaluation import encoder_filter, load_minilm
from pyquant.fakequant import DequantLinear, fake_quantize_rows
from pyquant.nn import quantize_model
from pyquant.quantizers.daq import DAQConfig, delta_metrics
from pyquant.quantizers.unisvq import UniSVQConfig
from pyquant.sentences import labelled_sentences

ROOT = Path(__file__).resolve().parents[1]

# two topical groupings of the modules; every module of the pool belongs to one class of each
TOPICS: dict[str, list[str]] = {
    "concurrency": ["asyncio", "threading", "subprocess", "concurrent.futures", "sched", "queue", "selectors",
                    "signal", "multiprocessing", "mmap"],
    "files-archives": ["shutil", "io", "os", "tempfile", "pathlib", "glob", "fnmatch", "filecmp", "stat", "lzma",
                       "bz2", "gzip", "zipfile", "tarfile", "zlib", "csv", "plistlib", "netrc", "sqlite3", "wave"],
    "network-mail": ["urllib.request", "socket", "smtplib", "ftplib", "imaplib", "http.client", "poplib", "email",
                     "mailbox", "mimetypes", "html.parser", "xml.dom.minidom", "xml.etree.ElementTree"],
    "debug-test": ["doctest", "pdb", "traceback", "unittest", "timeit", "tracemalloc", "trace", "pydoc",
                   "warnings", "gc"],
    "text": ["difflib", "codecs", "re", "textwrap", "locale", "gettext", "shlex", "string", "base64", "binascii",
             "json", "pickle", "struct", "pprint", "calendar", "time", "datetime"],
    "language": ["typing", "inspect", "ast", "dis", "tokenize", "importlib", "zipimport", "keyword", "dataclasses",
                 "abc", "enum", "functools", "weakref", "contextlib", "copy", "operator", "collections",
                 "itertools", "ctypes", "array"],
    "numbers-crypto": ["statistics", "fractions", "decimal", "math", "cmath", "numbers", "random", "heapq",
                       "bisect", "uuid", "hashlib", "hmac", "secrets", "colorsys"],
    "config-platform": ["configparser", "argparse", "optparse", "getopt", "cmd", "logging", "platform",
                        "sysconfig", "site", "venv"],
}
IO_CLASSES = ("concurrency", "files-archives", "network-mail")  # "io-vs-compute": these vs the rest


@dataclass
class Task:
    name: str
    classes: list[str]
    labels: torch.Tensor  # [n_sentences], one label per sentence of the pool
    splits: dict[str, torch.Tensor] = field(default_factory=dict)  # split -> sentence ids (shared by all tasks)

    def split(self, name: str) -> tuple[torch.Tensor, torch.Tensor]:
        ids = self.splits[name]
        return ids, self.labels[ids]


def _random_grouping(modules: list[str], k: int, seed: int) -> dict[str, int]:
    """Modules in a seeded random order, each put in the class with the fewest sentences so far."""
    counts: dict[str, int] = {}
    for m in modules:
        counts[m] = counts.get(m, 0) + 1
    order = sorted(counts)
    random.Random(f"grouping-{k}-{seed}").shuffle(order)
    order.sort(key=lambda m: -counts[m])  # stable: the biggest first, ties in the random order
    sizes, out = [0] * k, {}
    for m in order:
        c = min(range(k), key=lambda j: (sizes[j], j))
        out[m], sizes[c] = c, sizes[c] + counts[m]
    return out


TASK_NAMES = ("topic", "io-vs-compute", "random-2", "random-3", "random-4", "random-5")


def build_tasks(names: list[str], modules: list[str], seed: int) -> list[Task]:
    """Every task labels every sentence; one seeded 55/20/25 split for all of them."""
    topic_of = {m: t for t, mods in TOPICS.items() for m in mods}
    missing = sorted(set(modules) - set(topic_of))
    if missing:
        raise ValueError(f"modules without a topic: {missing}")
    ids = list(range(len(modules)))
    random.Random(f"split-{seed}").shuffle(ids)
    n_tr, n_va = int(0.55 * len(ids)), int(0.20 * len(ids))
    splits = {"train": sorted(ids[:n_tr]), "val": sorted(ids[n_tr:n_tr + n_va]), "test": sorted(ids[n_tr + n_va:])}
    tasks = []
    for name in names:
        if name == "topic":
            classes = list(TOPICS)
            label = {m: classes.index(t) for m, t in topic_of.items()}
        elif name == "io-vs-compute":
            classes = ["io", "compute"]
            label = {m: 0 if t in IO_CLASSES else 1 for m, t in topic_of.items()}
        elif name.startswith("random-"):
            k = int(name.split("-")[1])
            classes = [f"group-{j}" for j in range(k)]
            label = _random_grouping(modules, k, seed)
        else:
            raise ValueError(f"unknown task {name!r}; known: {TASK_NAMES}")
        labels = torch.tensor([label[m] for m in modules])
        tasks.append(Task(name, classes, labels, {k: torch.tensor(v) for k, v in splits.items()}))
    return tasks


# ---------------------------------------------------------------- model pieces
class TaskModel(nn.Module):
    """``backbone`` (the whole BertModel, so state-dict names match the full model) +
    linear ``head`` on mean-pooled tokens."""

    def __init__(self, backbone, n_classes: int, seed: int):
        super().__init__()
        self.backbone = backbone
        torch.manual_seed(seed)
        self.head = nn.Linear(backbone.config.hidden_size, n_classes)

    def pooled(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        h = self.backbone(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        m = attention_mask.unsqueeze(-1).to(h.dtype)
        return (h * m).sum(1) / m.sum(1).clamp_min(1)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.head(self.pooled(input_ids, attention_mask))


class Tokens:
    """The pool tokenized once; ``batch(ids)`` trims the padding to the longest sentence of the batch."""

    def __init__(self, tokenizer, sentences: list[str], max_length: int):
        enc = tokenizer(sentences, padding="longest", truncation=True, max_length=max_length, return_tensors="pt")
        self.ids, self.mask = enc["input_ids"], enc["attention_mask"]
        self.lengths = self.mask.sum(1)

    def batch(self, ids: torch.Tensor) -> dict[str, torch.Tensor]:
        L = int(self.lengths[ids].max())
        return {"input_ids": self.ids[ids, :L], "attention_mask": self.mask[ids, :L]}

    def batches(self, ids: torch.Tensor, batch_size: int):
        """Batches of ``ids`` sorted by length (for inference): ``(positions in ids, inputs)``."""
        order = torch.argsort(self.lengths[ids], stable=True)
        for s in range(0, len(order), batch_size):
            o = order[s:s + batch_size]
            yield o, self.batch(ids[o])


class Batches:
    """One epoch of training batches per iteration, in the same order for every run with the
    same seed; each batch holds sentences of similar length (less padding to compute)."""

    def __init__(self, tokens: Tokens, ids: torch.Tensor, labels: torch.Tensor, batch_size: int, seed: int):
        self.tokens, self.ids, self.labels, self.batch_size = tokens, ids, labels, batch_size
        self.gen = torch.Generator().manual_seed(seed)

    def __len__(self) -> int:
        return len(self.ids) // self.batch_size

    def __iter__(self):
        perm = torch.randperm(len(self.ids), generator=self.gen)
        pool = 8 * self.batch_size
        batches = []
        for s in range(0, len(perm), pool):  # sort by length within pools of 8 batches, then shuffle the batches
            chunk = perm[s:s + pool]
            chunk = chunk[torch.argsort(self.tokens.lengths[self.ids[chunk]], stable=True)]
            batches += [chunk[i:i + self.batch_size] for i in range(0, len(chunk) - self.batch_size + 1, self.batch_size)]
        for b in torch.randperm(len(batches), generator=self.gen).tolist():
            p = batches[b]
            yield self.tokens.batch(self.ids[p]), self.labels[p]


def encoder_linears(bert) -> dict[str, nn.Linear]:
    return {f"encoder.{n}": m for n, m in bert.encoder.named_modules() if isinstance(m, nn.Linear)}


@contextlib.contextmanager
def ptq(bert, bits: int):
    """RTN ``bits``-bit per-channel fake quantization of every encoder Linear weight, undone on exit."""
    saved = {}
    with torch.no_grad():
        for name, lin in encoder_linears(bert).items():
            saved[name] = lin.weight.detach().clone()
            lin.weight.copy_(fake_quantize_rows(lin.weight, bits))
    try:
        yield bert
    finally:
        with torch.no_grad():
            for name, lin in encoder_linears(bert).items():
                lin.weight.copy_(saved[name])


@torch.inference_mode()
def accuracy(model: TaskModel, tokens: Tokens, ids: torch.Tensor, labels: torch.Tensor) -> float:
    model.eval()
    correct = 0
    for o, inputs in tokens.batches(ids, 128):
        correct += int((model(**inputs).argmax(-1) == labels[o]).sum())
    return correct / len(ids)


def train(base_bert, task: Task, tokens: Tokens, args, bits: int | None, cache_dir: Path) -> TaskModel:
    """The FT (``bits=None``) or QAT model of ``task``, loaded from ``cache_dir`` when present."""
    model = TaskModel(copy.deepcopy(base_bert), len(task.classes), seed=args.seed)
    path = cache_dir / f"{task.name}-{'ft' if bits is None else f'qat{bits}'}.safetensors"
    from safetensors.torch import load_file, save_file

    if path.is_file():
        state = load_file(str(path))
        model.load_state_dict(state)
        return model
    t0 = time.perf_counter()
    ids, labels = task.split("train")
    data = Batches(tokens, ids, labels, args.batch_size, args.seed)
    steps = args.epochs * len(data)
    # quantize exactly the layers PTQ quantizes (the encoder's), never the head
    keep = {f"backbone.{n}.weight" for n in encoder_linears(model.backbone)}.__contains__
    losses = patching.finetune(model, data, steps=steps, lr=args.lr, weight_decay=args.weight_decay,
                               warmup=max(1, round(args.warmup * steps)), bits=bits, quant_filter=keep,
                               seed=args.seed, grad_clip=1.0)
    cache_dir.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    save_file({n: t.contiguous() for n, t in model.state_dict().items()}, str(tmp))
    os.replace(tmp, path)
    print(f"  trained {task.name} {'FT' if bits is None else f'QAT {bits}-bit'}: {steps} steps, loss "
          f"{statistics.mean(losses[:10]):.3f} -> {statistics.mean(losses[-10:]):.3f}, "
          f"{time.perf_counter() - t0:.0f} s", flush=True)
    return model


# ---------------------------------------------------------------- statistics
def bootstrap(gains: list[float], n: int = 10000, seed: int = 0) -> dict:
    """Mean, median and share improved of the gains, each with a 95 % percentile
    interval from resampling the gains (the pairs) with replacement."""
    g = torch.tensor(gains, dtype=torch.float64)
    idx = torch.randint(len(g), (n, len(g)), generator=torch.Generator().manual_seed(seed))
    sample = g[idx]
    stats = {"mean": (g.mean(), sample.mean(1)), "median": (g.median(), sample.median(1).values),
             "share_improved": ((g > 0).double().mean(), (sample > 0).double().mean(1))}
    out = {"n": len(gains)}
    for k, (point, dist) in stats.items():
        lo, hi = torch.quantile(dist, torch.tensor([0.025, 0.975], dtype=torch.float64)).tolist()
        scale = 1.0 if k == "share_improved" else 100.0  # gains in percentage points
        out[k] = point.item() * scale
        out[f"{k}_ci"] = [lo * scale, hi * scale]
    return out


@contextlib.contextmanager
def _restored(model: nn.Module, names):
    """The named parameters of ``model`` are put back as they were on exit."""
    params = dict(model.named_parameters())
    saved = {n: params[n].detach().clone() for n in names if n in params}
    try:
        yield model
    finally:
        with torch.no_grad():
            for n, t in saved.items():
                params[n].copy_(t)


# ---------------------------------------------------------------- the experiments
def patching_experiment(tasks, tokens, ft, qat, vectors, bits: int, lam_grid) -> dict:
    per_task, pairs = {}, []
    for t in tasks:
        with ptq(ft[t.name].backbone, bits):
            ptq_acc = accuracy(ft[t.name], tokens, *t.split("test"))
        with ptq(qat[t.name].backbone, bits):
            ceiling = accuracy(qat[t.name], tokens, *t.split("test"))
        per_task[t.name] = {"classes": len(t.classes), **{f"n_{s}": len(t.splits[s]) for s in t.splits},
                            "fp": accuracy(ft[t.name], tokens, *t.split("test")), "ptq": ptq_acc, "qat": ceiling,
                            "qv_norm": patching.vector_norm(vectors[t.name])}
        print(f"  {bits}-bit {t.name}: fp {per_task[t.name]['fp']:.3f}  ptq {ptq_acc:.3f}  qat {ceiling:.3f}",
              flush=True)
    for r in tasks:
        model = ft[r.name]
        for d in tasks:
            if d is r:
                continue
            v = vectors[d.name]

            def eval_fn(m):
                with ptq(m.backbone, bits):
                    return accuracy(m, tokens, *r.split("val"))

            lam, val_scores = patching.search_lambda(model, v, eval_fn, grid=lam_grid, return_scores=True)
            test_by_lam = {}
            for x in sorted({1.0, lam}):
                with _restored(model, v):
                    patching.apply_vector(model, v, x)
                    with ptq(model.backbone, bits):
                        test_by_lam[x] = accuracy(model, tokens, *r.split("test"))
            row = {"donor": d.name, "receiver": r.name, "fp": per_task[r.name]["fp"], "ptq": per_task[r.name]["ptq"],
                   "lam1": test_by_lam[1.0], "lam_searched": lam, "searched": test_by_lam[lam],
                   "qat": per_task[r.name]["qat"], "val_by_lam": val_scores,
                   "cos_qv": patching.cosine(v, vectors[r.name])}
            pairs.append(row)
            print(f"  {bits}-bit {d.name:>14} -> {r.name:<14} ptq {row['ptq']:.3f}  lam=1 {row['lam1']:.3f}  "
                  f"lam*={lam:<4} {row['searched']:.3f}  qat {row['qat']:.3f}", flush=True)
    qat_gain = statistics.mean(p["qat"] - p["ptq"] for p in pairs)
    summary = {
        "lam1": bootstrap([p["lam1"] - p["ptq"] for p in pairs]),
        "searched": bootstrap([p["searched"] - p["ptq"] for p in pairs]),
        "qat_ceiling": bootstrap([p["qat"] - p["ptq"] for p in pairs]),
        "ptq_damage": bootstrap([t["fp"] - t["ptq"] for t in per_task.values()]),
        # ratio of means over pairs (a per-pair ratio explodes where the QAT gain is one test sentence)
        "recovered_share_lam1": statistics.mean(p["lam1"] - p["ptq"] for p in pairs) / qat_gain if qat_gain > 0 else None,
        "recovered_share_searched": (statistics.mean(p["searched"] - p["ptq"] for p in pairs) / qat_gain
                                     if qat_gain > 0 else None),
        "mean_abs_cos_between_vectors": statistics.mean(abs(p["cos_qv"]) for p in pairs),
    }
    return {"bits": bits, "per_task": per_task, "pairs": pairs, "summary": summary}


def unisvq_experiment(tasks, tokens, ft, vectors, args) -> dict:
    """Receiver unpatched vs patched (donor's vector at lam = 1), each quantized by UniSVQ."""
    config = UniSVQConfig(finetune=args.unisvq_finetune, seed=args.seed)

    def quantized_accuracy(model: TaskModel, task: Task) -> tuple[float, float]:
        q = copy.deepcopy(model)
        ids = task.splits["train"][: args.unisvq_calibration]
        calib = [tokens.batch(ids[s:s + 32]) for s in range(0, len(ids), 32)]
        t0 = time.perf_counter()
        quantize_model(q.backbone, config, filter_fn=encoder_filter, calibration_data=calib, progress=False)
        return accuracy(q, tokens, *task.split("test")), time.perf_counter() - t0

    per_task, pairs = {}, []
    for r in tasks:
        acc, secs = quantized_accuracy(ft[r.name], r)
        per_task[r.name] = {"unisvq": acc, "fit_s": secs}
        print(f"  UniSVQ {r.name}: {acc:.3f} ({secs:.0f} s)", flush=True)
        for d in tasks:
            if d is r:
                continue
            with _restored(ft[r.name], vectors[d.name]):
                patching.apply_vector(ft[r.name], vectors[d.name], 1.0)
                patched, _ = quantized_accuracy(ft[r.name], r)
            pairs.append({"donor": d.name, "receiver": r.name, "unisvq": acc, "patched": patched})
            print(f"  UniSVQ {d.name:>14} -> {r.name:<14} {acc:.3f} -> {patched:.3f}", flush=True)
    return {"per_task": per_task, "pairs": pairs,
            "summary": {"lam1": bootstrap([p["patched"] - p["unisvq"] for p in pairs])},
            "config": {"finetune": args.unisvq_finetune, "calibration_sentences": args.unisvq_calibration}}


def quantized_copy(bert, config) -> tuple[nn.Module, dict]:
    """A dense BertModel whose encoder Linear weights are what ``config``'s deployed layers compute with."""
    q = copy.deepcopy(bert)
    quantize_model(q, config, filter_fn=lambda m, fqn: fqn.startswith("encoder."), progress=False)
    report = getattr(q, "pyquant_daq", {})
    dense = copy.deepcopy(bert)
    with torch.no_grad():
        for name, lin in encoder_linears(dense).items():
            layer = q.get_submodule(name)
            w = layer.dequantize_weight() if isinstance(layer, DequantLinear) else layer.dequantize().weight
            lin.weight.copy_(w)
    return dense, report


@torch.inference_mode()
def _embeddings(model: TaskModel, tokens: Tokens, ids: torch.Tensor) -> torch.Tensor:
    model.eval()
    out = torch.empty(len(ids), model.backbone.config.hidden_size)
    for o, inputs in tokens.batches(ids, 128):
        out[o] = F.normalize(model.pooled(**inputs), dim=-1)
    return out


def _delta_metrics(post, base, dense) -> dict:
    """Sign rate / delta cosine / weight MSE over all encoder Linear weights together."""
    p = torch.cat([l.weight.detach().reshape(-1) for l in encoder_linears(post).values()])
    b = torch.cat([l.weight.detach().reshape(-1) for l in encoder_linears(base).values()])
    q = torch.cat([l.weight.detach().reshape(-1) for l in encoder_linears(dense).values()])
    m = delta_metrics(p[None], b[None], q[None])
    return {"sign": m["sign"], "sign_n": m["sign_n"], "cosine": m["cosine"], "mse": m["mse"]}


def daq_experiment(base_bert, tasks, tokens, ft, args, embed_ids) -> dict:
    ref = _embeddings(TaskModel(base_bert, 1, seed=args.seed), tokens, embed_ids)
    rows = []
    for grid, gran in args.daq_grids:
        for t in tasks:
            model = ft[t.name]
            post = model.backbone
            row = {"task": t.name, "grid": grid, "granularity": gran, "fp_acc": accuracy(model, tokens, *t.split("test")),
                   "fp_base_cos": F.cosine_similarity(_embeddings(model, tokens, embed_ids), ref).mean().item(),
                   "scales": {}}
            configs = [("absmax", DAQConfig(base=base_bert, grid=grid, granularity=gran, search=False))]
            configs += [(f"daq-{m}", DAQConfig(base=base_bert, grid=grid, granularity=gran, metric=m))
                        for m in args.daq_metrics]
            for label, config in configs:
                t0 = time.perf_counter()
                dense, report = quantized_copy(post, config)
                qmodel = TaskModel(dense, len(t.classes), seed=args.seed)
                qmodel.head.load_state_dict(model.head.state_dict())
                row["scales"][label] = {
                    **_delta_metrics(post, base_bert, dense), "acc": accuracy(qmodel, tokens, *t.split("test")),
                    "base_cos": F.cosine_similarity(_embeddings(qmodel, tokens, embed_ids), ref).mean().item(),
                    "blocks_changed": sum(r["blocks_changed"] for r in report.values()),
                    "blocks": sum(r["blocks"] for r in report.values()), "seconds": time.perf_counter() - t0}
            rows.append(row)
            print(f"  {grid}/{gran} {t.name:<14} " + "  ".join(
                f"{k}: sign {v['sign']:.4f} cos {v['cosine']:.4f} acc {v['acc']:.3f} base {v['base_cos']:.4f}"
                for k, v in row["scales"].items()), flush=True)
    summary = {}
    for grid, gran in args.daq_grids:
        sel = [r for r in rows if (r["grid"], r["granularity"]) == (grid, gran)]
        summary[f"{grid}/{gran}"] = {label: {k: statistics.mean(r["scales"][label][k] for r in sel)
                                             for k in ("sign", "cosine", "mse", "acc", "base_cos")}
                                     for label in sel[0]["scales"]}
        summary[f"{grid}/{gran}"]["fp"] = {"acc": statistics.mean(r["fp_acc"] for r in sel),
                                          "base_cos": statistics.mean(r["fp_base_cos"] for r in sel)}
    return {"rows": rows, "summary": summary}


# ---------------------------------------------------------------- report
def _pct(x):
    return f"{100 * x:.1f}"


def _ci_row(label: str, v: dict) -> str:
    lo, hi = v["mean_ci"]
    mlo, mhi = v["median_ci"]
    slo, shi = v["share_improved_ci"]
    return (f"| {label} | {v['mean']:+.2f} [{lo:+.2f}, {hi:+.2f}] | {v['median']:+.2f} [{mlo:+.2f}, {mhi:+.2f}] | "
            f"{100 * v['share_improved']:.0f} % [{100 * slo:.0f}, {100 * shi:.0f}] of {v['n']} |")


def markdown(result: dict) -> str:
    cfg = result["config"]
    lines = ["# Quantization-vector patching and DAQ on MiniLM text tasks (qat-transfer's text protocol)", "",
             f"Command: `python benchmarks/patching_experiment.py` · machine: {result['machine']} · "
             f"runtime {result['runtime_s']:.0f} s (training {result['phase_s']['train']:.0f} s)", "",
             f"Backbone: bundled all-MiniLM-L6-v2 + linear head on mean-pooled tokens. Tasks: {len(cfg['tasks'])} "
             f"labelings of the same {cfg['n_sentences']} standard-library docstring sentences by source module "
             f"(two topical, four seeded random groupings), one shared split {cfg['split_sizes']} (train/val/test). "
             f"FT: full fine-tuning (embeddings, all layers, head), {cfg['epochs']} epochs ({cfg['steps']} steps), "
             f"batch {cfg['batch_size']}, max length {cfg['max_length']}, AdamW lr {cfg['lr']}, wd "
             f"{cfg['weight_decay']}, warm-up {100 * cfg['warmup']:.0f} % then cosine, clip 1.0; QAT: the same run "
             f"(same seed, data order, dropout) with STE per-channel RTN fake quantization. PTQ: RTN per-output-"
             f"channel absmax on all {cfg['n_quantized_layers']} encoder Linear layers (head in fp32). Vector "
             f"τ_q = QAT − FT over every floating backbone tensor (no head); λ grid {cfg['lam_grid']} searched on "
             f"the receiver's validation split (ties to the smallest), accuracies on its test split. Intervals: "
             f"bootstrap 95 % over the pairs (10 000 resamples; pairs share receivers and donors, so these are "
             f"optimistic).", ""]
    for pt in result["patching"]:
        bits, s = pt["bits"], pt["summary"]
        lines += [f"## RTN {bits}-bit", "", "| task | classes | full precision | PTQ | QAT ceiling | ‖τ_q‖ |",
                  "|---|---|---|---|---|---|"]
        for name, t in pt["per_task"].items():
            lines.append(f"| {name} | {t['classes']} | {_pct(t['fp'])} | {_pct(t['ptq'])} | {_pct(t['qat'])} | "
                         f"{t['qv_norm']:.3f} |")
        lines += ["", f"Gain over unpatched PTQ, test accuracy in pp (95 % interval), {s['lam1']['n']} ordered pairs:",
                  "", "| | mean | median | pairs improved |", "|---|---|---|---|",
                  _ci_row("patched, λ = 1 (zero-shot)", s["lam1"]),
                  _ci_row("patched, λ searched on val", s["searched"]),
                  _ci_row("receiver's own QAT (ceiling)", s["qat_ceiling"])]
        if s["recovered_share_lam1"] is not None:
            lines += ["", f"Share of the QAT gain recovered (mean gain / mean QAT gain): λ = 1 "
                          f"{100 * s['recovered_share_lam1']:.0f} %, searched λ {100 * s['recovered_share_searched']:.0f} %. "
                          f"Mean |cos| between different tasks' vectors: {s['mean_abs_cos_between_vectors']:.3f}."]
        lines += ["", "| donor → receiver | fp | PTQ | λ = 1 | λ* | searched | QAT | cos(τ_D, τ_R) |",
                  "|---|---|---|---|---|---|---|---|"]
        for p in pt["pairs"]:
            lines.append(f"| {p['donor']} → {p['receiver']} | {_pct(p['fp'])} | {_pct(p['ptq'])} | {_pct(p['lam1'])} | "
                         f"{p['lam_searched']} | {_pct(p['searched'])} | {_pct(p['qat'])} | {p['cos_qv']:.3f} |")
        lines.append("")
    u = result.get("unisvq")
    if u:
        c = u["config"]
        lines += ["## Patch → UniSVQ (2.065 bits/weight)", "",
                  f"The receiver's FT model, unpatched and patched with the donor's 2-bit τ_q at λ = 1, quantized by "
                  f"UniSVQ (`UniSVQConfig(finetune={c['finetune']})`, calibrated on {c['calibration_sentences']} of "
                  f"the receiver's training sentences).", "",
                  "| receiver | UniSVQ test acc | fit s |", "|---|---|---|"]
        for name, t in u["per_task"].items():
            lines.append(f"| {name} | {_pct(t['unisvq'])} | {t['fit_s']:.0f} |")
        lines += ["", "| | mean | median | pairs improved |", "|---|---|---|---|",
                  _ci_row("patched (λ = 1) − unpatched, UniSVQ", u["summary"]["lam1"]), ""]
    if result.get("daq"):
        lines += ["## DAQ: absmax vs delta-aware scales (base = pre-trained MiniLM, post = each FT model)", "",
                  "Same grid, same layers (the 36 encoder Linear layers); only the scales differ. sign = share of "
                  "weights with |ΔW| > 1e-5 whose quantized delta keeps the sign (0 counts as lost); cos = "
                  "cos(ΔW, ΔŴ); MSE = mean (Ŵ − W_post)²; task = test accuracy with the FT head; base = mean "
                  f"cosine of sentence embeddings to the pre-trained model's, on {cfg['n_embed']} test sentences.", "",
                  "| grid | scales | sign | cos | MSE | task acc | base cos |", "|---|---|---|---|---|---|---|"]
        for key, by in result["daq"]["summary"].items():
            fp = by["fp"]
            lines.append(f"| {key} | fp32 (unquantized) | | | | {_pct(fp['acc'])} | {fp['base_cos']:.4f} |")
            for label, v in by.items():
                if label != "fp":
                    lines.append(f"| {key} | {label} | {v['sign']:.4f} | {v['cosine']:.4f} | {v['mse']:.3e} | "
                                 f"{_pct(v['acc'])} | {v['base_cos']:.4f} |")
    return "\n".join(lines) + "\n"


def _machine() -> str:
    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        cpu = next(l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name"))
    return f"{cpu}, {os.cpu_count()} cores, torch {torch.__version__}, {torch.get_num_threads()} threads"


def _parse_daq_grids(text: str) -> list[tuple[str, str]]:
    out = []
    for item in filter(None, text.split(",")):
        grid, _, gran = item.partition(":")
        out.append((grid, gran or "block"))
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python benchmarks/patching_experiment.py", description=__doc__.split("\n")[0])
    ap.add_argument("--tasks", default=",".join(TASK_NAMES), help=f"comma-separated, at least 2 of {TASK_NAMES}")
    ap.add_argument("--bits", default="3,2", help="RTN bit-widths of PTQ and QAT (comma-separated, of 2, 3, 4, 8)")
    ap.add_argument("--epochs", type=int, default=5)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--max-length", type=int, default=128)
    ap.add_argument("--lr", type=float, default=1e-5)
    ap.add_argument("--weight-decay", type=float, default=0.1)
    ap.add_argument("--warmup", type=float, default=0.1, help="share of the steps spent warming up")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--lam-grid", default=",".join(map(str, patching.DEFAULT_LAMBDA_GRID)))
    ap.add_argument("--unisvq-calibration", type=int, default=256,
                    help="receiver training sentences that calibrate UniSVQ; 0 = no patch -> UniSVQ experiment")
    ap.add_argument("--unisvq-finetune", action="store_true", help="UniSVQ with block fine-tuning (about 2x slower)")
    ap.add_argument("--daq-grids", default="fp8:block", help="grid:granularity list (grids fp8, int2..int8, "
                    "pyquant2; granularity block, row, tensor); empty = no DAQ")
    ap.add_argument("--daq-metrics", default="sign,cosine", help="DAQ search metrics to compare (sign, cosine, mse)")
    ap.add_argument("--n-embed", type=int, default=256, help="test sentences for the DAQ base-behaviour cosine")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    ap.add_argument("--cache-dir", default=os.path.join(Path.home(), ".cache", "pyquant", "experiments"))
    ap.add_argument("--out-dir", default=str(ROOT / "benchmarks" / "results"))
    ap.add_argument("--out-name", default="patching", help="result files: <out-dir>/<out-name>.{json,md}")
    args = ap.parse_args(argv)
    names = [n for n in args.tasks.split(",") if n]
    unknown = [n for n in names if n not in TASK_NAMES]
    if unknown or len(names) < 2:
        ap.error(f"--tasks needs at least 2 of {TASK_NAMES}; unknown: {unknown}")
    try:
        bit_widths = [int(b) for b in args.bits.split(",") if b]
    except ValueError:
        ap.error(f"--bits: comma-separated integers, got {args.bits!r}")
    if not bit_widths or any(b not in (2, 3, 4, 8) for b in bit_widths):
        ap.error(f"--bits: each of 2, 3, 4, 8, got {args.bits!r}")
    args.lam_grid = [float(x) for x in args.lam_grid.split(",")]
    if 1.0 not in args.lam_grid:
        ap.error("--lam-grid must contain 1.0 (the zero-shot patch is reported from it)")
    if args.unisvq_calibration and 2 not in bit_widths:
        ap.error("the patch -> UniSVQ experiment uses the 2-bit vectors: add 2 to --bits or pass --unisvq-calibration 0")
    args.daq_grids = _parse_daq_grids(args.daq_grids)
    args.daq_metrics = [m for m in args.daq_metrics.split(",") if m]
    if any(m not in ("sign", "cosine", "mse") for m in args.daq_metrics) or not args.daq_metrics:
        ap.error("--daq-metrics: a comma-separated list of sign, cosine, mse")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if args.threads:
        torch.set_num_threads(args.threads)

    t_start = time.perf_counter()
    torch.manual_seed(args.seed)
    bert, tokenizer = load_minilm()
    pool = labelled_sentences()
    sentences, modules = [s for s, _ in pool], [m for _, m in pool]
    tasks = build_tasks(names, modules, args.seed)
    tokens = Tokens(tokenizer, sentences, args.max_length)
    sizes = {k: len(v) for k, v in tasks[0].splits.items()}
    steps = args.epochs * (sizes["train"] // args.batch_size)
    print(f"{len(tasks)} tasks over {len(sentences)} real sentences (train/val/test {sizes}); FT/QAT {steps} steps; "
          f"RTN {bit_widths}-bit", flush=True)

    fingerprint = hashlib.sha256(json.dumps({
        "tasks": {t.name: t.labels.tolist() for t in tasks}, "topics": TOPICS,
        "sentences": hashlib.sha256("\n".join(sentences).encode()).hexdigest(),
        **{k: getattr(args, k) for k in ("epochs", "batch_size", "max_length", "lr", "weight_decay", "warmup",
                                         "seed")}, "torch": torch.__version__, "protocol": "qat-transfer-text",
    }, sort_keys=True).encode()).hexdigest()[:16]
    cache_dir = Path(args.cache_dir) / f"patching-{fingerprint}"
    print(f"[1/4] fine-tuning FT and QAT models (cache: {cache_dir})", flush=True)
    ft = {t.name: train(bert, t, tokens, args, None, cache_dir) for t in tasks}
    qat = {b: {t.name: train(bert, t, tokens, args, b, cache_dir) for t in tasks} for b in bit_widths}
    t_trained = time.perf_counter()
    vectors = {b: {t.name: patching.quantization_vector(qat[b][t.name], ft[t.name]) for t in tasks}
               for b in bit_widths}

    print("[2/4] quantization-vector patching, every ordered donor -> receiver pair", flush=True)
    pt = [patching_experiment(tasks, tokens, ft, qat[b], vectors[b], b, args.lam_grid) for b in bit_widths]
    t_patched = time.perf_counter()
    unisvq = None
    if args.unisvq_calibration:
        print("[3/4] patch -> UniSVQ", flush=True)
        unisvq = unisvq_experiment(tasks, tokens, ft, vectors[2], args)
    t_unisvq = time.perf_counter()
    daq = None
    if args.daq_grids:
        print(f"[4/4] DAQ ({args.daq_metrics}) vs absmax on {args.daq_grids}", flush=True)
        embed_ids = tasks[0].splits["test"][: args.n_embed]
        daq = daq_experiment(bert, tasks, tokens, ft, args, embed_ids)
    runtime = time.perf_counter() - t_start
    result = {
        "config": {"bits": bit_widths, "epochs": args.epochs, "steps": steps, "batch_size": args.batch_size,
                   "max_length": args.max_length, "lr": args.lr, "weight_decay": args.weight_decay,
                   "warmup": args.warmup, "seed": args.seed, "lam_grid": args.lam_grid, "tasks": names,
                   "n_sentences": len(sentences), "split_sizes": "/".join(str(sizes[k]) for k in ("train", "val", "test")),
                   "daq_grids": args.daq_grids, "daq_metrics": args.daq_metrics, "n_embed": args.n_embed,
                   "n_quantized_layers": len(encoder_linears(bert)), "cache_key": fingerprint},
        "machine": _machine(), "runtime_s": runtime,
        "phase_s": {"train": t_trained - t_start, "patching": t_patched - t_trained, "unisvq": t_unisvq - t_patched,
                    "daq": time.perf_counter() - t_unisvq},
        "patching": pt, "unisvq": unisvq, "daq": daq,
    }
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{args.out_name}.json").write_text(json.dumps(result, indent=1, default=str))
    md = markdown(result)
    (out / f"{args.out_name}.md").write_text(md)
    print()
    print(md)
    print(f"wrote {out / args.out_name}.json and .md ({runtime:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
