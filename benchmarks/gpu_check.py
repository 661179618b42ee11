"""The GPU path, checked and timed on a machine with a CUDA GPU: one script to run there.

    python benchmarks/gpu_check.py                                  # parity, throughput, batch-1 step
    python benchmarks/gpu_check.py --peer-python /path/to/vllm-venv/bin/python   # + vLLM on the same GPU

1. Parity: tiny random models (Llama, Qwen2, Gemma 2: sliding + soft-capping, gpt-oss: sinks) on the GPU in
   float32 against HF on the CPU (tokens equal, logprobs within 1e-3); in bf16 the share of tokens equal to HF's
   bf16 generate on the GPU (near-ties of random weights split some). Then a LoRA adapter and a JSON-schema
   constraint on the GPU in float32: the adapter's tokens against HF + PEFT on the CPU.
2. Throughput on the random 200M Llama in bf16: 32 x 128 -> 128 (fixed) and seeded mixed lengths, against HF
   `generate` (static batch) and, with --peer-python, vLLM in its own virtualenv.
3. Batch-1 decode step against the HBM floor (the weights' bytes over the measured read bandwidth), eager and
   on CUDA graphs.
4. Sampling: the sampler on the GPU (platforms/cuda/sampling.py) against its host path (the logits copied over)
   on the same logits and seeds, 64 rows of a 152K vocabulary: tokens equal (but for rounding-level near-ties at a
   row's top-p boundary or draw), and each path's time a step.

On a machine without a CUDA GPU it exits at once, saying so. CI never runs it: the kernels are checked there
in Triton's interpreter (tests/attention/test_triton.py, tests/platforms/cuda/).
"""

from __future__ import annotations

import argparse
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from common import add_model_args, save_llama, weights_read_per_step
from transformers import AutoModelForCausalLM

from pagedformers import LLM, SamplingParams
from pagedformers.tools.family_check import (
    compare,
    hf_greedy_logprobs,
    pagedformers_greedy,
    prompt_token_ids,
    save_tiny_family,
)

FAMILIES = ["llama", "qwen2", "gemma2", "gpt_oss"]
_VLLM_CHILD = """
import sys, time, json
from vllm import LLM, SamplingParams
job = json.loads(sys.argv[1])
llm = LLM(model=job["model"], dtype="bfloat16", max_model_len=4096, enable_prefix_caching=False)
params = [SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True) for n in job["max_tokens"]]
prompts = [{"prompt_token_ids": p} for p in job["prompts"]]
llm.generate(prompts[:2], params[:2])
start = time.perf_counter()
llm.generate(prompts, params)
print(json.dumps({"elapsed_s": time.perf_counter() - start}))
"""


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_args(p)
    p.add_argument("--peer-python", help="python of a virtualenv with a CUDA build of vLLM")
    p.add_argument("--steps", type=int, default=64, help="decode steps of the batch-1 measurement")
    return p.parse_args()


def parity(tmp: Path) -> None:
    prompts = prompt_token_ids()
    for family in FAMILIES:
        path = save_tiny_family(family, tmp / family)
        worst, mismatch = compare(pagedformers_greedy(path, prompts, device="cuda"), hf_greedy_logprobs(path, prompts))
        ours = LLM(path, device="cuda", dtype="bfloat16", kv_cache_memory_bytes=1 << 26)
        got = [o.outputs[0].token_ids for o in ours.generate(
            [{"prompt_token_ids": p} for p in prompts], SamplingParams(temperature=0.0, max_tokens=16, ignore_eos=True),
            use_tqdm=False)]
        hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16).cuda()
        hf.generation_config.eos_token_id = None
        equal = total = 0
        for ids, tokens in zip(prompts, got):
            x = torch.tensor([ids], device="cuda")
            ref = hf.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=16, do_sample=False,
                              pad_token_id=0)[0, len(ids):].tolist()
            equal += next((i for i, (a, b) in enumerate(zip(tokens, ref)) if a != b), len(ref))
            total += len(ref)
        verdict = "pass" if mismatch is None and worst < 1e-3 else f"FAIL ({mismatch or f'logprobs {worst:.1e}'})"
        print(f"parity {family:8} float32: {verdict}, max logprob diff {worst:.1e}; bf16: {equal}/{total} leading "
              "tokens equal to HF's", flush=True)
        del ours, hf


