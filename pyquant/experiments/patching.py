"""Quantization-vector patching and DAQ on real text tasks: ``python -m pyquant.experiments.patching``.

Setting. The bundled MiniLM (all-MiniLM-L6-v2) with a small linear head on
mean-pooled tokens, on text-classification tasks built from real sentences
(the standard library's docstrings, :func:`pyquant.sentences.labelled_sentences`):
"which family of modules does this sentence document". Quantization is RTN
per-output-channel absmax at ``--bits`` (default 3: levels -3..3) on every
``nn.Linear`` of the encoder; the head stays in full precision.

To fit a 2-core machine, fine-tuning and QAT train only the last
``--train-layers`` transformer layers (default 2) plus the head; the layers
below stay pre-trained (and, under quantization, quantized), so their outputs
are computed once per weight set and cached. Every model is still evaluated
end to end: the cache is keyed by the exact prefix tensors (``torch.equal``).

Per task: FT (plain fine-tuning) and QAT (the same run, same seed and data
order, with straight-through fake quantization). For every ordered pair
donor -> receiver: receiver accuracy in full precision, after PTQ unpatched,
patched with ``tau_q(donor)`` at lam = 1, patched at the lam chosen on the
receiver's validation split, and the receiver's own QAT (the ceiling).

DAQ: base = the pre-trained backbone, post = each fine-tuned backbone; absmax
scales vs DAQ scales on the same grid: sign-preservation rate, delta cosine and
weight MSE over the encoder's Linear weights, task accuracy, and the base
model's own behaviour (cosine of the quantized post-model's sentence
embeddings to the pre-trained model's, on sentences outside every task's
training split).

Fine-tuned models are cached under ``--cache-dir``; tables go to
``benchmarks/results/patching.{json,md}``.
"""
from __future__ import annotations

import argparse
import contextlib
import copy
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

from .. import patching
from ..evaluation import load_minilm
from ..fakequant import DequantLinear, fake_quantize_rows
from ..nn import quantize_model
from ..quantizers.daq import DAQConfig, delta_metrics
from ..sentences import labelled_sentences

ROOT = Path(__file__).resolve().parents[2]
MAX_TOKENS = 48

# task -> class -> standard-library modules whose docstring sentences make up the class
TASKS: dict[str, dict[str, list[str]]] = {
    "family": {
        "concurrency": ["asyncio", "threading", "subprocess", "concurrent.futures", "sched", "queue"],
        "files": ["shutil", "io", "os", "tempfile", "pathlib", "glob", "fnmatch", "filecmp"],
        "network": ["urllib.request", "socket", "smtplib", "ftplib", "imaplib", "http.client", "poplib"],
        "debugging": ["doctest", "pdb", "traceback", "unittest", "timeit", "tracemalloc"],
        "text": ["difflib", "codecs", "re", "textwrap", "locale", "gettext", "shlex"],
        "cli-config": ["configparser", "argparse", "optparse", "cmd", "getopt", "logging"],
    },
    "concurrency": {
        "asyncio": ["asyncio"],
        "threads": ["threading", "concurrent.futures", "queue", "sched"],
        "processes": ["subprocess", "signal", "selectors", "multiprocessing"],
    },
    "types-vs-introspection": {
        "types": ["typing", "dataclasses", "abc", "enum", "numbers", "functools", "weakref"],
        "introspection": ["inspect", "ast", "dis", "tokenize", "importlib", "zipimport"],
    },
    "testing-tools": {
        "testing": ["doctest", "unittest"],
        "debugging": ["pdb", "traceback", "tracemalloc", "warnings"],
        "docs-timing": ["pydoc", "timeit", "trace"],
    },
    "internet": {
        "web": ["urllib.request", "http.client", "mimetypes"],
        "mail": ["smtplib", "imaplib", "poplib", "email", "mailbox"],
        "sockets-ftp": ["socket", "ftplib"],
    },
    "archives-vs-files": {
        "archives": ["lzma", "bz2", "gzip", "zipfile", "tarfile", "zlib"],
        "filesystem": ["shutil", "os", "pathlib", "tempfile", "glob", "fnmatch", "filecmp", "stat"],
    },
    "text-kinds": {
        "diff": ["difflib"],
        "encodings": ["codecs", "base64", "binascii"],
        "patterns": ["re", "textwrap", "string", "shlex"],
        "locale": ["locale", "gettext", "calendar"],
    },
    "config-cli": {
        "config": ["configparser"],
        "cli": ["argparse", "optparse", "getopt", "cmd"],
        "logging": ["logging"],
    },
}


