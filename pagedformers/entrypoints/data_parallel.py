"""Data parallel: `data_parallel_size` engine replicas, each a process with its own LLM, behind one LLM.

Each call's requests are split across the replicas by estimated work (longest first, to
the least loaded), run concurrently, and put back in order.
"""

from __future__ import annotations

import dataclasses
import multiprocessing as mp
import os
import traceback
from typing import Any, Callable

import cloudpickle
import torch

from pagedformers.config import EngineArgs
from pagedformers.logger import init_logger

logger = init_logger(__name__)

Item = tuple  # (kind, prompt_token_ids, params, extra), see LLM._run


class DataParallelReplicas:
    def __init__(self, args: EngineArgs, size: int) -> None:
        ctx = mp.get_context("spawn")
        blob = cloudpickle.dumps(dataclasses.replace(args, data_parallel_size=1))
        threads = max(1, (os.cpu_count() or 1) // size)
        self.conns, self.procs = [], []
        for i in range(size):
            parent, child = ctx.Pipe()
            proc = ctx.Process(target=_replica_main, args=(blob, threads, child), name=f"pagedformers-dp{i}",
                               daemon=True)
            proc.start()
            self.conns.append(parent)
            self.procs.append(proc)
        self.num_blocks = min(self._receive(conn) for conn in self.conns)

    def run(self, items: list[Item]) -> list[Any]:
        shares = _balance(items, len(self.conns))
        for conn, share in zip(self.conns, shares):
            conn.send(("run", [items[i] for i in share]))
        results: list[Any] = [None] * len(items)
        for conn, share in zip(self.conns, shares):
            for i, out in zip(share, self._receive(conn)):
                results[i] = out
        return results

    def apply_model(self, fn: Callable) -> list[Any]:
        for conn in self.conns:
            conn.send(("apply", cloudpickle.dumps(fn)))
        return [r for conn in self.conns for r in self._receive(conn)]

    def shutdown(self) -> None:
        for conn, proc in zip(self.conns, self.procs):
            if proc.is_alive():
                conn.send(("shutdown", None))
            proc.join(timeout=10)
            if proc.is_alive():
                proc.kill()

    def _receive(self, conn) -> Any:
        try:
            status, payload = conn.recv()
        except EOFError:
            raise RuntimeError("A data-parallel replica died; see its traceback above.") from None
        if status == "error":
            raise payload
        return payload


def _balance(items: list[Item], n: int) -> list[list[int]]:
    """Longest work first onto the least-loaded replica; each share keeps the callers' order."""
    def work(item: Item) -> int:
        params = item[2]
        return len(item[1]) + (getattr(params, "max_tokens", 0) or 0) * getattr(params, "n", 1)
    loads, shares = [0] * n, [[] for _ in range(n)]
    for i in sorted(range(len(items)), key=lambda i: -work(items[i])):
        r = loads.index(min(loads))
        shares[r].append(i)
        loads[r] += work(items[i])
    return [sorted(s) for s in shares]


def _replica_main(blob: bytes, threads: int, conn) -> None:
    torch.set_num_threads(threads)
    from pagedformers.entrypoints.llm import LLM

    try:
        args = cloudpickle.loads(blob)
        llm = LLM(**{f.name: getattr(args, f.name) for f in dataclasses.fields(args)})
        conn.send(("ok", llm.llm_engine.kv_manager.num_blocks))
    except Exception as e:
        traceback.print_exc()
        conn.send(("error", e))
        return
    while True:
        kind, payload = conn.recv()
        if kind == "shutdown":
            llm.shutdown()
            return
        try:
            result = llm._run(payload, use_tqdm=False) if kind == "run" else llm.apply_model(cloudpickle.loads(payload))
            conn.send(("ok", result))
        except Exception as e:
            conn.send(("error", e))