def lora_and_structured(tmp: Path, device: str = "cuda") -> None:
    sys.path.insert(0, str(Path(__file__).parents[1] / "tests"))
    from pagedformers import LoRARequest, StructuredOutputsParams
    from pagedformers.tools.tiny_models import save_tiny_model
    from support.lora import ATTENTION, PROMPTS, hf_tokens, save_adapter

    base = str(save_tiny_model(tmp / "lora_base", "llama"))
    adapter = save_adapter(base, tmp / "adapter", 8, ATTENTION, 1)
    llm = LLM(base, device=device, dtype="float32", enable_lora=True, max_lora_rank=8, kv_cache_memory_bytes=1 << 26)
    greedy = SamplingParams(temperature=0.0, max_tokens=16, ignore_eos=True)
    ours = [o.outputs[0].token_ids for o in llm.generate(PROMPTS, greedy, use_tqdm=False,
                                                          lora_request=LoRARequest("a", 1, adapter))]
    print(f"LoRA float32: {'pass' if ours == hf_tokens(base, adapter) else 'FAIL'} (tokens against HF + PEFT)")
    schema = {"type": "object", "properties": {"n": {"type": "integer", "minimum": 0, "maximum": 9}},
              "required": ["n"]}
    constraint = StructuredOutputsParams(json=schema, disable_any_whitespace=True)
    out = llm.generate(["Hello"], SamplingParams(temperature=1.0, max_tokens=64, structured_outputs=constraint),
                       use_tqdm=False)[0].outputs[0]
    print(f"structured outputs: {out.finish_reason} {out.text!r}", flush=True)


def workload(kind: str, vocab: int) -> list[tuple[list[int], int]]:
    rng = random.Random(0)
    if kind == "fixed":
        return [([rng.randrange(4, vocab) for _ in range(128)], 128) for _ in range(32)]
    return [([rng.randrange(4, vocab) for _ in range(rng.randint(16, 512))], rng.randint(16, 256)) for _ in range(64)]


def throughput(path: Path, args: argparse.Namespace) -> None:
    llm = LLM(str(path), device="cuda", dtype=args.dtype, max_model_len=4096, enable_prefix_caching=False)
    hf = AutoModelForCausalLM.from_pretrained(path, dtype=getattr(torch, args.dtype)).cuda()
    hf.generation_config.eos_token_id = None
    for kind in ("fixed", "mixed"):
        reqs = workload(kind, args.vocab)
        generated = sum(n for _, n in reqs)
        prompts = [{"prompt_token_ids": ids} for ids, _ in reqs]
        params = [SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True) for _, n in reqs]
        llm.generate(prompts[:2], params[:2], use_tqdm=False)
        ours = _timed(llm.generate, prompts, params, use_tqdm=False)
        theirs = _timed(_hf_static_batches, hf, reqs)
        line = (f"throughput {kind}: pagedformers {generated / ours:.0f} gen tok/s, HF generate "
                f"{generated / theirs:.0f} ({theirs / ours:.2f}x)")
        if args.peer_python:
            vllm = _vllm_seconds(args.peer_python, path, reqs)
            line += f", vLLM {generated / vllm:.0f} ({vllm / ours:.2f}x)"
        print(line, flush=True)


def _hf_static_batches(model: torch.nn.Module, reqs: list[tuple[list[int], int]], batch: int = 32) -> None:
    with torch.inference_mode():
        for i in range(0, len(reqs), batch):
            group = reqs[i:i + batch]
            width = max(len(ids) for ids, _ in group)
            ids = torch.tensor([[0] * (width - len(x)) + x for x, _ in group], device="cuda")
            mask = torch.tensor([[0] * (width - len(x)) + [1] * len(x) for x, _ in group], device="cuda")
            model.generate(ids, attention_mask=mask, max_new_tokens=max(n for _, n in group), do_sample=False,
                           pad_token_id=0)


def _vllm_seconds(python: str, path: Path, reqs: list[tuple[list[int], int]]) -> float:
    import json

    job = json.dumps({"model": str(path), "prompts": [ids for ids, _ in reqs], "max_tokens": [n for _, n in reqs]})
    done = subprocess.run([python, "-c", _VLLM_CHILD, job], capture_output=True, text=True, timeout=1800, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])["elapsed_s"]