# ---------------------------------------------------------------- data
@dataclass
class Task:
    name: str
    classes: list[str]
    splits: dict[str, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)  # split -> (sentence ids, labels)


def build_tasks(names: list[str], sentences: list[str], modules: list[str], per_class: int, seed: int) -> list[Task]:
    """Balanced-ish classes (at most ``per_class`` sentences each), split 55/20/25
    into train/val/test per class, deterministically."""
    tasks = []
    for name in names:
        spec = TASKS[name]
        t = Task(name, list(spec))
        parts = {"train": [], "val": [], "test": []}
        for label, (cls, mods) in enumerate(spec.items()):
            ids = [i for i, m in enumerate(modules) if m in mods]
            random.Random(f"{seed}-{name}-{cls}").shuffle(ids)
            ids = ids[:per_class]
            n_tr, n_va = int(0.55 * len(ids)), int(0.2 * len(ids))
            for split, chunk in (("train", ids[:n_tr]), ("val", ids[n_tr:n_tr + n_va]), ("test", ids[n_tr + n_va:])):
                parts[split] += [(i, label) for i in chunk]
        for split, pairs in parts.items():
            pairs.sort()
            t.splits[split] = (torch.tensor([i for i, _ in pairs]), torch.tensor([y for _, y in pairs]))
        tasks.append(t)
    return tasks


# ---------------------------------------------------------------- model pieces
class PrefixCache:
    """Hidden states after the frozen prefix (embeddings + the first ``split`` layers)
    for every sentence, one entry per distinct set of prefix tensors."""

    def __init__(self, tokens: dict, split: int, batch_size: int = 64):
        self.ids, self.mask, self.split, self.batch_size = tokens["input_ids"], tokens["attention_mask"], split, batch_size
        self.lengths = self.mask.sum(1)
        self.entries: list[tuple[list[torch.Tensor], torch.Tensor]] = []
        self.computed = 0

    def _prefix_tensors(self, bert) -> list[torch.Tensor]:
        mods = [bert.embeddings, *bert.encoder.layer[: self.split]]
        return [t.detach() for m in mods for t in m.state_dict().values()]

    @torch.no_grad()  # not inference_mode: training reads these tensors under autograd
    def hidden(self, bert) -> torch.Tensor:
        """``[n_sentences, MAX_TOKENS, hidden]`` (zero past each sentence's end)."""
        key = self._prefix_tensors(bert)
        for ref, h in self.entries:
            if len(ref) == len(key) and all(torch.equal(a, b) for a, b in zip(ref, key)):
                return h
        self.computed += 1
        out = torch.zeros(*self.ids.shape, bert.config.hidden_size)
        order = torch.argsort(self.lengths)
        for s in range(0, len(order), self.batch_size):
            idx = order[s:s + self.batch_size]
            L = int(self.lengths[idx].max())
            ids, mask = self.ids[idx, :L], self.mask[idx, :L]
            h = bert.embeddings(input_ids=ids)
            ext = _extended_mask(bert, mask, h)
            for layer in bert.encoder.layer[: self.split]:
                h = _unwrap(layer(h, attention_mask=ext))
            out[idx, :L] = h
        self.entries.append(([t.clone() for t in key], out))
        if len(self.entries) > 6:  # a few weight sets are reused (fp, PTQ, one per DAQ grid); bound the memory
            self.entries.pop(0)
        return out


