"""Tensor / pipeline parallel step time vs one process, on this machine, in one run.

    python benchmarks/parallel.py                  # ~30M Llama, float32, 8 requests x 64 -> 32
    python benchmarks/parallel.py --hidden 768 --layers 12 --dtype bfloat16

On 2 CPU cores expect little or no speed-up: the point is the overhead figure (the
collectives and the per-step broadcast) and that the tokens stay identical.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from common import add_model_args, save_llama

from pagedformers import LLM, SamplingParams


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_args(p, hidden=512, layers=8, heads=8, intermediate=1408, dtype="float32")
    p.add_argument("--num-requests", type=int, default=8)
    p.add_argument("--prompt-len", type=int, default=64)
    p.add_argument("--output-len", type=int, default=32)
    return p.parse_args()


def measure(path: Path, args: argparse.Namespace, **parallel) -> tuple[float, float, list]:
    start = time.perf_counter()
    llm = LLM(model=str(path), dtype=args.dtype, max_model_len=1024, kv_cache_memory_bytes=1 << 28, **parallel)
    startup = time.perf_counter() - start
    prompts = [{"prompt_token_ids": [(7 * i + j) % 30000 + 4 for j in range(args.prompt_len)]}
               for i in range(args.num_requests)]
    decode_only = SamplingParams(temperature=0.0, max_tokens=1, ignore_eos=True)
    full = SamplingParams(temperature=0.0, max_tokens=args.output_len + 1, ignore_eos=True)
    try:
        llm.generate(prompts[:1], decode_only, use_tqdm=False)  # warm-up
        start = time.perf_counter()
        llm.generate(prompts, decode_only, use_tqdm=False)  # prefill only
        prefill = time.perf_counter() - start
        start = time.perf_counter()
        outs = llm.generate(prompts, full, use_tqdm=False)
        step_ms = (time.perf_counter() - start - prefill) / args.output_len * 1e3
    finally:
        llm.shutdown()
    return startup, step_ms, [o.outputs[0].token_ids for o in outs]


def main() -> None:
    args = parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "model"
        save_llama(path, args)
        rows = {"1 process": {}, "TP=2": {"tensor_parallel_size": 2}, "PP=2": {"pipeline_parallel_size": 2}}
        results = {name: measure(path, args, **kw) for name, kw in rows.items()}
    base = results["1 process"][1]
    print(f"\n{args.num_requests} requests, decode step of {args.num_requests} tokens, {args.dtype}")
    print(f"{'setup':12} {'start-up s':>10} {'step ms':>9} {'vs 1 proc':>10} {'same tokens':>12}")
    for name, (startup, step_ms, tokens) in results.items():
        same = tokens == results["1 process"][2]
        print(f"{name:12} {startup:10.1f} {step_ms:9.1f} {base / step_ms:9.2f}x {str(same):>12}")


if __name__ == "__main__":
    main()
