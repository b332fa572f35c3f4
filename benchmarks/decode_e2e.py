"""End-to-end decode throughput: a Llama-2-7B-shaped decoder in fp16 vs the same model in pyquant 2-bit.

    python benchmarks/decode_e2e.py [--out DIR] [--layers 8] [--batches 1 4 16] [--steps 100]

Model: ``transformers.LlamaForCausalLM`` built from a ``LlamaConfig`` with Llama-2-7B's
dimensions (hidden 4096, MLP 11008, 32 heads, vocab 32000), random initialisation,
fp16, and ``--layers`` decoder layers (default 8 of the real 32, to keep the run within a
few minutes; both models scale alike with depth, so the ratio is the number to read).
The quantized copy goes through ``pyquant.quantize_model(model, pyquant.RTNConfig(bits=2))``
(every decoder ``nn.Linear``; ``lm_head`` stays fp16 as in QuIP#/AQLM). Speed does not
depend on the quantization method.

Each decode step (one new token per sequence, greedy, static KV cache of ``prompt + steps``
tokens) is captured in a CUDA graph for both models and replayed ``--steps`` times;
tokens/s = batch / step time. Every available pyquant GPU backend (``cuda``, ``triton``) is
measured, each forced in turn (the CUDA one also with programmatic dependent launch,
``PYQUANT_CUDA_PDL=1``, on sm_90+), after checking that its logits match the torch
reference backend on the same quantized model. If graph capture fails (it depends on the
transformers version), both models are timed eagerly instead and the JSON says so.

Writes ``decode_e2e_<gpu>.json`` and ``.md`` to ``--out``. Exits 0 with a message when
no CUDA GPU is present.
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import datetime
import inspect
import json
import os
import re
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

LLAMA2_7B = dict(hidden_size=4096, intermediate_size=11008, num_attention_heads=32, num_key_value_heads=32,
                 vocab_size=32000, max_position_embeddings=4096, rms_norm_eps=1e-5)


# --tiny: a small model with the same structure, to smoke-test this script on a CPU.
TINY = dict(hidden_size=256, intermediate_size=688, num_attention_heads=4, num_key_value_heads=4,
            vocab_size=1000, max_position_embeddings=512, rms_norm_eps=1e-5)


def build_model(layers: int, device: str, dims: dict = LLAMA2_7B):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(num_hidden_layers=layers, **dims)
    cfg._attn_implementation = "sdpa"
    torch.manual_seed(0)
    with torch.device(device):
        model = LlamaForCausalLM(cfg)
    return model.to(torch.float16).eval()


def not_head(module, fqn: str) -> bool:
    return not fqn.endswith("lm_head")


def quantize(model) -> str:
    """RTN 2-bit on every decoder linear layer, in place; returns how it was done."""
    import pyquant
    from pyquant.nn import QuantLinear

    config = pyquant.RTNConfig(bits=2)
    device = next(model.parameters()).device
    try:  # does the quantizer run where the model is?
        config.quantize_weight(torch.randn(256, 256, device=device))
        on_device = None
    except Exception as e:  # noqa: BLE001 - reported below
        on_device = f"{type(e).__name__}: {e}"
    if on_device is None or device.type == "cpu":
        pyquant.quantize_model(model, config, filter_fn=not_head, progress=False)
        return "RTN 2-bit (pyquant.quantize_model, RTNConfig(bits=2)) on every decoder linear layer"
    # RTN does not run on the GPU: quantizing every layer on the CPU takes minutes, so quantize
    # layer 0 there and give the other layers copies of its packed tensors (separate memory, same
    # values; the speed does not depend on them).
    print(f"decode_e2e: RTN does not run on {device} ({on_device}); quantizing layer 0 on the CPU and "
          "copying it to the other layers", flush=True)
    layers = model.model.layers
    first = layers[0].cpu()
    pyquant.quantize_model(first, config, progress=False)
    layers[0] = first.to(device)
    for layer in layers[1:]:
        for fqn, module in list(layer.named_modules()):
            if isinstance(module, torch.nn.Linear):
                q = QuantLinear.from_packed(layers[0].get_submodule(fqn).packed.to(device), None)
                parent, _, child = fqn.rpartition(".")
                setattr(layer.get_submodule(parent) if parent else layer, child, q)
    return ("RTN 2-bit on decoder layer 0 (on the CPU: RTN did not run on the GPU); "
            "layers 1.. hold copies of its packed tensors")

def make_cache(model, batch: int, max_len: int):
    from transformers import StaticCache

    # The constructor changed across transformers versions: pass what this one takes.
    params = inspect.signature(StaticCache.__init__).parameters
    kw = {"config": model.config, "max_cache_len": max_len}
    if "max_batch_size" in params:
        kw["max_batch_size"] = batch
    elif "batch_size" in params:
        kw["batch_size"] = batch
    if "device" in params:
        kw["device"] = next(model.parameters()).device
    if "dtype" in params:
        kw["dtype"] = torch.float16
    return StaticCache(**kw)


class Decoder:
    """Greedy decode of one token per sequence and step, state in static tensors so a step
    can be captured in a CUDA graph (the cache position advances inside the graph)."""

    def __init__(self, model, batch: int, prompt: int, max_len: int):
        self.model = model
        dev = next(model.parameters()).device
        self.cache = make_cache(model, batch, max_len)
        self.takes_cache_position = "cache_position" in inspect.signature(model.model.forward).parameters
        g = torch.Generator(device=dev).manual_seed(1)
        ids = torch.randint(0, model.config.vocab_size, (batch, prompt), device=dev, generator=g)
        pos = torch.arange(prompt, device=dev)
        with torch.no_grad():
            logits = self.forward(ids, pos)
        self.ids = logits[:, -1].argmax(-1, keepdim=True).clone()
        self.pos = torch.full((1,), prompt, device=dev, dtype=torch.long)

    def forward(self, ids, pos):
        kw = {"input_ids": ids, "past_key_values": self.cache, "use_cache": True,
              "position_ids": pos.unsqueeze(0).expand(ids.shape[0], -1)}
        if self.takes_cache_position:
            kw["cache_position"] = pos
        return self.model(**kw).logits

    def step(self):
        with torch.no_grad():
            logits = self.forward(self.ids, self.pos)
            self.ids.copy_(logits[:, -1].argmax(-1, keepdim=True))
            self.pos.add_(1)


def time_decode(model, batch: int, prompt: int, steps: int, use_graph: bool) -> tuple[float, str]:
    """Seconds per decode step, and the mode actually used."""
    warm = 3
    dec = Decoder(model, batch, prompt, prompt + 2 * warm + steps + 8)
    mode = "eager"
    run = dec.step
    if use_graph:
        try:
            s = torch.cuda.Stream()
            s.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(s):
                for _ in range(warm):
                    dec.step()
            torch.cuda.current_stream().wait_stream(s)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                dec.step()
            run, mode = graph.replay, "cuda graph"
        except Exception as e:  # noqa: BLE001 - reported, the caller falls back to eager
            raise GraphError(f"{type(e).__name__}: {e}") from e
    for _ in range(warm):
        run()
    if dec.ids.device.type != "cuda":  # --tiny smoke test on a CPU
        t = time.perf_counter()
        for _ in range(steps):
            run()
        return (time.perf_counter() - t) / steps, mode
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(steps):
        run()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / 1e3 / steps, mode


class GraphError(RuntimeError):
    pass


@contextlib.contextmanager
def environ(values: dict):
    """Temporarily set environment variables (read by the kernels at launch time)."""
    old = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def logits_once(model, batch: int = 2, prompt: int = 8) -> torch.Tensor:
    dec = Decoder(model, batch, prompt, prompt + 4)
    with torch.no_grad():
        return dec.forward(dec.ids, dec.pos).float()


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description="decode tokens/s: fp16 vs pyquant 2-bit, Llama-2-7B shapes")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    p.add_argument("--layers", type=int, default=8, help="decoder layers (Llama-2-7B has 32)")
    p.add_argument("--batches", type=int, nargs="+", default=[1, 4, 16])
    p.add_argument("--steps", type=int, default=100, help="timed decode steps per measurement")
    p.add_argument("--prompt", type=int, default=16, help="prompt tokens prefilled before decoding")
    p.add_argument("--no-graph", action="store_true", help="time eagerly (Python launch overhead included)")
    p.add_argument("--tiny", action="store_true", help="smoke test: small dims, on the CPU when there is no GPU")
    args = p.parse_args(argv)

    device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cpu" and not args.tiny:
        print("decode_e2e: no CUDA GPU in this process (torch.cuda.is_available() is False); nothing to measure. "
              "Run it on a machine with an NVIDIA GPU.")
        return 0
    try:
        import transformers
    except ImportError:
        print("decode_e2e: transformers is not installed")
        return 1
    import pyquant
    from pyquant import kernels

    t0 = time.time()
    gpu = torch.cuda.get_device_name() if device == "cuda" else "cpu"
    dims = TINY if args.tiny else LLAMA2_7B
    print(f"decode_e2e on {gpu}: {args.layers} {'tiny' if args.tiny else 'Llama-2-7B-shaped'} layers, "
          f"batches {args.batches}", flush=True)
    fp16 = build_model(args.layers, device, dims)
    qmodel = copy.deepcopy(fp16)
    how = quantize(qmodel)
    bpw = pyquant.bits_per_weight(qmodel)
    print(f"  quantized in {time.time() - t0:.0f} s: {how}; {bpw:.3f} bits/weight", flush=True)

    # (name, backend, extra environment): the CUDA backend also with programmatic dependent
    # launch on sm_90+ (its decode kernel prefetches codes while the previous kernel drains).
    avail = kernels.available_backends()
    variants = []
    if device == "cuda":
        if "cuda" in avail:
            variants.append(("cuda", "cuda", {}))
            if torch.cuda.get_device_capability()[0] >= 9:
                variants.append(("cuda_pdl", "cuda", {"PYQUANT_CUDA_PDL": "1"}))
        if "triton" in avail:
            variants.append(("triton", "triton", {}))
    elif "cpu" in avail:
        variants.append(("cpu", "cpu", {}))
    checks = {}
    with kernels.force_backend("torch"):
        ref = logits_once(qmodel)
    for v in list(variants):
        name, backend, env = v
        try:
            with kernels.force_backend(backend), environ(env):
                checks[name] = rel_err(logits_once(qmodel), ref)
        except Exception as e:  # noqa: BLE001 - a backend that fails is reported, not timed
            checks[name] = f"{type(e).__name__}: {e}"
            variants.remove(v)
        print(f"  {name}: logits vs torch reference backend: {checks[name]}", flush=True)
    backends = [v[0] for v in variants]

    use_graph = not args.no_graph and device == "cuda"
    rows, graph_error = [], None
    for batch in args.batches:
        row = {"batch": batch}
        plans = [("fp16", fp16, None, {})] + [(name, qmodel, b, env) for name, b, env in variants]
        for name, model, backend, env in plans:
            try:
                with kernels.force_backend(backend), environ(env):
                    try:
                        sec, mode = time_decode(model, batch, args.prompt, args.steps, use_graph)
                    except GraphError as e:
                        if graph_error is None:
                            graph_error = str(e)
                            print(f"  CUDA graph capture failed ({e}); timing every model eagerly", flush=True)
                        use_graph = False
                        sec, mode = time_decode(model, batch, args.prompt, args.steps, False)
                row[f"{name}_step_ms"] = sec * 1e3
                row[f"{name}_tok_s"] = batch / sec
                row[f"{name}_mode"] = mode
            except Exception as e:  # noqa: BLE001
                row[f"{name}_error"] = f"{type(e).__name__}: {e}"
            if device == "cuda":
                torch.cuda.empty_cache()
        for b in backends:
            if f"{b}_tok_s" in row and "fp16_tok_s" in row:
                row[f"{b}_speedup"] = row[f"{b}_tok_s"] / row["fp16_tok_s"]
        rows.append(row)
        print("  batch %d: %s" % (batch, ", ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}"
                                                    for k, v in row.items() if k != "batch")), flush=True)
    if graph_error is not None and any(r.get("fp16_mode") == "cuda graph" for r in rows):
        print("  note: some rows were timed with CUDA graphs before capture failed; compare within a row only")

    meta = {"gpu": gpu, "date": datetime.datetime.now().isoformat(timespec="seconds"), "torch": torch.__version__,
            "transformers": transformers.__version__, "cuda": torch.version.cuda,
            "model": f"LlamaForCausalLM, {'tiny smoke-test' if args.tiny else 'Llama-2-7B'} dims, "
                     f"{args.layers} of 32 layers, random init, fp16",
            "quantization": how, "bits_per_weight": bpw, "prompt": args.prompt, "steps": args.steps,
            "backend_check_rel_err": checks, "graph_error": graph_error,
            "metric": "tokens/s = batch / decode step time (median-free mean over the timed steps)"}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = "decode_e2e_" + re.sub(r"[^A-Za-z0-9._-]+", "_", gpu).strip("_")
    (out / f"{stem}.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    md = markdown(meta, rows, backends)
    (out / f"{stem}.md").write_text(md)
    print(md)
    print(f"wrote {out / (stem + '.json')} and {out / (stem + '.md')} in {time.time() - t0:.0f} s")
    return 0


def markdown(meta: dict, rows: list[dict], backends: list[str]) -> str:
    lines = [f"# Decode throughput, {meta['gpu']}", "",
             f"{meta['model']}; {meta['quantization']} ({meta['bits_per_weight']:.3f} bits/weight); "
             f"prompt {meta['prompt']}, {meta['steps']} timed steps; torch {meta['torch']}, "
             f"transformers {meta['transformers']}, CUDA {meta['cuda']}; {meta['date']}.", ""]
    head = "| batch | fp16 tok/s |" + "".join(f" {b} tok/s | {b} speed-up |" for b in backends) + " mode |"
    lines += [head, "|" + "---|" * (head.count("|") - 1)]
    for r in rows:
        cells = [str(r["batch"]), f"{r['fp16_tok_s']:.1f}" if "fp16_tok_s" in r else r.get("fp16_error", "-")]
        for b in backends:
            cells.append(f"{r[f'{b}_tok_s']:.1f}" if f"{b}_tok_s" in r else r.get(f"{b}_error", "-"))
            cells.append(f"{r[f'{b}_speedup']:.2f}x" if f"{b}_speedup" in r else "-")
        cells.append(r.get("fp16_mode", "-"))
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", "Backend check (relative error of the logits vs the torch reference backend): "
              + ", ".join(f"{k}: {v:.2e}" if isinstance(v, float) else f"{k}: {v}"
                          for k, v in meta["backend_check_rel_err"].items())]
    if meta.get("graph_error"):
        lines.append(f"CUDA graph capture failed: {meta['graph_error']}")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