def _unwrap(out):
    return out[0] if isinstance(out, tuple) else out


def _extended_mask(bert, mask, h):
    # the model's own mask construction (sdpa / eager alike)
    return bert._create_attention_masks(attention_mask=mask, encoder_attention_mask=None, embedding_output=h,
                                        encoder_hidden_states=None, past_key_values=None)[0]


class TaskModel(nn.Module):
    """``backbone`` (the whole BertModel, so state-dict names match the full
    model) + linear ``head`` on mean-pooled tokens; runs the layers from
    ``split`` on, on hidden states taken from a :class:`PrefixCache`."""

    def __init__(self, backbone, n_classes: int, split: int, cache: PrefixCache, seed: int):
        super().__init__()
        self.backbone, self.split, self.cache = backbone, split, cache
        torch.manual_seed(seed)
        self.head = nn.Linear(backbone.config.hidden_size, n_classes)

    def pooled(self, idx: torch.Tensor, hidden: torch.Tensor | None = None) -> torch.Tensor:
        hidden = self.cache.hidden(self.backbone) if hidden is None else hidden
        L = int(self.cache.lengths[idx].max())
        h, mask = hidden[idx, :L], self.cache.mask[idx, :L]
        ext = _extended_mask(self.backbone, mask, h)
        for layer in self.backbone.encoder.layer[self.split:]:
            h = _unwrap(layer(h, attention_mask=ext))
        m = mask.unsqueeze(-1).float()
        return (h * m).sum(1) / m.sum(1).clamp_min(1)

    def forward(self, idx: torch.Tensor, hidden: torch.Tensor | None = None) -> torch.Tensor:
        return self.head(self.pooled(idx, hidden))


class Batches:
    """Training batches of sentence ids in the same order for every run with the same
    seed; each batch holds sentences of similar length (less padding to compute)."""

    def __init__(self, ids: torch.Tensor, labels: torch.Tensor, lengths: torch.Tensor, batch_size: int, seed: int,
                 hidden: torch.Tensor):
        self.ids, self.labels, self.lengths, self.batch_size, self.hidden = ids, labels, lengths, batch_size, hidden
        self.gen = torch.Generator().manual_seed(seed)

    def __iter__(self):
        perm = torch.randperm(len(self.ids), generator=self.gen)
        pool = 8 * self.batch_size
        batches = []
        for s in range(0, len(perm), pool):  # sort by length within pools of 8 batches, then shuffle the batches
            chunk = perm[s:s + pool]
            chunk = chunk[torch.argsort(self.lengths[self.ids[chunk]], stable=True)]
            batches += [chunk[i:i + self.batch_size] for i in range(0, len(chunk) - self.batch_size + 1, self.batch_size)]
        for b in torch.randperm(len(batches), generator=self.gen).tolist():
            p = batches[b]
            yield {"idx": self.ids[p], "hidden": self.hidden}, self.labels[p]


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
def accuracy(model: TaskModel, ids: torch.Tensor, labels: torch.Tensor, batch_size: int = 64) -> float:
    model.eval()
    hidden = model.cache.hidden(model.backbone)
    order = torch.argsort(model.cache.lengths[ids])
    correct = 0
    for s in range(0, len(order), batch_size):
        o = order[s:s + batch_size]
        correct += int((model(ids[o], hidden).argmax(-1) == labels[o]).sum())
    return correct / len(ids)


def trainable_state(model: TaskModel) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def make_model(base_bert, task: Task, args, cache: PrefixCache) -> TaskModel:
    bert = copy.deepcopy(base_bert)
    for p in bert.parameters():
        p.requires_grad_(False)
    for layer in bert.encoder.layer[args.split:]:
        for p in layer.parameters():
            p.requires_grad_(True)
    return TaskModel(bert, len(task.classes), args.split, cache, seed=args.seed)


