"""The server under overload and on SIGTERM: how many requests it serves and how many it turns away (503 with
Retry-After) at 4x its capacity, and how long a SIGTERM takes to drain what is in flight.

    python benchmarks/overload.py [--max-num-seqs 8 --max-waiting-requests 8 --shutdown-timeout 5]

Capacity is max_num_seqs running plus max_waiting_requests queued; past it the server must answer 503 at once
rather than queue without bound. Then, with capacity in flight, SIGTERM: the server stops taking requests,
lets those in flight finish up to --shutdown-timeout, answers the rest with 503, and exits 0.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
from common import add_model_args, free_port, save_llama, wait_ready


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_model_args(p, hidden=256, layers=4, heads=4, kv_heads=2, intermediate=704)
    p.add_argument("--max-num-seqs", type=int, default=8)
    p.add_argument("--max-waiting-requests", type=int, default=8)
    p.add_argument("--shutdown-timeout", type=float, default=5.0)
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--drain-tokens", type=int, default=1024, help="tokens each in-flight request asks for at the "
                   "SIGTERM: more than the shutdown timeout lets finish, so that the rest are cut")
    args = p.parse_args()
    capacity = args.max_num_seqs + args.max_waiting_requests
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "llama"
        save_llama(path, args)
        port = free_port()
        server = _serve(path, port, args)
        try:
            codes, seconds = asyncio.run(_burst(port, 4 * capacity, args.max_tokens))
            print(f"overload: {4 * capacity} concurrent requests at capacity {capacity} "
                  f"(max_num_seqs {args.max_num_seqs} + max_waiting_requests {args.max_waiting_requests}): "
                  f"{dict(sorted(codes.items()))} in {seconds:.1f} s")
            drained = asyncio.run(_drain(server, port, capacity, args.drain_tokens))
            print(drained)
        finally:
            if server.poll() is None:
                server.kill()


def _serve(path: Path, port: int, args: argparse.Namespace) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "pagedformers", "serve", str(path), "--port", str(port),
           "--max-num-seqs", str(args.max_num_seqs), "--max-waiting-requests", str(args.max_waiting_requests),
           "--shutdown-timeout", str(args.shutdown_timeout), "--dtype", args.dtype]
    return wait_ready(subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=dict(os.environ)),
                      port)


async def _complete(client: httpx.AsyncClient, port: int, max_tokens: int) -> str:
    model = (await client.get(f"http://127.0.0.1:{port}/v1/models")).json()["data"][0]["id"]
    try:
        r = await client.post(f"http://127.0.0.1:{port}/v1/completions", json={
            "model": model, "prompt": "Hello, my name is", "max_tokens": max_tokens, "ignore_eos": True})
    except httpx.HTTPError:
        return "no answer"  # the connection closed unanswered
    if r.status_code == 503 and "retry-after" in r.headers:
        return "503 + Retry-After"
    return str(r.status_code)


async def _burst(port: int, n: int, max_tokens: int) -> tuple[collections.Counter, float]:
    async with httpx.AsyncClient(timeout=600, limits=httpx.Limits(max_connections=n)) as client:
        start = time.perf_counter()
        codes = await asyncio.gather(*(_complete(client, port, max_tokens) for _ in range(n)))
        return collections.Counter(codes), time.perf_counter() - start


async def _drain(server: subprocess.Popen, port: int, n: int, max_tokens: int) -> str:
    async with httpx.AsyncClient(timeout=600, limits=httpx.Limits(max_connections=n)) as client:
        tasks = [asyncio.create_task(_complete(client, port, max_tokens)) for _ in range(n)]
        await asyncio.sleep(1.0)  # all of them admitted, the first ones decoding
        start = time.perf_counter()
        server.send_signal(signal.SIGTERM)
        codes = collections.Counter(await asyncio.gather(*tasks))
        exit_code = await asyncio.to_thread(server.wait, 120)
        return (f"SIGTERM with {n} requests in flight ({max_tokens} tokens each): exited {exit_code} after "
                f"{time.perf_counter() - start:.1f} s; answers {dict(sorted(codes.items()))}")


if __name__ == "__main__":
    main()
