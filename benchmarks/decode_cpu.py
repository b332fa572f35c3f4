#!/usr/bin/env python
"""CPU greedy decode tokens/s of a Llama-2-7B-shaped decoder: transformers bf16, torch int4, llama.cpp
Q2_K / Q4_0 and pyquant 2-bit, on the same weights, machine and thread count, in one run.

    nice -n 10 python benchmarks/decode_cpu.py [--layers 8] [--threads 2] [--batches 1 4]
                                              [--prompt 16] [--new-tokens 64] [--out benchmarks/results]
    python benchmarks/decode_cpu.py --layers 2 --new-tokens 8 --out /tmp/dc    # smoke test
    python benchmarks/decode_cpu.py --prepare-only      # only build what is cached (no timing)

Model: ``LlamaForCausalLM`` from a ``LlamaConfig`` with Llama-2-7B's dimensions (hidden 4096, MLP
11008, 32 heads, vocab 32000) and ``--layers`` of its 32 decoder layers, random (seeded) weights,
written once as a bf16 safetensors checkpoint with a 32000-token byte-level BPE tokenizer
(trained with ``tokenizers`` on the Python stdlib's sources) so that llama.cpp's
``convert_hf_to_gguf.py`` converts the SAME weights. Cached, like the GGUFs, the pyquant
checkpoint and the llama.cpp build (``benchmarks/llama_cpp.sh``), under
``${PYQUANT_CACHE:-~/.cache/pyquant}``: the first run builds them (about 30 minutes on 2 cores,
most of it pyquant's RTN on 1.7 G weights and llama.cpp's build); later runs only time.

Columns (each in its own subprocess, so that its peak resident memory is its own):

- ``bf16``: transformers eager ``generate`` (dynamic KV cache, greedy, ``min_new_tokens`` so it never
  stops early);
- ``int4``: every decoder ``nn.Linear`` swapped for torch's int4 weight-only matmul, group 128
  (``aten._weight_int4pack_mm_for_cpu``, weights packed by ``_convert_weight_to_int4pack_for_cpu``,
  asymmetric scales and zeros as gpt-fast makes them); ``lm_head`` bf16; same ``generate``;
- ``llama.cpp BF16 / Q4_0 / Q2_K``: batch 1 from ``llama-bench -p 0 -n N -t T``, batch 4 from
  ``llama-batched-bench`` (4 parallel sequences, prompt P each, N new tokens);
- ``pyquant``: ``pyquant.quantize_model(model, RTNConfig(bits=2))`` (speed does not depend on the
  method), loaded from its saved checkpoint in CPU mode "int", eager ``generate``; ``lm_head`` bf16 (the default)
  and ``lm_head`` 2-bit too (a ``filter_fn`` taking every ``nn.Linear``);
- ``pyquant compiled``: the 2-bit model (2-bit ``lm_head``) with transformers' static cache and
  ``torch.compile`` of its forward (``generate(cache_implementation="static", compile_config=...)``,
  fullgraph, inductor); a compile that fails or takes over ``--compile-timeout`` s is reported;
- ``pyquant ... CPU mode lut`` / ``lut3``: the 2-bit-``lm_head`` columns again with the layers loaded in
  CPU mode "lut" (``pyquant.kernels.set_cpu_mode("lut")``: the table-lookup kernels, 14-bit
  activations) or "lut3" (triple lookups, 12-bit activations); n/a where the CPU's kernel set has
  none of its own (``_C.has_lut_kernel()``, ``_C.has_lut3_kernel()``).

Decode tokens/s = batch * (N - 1) / time from the first to the last generated token (the prefill
is not counted; llama-bench ``-p 0`` has none either), after a warm-up ``generate``. After timing,
the pyquant columns check their logits against the torch reference backend
(``pyquant.kernels.force_backend("torch")``: it reads the codes that mode lut leaves with the OS,
so before it they would count in the decoding RSS), and before it the int4 column its logits
against bf16's, on a short input. Memory: the process's peak RSS (``wait4``'s ``ru_maxrss``: loading and quantizing
included, and for llama.cpp its mmapped model) and, for the Python columns, the peak RSS while
decoding (``VmHWM`` reset just before the timed ``generate``).

Writes ``NAME.json`` and ``NAME.md`` to ``--out`` (``--name``, default ``decode_cpu``). One machine, one run, and it must be
quiet: a thread that shares its core with another process stalls every parallel region, which
costs the short quantized kernels far more than bf16's long GEMVs. Other work's CPU use during
each column is measured (/proc/stat less the column's own CPU time), and the table warns when it
took more than the CPUs left free.
"""
from __future__ import annotations

import argparse
import ctypes
import datetime
import gc
import json
import os
import platform
import re
import subprocess
import sys
import sysconfig
import threading
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

LLAMA2_7B = dict(hidden_size=4096, intermediate_size=11008, num_attention_heads=32, num_key_value_heads=32,
                 vocab_size=32000, max_position_embeddings=4096, rms_norm_eps=1e-5,
                 bos_token_id=1, eos_token_id=2, tie_word_embeddings=False)