def batch_one(path: Path, args: argparse.Namespace) -> None:
    model = AutoModelForCausalLM.from_pretrained(path, dtype=getattr(torch, args.dtype))
    _, weight_bytes = weights_read_per_step(model)
    del model
    floor = weight_bytes / hbm_read_bandwidth()
    for eager in (True, False):  # the model's own forward, then CUDA graphs (platforms/cuda/graphs.py)
        llm = LLM(str(path), device="cuda", dtype=args.dtype, max_model_len=2048, enable_prefix_caching=False,
                  enforce_eager=eager)
        prompt = [{"prompt_token_ids": list(range(4, 36))}]
        one = SamplingParams(temperature=0.0, max_tokens=1, ignore_eos=True)
        many = SamplingParams(temperature=0.0, max_tokens=args.steps + 1, ignore_eos=True)
        llm.generate(prompt, many, use_tqdm=False)
        prefill = min(_timed(llm.generate, prompt, one, use_tqdm=False) for _ in range(3))
        step = (min(_timed(llm.generate, prompt, many, use_tqdm=False) for _ in range(3)) - prefill) / args.steps
        print(f"batch 1 ({'eager' if eager else 'CUDA graphs'}): {step * 1e3:.2f} ms a decode step, "
              f"{step / floor:.2f}x the HBM floor ({floor * 1e3:.2f} ms: {weight_bytes / 1e6:.0f} MB of weights)",
              flush=True)
        del llm


def sampling() -> None:
    from pagedformers.engine.request import Request
    from pagedformers.engine.sampler import Sampler
    from pagedformers.platforms import get_platform

    settings = [{"temperature": 0.8, "top_p": 0.95}, {"top_k": 50}, {"temperature": 1.2, "min_p": 0.05}, {},
                {"temperature": 0.0}, {"top_k": 20, "top_p": 0.8, "logprobs": 5}]
    logits = torch.randn(64, 151936, device="cuda", generator=torch.Generator("cuda").manual_seed(0)) * 3
    tokens, seconds = {}, {}
    for name, sampler in (("device", Sampler(0)), ("host", Sampler(0, platform=get_platform("cpu")))):
        sampler(logits, [Request("w", [1], SamplingParams(**s), 16, 0) for s in settings])  # Triton compiles
        reqs = [Request(str(i), [1], SamplingParams(seed=i, **settings[i % len(settings)]), 16, 0) for i in range(64)]
        torch.cuda.synchronize()
        start = time.perf_counter()
        tokens[name] = sampler(logits, reqs).token_ids  # a list: the step's end
        seconds[name] = time.perf_counter() - start
    equal = sum(a == b for a, b in zip(tokens["device"], tokens["host"]))
    print(f"sampling 64 x 152K: {equal}/64 tokens equal to the host path's; device {seconds['device'] * 1e3:.1f} ms, "
          f"host {seconds['host'] * 1e3:.1f} ms a step", flush=True)


def hbm_read_bandwidth() -> float:
    buffer = torch.ones(1 << 28, device="cuda")  # 1 GiB of float32
    best = float("inf")
    for _ in range(5):
        torch.cuda.synchronize()
        start = time.perf_counter()
        buffer.sum()
        torch.cuda.synchronize()
        best = min(best, time.perf_counter() - start)
    return buffer.numel() * buffer.element_size() / best


def _timed(fn, *args, **kwargs) -> float:
    torch.cuda.synchronize()
    start = time.perf_counter()
    fn(*args, **kwargs)
    torch.cuda.synchronize()
    return time.perf_counter() - start


def main() -> None:
    if not torch.cuda.is_available():
        raise SystemExit("gpu_check: no CUDA GPU on this machine (torch.cuda.is_available() is False): nothing to "
                         "check. The kernels are checked on CPU by the test suite, in Triton's interpreter.")
    args = parse_args()
    print(f"GPU: {torch.cuda.get_device_name()}, torch {torch.__version__}", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        parity(Path(tmp))
        lora_and_structured(Path(tmp))
        path = Path(tmp) / "llama"
        save_llama(path, args)
        throughput(path, args)
        batch_one(path, args)
    sampling()


if __name__ == "__main__":
    sys.exit(main())
