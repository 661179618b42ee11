"""Executors run model steps on one or more workers; the engine sees only this interface."""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any, Callable, TypeVar

from torch import nn

from pagedformers.config import EngineConfig
from pagedformers.engine.model_runner import ModelRunner, ModelRunnerOutput
from pagedformers.engine.scheduler import SchedulerOutput

R = TypeVar("R")


class Executor(ABC):
    num_blocks: int

    @abstractmethod
    def execute(self, out: SchedulerOutput) -> ModelRunnerOutput: ...

    @abstractmethod
    def apply_model(self, fn: Callable[[nn.Module], R]) -> list[R]:
        """Run fn on the model of every worker; one result per worker."""

    def shutdown(self) -> None:
        """Release workers (nothing to do in-process)."""


class InProcessExecutor(Executor):
    def __init__(self, config: EngineConfig) -> None:
        self.runner = ModelRunner(config)
        self.num_blocks = self.runner.num_blocks

    def execute(self, out: SchedulerOutput) -> ModelRunnerOutput:
        return self.runner.execute(out)

    def apply_model(self, fn: Callable[[nn.Module], Any]) -> list[Any]:
        return [fn(self.runner.model)]
