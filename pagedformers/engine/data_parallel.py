"""Data parallel: `data_parallel_size` engine replicas, each a process with its own engine, behind one client.

Requests are shaped and checked here, in the driver, by one input processor (its KV-fit check against the
smallest replica's cache); each call's requests are then split across the replicas by estimated work (longest
first, to the least loaded), run concurrently, and put back in order.
"""

from __future__ import annotations

import dataclasses
import multiprocessing as mp
import os
import traceback
import weakref
from collections.abc import Callable
from typing import Any

import cloudpickle
import torch

from pagedformers.config import EngineArgs, EngineConfig
from pagedformers.engine.client import InProcessClient, Output
from pagedformers.engine.input_processor import EngineRequest, InputProcessor
from pagedformers.loading.tokenizer import load_tokenizer
from pagedformers.logger import init_logger

logger = init_logger(__name__)


class DataParallelClient:
    llm_engine = None  # every engine runs in a replica process

    def __init__(self, config: EngineConfig) -> None:
        self.config = config
        size = config.parallel.data_parallel_size
        ctx = mp.get_context("spawn")
        blob = cloudpickle.dumps(dataclasses.replace(config.local_args(), data_parallel_size=1))
        threads = max(1, (os.cpu_count() or 1) // size)
        self.conns, self.procs = [], []
        for i in range(size):
            parent, child = ctx.Pipe()
            proc = ctx.Process(target=_replica_main, args=(blob, threads, child), name=f"pagedformers-dp{i}",
                               daemon=True)
            proc.start()
            self.conns.append(parent)
            self.procs.append(proc)
        self._release = weakref.finalize(self, _stop_replicas, self.conns, self.procs)  # also on garbage collection
        num_blocks = min(self._receive(conn) for conn in self.conns)
        self.processor = InputProcessor(config, load_tokenizer(config), num_blocks)

    def run(self, requests: list[EngineRequest], use_tqdm: bool) -> list[Output]:
        shares = _balance(requests, len(self.conns))
        for conn, share in zip(self.conns, shares):
            conn.send(("run", [requests[i] for i in share]))
        results: list[Any] = [None] * len(requests)
        for conn, share in zip(self.conns, shares):
            for i, out in zip(share, self._receive(conn)):
                results[i] = out
        return results

    def apply_model(self, fn: Callable) -> list[Any]:
        for conn in self.conns:
            conn.send(("apply", cloudpickle.dumps(fn)))
        return [r for conn in self.conns for r in self._receive(conn)]

    def shutdown(self) -> None:
        self._release()  # once

    def _receive(self, conn) -> Any:
        try:
            status, payload = conn.recv()
        except EOFError:
            raise RuntimeError("A data-parallel replica died; see its traceback above.") from None
        if status == "error":
            raise payload
        return payload


def _balance(requests: list[EngineRequest], n: int) -> list[list[int]]:
    """Longest work first onto the least-loaded replica; each share keeps the callers' order."""
    def work(request: EngineRequest) -> int:
        params = request.params
        decode = 0 if request.is_pooling else (params.max_tokens or 0) * params.n
        return len(request.prompt_token_ids) + decode
    loads, shares = [0] * n, [[] for _ in range(n)]
    for i in sorted(range(len(requests)), key=lambda i: -work(requests[i])):
        r = loads.index(min(loads))
        shares[r].append(i)
        loads[r] += work(requests[i])
    return [sorted(s) for s in shares]


def _stop_replicas(conns: list, procs: list[mp.Process]) -> None:
    for conn, proc in zip(conns, procs):
        if proc.is_alive():
            try:
                conn.send(("shutdown", None))
            except OSError:  # its end of the pipe is gone already
                pass
        proc.join(timeout=10)
        if proc.is_alive():
            proc.kill()


def _replica_main(blob: bytes, threads: int, conn) -> None:
    torch.set_num_threads(threads)
    from pagedformers.loading.gguf_once import gguf_parsed_once
    from pagedformers.loading.model_files import create_engine_config

    try:
        args: EngineArgs = cloudpickle.loads(blob)
        with gguf_parsed_once(args.model, args.gguf_file):
            client = InProcessClient(create_engine_config(args))
        conn.send(("ok", client.llm_engine.num_kv_blocks))
    except Exception as e:
        traceback.print_exc()
        conn.send(("error", e))
        return
    while True:
        kind, payload = conn.recv()
        if kind == "shutdown":
            client.shutdown()
            return
        try:
            result = client.run(payload, use_tqdm=False) if kind == "run" else \
                client.apply_model(cloudpickle.loads(payload))
            conn.send(("ok", result))
        except Exception as e:
            conn.send(("error", e))
