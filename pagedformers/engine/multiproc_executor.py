"""Tensor x pipeline parallel execution over torch.distributed (gloo on CPU, NCCL on CUDA).

The driver process is rank 0; ranks 1.. are spawned (not forked: torch has started
threads by then). Each step, rank 0 broadcasts the step plan; every rank runs its part;
the logits come back to rank 0. Collectives carry a timeout, and the driver checks its
workers are alive before each step, so a dead worker surfaces as WorkerDiedError, not a hang.

Rendezvous goes through a TCP store the driver hosts: each worker marks itself there once it runs, and the driver
waits for the marks while watching the processes, so a worker that dies on the way (most often: a script without
an `if __name__ == "__main__":` guard, which every spawned worker re-runs) fails the start within seconds. The
workers and the process group are released by `shutdown`, or when the executor is garbage-collected.

Across machines, a launcher starts every rank instead (`torchrun --nnodes N ...`, or RANK / WORLD_SIZE /
MASTER_ADDR / MASTER_PORT set by hand): every process runs the same script; rank 0's LLM drives, and every other
rank's LLM() serves as a worker until rank 0 shuts down, then ends its process.
"""

from __future__ import annotations

import gc
import multiprocessing as mp
import os
import sys
import threading
import time
import traceback
import weakref
from collections.abc import Callable
from datetime import timedelta
from typing import Any

import cloudpickle
import torch
import torch.distributed as dist
from torch import nn

from pagedformers.config import EngineConfig
from pagedformers.engine.executor import Executor, WorkerDiedError
from pagedformers.engine.inputs import StepPlan
from pagedformers.engine.worker import Worker, WorkerOutput
from pagedformers.loading.gguf_once import gguf_parsed_once
from pagedformers.loading.model_files import create_engine_config
from pagedformers.logger import init_logger
from pagedformers.model.loader import check_parallel
from pagedformers.parallel_plans import create_parallel_state

logger = init_logger(__name__)


UNGUARDED_SCRIPT_HELP = (
    "Parallel workers are spawned processes that re-import the script that started them: a script that builds a "
    "parallel LLM must do so under `if __name__ == \"__main__\":` (or in a function it calls from there).")