def train_pair(base_bert, task: Task, args, cache: PrefixCache, cache_dir: Path) -> dict[str, TaskModel]:
    """The FT and QAT models of ``task`` (loaded from ``cache_dir`` when present)."""
    out = {}
    for kind in ("ft", "qat"):
        model = make_model(base_bert, task, args, cache)
        path = cache_dir / f"{task.name}-{kind}.safetensors"
        if path.is_file():
            from safetensors.torch import load_file

            state = load_file(str(path))
            missing = set(trainable_state(model)) ^ set(state)
            if missing:
                raise ValueError(f"cached model {path} does not match this configuration ({sorted(missing)[:3]})")
            with torch.no_grad():
                params = dict(model.named_parameters())
                for n, t in state.items():
                    params[n].copy_(t)
            out[kind] = model
            continue
        t0 = time.perf_counter()
        with torch.no_grad():
            hidden = cache.hidden(model.backbone) if kind == "ft" else _quantized_hidden(model.backbone, args.bits, cache)
        ids, labels = task.splits["train"]
        data = Batches(ids, labels, cache.lengths, args.batch_size, args.seed, hidden)
        # quantize exactly the layers PTQ quantizes (the encoder's), never the head
        keep = {f"backbone.{n}.weight" for n in encoder_linears(model.backbone)}.__contains__
        patching.finetune(model, data, steps=args.steps, lr=args.lr, weight_decay=args.weight_decay,
                          warmup=args.warmup, bits=args.bits if kind == "qat" else None, quant_filter=keep,
                          seed=args.seed)
        from safetensors.torch import save_file

        cache_dir.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        save_file({n: t.contiguous() for n, t in trainable_state(model).items()}, str(tmp))
        os.replace(tmp, path)
        print(f"  trained {task.name} {kind}: {time.perf_counter() - t0:.1f} s", flush=True)
        out[kind] = model
    return out


def _quantized_hidden(bert, bits: int, cache: PrefixCache) -> torch.Tensor:
    with ptq(bert, bits):
        return cache.hidden(bert)


# ---------------------------------------------------------------- the experiment
def summarize(gains: list[float]) -> dict:
    return {"mean_pp": 100 * statistics.mean(gains), "median_pp": 100 * statistics.median(gains),
            "share_improved": sum(g > 0 for g in gains) / len(gains), "n": len(gains)}


def patching_experiment(tasks, models, args) -> dict:
    per_task, pairs = {}, []
    vectors = {t.name: patching.quantization_vector(models[t.name]["qat"], models[t.name]["ft"]) for t in tasks}
    for t in tasks:
        ft, qat = models[t.name]["ft"], models[t.name]["qat"]
        test, val = t.splits["test"], t.splits["val"]
        with ptq(ft.backbone, args.bits):
            ptq_acc = accuracy(ft, *test)
        with ptq(qat.backbone, args.bits):
            ceiling = accuracy(qat, *test)
        per_task[t.name] = {"classes": len(t.classes), "train": len(t.splits["train"][0]), "val": len(val[0]),
                            "test": len(test[0]), "fp": accuracy(ft, *test), "ptq": ptq_acc, "qat": ceiling,
                            "qv_norm": patching.vector_norm(vectors[t.name])}
        print(f"  {t.name}: fp {per_task[t.name]['fp']:.3f}  ptq {ptq_acc:.3f}  qat {ceiling:.3f}", flush=True)
    for r in tasks:
        ft = models[r.name]["ft"]
        test, val = r.splits["test"], r.splits["val"]
        for d in tasks:
            if d is r:
                continue
            test_at = {}

            def eval_fn(model, test_at=test_at):
                with ptq(model.backbone, args.bits):
                    v = accuracy(model, *val)
                    test_at[len(test_at)] = accuracy(model, *test)
                return v

            lam, val_scores = patching.search_lambda(ft, vectors[d.name], eval_fn, grid=args.lam_grid,
                                                     return_scores=True)
            test_by_lam = dict(zip(val_scores, test_at.values()))
            row = {"donor": d.name, "receiver": r.name, "fp": per_task[r.name]["fp"], "ptq": per_task[r.name]["ptq"],
                   "lam1": test_by_lam[1.0], "lam_searched": lam, "searched": test_by_lam[lam],
                   "qat": per_task[r.name]["qat"], "val_by_lam": val_scores, "test_by_lam": test_by_lam,
                   "cos_qv": patching.cosine(vectors[d.name], vectors[r.name])}
            pairs.append(row)
            print(f"  {d.name:>22} -> {r.name:<22} ptq {row['ptq']:.3f}  lam=1 {row['lam1']:.3f}  "
                  f"lam*={lam:<4} {row['searched']:.3f}  qat {row['qat']:.3f}", flush=True)
    summary = {
        "lam1": summarize([p["lam1"] - p["ptq"] for p in pairs]),
        "searched": summarize([p["searched"] - p["ptq"] for p in pairs]),
        "qat_ceiling": summarize([per_task[t.name]["qat"] - per_task[t.name]["ptq"] for t in tasks]),
        "ptq_damage": summarize([per_task[t.name]["fp"] - per_task[t.name]["ptq"] for t in tasks]),
        "recovered_share_lam1": statistics.mean(
            (p["lam1"] - p["ptq"]) / (p["qat"] - p["ptq"]) for p in pairs if p["qat"] - p["ptq"] > 0)
        if any(p["qat"] - p["ptq"] > 0 for p in pairs) else None,
        "mean_abs_cos_between_vectors": statistics.mean(abs(p["cos_qv"]) for p in pairs),
    }
    return {"per_task": per_task, "pairs": pairs, "summary": summary}


