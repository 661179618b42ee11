"""The cost of LoRA: a decode step of 32 requests spread over 4 adapters (rank 16, on every linear of the
decoder) against the same 32 requests on the base model, in the same run, on the random ~200M Llama. Also the
base model on an engine without LoRA (decode graphs on), which is what a user who turns LoRA on gives up.

    python benchmarks/lora.py
    python benchmarks/lora.py --adapters 2 --rank 8 --rows 64
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import torch
from common import add_model_args, full_batch_step_ms, save_llama
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM

from pagedformers import LLM, LoRARequest, SamplingParams

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_args(p)
    p.add_argument("--adapters", type=int, default=4)
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--rows", type=int, default=32)
    p.add_argument("--steps", type=int, default=48, help="decode steps a run")
    p.add_argument("--repeat", type=int, default=3, help="runs of each kind, alternating; the fastest kept")
    return p.parse_args()


def save_adapters(base: Path, root: Path, args: argparse.Namespace) -> list[LoRARequest]:
    adapters = []
    for i in range(args.adapters):
        torch.manual_seed(i)
        model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
        config = LoraConfig(r=args.rank, lora_alpha=args.rank, target_modules=TARGETS, init_lora_weights=False)
        get_peft_model(model, config).save_pretrained(str(root / f"adapter{i}"))
        adapters.append(LoRARequest(f"adapter{i}", i + 1, str(root / f"adapter{i}")))
    return adapters


def main() -> None:
    args = parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        base = Path(tmp) / "base"
        save_llama(base, args)
        adapters = save_adapters(base, Path(tmp), args)
        kwargs = dict(dtype=args.dtype, max_num_seqs=args.rows, enable_prefix_caching=False,
                      kv_cache_memory_bytes=1 << 29)
        lora_llm = LLM(str(base), enable_lora=True, max_loras=args.adapters, max_lora_rank=args.rank, **kwargs)
        plain_llm = LLM(str(base), **kwargs)
        prompt = list(range(100, 132))
        params = SamplingParams(temperature=0.0, max_tokens=args.steps, ignore_eos=True)
        lora, plain = lora_llm.llm_engine, plain_llm.llm_engine
        for engine, loras in ((lora, adapters), (plain, None)):  # warm-up: loads adapters, traces decode graphs
            full_batch_step_ms(engine, prompt, params, args.rows, loras)
        runs = {"adapters": [], "base": [], "no_lora": []}
        for _ in range(args.repeat):
            runs["adapters"].append(full_batch_step_ms(lora, prompt, params, args.rows, adapters)[0])
            runs["base"].append(full_batch_step_ms(lora, prompt, params, args.rows)[0])
            runs["no_lora"].append(full_batch_step_ms(plain, prompt, params, args.rows)[0])
    ms = {k: min(v) for k, v in runs.items()}
    print(f"{args.rows} requests over {args.adapters} adapters of rank {args.rank} on {len(TARGETS)} linears a "
          f"layer; {args.dtype}; fastest of {args.repeat} alternating runs")
    print(f"decode step: adapters {ms['adapters']:.2f} ms, base on the LoRA engine {ms['base']:.2f} ms "
          f"({ms['adapters'] / ms['base']:.2f}x, goal <= 1.3x), base without LoRA {ms['no_lora']:.2f} ms "
          f"({ms['adapters'] / ms['no_lora']:.2f}x)")


if __name__ == "__main__":
    main()
