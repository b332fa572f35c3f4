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
from conftest import ENGINE, PROMPTS, pyquant_greedy

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


@pytest.mark.parametrize("name, eager", [("llama-rtn", False), ("qwen2-unisvq", True)])
def test_greedy_tokens_match_pyquants_generate(checkpoints, name, eager):
    """Llama with vLLM's torch.compile (the pyquant ops inside its graph), Qwen2 (q/k/v biases,
    UniSVQ) eager; both fp32."""
    path = checkpoints[name]
    want = pyquant_greedy(path, PROMPTS, NEW_TOKENS)
    llm = vllm.LLM(model=str(path), enforce_eager=eager, **ENGINE)
    layer = llm.llm_engine.model_executor.driver_worker.worker.model_runner.model.model.layers[0]
    assert type(layer.self_attn.qkv_proj.quant_method).__name__ == "PyquantLinearMethod"
    assert len(layer.self_attn.qkv_proj.pyquant_layers) == 3 and len(layer.mlp.gate_up_proj.pyquant_layers) == 2
    got = greedy(llm, PROMPTS, NEW_TOKENS)
    close(llm)
    assert got == want


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
    assert got.shape == want.shape and cos.min() >= 0.9999, cos.min()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_openai_server_answers_a_completion(checkpoints):
    """``vllm serve DIR`` on 127.0.0.1, started and stopped here: its greedy completion is the
    text of pyquant's own greedy tokens."""
    from transformers import AutoTokenizer

    path = checkpoints["llama-rtn"]
    tok = AutoTokenizer.from_pretrained(path)
    want = tok.decode(pyquant_greedy(path, PROMPTS[:1], 8)[0])
    port = free_port()
    cmd = [os.path.join(os.path.dirname(sys.executable), "vllm"), "serve", str(path), "--host", "127.0.0.1",
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


def test_an_unknown_format_version_fails_at_load(checkpoints, tmp_path):
    path = tmp_path / "future"
    shutil.copytree(checkpoints["llama-rtn"], path)
    cfg = json.loads((path / "config.json").read_text())
    cfg["quantization_config"]["format_version"] = 99
    (path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(Exception, match="format_version 99; the installed pyquant reads versions"):
        vllm.LLM(model=str(path), enforce_eager=True, **ENGINE)


def test_a_quantized_head_is_refused_with_a_clear_message(checkpoints, tmp_path):
    path = tmp_path / "head"
    shutil.copytree(checkpoints["llama-rtn"], path)
    cfg = json.loads((path / "config.json").read_text())
    layers = cfg["quantization_config"]["layers"]
    layers["lm_head"] = layers["model.layers.0.mlp.down_proj"]  # the entry alone is enough to be refused
    (path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(Exception, match="lm_head: this pyquant checkpoint quantizes the output head"):
        vllm.LLM(model=str(path), enforce_eager=True, **ENGINE)
