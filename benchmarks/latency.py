"""Batch-1 decode step time against the memory-bandwidth floor (every weight read once per step),
and against HF generate on the same model in the same run.

    python benchmarks/latency.py                     # ~200M Llama, bf16
    python benchmarks/latency.py --hidden 768 --intermediate 2048 --heads 12   # ~125M
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch
from common import (
    add_model_args,
    decode_step_ms,
    linear_implementations,
    memory_bandwidth,
    save_llama,
    weights_read_per_step,
)
from transformers import AutoModelForCausalLM

from pagedformers import LLM


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_args(p)
    p.add_argument("--prompt-len", type=int, default=32)
    p.add_argument("--steps", type=int, default=64)
    p.add_argument("--repeat", type=int, default=5, help="our runs (each --steps decode steps), fastest kept")
    p.add_argument("--model-impl", default="auto", choices=["auto", "native", "transformers"])
    return p.parse_args()


def ours_steps_and_bandwidths(path: Path, args: argparse.Namespace, prompt: list[int]) -> list[tuple[float, float]]:
    """Per run of ours: (its decode step in ms, the read bandwidth in bytes/s around it: the higher of the
    measurements just before and just after), `--repeat` runs, so that this VM's drift over minutes reaches
    both alike."""
    llm = LLM(model=str(path), dtype=args.dtype, max_model_len=2048, enable_prefix_caching=False,
              kv_cache_memory_bytes=1 << 28, model_impl=args.model_impl)
    print(f"pagedformers linears: {linear_implementations(llm)}", flush=True)
    decode_step_ms(llm, prompt, args.steps)  # warm-up; traces the decode graph
    runs, before = [], memory_bandwidth()
    for _ in range(args.repeat):
        step = decode_step_ms(llm, prompt, args.steps)
        after = memory_bandwidth()
        runs.append((step, max(before, after)))
        before = after
    return runs


def hf_step_ms(path: Path, args: argparse.Namespace, prompt: list[int]) -> float:
    model = AutoModelForCausalLM.from_pretrained(path, dtype=getattr(torch, args.dtype))
    model.generation_config.eos_token_id = None
    ids = torch.tensor([prompt])
    with torch.inference_mode():
        model.generate(ids, max_new_tokens=2, do_sample=False, pad_token_id=0)
        start = time.perf_counter()
        model.generate(ids, max_new_tokens=1, do_sample=False, pad_token_id=0)
        prefill = time.perf_counter() - start
        start = time.perf_counter()
        model.generate(ids, max_new_tokens=args.steps + 1, do_sample=False, pad_token_id=0)
    return (time.perf_counter() - start - prefill) / args.steps * 1e3


def main() -> None:
    args = parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "model"
        save_llama(path, args)
        model = AutoModelForCausalLM.from_pretrained(path, dtype=getattr(torch, args.dtype))
        num_params = sum(p.numel() for p in model.parameters())
        _, weight_bytes = weights_read_per_step(model)
        del model
        prompt = [(13 * i) % (args.vocab - 4) + 4 for i in range(args.prompt_len)]
        # This VM's memory bandwidth drifts between runs (27-65 GB/s): it is measured in turn with our runs.
        runs = ours_steps_and_bandwidths(path, args, prompt)
        hf = hf_step_ms(path, args, prompt)
    ours, bandwidth = min(step for step, _ in runs), max(bw for _, bw in runs)
    floor = weight_bytes / bandwidth * 1e3
    paired = [step / (weight_bytes / bw * 1e3) for step, bw in runs]
    print(f"\nmodel {num_params / 1e6:.0f}M params {args.dtype}, batch 1, {args.steps} decode steps")
    print(f"bandwidth floor {floor:.1f} ms/step ({weight_bytes / 1e6:.0f} MB of weights read per step, the input "
          f"embedding excluded, / {bandwidth / 1e9:.1f} GB/s, the highest read bandwidth measured)")
    print(f"pagedformers ({args.model_impl}) {ours:.1f} ms/step = {ours / floor:.2f}x that floor "
          f"(fastest of {args.repeat} runs)")
    print("  run by run     " + ", ".join(f"{step:.1f} ms at {bw / 1e9:.0f} GB/s: {ratio:.2f}x"
                                           for (step, bw), ratio in zip(runs, paired)))
    print(f"  median        {statistics.median(paired):.2f}x the floor of its own minutes (the bandwidth measured "
          f"just before and after each run, the higher)")
    print(f"HF generate     {hf:.1f} ms/step = {hf / floor:.2f}x the floor; ours is {hf / ours:.2f}x faster")


if __name__ == "__main__":
    main()