class MultiprocExecutor(Executor):
    def __init__(self, config: EngineConfig) -> None:
        if _is_spawned_worker_importing_main():
            raise RuntimeError(UNGUARDED_SCRIPT_HELP)
        _release_process_group_of_dead_engines()
        self.config = config
        self._lock = threading.Lock()  # one collective at a time: steps, apply_model, the heartbeat, shutdown
        self._last_message = time.monotonic()
        self.world_size = config.parallel.world_size
        check_parallel(config)
        timeout = timedelta(seconds=config.parallel.distributed_timeout_s)
        launched = launched_rank(self.world_size)
        if launched is not None:
            self._join_launched_ranks(config, launched, timeout)
            return
        # Ranks share the machine's cores (the driver, rank 0, included).
        torch.set_num_threads(_threads_per_rank(self.world_size))
        host = self.store_host()
        store = dist.TCPStore(host, 0, self.world_size, is_master=True, timeout=timeout, wait_for_workers=False)
        # Workers rebuild the config from its arguments: remote-code config classes do not unpickle
        # in a fresh process, and hf_overrides may be a lambda (hence cloudpickle).
        blob = cloudpickle.dumps(config.local_args())
        self.procs = self.start_workers(blob, host, store.port)
        self._release = weakref.finalize(self, _stop_workers, self.procs)
        try:
            _wait_for_workers(store, self.procs, config.parallel.distributed_timeout_s)
            self.driver_worker, self.control = _init_rank(config, 0, self.world_size, store)
        except Exception:
            self.shutdown(graceful=False)
            raise
        self.num_blocks = self.driver_worker.num_blocks
        self._start_heartbeat()

    def store_host(self) -> str:
        """Where the workers reach the driver's rendezvous store."""
        return "127.0.0.1"

    def start_workers(self, blob: bytes, host: str, port: int) -> list[Any]:
        """Ranks 1.. started, each running `worker_main`; returned as handles with multiprocessing.Process's
        `name`, `is_alive`, `exitcode`, `join` and `kill`."""
        ctx = mp.get_context("spawn")
        procs = [ctx.Process(target=worker_main, args=(blob, rank, self.world_size, host, port),
                             name=f"pagedformers-rank{rank}", daemon=True) for rank in range(1, self.world_size)]
        for p in procs:
            p.start()
        return procs

    def _join_launched_ranks(self, config: EngineConfig, rank: int, timeout: timedelta) -> None:
        """Every rank was started by a launcher (torchrun, across machines too): rank 0 drives, as usual; any other
        rank serves as a worker here, inside LLM(), and its process exits once rank 0 shuts down."""
        master_hosts = rank == 0 and os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True"  # torchrun's agent may
        store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), self.world_size,
                              is_master=master_hosts, timeout=timeout, wait_for_workers=False)
        if rank != 0:
            _serve(*_init_rank(config, rank, self.world_size, store))
            dist.destroy_process_group()
            raise SystemExit(0)
        self.procs = []  # started by the launcher: not ours to watch or stop
        self._release = weakref.finalize(self, _stop_workers, self.procs)
        self.driver_worker, self.control = _init_rank(config, 0, self.world_size, store)
        self.num_blocks = self.driver_worker.num_blocks
        self._start_heartbeat()

    def execute(self, plan: StepPlan) -> WorkerOutput:
        def run() -> WorkerOutput:
            self._broadcast(("execute", plan))
            return self.driver_worker.execute(plan)
        return self._collective(run)

    def apply_model(self, fn: Callable[[nn.Module], Any]) -> list[Any]:
        def run() -> list[Any]:
            self._broadcast(("apply", cloudpickle.dumps(fn)))
            results = [None] * self.world_size
            dist.gather_object(self.driver_worker.apply_model(fn), results, dst=0, group=self.control)
            return results
        return self._collective(run)

    def shutdown(self, graceful: bool = True) -> None:
        with self._lock:
            if graceful and self._release.alive and dist.is_initialized() and all(p.is_alive() for p in self.procs):
                try:
                    self._broadcast(("shutdown", None))
                except RuntimeError:
                    pass  # a worker is already gone: the kill below cleans up
            self._release()  # once: the process group, then the workers

    def _broadcast(self, message: tuple[str, Any]) -> None:
        dist.broadcast_object_list([message], src=0, group=self.control)
        self._last_message = time.monotonic()

    def _collective(self, fn: Callable[[], Any]) -> Any:
        dead = [p for p in self.procs if not p.is_alive()]
        if dead:
            raise WorkerDiedError(f"Worker {dead[0].name} exited (code {dead[0].exitcode}); the engine must be "
                                  "restarted.")
        try:
            with self._lock:
                return fn()
        except RuntimeError as e:  # gloo: peer closed the connection, or the collective timed out
            raise WorkerDiedError(f"A collective with the workers failed ({e}); a worker died or hung.") from e

    def _start_heartbeat(self) -> None:
        """Workers wait for the next step in a broadcast, which times out after distributed_timeout_s: an engine
        idle that long would lose them. A thread sends an empty message whenever the line has been quiet for a
        quarter of it. It holds the executor weakly, so that dropping the LLM still releases everything."""
        interval = max(0.5, self.config.parallel.distributed_timeout_s / 4)
        threading.Thread(target=_heartbeat, args=(weakref.ref(self), interval), name="pagedformers-heartbeat",
                         daemon=True).start()


def _heartbeat(executor_ref: weakref.ref, interval: float) -> None:
    while True:
        time.sleep(interval)
        executor = executor_ref()
        if executor is None or not executor._release.alive:
            return
        with executor._lock:
            if time.monotonic() - executor._last_message >= interval and dist.is_initialized():
                try:
                    executor._broadcast(("noop", None))
                except RuntimeError:  # the workers are gone: the next step reports it
                    return
        del executor


def _stop_workers(procs: list[mp.Process]) -> None:
    """Release the process group and end the workers (who leave their broadcast wait when the group goes)."""
    if dist.is_initialized():
        dist.destroy_process_group()
    for p in procs:
        p.join(timeout=5)
        if p.is_alive():
            p.kill()


def _release_process_group_of_dead_engines() -> None:
    """A parallel LLM that was dropped without shutdown() holds the process group until it is collected: collect
    it now, so that a new one can start; one still alive is a clear error, not torch's "initialize the default
    process group twice"."""
    if dist.is_initialized():
        gc.collect()
    if dist.is_initialized():
        raise RuntimeError("Another parallel LLM is alive in this process (a process holds one process group): "
                           "call its shutdown(), or use `with LLM(...) as llm:`, before building a new one.")


def _is_spawned_worker_importing_main() -> bool:
    """Whether this process is a spawned child still importing the parent's script (multiprocessing runs it as
    `__mp_main__`): an LLM built there comes from a script without a main guard."""
    main = sys.modules.get("__main__")
    return mp.parent_process() is not None and getattr(main, "__name__", None) == "__mp_main__" \
        and getattr(mp.current_process(), "_inheriting", False)