def quantized_copy(bert, config) -> nn.Module:
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


def daq_experiment(base_bert, tasks, models, args, embed_ids) -> dict:
    base_task = TaskModel(base_bert, 1, args.split, models[tasks[0].name]["ft"].cache, seed=args.seed)
    rows = []
    ref = _embeddings(base_task, embed_ids)
    for grid, gran in args.daq_grids:
        for t in tasks:
            ft = models[t.name]["ft"]
            post = ft.backbone
            fp_cos = F.cosine_similarity(_embeddings(ft, embed_ids), ref).mean().item()
            row = {"task": t.name, "grid": grid, "granularity": gran, "fp_acc": accuracy(ft, *t.splits["test"]),
                   "fp_base_cos": fp_cos}
            for label, config in (("absmax", DAQConfig(base=base_bert, grid=grid, granularity=gran, search=False)),
                                  ("daq", DAQConfig(base=base_bert, grid=grid, granularity=gran, metric=args.daq_metric))):
                t0 = time.perf_counter()
                dense, _ = quantized_copy(post, config)
                metrics = _delta_metrics(post, base_bert, dense)
                qmodel = TaskModel(dense, len(t.classes), args.split, ft.cache, seed=args.seed)
                qmodel.head.load_state_dict(ft.head.state_dict())
                row[label] = {**metrics, "acc": accuracy(qmodel, *t.splits["test"]),
                              "base_cos": F.cosine_similarity(_embeddings(qmodel, embed_ids), ref).mean().item(),
                              "seconds": time.perf_counter() - t0}
            rows.append(row)
            a, q = row["absmax"], row["daq"]
            print(f"  {grid}/{gran} {t.name:<22} sign {a['sign']:.4f} -> {q['sign']:.4f}  cos {a['cosine']:.4f} -> "
                  f"{q['cosine']:.4f}  acc {a['acc']:.3f} -> {q['acc']:.3f}  base-cos {a['base_cos']:.4f} -> "
                  f"{q['base_cos']:.4f}", flush=True)
    return {"rows": rows}


def _embeddings(model: TaskModel, ids: torch.Tensor, batch_size: int = 64) -> torch.Tensor:
    with torch.inference_mode():
        hidden = model.cache.hidden(model.backbone)
        order = torch.argsort(model.cache.lengths[ids])
        out = torch.empty(len(ids), model.backbone.config.hidden_size)
        for s in range(0, len(order), batch_size):
            o = order[s:s + batch_size]
            out[o] = F.normalize(model.pooled(ids[o], hidden), dim=-1)
        return out


