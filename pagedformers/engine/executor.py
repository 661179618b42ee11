"""Executors run step plans on one or more workers; the engine sees only this interface."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from typing import Any, TypeVar

from torch import nn

from pagedformers.config import EngineConfig
from pagedformers.engine.inputs import StepPlan
from pagedformers.engine.worker import Worker, WorkerOutput

R = TypeVar("R")


class Executor(ABC):
    num_blocks: int
    driver_worker: Worker  # the worker in this process: rank 0

    @abstractmethod
    def execute(self, plan: StepPlan) -> WorkerOutput:
        """Run the plan on every worker; the driver gets the final hidden states and logits."""

    @abstractmethod
    def apply_model(self, fn: Callable[[nn.Module], R]) -> list[R]:
        """Run fn on the model of every worker; one result per worker."""

    def shutdown(self) -> None:  # noqa: B027 (a hook: in-process, there is nothing to release)
        """Release workers."""


class WorkerDiedError(RuntimeError):
    """A worker process is gone or a collective failed: the engine cannot continue."""


def create_executor(config: EngineConfig) -> Executor:
    if config.parallel.world_size == 1:
        return InProcessExecutor(config)
    if config.parallel.distributed_executor_backend == "ray":
        from pagedformers.engine.ray_executor import RayExecutor

        return RayExecutor(config)
    from pagedformers.engine.multiproc_executor import MultiprocExecutor

    return MultiprocExecutor(config)


class InProcessExecutor(Executor):
    def __init__(self, config: EngineConfig) -> None:
        self.driver_worker = Worker(config)
        self.driver_worker.allocate_kv_cache(self.driver_worker.num_blocks)
        self.driver_worker.check_hf_parity()
        self.num_blocks = self.driver_worker.num_blocks

    def execute(self, plan: StepPlan) -> WorkerOutput:
        return self.driver_worker.execute(plan)

    def apply_model(self, fn: Callable[[nn.Module], Any]) -> list[Any]:
        return [self.driver_worker.apply_model(fn)]
