"""Offline throughput: pagedformers vs HF `generate` (static batch) and transformers' `generate_batch`,
measured in the same run on the same random-weight model, plus the machine's physical floors.

    python benchmarks/throughput.py                       # ~100M Llama, 32 x 128 -> 128, bf16
    python benchmarks/throughput.py --workload mixed      # seeded mixed prompt/output lengths
    python benchmarks/throughput.py --hidden 1024 --layers 12 --heads 16 --kv-heads 4 --intermediate 2816
"""

from __future__ import annotations

import argparse
import random
import tempfile
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, GenerationConfig

from pagedformers import LLM, SamplingParams
from pagedformers.tools.tiny_models import save_tiny_model


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--hidden", type=int, default=768)
    p.add_argument("--layers", type=int, default=12)
    p.add_argument("--heads", type=int, default=12)
    p.add_argument("--kv-heads", type=int, default=4)
    p.add_argument("--intermediate", type=int, default=2048)
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    p.add_argument("--num-requests", type=int, default=32)
    p.add_argument("--prompt-len", type=int, default=128)
    p.add_argument("--output-len", type=int, default=128)
    p.add_argument("--workload", default="fixed", choices=["fixed", "mixed"])
    p.add_argument("--peers", default="hf,cb", help="comma list of peers: hf (generate), cb (generate_batch)")
    return p.parse_args()


def build_model(args: argparse.Namespace, path: Path) -> int:
    save_tiny_model(path, "llama", hidden_size=args.hidden, num_hidden_layers=args.layers,
                    num_attention_heads=args.heads, num_key_value_heads=args.kv_heads,
                    intermediate_size=args.intermediate, vocab_size=args.vocab, max_position_embeddings=4096,
                    initializer_range=0.02, dtype=args.dtype)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=getattr(torch, args.dtype))
    return sum(p.numel() for p in model.parameters())


def workload(args: argparse.Namespace, vocab: int) -> list[tuple[list[int], int]]:
    rng = random.Random(0)
    reqs = []
    for _ in range(args.num_requests):
        if args.workload == "fixed":
            n_in, n_out = args.prompt_len, args.output_len
        else:  # long-tailed, like real traffic: many short, some long
            n_in = min(int(rng.lognormvariate(4.0, 0.8)) + 4, 1024)
            n_out = min(int(rng.lognormvariate(4.0, 0.7)) + 4, 512)
        reqs.append(([rng.randrange(4, vocab) for _ in range(n_in)], n_out))
    return reqs


def run_pagedformers(path: Path, args, reqs) -> dict:
    start = time.perf_counter()
    llm = LLM(model=str(path), dtype=args.dtype, max_model_len=4096, max_num_seqs=256)
    startup = time.perf_counter() - start
    prompts = [{"prompt_token_ids": ids} for ids, _ in reqs]
    params = [SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True) for _, n in reqs]
    llm.generate(prompts[:2], params[:2], use_tqdm=False)  # warm-up
    start = time.perf_counter()
    outs = llm.generate(prompts, params, use_tqdm=False)
    elapsed = time.perf_counter() - start
    generated = sum(len(o.outputs[0].token_ids) for o in outs)
    return {"startup_s": startup, "elapsed_s": elapsed, "generated": generated}


def run_hf_generate(path: Path, args, reqs) -> dict:
    """Static batching: one padded batch per request group, left padding, eos ignored."""
    start = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(path, dtype=getattr(torch, args.dtype), attn_implementation="sdpa")
    startup = time.perf_counter() - start
    model.generation_config.eos_token_id = None
    start = time.perf_counter()
    generated = 0
    batch = args.num_requests
    with torch.inference_mode():
        for i in range(0, len(reqs), batch):
            group = reqs[i:i + batch]
            width = max(len(ids) for ids, _ in group)
            ids = torch.tensor([[0] * (width - len(x)) + x for x, _ in group])
            mask = torch.tensor([[0] * (width - len(x)) + [1] * len(x) for x, _ in group])
            n_out = max(n for _, n in group)  # a static batch runs until its longest member is done
            model.generate(ids, attention_mask=mask, max_new_tokens=n_out, do_sample=False, pad_token_id=0)
            generated += sum(n for _, n in group)  # tokens the requests asked for (the rest is waste)
    return {"startup_s": startup, "elapsed_s": time.perf_counter() - start, "generated": generated}


