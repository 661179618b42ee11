"""Engine clients: what a front end talks to, never the engine's internals.

    EngineClient         every client: the config, the input processor, apply_model, shutdown
    OfflineClient        runs a batch of processed requests to completion (LLM's calls)
      InProcessClient      one LLMEngine in this process
      DataParallelClient   engine replicas in processes of their own (data_parallel.py)
    AsyncLLM             streams outputs to asyncio callers (entrypoints/async_engine.py, the server's client)
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any, Protocol, TypeVar

from torch import nn
from tqdm.auto import tqdm

from pagedformers.config import EngineConfig
from pagedformers.engine.input_processor import EngineRequest, InputProcessor
from pagedformers.engine.llm_engine import LLMEngine
from pagedformers.outputs import PoolingRequestOutput, RequestOutput
from pagedformers.sampling_params import RequestOutputKind

R = TypeVar("R")
Output = RequestOutput | PoolingRequestOutput


class EngineClient(Protocol):
    config: EngineConfig
    processor: InputProcessor  # shapes and checks this front end's requests (its own tokenizer)

    def apply_model(self, fn: Callable[[nn.Module], R]) -> list[R]:
        """fn(model) on every worker of every replica; one result each."""

    def shutdown(self) -> None:
        """Release worker and replica processes; the client is unusable afterwards."""


class OfflineClient(EngineClient, Protocol):
    llm_engine: LLMEngine | None  # the engine, where it runs in this process

    def run(self, requests: list[EngineRequest], use_tqdm: bool) -> list[Output]:
        """Every request's final output, in order. A request that fails inside the engine ends with `error`
        set; the others complete."""


def create_offline_client(config: EngineConfig) -> OfflineClient:
    if config.parallel.data_parallel_size > 1:
        from pagedformers.engine.data_parallel import DataParallelClient

        return DataParallelClient(config)
    return InProcessClient(config)


class InProcessClient:
    def __init__(self, config: EngineConfig) -> None:
        self.config = config
        self.llm_engine = LLMEngine(config)
        self.processor = self.llm_engine.processor

    def run(self, requests: list[EngineRequest], use_tqdm: bool) -> list[Output]:
        engine = self.llm_engine
        for request in requests:
            if not request.is_pooling:  # only final outputs are returned: no text decoded along the way
                params = dataclasses.replace(request.params, output_kind=RequestOutputKind.FINAL_ONLY)
                request = dataclasses.replace(request, params=params)
            engine.add_processed_request(request)
        done: dict[str, Output] = {}
        with tqdm(total=len(requests), desc="Processed prompts", disable=not use_tqdm) as bar:
            try:
                while len(done) < len(requests):
                    for out in engine.step():
                        if out.finished:
                            done[out.request_id] = out
                            bar.update(1)
            finally:  # e.g. KeyboardInterrupt: leave the engine clean for the next call
                for request in requests:
                    if request.request_id not in done:
                        engine.abort_request(request.request_id)
        return [done[r.request_id] for r in requests]

    def apply_model(self, fn: Callable[[nn.Module], Any]) -> list[Any]:
        return self.llm_engine.executor.apply_model(fn)

    def shutdown(self) -> None:
        self.llm_engine.executor.shutdown()