CACHE = Path(os.environ.get("PYQUANT_CACHE", Path.home() / ".cache" / "pyquant")).expanduser()

# name -> label; the order of the table
COLUMNS = {
    "bf16": "transformers bf16 eager",
    "int4": "torch int4 g128 (lm_head bf16)",
    "llama_bf16": "llama.cpp BF16",
    "llama_q4_0": "llama.cpp Q4_0",
    "llama_q2_k": "llama.cpp Q2_K",
    "pyquant": "pyquant 2-bit eager, lm_head bf16, CPU mode int",
    "pyquant_head": "pyquant 2-bit eager, lm_head 2-bit, CPU mode int",
    "pyquant_compiled": "pyquant 2-bit compiled, lm_head 2-bit, CPU mode int",
    "pyquant_lut": "pyquant 2-bit eager, lm_head 2-bit, CPU mode lut",
    "pyquant_lut_compiled": "pyquant 2-bit compiled, lm_head 2-bit, CPU mode lut",
    "pyquant_lut3": "pyquant 2-bit eager, lm_head 2-bit, CPU mode lut3",
    "pyquant_lut3_compiled": "pyquant 2-bit compiled, lm_head 2-bit, CPU mode lut3",
}
GGUF_TYPES = {"llama_bf16": "BF16", "llama_q4_0": "Q4_0", "llama_q2_k": "Q2_K"}


