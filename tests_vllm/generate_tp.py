"""``python generate_tp.py DIR TP PROMPT...``: greedy tokens of vLLM with tensor parallel size TP
(worker processes, one core each), printed as one JSON line. A script, because vLLM's workers
re-import the main module (it must be guarded by ``__name__ == "__main__"``)."""
import json
import sys

if __name__ == "__main__":
    from vllm import LLM, SamplingParams

    path, tp, prompts = sys.argv[1], int(sys.argv[2]), sys.argv[3:]
    llm = LLM(model=path, dtype="float32", enforce_eager=True, max_model_len=128, gpu_memory_utilization=0.15,
              tensor_parallel_size=tp, distributed_executor_backend="mp", seed=0)
    out = llm.generate(prompts, SamplingParams(max_tokens=16, min_tokens=16, temperature=0.0), use_tqdm=False)
    print("TOKENS " + json.dumps([list(o.outputs[0].token_ids) for o in out]), flush=True)
    llm.llm_engine.engine_core.shutdown()  # stops the worker processes (an os._exit would orphan them)