def _delta_metrics(post, base, dense) -> dict:
    """Sign rate / delta cosine / weight MSE over all encoder Linear weights together."""
    p = torch.cat([l.weight.detach().reshape(-1) for l in encoder_linears(post).values()])
    b = torch.cat([l.weight.detach().reshape(-1) for l in encoder_linears(base).values()])
    q = torch.cat([l.weight.detach().reshape(-1) for l in encoder_linears(dense).values()])
    m = delta_metrics(p[None], b[None], q[None])
    return {"sign": m["sign"], "sign_n": m["sign_n"], "cosine": m["cosine"], "mse": m["mse"]}


# ---------------------------------------------------------------- report
def _pct(x):
    return f"{100 * x:.1f}"


def markdown(result: dict) -> str:
    cfg, pt = result["config"], result["patching"]
    lines = [f"# Quantization-vector patching and DAQ on MiniLM text tasks",
             "",
             f"Command: `python -m pyquant.experiments.patching` · machine: {result['machine']} · "
             f"runtime {result['runtime_s']:.0f} s",
             "",
             f"Backbone: bundled all-MiniLM-L6-v2 + linear head on mean-pooled tokens. PTQ: RTN {cfg['bits']}-bit "
             f"per-output-channel absmax on all {cfg['n_quantized_layers']} encoder Linear layers (head in fp32). "
             f"FT/QAT train the last {cfg['train_layers']} of 6 layers + head ({cfg['steps']} steps, batch "
             f"{cfg['batch_size']}, AdamW lr {cfg['lr']}, wd {cfg['weight_decay']}, warm-up {cfg['warmup']}, cosine; "
             f"QAT = same run + STE fake quantization). Vectors: weights and biases of the encoder Linear layers. "
             f"lam grid {cfg['lam_grid']} searched on the receiver's validation split; accuracies on its test split.",
             "",
             "## Per task (test accuracy, %)",
             "",
             "| task | classes | train/val/test | full precision | PTQ | QAT ceiling | ‖τ_q‖ |",
             "|---|---|---|---|---|---|---|"]
    for name, t in pt["per_task"].items():
        lines.append(f"| {name} | {t['classes']} | {t['train']}/{t['val']}/{t['test']} | {_pct(t['fp'])} | "
                     f"{_pct(t['ptq'])} | {_pct(t['qat'])} | {t['qv_norm']:.3f} |")
    s = pt["summary"]
    lines += ["", f"## Summary over {s['lam1']['n']} ordered donor→receiver pairs ({cfg['bits']}-bit)", "",
              "| gain over unpatched PTQ | mean (pp) | median (pp) | pairs improved |", "|---|---|---|---|"]
    for key, label in (("lam1", "patched, λ = 1 (zero-shot)"), ("searched", "patched, λ searched on val"),
                       ("qat_ceiling", "QAT ceiling (per receiver)"), ("ptq_damage", "PTQ damage: fp − PTQ (per task)")):
        v = s[key]
        lines.append(f"| {label} | {v['mean_pp']:+.1f} | {v['median_pp']:+.1f} | "
                     f"{100 * v['share_improved']:.0f} % of {v['n']} |")
    if s["recovered_share_lam1"] is not None:
        lines += ["", f"Mean share of the QAT gain recovered by λ = 1 (pairs with a positive QAT gain): "
                      f"{100 * s['recovered_share_lam1']:.0f} %. Mean |cosine| between different tasks' vectors: "
                      f"{s['mean_abs_cos_between_vectors']:.3f}."]
    lines += ["", "## All pairs (test accuracy, %)", "",
              "| donor → receiver | fp | PTQ | λ = 1 | λ* | searched | QAT | cos(τ_D, τ_R) |", "|---|---|---|---|---|---|---|---|"]
    for p in pt["pairs"]:
        lines.append(f"| {p['donor']} → {p['receiver']} | {_pct(p['fp'])} | {_pct(p['ptq'])} | {_pct(p['lam1'])} | "
                     f"{p['lam_searched']} | {_pct(p['searched'])} | {_pct(p['qat'])} | {p['cos_qv']:.3f} |")
    if result.get("daq"):
        lines += ["", "## DAQ: absmax vs delta-aware scales (base = pre-trained MiniLM, post = each FT model)", "",
                  f"Metric searched: {cfg['daq_metric']}. Sign rate over encoder Linear weights with |ΔW| > 1e-5; "
                  "delta cosine cos(ΔW, ΔŴ); weight MSE ‖Ŵ − W_post‖²/n; task = test accuracy with the FT head; "
                  "base = mean cosine of the quantized post-model's sentence embeddings to the pre-trained model's "
                  f"on {cfg['n_embed']} sentences outside every training split (full-precision post model: column fp).",
                  "",
                  "| grid | task | sign absmax | sign DAQ | cos absmax | cos DAQ | MSE absmax | MSE DAQ | "
                  "task fp | task absmax | task DAQ | base fp | base absmax | base DAQ |",
                  "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
        for r in result["daq"]["rows"]:
            a, q = r["absmax"], r["daq"]
            lines.append(f"| {r['grid']}/{r['granularity']} | {r['task']} | {a['sign']:.4f} | {q['sign']:.4f} | "
                         f"{a['cosine']:.4f} | {q['cosine']:.4f} | {a['mse']:.3e} | {q['mse']:.3e} | "
                         f"{_pct(r['fp_acc'])} | {_pct(a['acc'])} | {_pct(q['acc'])} | {r['fp_base_cos']:.4f} | "
                         f"{a['base_cos']:.4f} | {q['base_cos']:.4f} |")
    return "\n".join(lines) + "\n"


def _machine() -> str:
    return f"{platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, {torch.get_num_threads()} threads"


def _parse_daq_grids(text: str) -> list[tuple[str, str]]:
    out = []
    for item in filter(None, text.split(",")):
        grid, _, gran = item.partition(":")
        out.append((grid, gran or "block"))
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m pyquant.experiments.patching", description=__doc__.split("\n")[0])
    ap.add_argument("--tasks", default=",".join(TASKS), help="comma-separated task names (at least 2)")
    ap.add_argument("--bits", type=int, default=3, help="RTN bit-width of PTQ and QAT (2, 3, 4 or 8)")
    ap.add_argument("--train-layers", type=int, default=2, help="how many of the 6 layers FT/QAT train")
    ap.add_argument("--steps", type=int, default=120)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--lr", type=float, default=2e-4)
    ap.add_argument("--weight-decay", type=float, default=0.01)
    ap.add_argument("--warmup", type=int, default=12)
    ap.add_argument("--per-class", type=int, default=100, help="at most this many sentences per class")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--lam-grid", default=",".join(map(str, patching.DEFAULT_LAMBDA_GRID)))
    ap.add_argument("--daq-grids", default="fp8:block,int4:block", help="grid:granularity list; empty = no DAQ")
    ap.add_argument("--daq-metric", default="sign", choices=["sign", "cosine", "mse"])
    ap.add_argument("--n-embed", type=int, default=200, help="sentences for the base-behaviour embedding cosine")
    ap.add_argument("--cache-dir", default=os.path.join(Path.home(), ".cache", "pyquant", "experiments"))
    ap.add_argument("--out-dir", default=str(ROOT / "benchmarks" / "results"))
    args = ap.parse_args(argv)
    names = [n for n in args.tasks.split(",") if n]
    unknown = [n for n in names if n not in TASKS]
    if unknown or len(names) < 2:
        ap.error(f"--tasks needs at least 2 of {list(TASKS)}; unknown: {unknown}")
    if not 1 <= args.train_layers <= 6:
        ap.error("--train-layers must be 1..6")
    args.split = 6 - args.train_layers
    args.lam_grid = [float(x) for x in args.lam_grid.split(",")]
    if 1.0 not in args.lam_grid:
        ap.error("--lam-grid must contain 1.0 (the zero-shot patch is reported from it)")
    args.daq_grids = _parse_daq_grids(args.daq_grids)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

    t_start = time.perf_counter()
    torch.manual_seed(args.seed)
    bert, tokenizer = load_minilm()
    pairs = labelled_sentences()
    sentences, modules = [s for s, _ in pairs], [m for _, m in pairs]
    tasks = build_tasks(names, sentences, modules, args.per_class, args.seed)
    used = sorted({int(i) for t in tasks for ids, _ in t.splits.values() for i in ids})
    train_used = {int(i) for t in tasks for i in t.splits["train"][0]}
    rest = [i for i in range(len(sentences)) if i not in train_used]
    random.Random(args.seed).shuffle(rest)
    embed_set = sorted(rest[: args.n_embed])
    keep = sorted(set(used) | set(embed_set))
    remap = {old: new for new, old in enumerate(keep)}
    for t in tasks:
        t.splits = {k: (torch.tensor([remap[int(i)] for i in ids]), y) for k, (ids, y) in t.splits.items()}
    embed_ids = torch.tensor([remap[i] for i in embed_set])
    tokens = dict(tokenizer([sentences[i] for i in keep], padding="max_length", truncation=True,
                            max_length=MAX_TOKENS, return_tensors="pt"))
    cache = PrefixCache(tokens, args.split)
    print(f"{len(tasks)} tasks over {len(keep)} real sentences; RTN {args.bits}-bit PTQ; FT/QAT train layers "
          f"{args.split}..5 + head", flush=True)

    fingerprint = hashlib.sha256(json.dumps({
        "tasks": {t: TASKS[t] for t in names}, "sentences": hashlib.sha256("\n".join(sentences).encode()).hexdigest(),
        **{k: getattr(args, k) for k in ("bits", "split", "steps", "batch_size", "lr", "weight_decay", "warmup",
                                         "per_class", "seed")}, "torch": torch.__version__,
    }, sort_keys=True).encode()).hexdigest()[:16]
    cache_dir = Path(args.cache_dir) / f"patching-{fingerprint}"
    print(f"[1/3] fine-tuning FT and QAT models (cache: {cache_dir})", flush=True)
    models = {t.name: train_pair(bert, t, args, cache, cache_dir) for t in tasks}
    t_trained = time.perf_counter()

    print("[2/3] quantization-vector patching, every ordered donor -> receiver pair", flush=True)
    pt = patching_experiment(tasks, models, args)
    t_patched = time.perf_counter()

    daq = None
    if args.daq_grids:
        print(f"[3/3] DAQ ({args.daq_metric}) vs absmax on {args.daq_grids}", flush=True)
        daq = daq_experiment(bert, tasks, models, args, embed_ids)
    runtime = time.perf_counter() - t_start
    result = {
        "config": {"bits": args.bits, "train_layers": args.train_layers, "steps": args.steps,
                   "batch_size": args.batch_size, "lr": args.lr, "weight_decay": args.weight_decay,
                   "warmup": args.warmup, "per_class": args.per_class, "seed": args.seed, "lam_grid": args.lam_grid,
                   "daq_grids": args.daq_grids, "daq_metric": args.daq_metric, "n_embed": len(embed_set),
                   "tasks": names, "n_quantized_layers": len(encoder_linears(bert)), "cache_key": fingerprint},
        "machine": _machine(), "runtime_s": runtime,
        "phase_s": {"train": t_trained - t_start, "patching": t_patched - t_trained,
                    "daq": time.perf_counter() - t_patched},
        "prefix_computations": cache.computed,
        "patching": pt, "daq": daq,
    }
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    md = markdown(result)
    (out / "patching.json").write_text(json.dumps(result, indent=1, default=str))
    (out / "patching.md").write_text(md)
    print()
    print(md)
    print(f"wrote {out / 'patching.json'} and {out / 'patching.md'} ({runtime:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