def log(msg: str) -> None:
    print(f"decode_cpu: {msg}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------- memory
def cpu_busy_s() -> float:
    """CPU-seconds all CPUs have been busy since boot (/proc/stat, USER_HZ = 100)."""
    v = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    return (sum(v) - v[3] - v[4]) / os.sysconf("SC_CLK_TCK")


# CPU-seconds of other work while a child of this run ran (the machine's busy time less the
# child's own user + system time), and those children's wall seconds: other_cpus() of a column.
OTHERS = [0.0, 0.0]


def others_since(mark: tuple) -> float:
    """Average CPUs that other work kept busy while this run's children ran since ``mark``."""
    return (OTHERS[0] - mark[0]) / max(OTHERS[1] - mark[1], 1e-9)


def proc_status_mb(key: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) / 1024
    return float("nan")


def reset_peak_rss() -> None:
    """Free what can be freed and restart the process's VmHWM from its current RSS (Linux
    clear_refs "5"), so that the next reading is the peak of what follows only."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:
        pass
    Path("/proc/self/clear_refs").write_text("5")


# ---------------------------------------------------------------- subprocesses
def run_child(cmd: list[str], timeout: float, stderr=None) -> tuple[int, str, float, float]:
    """(exit code, stdout, peak RSS in MiB, wall seconds) of ``cmd``; the peak is wait4's
    ru_maxrss of that one child (Linux reports KiB)."""
    t0, busy0 = time.time(), cpu_busy_s()
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=stderr, text=True)
    timer = threading.Timer(timeout, p.kill)
    timer.start()
    out = p.stdout.read()
    _, status, ru = os.wait4(p.pid, 0)
    timer.cancel()
    p.returncode = os.waitstatus_to_exitcode(status)  # reaped here: Popen must not wait again
    wall = time.time() - t0
    OTHERS[0] += max(cpu_busy_s() - busy0 - ru.ru_utime - ru.ru_stime, 0.0)
    OTHERS[1] += wall
    return p.returncode, out, ru.ru_maxrss / 1024, wall


def python_child(args, column: str, timeout: float) -> dict:
    """Run ``--column NAME`` of this script in a fresh process; its result is the last line
    ``RESULT {json}`` of its stdout (its progress goes to stderr, shown live)."""
    cmd = [sys.executable, __file__, "--column", column, "--layers", str(args.layers), "--threads",
           str(args.threads), "--prompt", str(args.prompt), "--new-tokens", str(args.new_tokens),
           "--compile-timeout", str(args.compile_timeout), "--batches", *map(str, args.batches)]
    rc, out, rss, wall = run_child(cmd, timeout)
    lines = [ln for ln in out.splitlines() if ln.startswith("RESULT ")]
    res = json.loads(lines[-1][7:]) if lines else {}
    if rc != 0 and "error" not in res:
        res["error"] = f"exit code {rc}" + (" (killed: over the timeout)" if rc == -9 else "")
    res.update(peak_rss_mb=rss, wall_s=wall)
    return res


# ---------------------------------------------------------------- the checkpoint
def ckpt_dir(layers: int) -> Path:
    return CACHE / "decode_cpu" / f"llama2-7b-shape-{layers}l-seed0"


def build_tokenizer(out: Path) -> int:
    """A 32000-token byte-level BPE trained on the stdlib's .py files: the converter needs a
    tokenizer in the checkpoint; the benchmark never tokenizes text (prompts are random ids)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    lib = Path(sysconfig.get_paths()["stdlib"])
    files = [f for f in sorted(lib.rglob("*.py")) if "site-packages" not in f.parts]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=LLAMA2_7B["vocab_size"], special_tokens=["<unk>", "<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator((f.read_text(errors="replace") for f in files), trainer)
    PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>").save_pretrained(out)
    return tok.get_vocab_size()


def col_checkpoint(args) -> dict:
    from transformers import LlamaConfig, LlamaForCausalLM

    out = ckpt_dir(args.layers)
    tmp = out.with_name(out.name + ".tmp")
    t0 = time.time()
    cfg = LlamaConfig(num_hidden_layers=args.layers, **LLAMA2_7B)
    torch.manual_seed(0)
    torch.set_default_dtype(torch.bfloat16)  # built in bf16 directly: an fp32 copy would double the memory
    model = LlamaForCausalLM(cfg).eval()
    torch.set_default_dtype(torch.float32)
    model.save_pretrained(tmp)
    vocab = build_tokenizer(tmp)
    tmp.rename(out)
    return {"dir": str(out), "tokenizer_vocab": vocab, "seconds": time.time() - t0}


def col_pyquant_ckpt(args) -> dict:
    """Quantize once (every nn.Linear, lm_head included) and save: RTN over 1.7 G weights takes
    minutes a layer on 2 cores, which the three pyquant columns then share."""
    import pyquant
    from transformers import LlamaForCausalLM

    out = ckpt_dir(args.layers) / "pyquant-rtn2"
    model = LlamaForCausalLM.from_pretrained(ckpt_dir(args.layers), dtype=torch.bfloat16).eval()
    t0 = time.time()
    pyquant.quantize_model(model, pyquant.RTNConfig(bits=2), filter_fn=lambda m, fqn: m.in_features % 4 == 0)
    info = {"quantize_s": time.time() - t0, "bits_per_weight": pyquant.bits_per_weight(model),
            "skipped": getattr(model, "pyquant_skipped", {})}
    pyquant.save_quantized(model, out)
    (out / "decode_cpu_quantize.json").write_text(json.dumps(info))
    return info


# ---------------------------------------------------------------- torch int4
class Int4Linear(torch.nn.Module):
    """Weight-only int4, group 128, as gpt-fast packs it for the CPU: per group of 128 inputs a
    bf16 scale and zero, w ~ (q - 8) * scale + zero with q in 0..15."""

    def __init__(self, linear: torch.nn.Linear, group: int = 128):
        super().__init__()
        n, k = linear.weight.shape
        self.n, self.k, self.group = n, k, group
        q, scale, zero = self.quantize(linear.weight, group)
        # inner_k_tiles is the CUDA layout's; the CPU packing takes it and ignores it
        self.register_buffer("weight", torch.ops.aten._convert_weight_to_int4pack_for_cpu(q, 8))
        self.register_buffer("scales_and_zeros", torch.stack([scale, zero], -1).transpose(0, 1).contiguous())
        self.bias = linear.bias

    @staticmethod
    def quantize(weight: torch.Tensor, group: int):
        """Codes [n, k] int32 in 0..15 and bf16 scales and zeros [n, k / group]."""
        n, k = weight.shape
        w = weight.detach().float().reshape(n, k // group, group)
        lo, hi = w.amin(-1), w.amax(-1)
        # scales and zeros rounded to bf16 first (what the kernel reads), then the codes from them
        scale = ((hi - lo).clamp(min=1e-6) / 15).to(torch.bfloat16)
        zero = (lo + scale.float() * 8).to(torch.bfloat16)
        low = zero.float() - scale.float() * 8
        q = ((w - low[..., None]) / scale.float()[..., None]).round().clamp(0, 15).to(torch.int32).reshape(n, k)
        return q, scale, zero

    @classmethod
    def reference_weight(cls, weight: torch.Tensor, group: int = 128) -> torch.Tensor:
        """What the kernel should apply, in plain torch: (q - 8) * scale + zero."""
        q, scale, zero = cls.quantize(weight, group)
        n, k = weight.shape
        q = q.float().reshape(n, k // group, group)
        return ((q - 8) * scale.float()[..., None] + zero.float()[..., None]).reshape(n, k)

    def forward(self, x):
        y = torch.ops.aten._weight_int4pack_mm_for_cpu(x.reshape(-1, self.k).to(torch.bfloat16), self.weight,
                                                      self.group, self.scales_and_zeros)
        y = y.reshape(*x.shape[:-1], self.n).to(x.dtype)
        return y if self.bias is None else y + self.bias


def to_int4(model) -> tuple[int, float]:
    """Swap every decoder nn.Linear; returns how many, and the relative error of the first one's
    kernel output against its weight dequantized in plain torch (packing and layout check)."""
    n, check = 0, None
    for layer in model.model.layers:
        for fqn, m in list(layer.named_modules()):
            if isinstance(m, torch.nn.Linear):
                q = Int4Linear(m)
                if check is None:
                    x = torch.randn(4, m.in_features, generator=torch.Generator().manual_seed(3)).to(torch.bfloat16)
                    check = rel_err(q(x).float(), x.float() @ Int4Linear.reference_weight(m.weight).t())
                parent, _, child = fqn.rpartition(".")
                setattr(layer.get_submodule(parent) if parent else layer, child, q)
                n += 1
    return n, check


# ---------------------------------------------------------------- timing
def short_logits(model) -> torch.Tensor:
    ids = torch.randint(3, LLAMA2_7B["vocab_size"], (2, 8), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        return model(ids).logits.float()


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()


def prompt_ids(batch: int, prompt: int) -> torch.Tensor:
    return torch.randint(3, LLAMA2_7B["vocab_size"], (batch, prompt), generator=torch.Generator().manual_seed(1))


def generate(model, ids, new: int, compiled: bool, processors=None):
    from transformers import LogitsProcessorList
    from transformers.generation.configuration_utils import CompileConfig

    kw = dict(attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=new, min_new_tokens=new,
              pad_token_id=0, eos_token_id=2, logits_processor=LogitsProcessorList(processors or []))
    if compiled:
        # transformers compiles the decode forward itself with a static cache; on the CPU only
        # when asked (_compile_all_devices). "default" mode: reduce-overhead is CUDA graphs.
        cc = CompileConfig(fullgraph=True, dynamic=False, mode="default")
        cc._compile_all_devices = True
        kw.update(cache_implementation="static", compile_config=cc)
    with torch.no_grad():
        return model.generate(ids, **kw)


class StepClock:
    """A logits processor that only notes the time: generate calls it once per new token."""

    def __init__(self):
        self.t: list[float] = []

    def __call__(self, input_ids, scores):
        self.t.append(time.perf_counter())
        return scores


def time_decode(model, batch: int, args, compiled: bool = False) -> dict:
    ids = prompt_ids(batch, args.prompt)
    t0 = time.time()
    # warm-up; the compiled one must have the timed run's length (the static cache's shape), and
    # compiles in it: stopped after --compile-timeout s
    signal_timeout(args.compile_timeout if compiled else 0)
    try:
        generate(model, ids, args.new_tokens if compiled else 4, compiled)
    finally:
        signal_timeout(0)
    warm = time.time() - t0
    reset_peak_rss()
    clock = StepClock()
    out = generate(model, ids, args.new_tokens, compiled, [clock])
    t = clock.t
    steps = sorted(b - a for a, b in zip(t, t[1:]))
    return {"tok_s": batch * (len(t) - 1) / (t[-1] - t[0]), "step_ms_median": 1e3 * steps[len(steps) // 2],
            "decode_rss_mb": proc_status_mb("VmHWM"), "warmup_s": warm, "new_tokens": out.shape[1] - ids.shape[1],
            "tokens": out[0, ids.shape[1]:].tolist() if batch == 1 else None}


def time_batches(model, args, compiled=False) -> dict:
    rows = {}
    for b in args.batches:
        r = time_decode(model, b, args, compiled)
        rows[str(b)] = r
        log(f"  batch {b}: {r['tok_s']:.2f} tok/s (median step {r['step_ms_median']:.0f} ms), "
            f"decode RSS {r['decode_rss_mb']:.0f} MiB")
    return rows


def load_bf16(args):
    from transformers import LlamaForCausalLM

    return LlamaForCausalLM.from_pretrained(ckpt_dir(args.layers), dtype=torch.bfloat16).eval()


def load_pyquant(args, head_2bit: bool):
    from safetensors import safe_open
    from transformers import LlamaForCausalLM

    import pyquant  # noqa: F401  (registers the "pyquant" quant_method with transformers)

    model = LlamaForCausalLM.from_pretrained(ckpt_dir(args.layers) / "pyquant-rtn2", dtype=torch.bfloat16).eval()
    if not head_2bit:  # the default of quantize_model: lm_head in bf16, the checkpoint's own weights
        head = torch.nn.Linear(LLAMA2_7B["hidden_size"], LLAMA2_7B["vocab_size"], bias=False, dtype=torch.bfloat16)
        ckpt = ckpt_dir(args.layers)
        index = ckpt / "model.safetensors.index.json"  # a sharded checkpoint names the file
        name = json.loads(index.read_text())["weight_map"]["lm_head.weight"] if index.is_file() else "model.safetensors"
        with safe_open(str(ckpt / name), framework="pt") as f:
            head.weight.data = f.get_tensor("lm_head.weight")
        model.lm_head = head
    return model


def backend_check(model) -> dict:
    from pyquant import kernels

    with kernels.force_backend("torch"):
        ref = short_logits(model)
    got = short_logits(model)
    backends = sorted({m.last_backend for m in model.modules() if hasattr(m, "last_backend")} - {None})
    return {"rel_err_vs_torch_backend": rel_err(got, ref), "backends": backends}


def col_python(args) -> dict:
    torch.set_num_threads(args.threads)
    name = args.column
    res: dict = {"column": name}
    ref_file = ckpt_dir(args.layers) / "bf16_short_logits.pt"  # written by the bf16 column
    if name == "bf16":
        model = load_bf16(args)
        torch.save(short_logits(model), ref_file)
    elif name == "int4":
        model = load_bf16(args)
        ref = short_logits(model)
        res["swapped_linears"], res["rel_err_kernel_vs_dequantized"] = to_int4(model)
        gc.collect()
        res["rel_err_vs_bf16"] = rel_err(short_logits(model), ref)
        log(f"  int4 kernel vs its weight dequantized in torch: relative error {res['rel_err_kernel_vs_dequantized']:.1e}; "
            f"int4 logits vs bf16: {res['rel_err_vs_bf16']:.3f}")
    else:
        import pyquant

        mode = "lut3" if "_lut3" in name else "lut" if "_lut" in name else "int"
        has = {"lut": pyquant.ops._C.has_lut_kernel, "lut3": pyquant.ops._C.has_lut3_kernel}.get(mode)
        if has is not None and not has():
            return {**res, "error": f"no {mode} kernels of its own in kernel set '{pyquant.ops._C.get_isa()}'"}
        # the mode of the layers loaded from here on (the default, "auto", is lut or lut3 on some CPUs)
        pyquant.kernels.set_cpu_mode(mode)
        model = load_pyquant(args, head_2bit=name != "pyquant")
        res["bits_per_weight"] = pyquant.bits_per_weight(model)
    res["model_rss_mb"] = proc_status_mb("VmRSS")
    if not name.endswith("_compiled"):
        res["batches"] = time_batches(model, args)
        pyquant_checks(model, res, ref_file)
        return res
    # Compiled: eager tokens first (batch 1), to check the compiled model generates the same ones.
    eager = generate(model, prompt_ids(1, args.prompt), args.new_tokens, False)[0, args.prompt:].tolist()
    try:
        res["batches"] = time_batches(model, args, compiled=True)
    except CompileTimeout:
        res["error"] = f"compile + warm-up took over {args.compile_timeout} s (stopped)"
        return res
    got = res["batches"].get("1", {}).get("tokens")
    if got is not None:
        res["compiled_tokens_equal_eager"] = got == eager
        res["compiled_eager_first_mismatch"] = next((i for i, (a, b) in enumerate(zip(got, eager)) if a != b), None)
        # Where they differ, is it a near-tie? The eager model, fed the compiled tokens, scores
        # each of them against its own best: the largest gap, in units of the logits' std.
        seq = torch.cat([prompt_ids(1, args.prompt), torch.tensor([got])], 1)
        with torch.no_grad():
            lg = model(seq).logits[0, args.prompt - 1:-1].float()
        gap = (lg.max(-1).values - lg.gather(-1, seq[0, args.prompt:, None])[:, 0]) / lg.std(-1)
        res["compiled_tokens_max_eager_gap_std"] = gap.max().item()
    pyquant_checks(model, res, ref_file)
    return res


def pyquant_checks(model, res: dict, ref_file: Path) -> None:
    """A pyquant model's logits against the torch reference backend's and bf16's, into ``res``.
    After the timed decoding: the reference reads every layer's codes, whose pages mode lut
    otherwise leaves with the OS (they would count in the decoding RSS)."""
    if "bits_per_weight" not in res:  # not a pyquant column
        return
    res.update(backend_check(model))
    log(f"  logits vs torch reference backend: relative error {res['rel_err_vs_torch_backend']:.2e} "
        f"({res['backends']})")
    if ref_file.is_file():  # how far 2-bit RTN is from bf16 (information, not a check)
        res["rel_err_vs_bf16"] = rel_err(short_logits(model), torch.load(ref_file))


class CompileTimeout(Exception):
    pass


def signal_timeout(seconds: int) -> None:
    """Raise CompileTimeout in this process after ``seconds`` (0: cancel)."""
    import signal

    def stop(*_):
        raise CompileTimeout()

    signal.signal(signal.SIGALRM, stop)
    signal.alarm(seconds)


# ---------------------------------------------------------------- llama.cpp
def build_llama_cpp() -> dict:
    """benchmarks/llama_cpp.sh (a second when cached): KEY=value lines."""
    log("llama.cpp: benchmarks/llama_cpp.sh (builds it the first time, ~8 min on 2 cores)")
    p = subprocess.run(["bash", str(ROOT / "benchmarks" / "llama_cpp.sh")], capture_output=True, text=True)
    if p.returncode != 0:
        raise RuntimeError(f"llama_cpp.sh failed: {p.stderr.strip()[-2000:]}")
    return dict(ln.split("=", 1) for ln in p.stdout.splitlines() if re.match(r"^LLAMA_CPP_[A-Z]+=", ln))


# The converter names a BPE tokenizer's pre-tokenizer by the hash of how it splits a test text;
# a tokenizer trained here matches none of its known ones. The decode does not tokenize, so tell
# it "gpt-2" (byte-level BPE, what this tokenizer is) instead of patching the vendored tree.
CONVERT = """
import runpy, sys
src = sys.argv[1]
sys.path[:0] = [src, src + "/gguf-py"]
import conversion.base as base
base.TextModel.get_vocab_base_pre = lambda self, tokenizer: "gpt-2"
sys.argv = [src + "/convert_hf_to_gguf.py", *sys.argv[2:]]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def make_ggufs(llama: dict, ckpt: Path, logs: Path) -> dict[str, Path]:
    """The checkpoint as GGUF: BF16 (the same bits as the safetensors), then llama-quantize's
    Q4_0 and Q2_K from it. Cached beside the checkpoint."""
    bf16 = ckpt / "model-BF16.gguf"
    if not bf16.is_file():
        log("converting to GGUF BF16 (convert_hf_to_gguf.py)")
        tmp = bf16.with_suffix(".tmp")
        with open(logs / "convert.log", "w") as f:
            rc, _, _, _ = run_child([sys.executable, "-c", CONVERT, llama["LLAMA_CPP_SRC"], "--outtype", "bf16",
                                     "--outfile", str(tmp), str(ckpt)], 3600, stderr=f)
        if rc != 0:
            raise RuntimeError(f"convert_hf_to_gguf.py failed (exit {rc}): {(logs / 'convert.log').read_text()[-1500:]}")
        tmp.rename(bf16)
    out = {"llama_bf16": bf16}
    for col, qtype in GGUF_TYPES.items():
        if qtype == "BF16":
            continue
        path = ckpt / f"model-{qtype}.gguf"
        if not path.is_file():
            log(f"llama-quantize {qtype}")
            tmp = path.with_suffix(".tmp")
            with open(logs / f"quantize-{qtype}.log", "w") as f:
                rc, _, _, _ = run_child([f"{llama['LLAMA_CPP_BIN']}/llama-quantize", str(bf16), str(tmp), qtype,
                                         str(os.cpu_count())], 3600, stderr=f)
            if rc != 0:
                raise RuntimeError(f"llama-quantize {qtype} failed: {(logs / f'quantize-{qtype}.log').read_text()[-1500:]}")
            tmp.rename(path)
        out[col] = path
    return out


def llama_column(args, llama: dict, gguf: Path, logs: Path, col: str) -> dict:
    """Batch 1: llama-bench (tg N from an empty context, its default 5 repetitions, mean).
    Batch > 1: llama-batched-bench, B sequences of P prompt tokens each, then N tokens each,
    decoded together (speed_tg = B * N / decode time)."""
    res: dict = {"column": col, "gguf_mib": gguf.stat().st_size / 2**20, "batches": {}}
    bin_ = Path(llama["LLAMA_CPP_BIN"])
    peak = 0.0
    with open(logs / f"{col}.log", "w") as f:
        if 1 in args.batches:
            rc, out, rss, _ = run_child([str(bin_ / "llama-bench"), "-m", str(gguf), "-p", "0", "-n", str(args.new_tokens),
                                         "-t", str(args.threads), "-o", "json"], 1800, stderr=f)
            peak = max(peak, rss)
            if rc == 0:
                r = json.loads(out)[0]
                res["batches"]["1"] = {"tok_s": r["avg_ts"], "stddev_tok_s": r["stddev_ts"], "peak_rss_mb": rss,
                                       "tool": "llama-bench"}
                res.update(bits_per_weight=8 * r["model_size"] / r["model_n_params"], build_commit=r.get("build_commit"),
                           model_type=r.get("model_type"))
            else:
                res["batches"]["1"] = {"error": f"llama-bench exit {rc}, see {logs / (col + '.log')}"}
        many = [b for b in args.batches if b > 1]
        if many and not (bin_ / "llama-batched-bench").is_file():
            for b in many:
                res["batches"][str(b)] = {"error": "llama-batched-bench is not in this llama.cpp tree"}
        elif many:
            ctx = max(many) * (args.prompt + args.new_tokens) + 64
            # batch 1 again, from batched-bench: the same tool's number for comparing B to 1
            npl = sorted({1, *many})
            rc, out, rss, _ = run_child([str(bin_ / "llama-batched-bench"), "-m", str(gguf), "-c", str(ctx), "-b", "512",
                                         "-ub", "512", "-npp", str(args.prompt), "-ntg", str(args.new_tokens),
                                         "-npl", ",".join(map(str, npl)), "-t", str(args.threads), "-tb", str(args.threads),
                                         "--output-format", "jsonl"], 1800, stderr=subprocess.STDOUT)
            f.write(out)
            peak = max(peak, rss)
            rows = [json.loads(ln) for ln in out.splitlines() if ln.startswith("{") and "speed_tg" in ln]
            by_pl = {r["pl"]: r for r in rows}
            for b in many:
                if b in by_pl:
                    res["batches"][str(b)] = {"tok_s": by_pl[b]["speed_tg"], "peak_rss_mb": rss, "tool": "llama-batched-bench"}
                else:
                    res["batches"][str(b)] = {"error": f"llama-batched-bench exit {rc}, no row for {b}, see {logs / (col + '.log')}"}
            if 1 in by_pl:
                res["batched_bench_b1_tok_s"] = by_pl[1]["speed_tg"]
    res["peak_rss_mb"] = peak
    return res


# ---------------------------------------------------------------- report
def machine() -> dict:
    try:
        lscpu = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
        cpu = re.search(r"Model name:\s*(.+)", lscpu).group(1).strip()
    except (OSError, AttributeError):
        cpu = platform.processor()
    import transformers

    return {"cpu": cpu, "logical_cpus": os.cpu_count(), "torch": torch.__version__,
            "transformers": transformers.__version__, "python": platform.python_version(),
            "date": datetime.datetime.now().isoformat(timespec="seconds")}


def markdown(meta: dict, results: dict, args) -> str:
    def tok(col, b):
        return results.get(col, {}).get("batches", {}).get(str(b), {}).get("tok_s")

    lines = [f"# CPU decode, Llama-2-7B-shaped, {args.layers} of 32 layers ({meta['date']})", "",
             f"- CPU: {meta['cpu']}, {meta['logical_cpus']} logical CPUs; {args.threads} threads everywhere "
             f"(torch.set_num_threads, llama.cpp -t)",
             f"- torch {meta['torch']}, transformers {meta['transformers']}; llama.cpp: {meta.get('llama_cpp', 'n/a')}",
             f"- greedy, prompt {args.prompt} random tokens, {args.new_tokens} new tokens; decode tok/s = batch x "
             f"(N-1) / time first->last new token (llama-bench: -p 0 -n {args.new_tokens}, mean of 5); "
             f"'at median step': batch / median step time (less sensitive to other work)",
             f"- command: `{meta['command']}`; wall time {meta.get('wall_s', 0) / 60:.1f} min", "",
             "| column | batch | tok/s | x llama.cpp Q2_K | x bf16 | x int4 | tok/s at median step | peak RSS MiB | "
             "RSS decoding MiB | notes |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for col, label in COLUMNS.items():
        r = results.get(col)
        if r is None:
            continue
        for b in args.batches:
            row = r.get("batches", {}).get(str(b), {})
            t = row.get("tok_s")
            notes = []
            if "error" in row or ("error" in r and t is None):
                notes.append(row.get("error") or r["error"])
            if b == args.batches[0]:
                if "bits_per_weight" in r:
                    notes.append(f"{r['bits_per_weight']:.2f} bits/weight")
                if "rel_err_vs_torch_backend" in r:
                    notes.append(f"logits vs torch backend {r['rel_err_vs_torch_backend']:.1e}")
                if "rel_err_kernel_vs_dequantized" in r:
                    notes.append(f"int4 kernel vs dequantized weight {r['rel_err_kernel_vs_dequantized']:.1e}")
                if "rel_err_vs_bf16" in r:
                    notes.append(f"logits vs bf16 {r['rel_err_vs_bf16']:.2f}")
                if "compiled_tokens_equal_eager" in r:
                    notes.append(f"compiled tokens == eager: {r['compiled_tokens_equal_eager']}" + (
                        f" (eager logit gap of compiled's tokens <= {r['compiled_tokens_max_eager_gap_std']:.3f} std)"
                        if not r["compiled_tokens_equal_eager"] else ""))
            if row.get("warmup_s") and col.endswith("_compiled"):
                notes.append(f"compile + warm-up {row['warmup_s']:.0f} s")
            q2, bf, i4 = tok("llama_q2_k", b), tok("bf16", b), tok("int4", b)
            rss = row.get("peak_rss_mb", r.get("peak_rss_mb"))
            lines.append("| " + " | ".join([
                label, str(b), f"{t:.2f}" if t else "n/a",
                f"{t / q2:.2f}x" if t and q2 else "-", f"{t / bf:.2f}x" if t and bf else "-",
                f"{t / i4:.2f}x" if t and i4 else "-",
                f"{1e3 * b / row['step_ms_median']:.2f}" if row.get("step_ms_median") else "-",
                f"{rss:.0f}" if rss else "-", f"{row['decode_rss_mb']:.0f}" if "decode_rss_mb" in row else "-",
                "; ".join(notes)]) + " |")
    lines += ["", "Peak RSS: the column's whole process (wait4 ru_maxrss: loading, quantizing, llama.cpp's mmapped "
              "model); RSS decoding: its VmHWM over the timed generate (Python columns). Logits vs bf16: the "
              "relative error of the short input's logits against the bf16 model's, for information (on random "
              "weights the error grows layer after layer; 2-bit RTN's own weight error is about 0.36)."]
    if meta.get("pyquant_quantize"):
        q = meta["pyquant_quantize"]
        lines.append(f"pyquant RTN 2-bit of every linear layer (lm_head included) took {q['quantize_s']:.0f} s "
                     f"({q['bits_per_weight']:.3f} bits/weight), once; the columns load its checkpoint.")
    for k, v in meta.get("errors", {}).items():
        lines.append(f"- {k}: {v}")
    lines.append("CPUs kept busy by other work while each column ran (/proc/stat less the column's own CPU time): "
                 + ", ".join(f"{c} {r['others_cpu']:.2f}" for c, r in results.items() if r.get("others_cpu") is not None))
    if any((r.get("others_cpu") or 0) > max(0.25, meta["logical_cpus"] - args.threads) for r in results.values()):
        # threads that share a core with another process wait at every parallel region's barrier:
        # short kernels (2-bit, int4, llama.cpp's) lose far more than long bf16 GEMVs
        lines.append("**Warning: other work was running on the CPUs this run uses: the numbers are "
                     "disturbed, the quantized columns the most.**")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description="CPU decode tokens/s, Llama-2-7B shapes: bf16, int4, llama.cpp, pyquant")
    p.add_argument("--layers", type=int, default=8, help="decoder layers (Llama-2-7B has 32)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--batches", type=int, nargs="+", default=[1, 4])
    p.add_argument("--prompt", type=int, default=16, help="prompt tokens per sequence")
    p.add_argument("--new-tokens", type=int, default=64, help="tokens generated per sequence")
    p.add_argument("--columns", nargs="+", default=list(COLUMNS), choices=list(COLUMNS))
    p.add_argument("--compile-timeout", type=int, default=600, help="seconds for compile + warm-up of a batch")
    p.add_argument("--prepare-only", action="store_true",
                   help="build the cached checkpoint, GGUFs, pyquant checkpoint and llama.cpp, time nothing")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    p.add_argument("--name", default="decode_cpu", help="the result files' name (NAME.json, NAME.md)")
    p.add_argument("--column", help=argparse.SUPPRESS)  # internal: run one column in this process
    args = p.parse_args(argv)

    if args.column:
        fn = {"checkpoint": col_checkpoint, "pyquant_ckpt": col_pyquant_ckpt}.get(args.column, col_python)
        try:
            res = fn(args)
        except Exception as e:  # noqa: BLE001 - reported in the table, the other columns go on
            import traceback

            traceback.print_exc()
            res = {"error": f"{type(e).__name__}: {e}"[:600]}
        print("RESULT " + json.dumps(res), flush=True)
        return 0 if "error" not in res else 1

    t0 = time.time()
    os.environ.update(OMP_NUM_THREADS=str(args.threads), MKL_NUM_THREADS=str(args.threads))
    meta = machine()
    meta.update(command="python benchmarks/decode_cpu.py " + " ".join(argv if argv is not None else sys.argv[1:]),
                layers=args.layers, threads=args.threads, prompt=args.prompt, new_tokens=args.new_tokens, errors={})
    ckpt = ckpt_dir(args.layers)
    logs = ckpt.parent / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    if not (ckpt / "config.json").is_file():
        log(f"writing the random bf16 checkpoint to {ckpt}")
        r = python_child(args, "checkpoint", 3600)
        if "error" in r:
            raise SystemExit(f"decode_cpu: could not write the checkpoint: {r['error']}")

    llama_cols = [c for c in args.columns if c in GGUF_TYPES]
    ggufs = {}
    if llama_cols:
        try:
            llama = build_llama_cpp()
            meta["llama_cpp"] = llama.get("LLAMA_CPP_VERSION", "?")
            ggufs = make_ggufs(llama, ckpt, logs)
        except Exception as e:  # noqa: BLE001 - the llama.cpp columns are n/a, said why
            meta["errors"]["llama.cpp"] = str(e)[:1500]
            log(f"llama.cpp columns n/a: {e}")

    if any(c.startswith("pyquant") for c in args.columns):
        qinfo = ckpt / "pyquant-rtn2" / "decode_cpu_quantize.json"
        if not qinfo.is_file():
            log("quantizing with pyquant RTN 2-bit, once (minutes per layer on 2 cores)")
            r = python_child(args, "pyquant_ckpt", 4 * 3600)
            if "error" in r:
                meta["errors"]["pyquant quantize"] = r["error"]
        if qinfo.is_file():
            meta["pyquant_quantize"] = json.loads(qinfo.read_text())

    if args.prepare_only:
        log(f"prepared in {(time.time() - t0) / 60:.1f} min: {ckpt}; {meta['errors'] or 'no errors'}")
        return 0 if not meta["errors"] else 1
    results = {}
    for col in args.columns:
        log(f"column {col}: {COLUMNS[col]}")
        mark = tuple(OTHERS)
        if col in GGUF_TYPES:
            if col not in ggufs:
                results[col] = {"error": meta["errors"].get("llama.cpp", "no GGUF"), "batches": {}}
            else:
                results[col] = llama_column(args, llama, ggufs[col], logs, col)
                for b, row in results[col]["batches"].items():
                    log(f"  batch {b}: {row.get('tok_s', float('nan')):.2f} tok/s {row.get('error', '')}")
        else:
            results[col] = python_child(args, col, 3 * 3600)
        results[col]["others_cpu"] = others_since(mark) if OTHERS[1] > mark[1] else None
        if "error" in results[col]:
            log(f"  error: {results[col]['error']}")
    meta["wall_s"] = time.time() - t0

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{args.name}.json").write_text(json.dumps({"meta": meta, "results": results}, indent=1))
    md = markdown(meta, results, args)
    (out / f"{args.name}.md").write_text(md)
    print(md)
    log(f"wrote {out / args.name}.json and .md in {meta['wall_s'] / 60:.1f} min")
    return 0


if __name__ == "__main__":
    sys.exit(main())
