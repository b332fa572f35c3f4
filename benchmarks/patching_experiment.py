"""Quantization-vector patching and DAQ on real text tasks: ``python benchmarks/patching_experiment.py``.

Setting. The bundled MiniLM (all-MiniLM-L6-v2) with a small linear head on
mean-pooled tokens, on text-classification tasks built from real sentences
(the standard library's docstrings, :func:`pyquant.sentences.labelled_sentences`):
"which family of modules does this sentence document". Quantization is RTN
per-output-channel absmax at ``--bits`` (default 3: levels -3..3) on every
``nn.Linear`` of the encoder; the head stays in full precision.

To fit a 2-core machine, fine-tuning and QAT train only the last
``--train-layers`` transformer layers (default 6, all of them) plus the head; the layers
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

from pyquant import patching
from pyquant.evaluation import load_minilm
from pyquant.fakequant import DequantLinear, fake_quantize_rows
from pyquant.nn import quantize_model
from pyquant.quantizers.daq import DAQConfig, delta_metrics
from pyquant.sentences import labelled_sentences

ROOT = Path(__file__).resolve().parents[1]
MAX_TOKENS = 32

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


# six tasks by default: 30 ordered pairs; the other two are there for longer runs
DEFAULT_TASKS = ["family", "concurrency", "types-vs-introspection", "testing-tools", "text-kinds", "config-cli"]


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


def export_for_cli(receiver: TaskModel, tokenizer, donor: dict, out: Path) -> dict:
    """A fine-tuned receiver backbone as a Hugging Face directory and a donor's
    quantization vector with the backbone's own names, for
    ``python -m pyquant quantize <model> --vector <v> --lam 1.0``."""
    model_dir, vec = out / "receiver-ft", out / "donor-qv.safetensors"
    if not (model_dir / "config.json").is_file():
        receiver.backbone.save_pretrained(str(model_dir))
        tokenizer.save_pretrained(str(model_dir))
    if not vec.is_file():
        v = patching.quantization_vector(donor["qat"], donor["ft"])
        patching.save_vector(patching.rename(v, remove_prefix="backbone."), vec)
    return {"model": str(model_dir), "vector": str(vec)}


# ---------------------------------------------------------------- the experiment
def summarize(gains: list[float]) -> dict:
    return {"mean_pp": 100 * statistics.mean(gains), "median_pp": 100 * statistics.median(gains),
            "share_improved": sum(g > 0 for g in gains) / len(gains), "n": len(gains)}


def _ratio(pairs: list[dict], key: str) -> float | None:
    qat_gain = statistics.mean(p["qat"] - p["ptq"] for p in pairs)
    return statistics.mean(p[key] - p["ptq"] for p in pairs) / qat_gain if qat_gain > 0 else None


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
            def eval_fn(model):
                with ptq(model.backbone, args.bits):
                    return accuracy(model, *val)

            lam, val_scores = patching.search_lambda(ft, vectors[d.name], eval_fn, grid=args.lam_grid,
                                                     return_scores=True)
            test_by_lam = {}
            for x in sorted({1.0, lam}):
                saved = {n: p.detach().clone() for n, p in ft.named_parameters() if n in vectors[d.name]}
                patching.apply_vector(ft, vectors[d.name], x)
                with ptq(ft.backbone, args.bits):
                    test_by_lam[x] = accuracy(ft, *test)
                with torch.no_grad():
                    for n, p in ft.named_parameters():
                        if n in saved:
                            p.copy_(saved[n])
            row = {"donor": d.name, "receiver": r.name, "fp": per_task[r.name]["fp"], "ptq": per_task[r.name]["ptq"],
                   "lam1": test_by_lam[1.0], "lam_searched": lam, "searched": test_by_lam[lam],
                   "qat": per_task[r.name]["qat"], "val_by_lam": val_scores,
                   "cos_qv": patching.cosine(vectors[d.name], vectors[r.name])}
            pairs.append(row)
            print(f"  {d.name:>22} -> {r.name:<22} ptq {row['ptq']:.3f}  lam=1 {row['lam1']:.3f}  "
                  f"lam*={lam:<4} {row['searched']:.3f}  qat {row['qat']:.3f}", flush=True)
    summary = {
        "lam1": summarize([p["lam1"] - p["ptq"] for p in pairs]),
        "searched": summarize([p["searched"] - p["ptq"] for p in pairs]),
        "qat_ceiling": summarize([per_task[t.name]["qat"] - per_task[t.name]["ptq"] for t in tasks]),
        "ptq_damage": summarize([per_task[t.name]["fp"] - per_task[t.name]["ptq"] for t in tasks]),
        # ratio of means over pairs (a per-pair ratio explodes where the QAT gain is one test sentence)
        "recovered_share_lam1": _ratio(pairs, "lam1"),
        "recovered_share_searched": _ratio(pairs, "searched"),
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
    ref = _embeddings(base_task, embed_ids)
    rows = []
    for grid, gran in args.daq_grids:
        for t in tasks:
            ft = models[t.name]["ft"]
            post = ft.backbone
            row = {"task": t.name, "grid": grid, "granularity": gran, "fp_acc": accuracy(ft, *t.splits["test"]),
                   "fp_base_cos": F.cosine_similarity(_embeddings(ft, embed_ids), ref).mean().item(), "scales": {}}
            configs = [("absmax", DAQConfig(base=base_bert, grid=grid, granularity=gran, search=False))]
            configs += [(f"daq-{m}", DAQConfig(base=base_bert, grid=grid, granularity=gran, metric=m))
                        for m in args.daq_metrics]
            for label, config in configs:
                t0 = time.perf_counter()
                dense, report = quantized_copy(post, config)
                qmodel = TaskModel(dense, len(t.classes), args.split, ft.cache, seed=args.seed)
                qmodel.head.load_state_dict(ft.head.state_dict())
                row["scales"][label] = {
                    **_delta_metrics(post, base_bert, dense), "acc": accuracy(qmodel, *t.splits["test"]),
                    "base_cos": F.cosine_similarity(_embeddings(qmodel, embed_ids), ref).mean().item(),
                    "blocks_changed": sum(r["blocks_changed"] for r in report.values()),
                    "blocks": sum(r["blocks"] for r in report.values()), "seconds": time.perf_counter() - t0}
            rows.append(row)
            print(f"  {grid}/{gran} {t.name:<22} " + "  ".join(
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
def _trained(n: int) -> str:
    return "all 6 encoder layers" if n == 6 else f"the last {n} of 6 encoder layers"


def _pct(x):
    return f"{100 * x:.1f}"


def markdown(result: dict) -> str:
    cfg, pt = result["config"], result["patching"]
    lines = [f"# Quantization-vector patching and DAQ on MiniLM text tasks",
             "",
             f"Command: `python benchmarks/patching_experiment.py` · machine: {result['machine']} · "
             f"runtime {result['runtime_s']:.0f} s",
             "",
             f"Backbone: bundled all-MiniLM-L6-v2 + linear head on mean-pooled tokens. PTQ: RTN {cfg['bits']}-bit "
             f"per-output-channel absmax on all {cfg['n_quantized_layers']} encoder Linear layers (head in fp32). "
             f"FT/QAT train {_trained(cfg['train_layers'])} + head, embeddings frozen ({cfg['steps']} steps, batch "
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
        lines += ["", f"Share of the QAT gain recovered (mean gain over pairs / mean QAT gain over pairs): "
                      f"λ = 1 {100 * s['recovered_share_lam1']:.0f} %, searched λ "
                      f"{100 * s['recovered_share_searched']:.0f} %."]
    lines += ["", f"Mean |cosine| between different tasks' quantization vectors: "
                  f"{s['mean_abs_cos_between_vectors']:.3f}."]
    lines += ["", "## All pairs (test accuracy, %)", "",
              "| donor → receiver | fp | PTQ | λ = 1 | λ* | searched | QAT | cos(τ_D, τ_R) |", "|---|---|---|---|---|---|---|---|"]
    for p in pt["pairs"]:
        lines.append(f"| {p['donor']} → {p['receiver']} | {_pct(p['fp'])} | {_pct(p['ptq'])} | {_pct(p['lam1'])} | "
                     f"{p['lam_searched']} | {_pct(p['searched'])} | {_pct(p['qat'])} | {p['cos_qv']:.3f} |")
    if result.get("daq"):
        lines += ["", "## DAQ: absmax vs delta-aware scales (base = pre-trained MiniLM, post = each FT model)", "",
                  "Same grid, same layers (the 36 encoder Linear layers); only the scales differ. sign = share of "
                  "weights with |ΔW| > 1e-5 whose quantized delta keeps the sign (0 counts as lost); cos = "
                  "cos(ΔW, ΔŴ); MSE = mean (Ŵ − W_post)²; task = test accuracy with the FT head; base = mean "
                  "cosine of sentence embeddings to the pre-trained model's, on "
                  f"{cfg['n_embed']} sentences outside every training split (fp32 post model: row 'fp32').", "",
                  "Means over the tasks:", "",
                  "| grid | scales | sign | cos | MSE | task acc | base cos |", "|---|---|---|---|---|---|---|"]
        for key, by in result["daq"]["summary"].items():
            fp = by["fp"]
            lines.append(f"| {key} | fp32 (unquantized) | | | | {_pct(fp['acc'])} | {fp['base_cos']:.4f} |")
            for label, v in by.items():
                if label != "fp":
                    lines.append(f"| {key} | {label} | {v['sign']:.4f} | {v['cosine']:.4f} | {v['mse']:.3e} | "
                                 f"{_pct(v['acc'])} | {v['base_cos']:.4f} |")
        lines += ["", "Per task:", "",
                  "| grid | task | scales | sign | cos | MSE | task acc | base cos | blocks changed |",
                  "|---|---|---|---|---|---|---|---|---|"]
        for r in result["daq"]["rows"]:
            key = f"{r['grid']}/{r['granularity']}"
            lines.append(f"| {key} | {r['task']} | fp32 | | | | {_pct(r['fp_acc'])} | {r['fp_base_cos']:.4f} | |")
            for label, v in r["scales"].items():
                lines.append(f"| {key} | {r['task']} | {label} | {v['sign']:.4f} | {v['cosine']:.4f} | "
                             f"{v['mse']:.3e} | {_pct(v['acc'])} | {v['base_cos']:.4f} | "
                             f"{v['blocks_changed']}/{v['blocks']} |")
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
    ap = argparse.ArgumentParser(prog="python benchmarks/patching_experiment.py", description=__doc__.split("\n")[0])
    ap.add_argument("--tasks", default=",".join(DEFAULT_TASKS), help=f"comma-separated, at least 2 of {list(TASKS)}")
    ap.add_argument("--bits", type=int, default=3, help="RTN bit-width of PTQ and QAT (2, 3, 4 or 8)")
    ap.add_argument("--train-layers", type=int, default=6,
                    help="FT/QAT train the last N of the 6 layers (fewer = faster; the rest stays pre-trained)")
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--lr", type=float, default=1e-4)
    ap.add_argument("--weight-decay", type=float, default=0.01)
    ap.add_argument("--warmup", type=int, default=4)
    ap.add_argument("--per-class", type=int, default=80, help="at most this many sentences per class")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--lam-grid", default=",".join(map(str, patching.DEFAULT_LAMBDA_GRID)))
    ap.add_argument("--daq-grids", default="fp8:block", help="grid:granularity list (grids fp8, int2..int8, "
                    "pyquant2; granularity block, row, tensor); empty = no DAQ")
    ap.add_argument("--daq-metrics", default="sign,cosine", help="DAQ search metrics to compare (sign, cosine, mse)")
    ap.add_argument("--threads", type=int, default=0,
                    help="torch threads; 0 = 1 when the machine is oversubscribed (load >= cores), else torch's default")
    ap.add_argument("--n-embed", type=int, default=128, help="sentences for the base-behaviour embedding cosine")
    ap.add_argument("--cache-dir", default=os.path.join(Path.home(), ".cache", "pyquant", "experiments"))
    ap.add_argument("--out-dir", default=str(ROOT / "benchmarks" / "results"))
    ap.add_argument("--out-name", default="patching", help="result files: <out-dir>/<out-name>.{json,md}")
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
    args.daq_metrics = [m for m in args.daq_metrics.split(",") if m]
    if any(m not in ("sign", "cosine", "mse") for m in args.daq_metrics) or not args.daq_metrics:
        ap.error("--daq-metrics: a comma-separated list of sign, cosine, mse")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if args.threads:
        torch.set_num_threads(args.threads)
    elif hasattr(os, "getloadavg") and os.getloadavg()[0] >= (os.cpu_count() or 1):
        # on a busy machine one thread per process beats threads waiting on each other at every barrier
        torch.set_num_threads(1)

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

    export = export_for_cli(models[tasks[0].name]["ft"], tokenizer, models[tasks[1].name], cache_dir / "cli")
    print(f"  CLI inputs: receiver {export['model']}, donor vector {export['vector']}", flush=True)

    print("[2/3] quantization-vector patching, every ordered donor -> receiver pair", flush=True)
    pt = patching_experiment(tasks, models, args)
    t_patched = time.perf_counter()

    daq = None
    if args.daq_grids:
        print(f"[3/3] DAQ ({args.daq_metrics}) vs absmax on {args.daq_grids}", flush=True)
        daq = daq_experiment(bert, tasks, models, args, embed_ids)
    runtime = time.perf_counter() - t_start
    result = {
        "config": {"bits": args.bits, "train_layers": args.train_layers, "steps": args.steps,
                   "batch_size": args.batch_size, "lr": args.lr, "weight_decay": args.weight_decay,
                   "warmup": args.warmup, "per_class": args.per_class, "seed": args.seed, "lam_grid": args.lam_grid,
                   "daq_grids": args.daq_grids, "daq_metrics": args.daq_metrics, "n_embed": len(embed_set),
                   "tasks": names, "n_quantized_layers": len(encoder_linears(bert)), "cache_key": fingerprint},
        "machine": _machine(), "runtime_s": runtime,
        "phase_s": {"train": t_trained - t_start, "patching": t_patched - t_trained,
                    "daq": time.perf_counter() - t_patched},
        "prefix_computations": cache.computed, "cli_export": export,
        "patching": pt, "daq": daq,
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