def _wait_for_workers(store: dist.TCPStore, procs: list[mp.Process], timeout_s: float) -> None:
    """Until every worker marked itself in the store; a worker that exits first fails the start at once."""
    keys = [f"started/{rank}" for rank in range(1, len(procs) + 1)]
    deadline = time.monotonic() + timeout_s
    while not store.check(keys):
        dead = next((p for p in procs if not p.is_alive()), None)
        if dead is not None:
            raise RuntimeError(f"Worker {dead.name} exited (code {dead.exitcode}) before joining the process group; "
                               f"its error is above. {UNGUARDED_SCRIPT_HELP}")
        if time.monotonic() > deadline:
            raise RuntimeError(f"The workers did not start within distributed_timeout_s={timeout_s:g} s.")
        time.sleep(0.05)


def _init_rank(config: EngineConfig, rank: int, world_size: int,
               store: dist.Store) -> tuple[Worker, dist.ProcessGroup]:
    """This rank's worker, and the process group of the engine's own messages (steps, apply_model, shutdown).
    Not the default group: a collective other code in the driver runs on that one (transformers broadcasts while it
    loads a compressed-tensors checkpoint, where a group exists) reached a worker as an engine message."""
    backend = "nccl" if config.device.device.startswith("cuda") else "gloo"
    dist.init_process_group(backend, store=store, rank=rank, world_size=world_size,
                            timeout=timedelta(seconds=config.parallel.distributed_timeout_s))
    control = dist.new_group(backend="gloo")  # every rank creates it first, before the parallel plans' groups
    state = create_parallel_state(config.parallel.tensor_parallel_size, config.parallel.pipeline_parallel_size)
    worker = Worker(config, state)
    num_blocks = _min_over_ranks(worker.num_blocks)  # every rank's block tables index the same blocks
    worker.allocate_kv_cache(num_blocks)
    return worker, control


def _min_over_ranks(value: int) -> int:
    t = torch.tensor([value])
    dist.all_reduce(t, op=dist.ReduceOp.MIN)
    return int(t)


def worker_main(config_blob: bytes, rank: int, world_size: int, store_host: str, store_port: int) -> None:
    torch.set_num_threads(_threads_per_rank(world_size))
    try:
        args = cloudpickle.loads(config_blob)
        timeout = timedelta(seconds=args.distributed_timeout_s)
        store = dist.TCPStore(store_host, store_port, world_size, is_master=False, timeout=timeout)
        store.set(f"started/{rank}", "1")
        with gguf_parsed_once(args.model, args.gguf_file):
            config = create_engine_config(args)
            worker, control = _init_rank(config, rank, world_size, store)
        _serve(worker, control)
    except Exception:
        traceback.print_exc()
        raise SystemExit(1) from None
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def _serve(worker: Worker, control: dist.ProcessGroup) -> None:
    """A worker rank's loop: run what rank 0 broadcasts on `control` until it says shutdown."""
    while True:
        message = [None]
        try:
            dist.broadcast_object_list(message, src=0, group=control)
        except RuntimeError as e:
            if "Connection closed" not in str(e) and "Connection reset" not in str(e):
                raise  # a timeout or another failure: worker_main prints it and exits 1
            # The driver released the group without a word (an LLM dropped, or its process ended)
            logger.info("rank %d: the driver is gone (%s); this worker exits", dist.get_rank(), str(e)[:200])
            return
        if not (isinstance(message[0], tuple) and len(message[0]) == 2):
            raise RuntimeError(f"rank {dist.get_rank()}: not an engine message: {str(message[0])[:200]}")
        kind, payload = message[0]
        if kind == "noop":  # the driver's heartbeat: it is idle, not gone
            continue
        if kind == "shutdown":
            return
        if kind == "execute":
            worker.execute(payload)
        elif kind == "apply":
            dist.gather_object(worker.apply_model(cloudpickle.loads(payload)), None, dst=0, group=control)


def launched_rank(world_size: int) -> int | None:
    """This process's rank where a launcher started every rank (torchrun; or RANK, WORLD_SIZE, MASTER_ADDR and
    MASTER_PORT set by hand, one process a rank, on one machine or several); None where this process spawns them.

    Raises:
        ValueError: the launcher's WORLD_SIZE is not the engine's tensor x pipeline size.
    """
    if not all(k in os.environ for k in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")):
        return None
    if int(os.environ["WORLD_SIZE"]) != world_size:
        raise ValueError(f"The launcher started WORLD_SIZE={os.environ['WORLD_SIZE']} processes, but "
                         f"tensor_parallel_size x pipeline_parallel_size = {world_size}: launch one process a rank.")
    return int(os.environ["RANK"])


def _threads_per_rank(world_size: int) -> int:
    return max(1, (os.cpu_count() or 1) // world_size)