def run_generate_batch(path: Path, args, reqs) -> dict:
    start = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(path, dtype=getattr(torch, args.dtype), attn_implementation="sdpa")
    startup = time.perf_counter() - start
    max_new = max(n for _, n in reqs)
    config = GenerationConfig(max_new_tokens=max_new, do_sample=False, eos_token_id=None, pad_token_id=0)
    start = time.perf_counter()
    outs = model.generate_batch(inputs=[ids for ids, _ in reqs], generation_config=config, progress_bar=False)
    elapsed = time.perf_counter() - start
    generated = sum(len(o.generated_tokens) for o in outs.values())
    return {"startup_s": startup, "elapsed_s": elapsed, "generated": generated}


def memory_bandwidth() -> float:
    """Bytes/s of a large copy (read + write)."""
    src = torch.empty(256 << 20, dtype=torch.uint8).fill_(1)
    dst = torch.empty_like(src)
    best = float("inf")
    for _ in range(5):
        start = time.perf_counter()
        dst.copy_(src)
        best = min(best, time.perf_counter() - start)
    return 2 * src.numel() / best


def matmul_rate(dtype: torch.dtype) -> float:
    a, b = torch.randn(2048, 2048, dtype=dtype), torch.randn(2048, 2048, dtype=dtype)
    a @ b
    start = time.perf_counter()
    for _ in range(5):
        a @ b
    return 5 * 2 * 2048 ** 3 / (time.perf_counter() - start)


def main() -> None:
    args = parse_args()
    torch.set_num_threads(torch.get_num_threads())
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "model"
        num_params = build_model(args, path)
        reqs = workload(args, args.vocab)
        dtype = getattr(torch, args.dtype)
        print(f"model: {num_params / 1e6:.0f}M params, {args.dtype}; workload: {args.workload}, "
              f"{len(reqs)} requests, {sum(len(i) for i, _ in reqs)} prompt / {sum(n for _, n in reqs)} output tokens; "
              f"{torch.get_num_threads()} threads")
        results = {"pagedformers": run_pagedformers(path, args, reqs)}
        peers = {"hf": ("HF generate (static batch)", run_hf_generate),
                 "cb": ("transformers generate_batch", run_generate_batch)}
        for key in filter(None, args.peers.split(",")):
            name, fn = peers[key]
            try:
                results[name] = fn(path, args, reqs)
            except Exception as e:  # a peer that breaks must not hide the others' numbers
                print(f"{name}: failed: {type(e).__name__}: {e}")
        ours = results["pagedformers"]["generated"] / results["pagedformers"]["elapsed_s"]
        print(f"\n{'engine':32} {'gen tok/s':>10} {'total tok/s':>12} {'start-up s':>11} {'ours / it':>10}")
        prompt_tokens = sum(len(i) for i, _ in reqs)
        for name, r in results.items():
            tps = r["generated"] / r["elapsed_s"]
            total = (r["generated"] + prompt_tokens) / r["elapsed_s"]
            print(f"{name:32} {tps:10.1f} {total:12.1f} {r['startup_s']:11.1f} {ours / tps:10.2f}x")
        weight_bytes = num_params * dtype.itemsize
        bw, rate = memory_bandwidth(), matmul_rate(dtype)
        print(f"\nfloors: batch-1 decode step >= {weight_bytes / bw * 1e3:.1f} ms "
              f"({weight_bytes / 1e6:.0f} MB weights / {bw / 1e9:.1f} GB/s measured copy bandwidth) "
              f"= {bw / weight_bytes:.0f} tok/s at batch 1; "
              f"compute: {rate / 1e9:.0f} GFLOP/s {args.dtype} matmul -> <= "
              f"{rate / (2 * num_params):.0f} tok/s at large batch")


if __name__ == "__main__":
    main()
