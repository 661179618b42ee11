"""AsyncLLM: one LLMEngine built and stepped by one background thread, streaming outputs to asyncio callers
(`generate` yields a request's outputs as they grow; `encode`, for pooling models, returns its one result).
It is the server's engine client (engine/client.py): callers shape and check each request with its
`processor`, on their own thread, before handing it over.

The engine is not thread-safe, so it has exactly one owner: the engine thread. Callers on
the event loop never touch it; they queue commands (add, abort) and the thread applies
them between steps. Every request that arrives while a step runs joins the next one,
which is what batches concurrent clients together. Outputs go back to each request's
asyncio.Queue through `loop.call_soon_threadsafe`, one call per step and event loop.
With nothing to do, the thread sleeps on a Condition until a command arrives.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import copy
import threading
import time
from collections import defaultdict
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from functools import partial
from typing import TypeVar

from torch import nn

from pagedformers.config import EngineConfig
from pagedformers.engine.input_processor import EngineRequest, InputProcessor
from pagedformers.engine.llm_engine import LLMEngine
from pagedformers.entrypoints.metrics import EngineMetrics, RequestStats
from pagedformers.logger import init_logger
from pagedformers.outputs import PoolingRequestOutput, RequestOutput

logger = init_logger(__name__)

R = TypeVar("R")


class EngineError(RuntimeError):
    """The engine could not serve a request: a step failed, or the engine is shut down."""

    status = 500  # the HTTP status the server answers it with


class ShuttingDownError(EngineError):
    """The server is stopping and its grace period is over: the request was aborted, its KV blocks freed."""

    status = 503


class RequestTimeoutError(EngineError):
    """The request ran past its time limit: it has been aborted, its KV blocks freed."""

    status = 504


_Item = RequestOutput | PoolingRequestOutput | BaseException


@dataclass
class _Stream:
    """Where one request's outputs go: a queue owned by the caller's event loop."""
    loop: asyncio.AbstractEventLoop
    stats: RequestStats
    queue: asyncio.Queue[_Item] = field(default_factory=asyncio.Queue)


class AsyncLLM:
    def __init__(self, engine: LLMEngine | EngineConfig, metrics: EngineMetrics | None = None) -> None:
        """`engine`: a config, which the engine thread builds into its engine (the server's way: the thread that
        steps the model then owns the process's only OpenMP team, platforms/openmp.py), or an engine the caller
        built (in-process use, tests). Raises what building the engine raised."""
        self.metrics = metrics or EngineMetrics()
        self._cond = threading.Condition()
        self._commands: list[Callable[[], None]] = []  # guarded by _cond
        self._stopped = False  # guarded by _cond
        self._streams: dict[str, _Stream] = {}  # NOTE: touched only on the engine thread
        built: concurrent.futures.Future[LLMEngine] = concurrent.futures.Future()
        self._thread = threading.Thread(target=self._run, args=(engine, built), name="pagedformers-engine",
                                        daemon=True)
        self._thread.start()
        try:
            self.engine = built.result()  # NOTE: touched only on the engine thread from now on
            self.config = self.engine.config
            # The callers' own: HF fast tokenizers are not thread-safe; the engine thread detokenizes with its own.
            self.processor = InputProcessor(self.config, copy.deepcopy(self.engine.tokenizer),
                                            self.engine.num_kv_blocks, self.engine.processor.structured,
                                            self.engine.processor.lora_check)
        except BaseException:  # e.g. Ctrl-C while the model loads: the thread shuts the engine down once built
            with self._cond:
                self._stopped = True
                self._cond.notify()
            raise

    @property
    def is_running(self) -> bool:
        return self._thread.is_alive()

    @property
    def supported_tasks(self) -> tuple[str, ...]:
        return self.processor.supported_tasks

    async def generate(self, request: EngineRequest, timeout_s: float | None = None) -> AsyncIterator[RequestOutput]:
        """Queue a request (from `self.processor`) and yield its RequestOutputs as the engine produces them
        (cumulative, the last one `finished`). Closing or cancelling the iterator early aborts the request.

        Raises:
            EngineError: the request failed in the engine, or the engine was shut down.
            RequestTimeoutError: it ran longer than `timeout_s` seconds (then it is aborted).
        """
        request_id = request.request_id
        stream = _Stream(asyncio.get_running_loop(), RequestStats(time.monotonic(), len(request.prompt_token_ids)))
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        self._submit(partial(self._add, request, stream))
        finished = False
        try:
            while not finished:
                item = await _next_item(stream, deadline)
                if isinstance(item, BaseException):
                    finished = True  # the engine thread has already dropped the request
                    raise item
                finished = item.finished
                yield item
        finally:
            if not finished:  # the caller went away (cancelled, closed, client disconnected)
                self.abort(request_id)

    async def encode(self, request: EngineRequest, timeout_s: float | None = None) -> PoolingRequestOutput:
        """Queue a pooling request (from `self.processor`) and return its output (with `error` set if it failed
        in a step). Cancelling the call aborts the request.

        Raises:
            EngineError: the engine was shut down, or a step failed.
            RequestTimeoutError: it ran longer than `timeout_s` seconds (then it is aborted).
        """
        request_id = request.request_id
        stream = _Stream(asyncio.get_running_loop(), RequestStats(time.monotonic(), len(request.prompt_token_ids)))
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        self._submit(partial(self._add, request, stream))
        item: _Item | None = None
        try:
            while item is None or not item.finished:  # NOTE: a prompt pooled over several steps reports each
                item = await _next_item(stream, deadline)
                if isinstance(item, BaseException):
                    raise item  # the engine thread has already dropped the request
        except (asyncio.CancelledError, RequestTimeoutError):  # the caller went away, or the time is up
            self.abort(request_id)
            raise
        return item

    def abort(self, request_id: str) -> None:
        """Abort a request and free its KV blocks (on the engine thread, before its next step)."""
        try:
            self._submit(partial(self._abort, request_id))
        except EngineError:
            pass  # shut down: every request is gone already

    def fail_in_flight(self, message: str) -> None:
        """End every request in flight with ShuttingDownError (503): their callers answer it (a stream with a last
        error event) while their connections are still open, and their KV blocks are freed."""
        try:
            self._submit(partial(self._fail_all, message, ShuttingDownError))
        except EngineError:
            pass  # shut down already: every request is gone

    def apply_model(self, fn: Callable[[nn.Module], R]) -> list[R]:
        """fn(model) on every worker, run by the engine thread between steps; blocks the caller until it ran."""
        result: concurrent.futures.Future[list[R]] = concurrent.futures.Future()

        def command() -> None:
            try:
                result.set_result(self.engine.executor.apply_model(fn))
            except Exception as e:  # noqa: BLE001 (the caller's to handle)
                result.set_exception(e)
        self._submit(command)
        return result.result()

    def shutdown(self, timeout: float = 30.0) -> None:
        """Stop the engine thread, then the engine's workers; requests still in flight fail with EngineError."""
        with self._cond:
            self._stopped = True
            self._cond.notify()
        if self._thread is not threading.current_thread():
            self._thread.join(timeout)
        if not self._thread.is_alive():
            self.engine.executor.shutdown()

    # -- the engine thread ------------------------------------------------------------------------

    def _submit(self, command: Callable[[], None]) -> None:
        with self._cond:
            if self._stopped:
                raise EngineError("The engine is shut down")
            self._commands.append(command)
            self._cond.notify()

    def _run(self, engine: LLMEngine | EngineConfig, built: concurrent.futures.Future[LLMEngine]) -> None:
        try:
            engine = engine if isinstance(engine, LLMEngine) else LLMEngine(engine)
        except BaseException as e:  # the constructor raises it
            built.set_exception(e)
            return
        built.set_result(engine)
        with self._cond:
            if self._stopped:  # the caller gave up while the engine was being built
                engine.executor.shutdown()
                return
        stopped = False
        while not stopped:
            with self._cond:
                while not (self._commands or self._stopped or engine.has_unfinished_requests()):
                    self._cond.wait()
                stopped = self._stopped
                commands, self._commands = self._commands, []
            for command in commands:  # on shutdown too: an add must reach _fail_all, or its caller waits forever
                try:
                    command()
                except Exception:  # a bug; the thread must survive it or every later request hangs
                    logger.exception("Engine command %s failed", command)
            if not stopped and engine.has_unfinished_requests():
                self._step()
            self.metrics.on_engine_state(engine.get_stats())
        self._fail_all("The engine was shut down")

    def _add(self, request: EngineRequest, stream: _Stream) -> None:
        try:
            self.engine.add_processed_request(request)
        except Exception as e:  # e.g. a request id already in use: this request fails alone
            self._deliver([(stream, e)])
            return
        self._streams[request.request_id] = stream

    def _abort(self, request_id: str) -> None:
        if self._streams.pop(request_id, None) is not None:
            self.metrics.on_finished("abort")
        self.engine.abort_request(request_id)

    def _step(self) -> None:
        try:
            outputs = self.engine.step()
        except Exception as e:  # a bug in the engine: fail what is in flight, keep serving
            logger.exception("Engine step failed; failing the %d requests in flight", len(self._streams))
            self._fail_all(f"Engine step failed: {type(e).__name__}: {e}")
            return
        now = time.monotonic()
        deliveries: list[tuple[_Stream, _Item]] = []
        for out in outputs:
            stream = self._streams.get(out.request_id)
            if stream is None:
                continue
            self.metrics.on_output(stream.stats, out, now)
            if out.finished:
                del self._streams[out.request_id]
            deliveries.append((stream, out))
        self._deliver(deliveries)

    def _fail_all(self, message: str, error: type[EngineError] = EngineError) -> None:
        streams, self._streams = self._streams, {}
        for request_id in streams:
            try:
                self.engine.abort_request(request_id)
            except Exception:
                logger.exception("Could not abort request %s", request_id)
            self.metrics.on_finished("error")
        self._deliver([(stream, error(message)) for stream in streams.values()])

    def _deliver(self, deliveries: list[tuple[_Stream, _Item]]) -> None:
        by_loop: dict[asyncio.AbstractEventLoop, list[tuple[_Stream, _Item]]] = defaultdict(list)
        for stream, item in deliveries:
            by_loop[stream.loop].append((stream, item))
        for loop, items in by_loop.items():
            try:
                loop.call_soon_threadsafe(_put_all, items)
            except RuntimeError:  # that event loop is closed: nobody is listening any more
                for _, item in items:
                    if isinstance(item, RequestOutput) and not item.finished:
                        self._abort(item.request_id)


def _put_all(items: list[tuple[_Stream, _Item]]) -> None:
    for stream, item in items:
        stream.queue.put_nowait(item)


async def _next_item(stream: _Stream, deadline: float | None) -> _Item:
    """The stream's next item, or RequestTimeoutError once `deadline` (time.monotonic()) has passed."""
    if deadline is None:
        return await stream.queue.get()
    try:
        return await asyncio.wait_for(stream.queue.get(), max(0.0, deadline - time.monotonic()))
    except TimeoutError:
        raise RequestTimeoutError("The request ran past the server's --request-timeout and was aborted") from None
