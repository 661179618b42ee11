"""Data parallel: `data_parallel_size` engine replicas, each a process with its own engine (or, with
distributed_executor_backend="ray", a Ray actor placed across the cluster's nodes), behind one client.

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
        blob = cloudpickle.dumps(dataclasses.replace(config.local_args(), data_parallel_size=1))
        threads = max(1, (os.cpu_count() or 1) // size)
        on_ray = config.parallel.distributed_executor_backend == "ray"
        # On CUDA each replica's bundle holds its ranks' GPUs: Ray hides the GPUs from an actor that asks for none.
        gpus = config.parallel.world_size if config.device.type == "cuda" else 0
        self.replicas = _start_ray_replicas(blob, size, config.parallel.distributed_timeout_s, gpus) if on_ray else \
            [_ProcessReplica(blob, threads, f"pagedformers-dp{i}") for i in range(size)]
        self.procs = [r.proc for r in self.replicas if isinstance(r, _ProcessReplica)]
        self._release = weakref.finalize(self, _stop_replicas, self.replicas)  # also on garbage collection
        num_blocks = min(self._receive(r) for r in self.replicas)
        self.processor = InputProcessor(config, load_tokenizer(config), num_blocks)

    def run(self, requests: list[EngineRequest], use_tqdm: bool) -> list[Output]:
        shares = _balance(requests, len(self.replicas))
        for replica, share in zip(self.replicas, shares):
            replica.send("run", [requests[i] for i in share])
        results: list[Any] = [None] * len(requests)
        for replica, share in zip(self.replicas, shares):
            for i, out in zip(share, self._receive(replica)):
                results[i] = out
        return results

    def apply_model(self, fn: Callable) -> list[Any]:
        for replica in self.replicas:
            replica.send("apply", cloudpickle.dumps(fn))
        return [r for replica in self.replicas for r in self._receive(replica)]

    def shutdown(self) -> None:
        self._release()  # once

    def _receive(self, replica: _ProcessReplica | _RayReplica) -> Any:
        status, payload = replica.receive()
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


class ReplicaServer:
    """One replica's engine, in a process of its own or a Ray actor: it answers ("ok", result) or ("error", e)."""

    def __init__(self, blob: bytes, threads: int) -> None:
        torch.set_num_threads(threads)
        from pagedformers.loading.gguf_once import gguf_parsed_once
        from pagedformers.loading.model_files import create_engine_config

        self.client, self.failure = None, None
        try:
            args: EngineArgs = cloudpickle.loads(blob)
            with gguf_parsed_once(args.model, args.gguf_file):
                self.client = InProcessClient(create_engine_config(args))
        except Exception as e:
            traceback.print_exc()
            self.failure = e

    def ready(self) -> tuple[str, Any]:
        return ("error", self.failure) if self.client is None else ("ok", self.client.llm_engine.num_kv_blocks)

    def handle(self, kind: str, payload: Any) -> tuple[str, Any]:
        try:
            if kind == "run":
                return "ok", self.client.run(payload, use_tqdm=False)
            return "ok", self.client.apply_model(cloudpickle.loads(payload))
        except Exception as e:
            return "error", e

    def shutdown(self) -> None:
        if self.client is not None:
            self.client.shutdown()


class _ProcessReplica:
    def __init__(self, blob: bytes, threads: int, name: str) -> None:
        self.conn, child = mp.get_context("spawn").Pipe()
        self.proc = mp.get_context("spawn").Process(target=_replica_main, args=(blob, threads, child), name=name,
                                                    daemon=True)
        self.proc.start()

    def send(self, kind: str, payload: Any) -> None:
        self.conn.send((kind, payload))

    def receive(self) -> tuple[str, Any]:
        try:
            return self.conn.recv()
        except EOFError:
            raise RuntimeError("A data-parallel replica died; see its traceback above.") from None

    def stop(self) -> None:
        if self.proc.is_alive():
            try:
                self.conn.send(("shutdown", None))
            except OSError:  # its end of the pipe is gone already
                pass
        self.proc.join(timeout=10)
        if self.proc.is_alive():
            self.proc.kill()


class _RayReplica:
    """A replica as a Ray actor with one CPU bundle of a placement group spread over the cluster's nodes."""

    def __init__(self, actor: Any, group: Any) -> None:
        self.actor, self.group, self.pending = actor, group, actor.ready.remote()

    def send(self, kind: str, payload: Any) -> None:
        self.pending = self.actor.handle.remote(kind, payload)

    def receive(self) -> tuple[str, Any]:
        import ray

        try:
            return ray.get(self.pending)
        except ray.exceptions.RayActorError as e:
            raise RuntimeError(f"A data-parallel replica (Ray actor) died: {e}") from None

    def stop(self) -> None:
        import ray
        from ray.util.placement_group import remove_placement_group

        try:
            ray.get(self.actor.shutdown.remote(), timeout=10)
        except Exception:  # noqa: BLE001 - gone already, or hung: killed below
            pass
        ray.kill(self.actor)
        try:
            remove_placement_group(self.group)  # the first replica's call releases it; the others' find it gone
        except Exception:  # noqa: BLE001 - already removed
            pass


def _start_ray_replicas(blob: bytes, size: int, timeout_s: float, gpus: int) -> list[_RayReplica]:
    """One actor a replica, each with one CPU (its torch threads) and `gpus` GPUs; the model path must be readable
    on every node."""
    import ray
    from ray.util.placement_group import placement_group, remove_placement_group
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    if not ray.is_initialized():
        ray.init()
    group = placement_group([{"CPU": 1, **({"GPU": gpus} if gpus else {})}] * size, strategy="SPREAD")
    try:
        ray.get(group.ready(), timeout=timeout_s)
    except Exception:
        remove_placement_group(group)  # nothing holds it yet: give its reservations back
        raise
    actor_cls = ray.remote(num_cpus=1, num_gpus=gpus)(ReplicaServer)
    return [_RayReplica(actor_cls.options(scheduling_strategy=PlacementGroupSchedulingStrategy(
        group, placement_group_bundle_index=i)).remote(blob, 1), group) for i in range(size)]


def _stop_replicas(replicas: list[_ProcessReplica | _RayReplica]) -> None:
    for replica in replicas:
        replica.stop()


def _replica_main(blob: bytes, threads: int, conn) -> None:
    server = ReplicaServer(blob, threads)
    conn.send(server.ready())
    if server.client is None:
        return
    while True:
        kind, payload = conn.recv()
        if kind == "shutdown":
            server.shutdown()
            return
        conn.send(server.handle(kind, payload))
