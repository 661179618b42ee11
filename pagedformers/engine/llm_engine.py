"""LLMEngine: requests in, one scheduled model step at a time, RequestOutputs out."""

from __future__ import annotations

import dataclasses
import itertools
import time
import traceback

from pagedformers.adapter.compat import keeps_prompt_in_window
from pagedformers.config import EngineConfig
from pagedformers.engine.detokenizer import Detokenizer
from pagedformers.engine.executor import Executor, WorkerDiedError, create_executor
from pagedformers.engine.input_processor import EngineRequest, InputProcessor, PromptType
from pagedformers.engine.kv_cache_manager import KVCacheManager
from pagedformers.engine.model_runner import ModelRunner, ModelRunnerOutput
from pagedformers.engine.request import Request
from pagedformers.engine.scheduler import Scheduler, SchedulerOutput
from pagedformers.loading.tokenizer import load_tokenizer
from pagedformers.logger import init_logger
from pagedformers.lora import LoRARequest
from pagedformers.lora.adapter import read_adapter
from pagedformers.model.interface import SupportsPerRequestState
from pagedformers.outputs import CompletionOutput, PoolingOutput, PoolingRequestOutput, RequestMetrics, RequestOutput
from pagedformers.pooling_params import PoolingParams
from pagedformers.sampling_params import RequestOutputKind, SamplingParams

logger = init_logger(__name__)


@dataclasses.dataclass
class _Parent:
    """A user request: n sampled sequences of one prompt."""
    request_id: str
    prompt: str | None
    children: list[Request]


@dataclasses.dataclass(frozen=True)
class EngineStats:
    """The engine's state for metrics: gauges now, and running totals since it started."""
    num_running: int
    num_waiting: int
    kv_cache_usage: float  # share of KV blocks held by requests
    num_preemptions: int
    prefix_cache_queries: int  # prompt tokens looked up
    prefix_cache_hits: int


class LLMEngine:
    """Requests in, one scheduled model step at a time, outputs out. `add_request` takes a prompt as the input
    processor does (`self.processor`); a front end that checks its requests before queuing any passes them,
    processed, to `add_processed_request`."""

    def __init__(self, config: EngineConfig, executor: Executor | None = None) -> None:
        if config.parallel.data_parallel_size > 1:
            raise ValueError("data_parallel_size > 1 is served by LLM(...), which runs one engine per replica; "
                             "a single LLMEngine (and so the server) runs one replica.")
        self.config = config
        self.tokenizer = load_tokenizer(config)
        self.executor = executor or create_executor(config)
        self.processor = InputProcessor(config, self.tokenizer, self.executor.num_blocks,
                                        lora_check=self._check_lora if config.lora.enabled else None)
        self._lora_checked: dict[int, LoRARequest] = {}
        self.runner = ModelRunner(config, self.executor)
        self.kv_manager = KVCacheManager(self.executor.num_blocks, config.cache.block_size, self._prefix_caching(),
                                         keeps_prompt_in_window(config.model.hf_config))
        self.scheduler = Scheduler(self.kv_manager, config.scheduler.max_num_seqs,
                                   config.scheduler.max_num_batched_tokens, config.lora.max_loras)
        self.detokenizer = Detokenizer(self.tokenizer)
        self.parents: dict[str, _Parent] = {}
        self._arrivals = itertools.count()

    @property
    def num_kv_blocks(self) -> int:
        return self.kv_manager.num_blocks

    def _prefix_caching(self) -> bool:
        if not self.config.cache.enable_prefix_caching:
            return False
        if isinstance(self.executor.driver_worker.model, SupportsPerRequestState):
            logger.info("Prefix caching is off: the per-request layer state of this model (conv / linear-attention "
                        "states, indexer keys) cannot be restored from cached KV blocks.")
            return False
        return True

    # -- requests -----------------------------------------------------------------------------------

    def add_request(self, request_id: str, prompt: PromptType, params: SamplingParams | PoolingParams) -> None:
        """Raises ValueError (InvalidRequest) for a request that can never run, before it is queued."""
        self.add_processed_request(self.processor.process(request_id, prompt, params, f"Request {request_id!r}"))

    def add_processed_request(self, request: EngineRequest) -> None:
        """Queue a request the input processor made (its sequences: n samples, or one pooled prompt)."""
        request_id = request.request_id
        if request_id in self.parents:
            raise ValueError(f"Request id {request_id!r} is already in use")
        if request.is_pooling:
            children = [Request(f"{request_id}#0", request.prompt_token_ids, SamplingParams(max_tokens=1), 1,
                                next(self._arrivals), pooling_params=request.params,
                                token_type_ids=request.token_type_ids, parent_id=request_id)]
        else:
            children = self._samples(request)
        for child in children:
            self.scheduler.add(child)
        self.parents[request_id] = _Parent(request_id, request.prompt, children)

    def _samples(self, request: EngineRequest) -> list[Request]:
        params, num_prompt = request.params, len(request.prompt_token_ids)
        limit = self.config.model.max_model_len
        max_tokens = min(params.max_tokens or limit, limit - num_prompt)
        children = []
        for i in range(params.n):
            seeded = params.seed is not None and i > 0  # each sample its own stream, from the request's seed
            child_params = dataclasses.replace(params, seed=params.seed + i) if seeded else params
            child = Request(f"{request.request_id}#{i}", request.prompt_token_ids, child_params, max_tokens,
                            next(self._arrivals), multi_modal_inputs=request.multi_modal_inputs,
                            parent_id=request.request_id, lora_request=request.lora_request)
            if params.structured_outputs is not None:
                child.grammar = self.processor.structured.matcher(params.structured_outputs, params.stop_token_ids)
            children.append(child)
        return children

    def _check_lora(self, adapter: LoRARequest) -> None:
        """Raises ValueError for an adapter this model cannot run, before its request is queued: read once per
        adapter id and checked against the driver rank's layers (any thread: it reads, never writes, them)."""
        known = self._lora_checked.get(adapter.lora_int_id)
        if known == adapter:
            return
        if known is not None:
            raise ValueError(f"LoRA adapter id {adapter.lora_int_id} is already {known.lora_name!r} at "
                             f"{known.lora_path!r}: give {adapter.lora_name!r} an id of its own")
        lora = self.executor.driver_worker.lora
        lora.check(read_adapter(adapter.lora_path, self.config.lora.max_lora_rank), adapter)
        self._lora_checked[adapter.lora_int_id] = adapter

    def abort_request(self, request_id: str) -> None:
        parent = self.parents.pop(request_id, None)
        for child in parent.children if parent else []:
            if not child.is_finished:
                child.finish("abort")
                self.scheduler.finish(child)

    def has_unfinished_requests(self) -> bool:
        return self.scheduler.has_unfinished

    def get_stats(self) -> EngineStats:
        prefix = self.kv_manager.stats
        return EngineStats(len(self.scheduler.running), len(self.scheduler.waiting), self.kv_manager.usage,
                           self.scheduler.num_preemptions, prefix.queries, prefix.hits)

    # -- stepping -----------------------------------------------------------------------------------

    def step(self) -> list[RequestOutput]:
        """Run one model step; return the outputs of every request that advanced (finished ones dropped)."""
        out = self.scheduler.schedule()
        if not out.scheduled:
            return []
        scheduled = list(out.scheduled)  # _execute drops the requests that fail
        result = self._execute(out)
        self.scheduler.update_after_step(out)
        touched: dict[str, None] = {}
        for s in scheduled:
            req = s.request
            try:
                self._process(req, result)
            except Exception as e:  # one request's bad output must not take the batch down
                self._fail(req, e)
            touched[req.parent_id] = None
        return [self._output(pid, pop=True) for pid in touched if pid in self.parents and self._reports(pid)]

    def _reports(self, parent_id: str) -> bool:
        """Whether this step reports the request: FINAL_ONLY ones (LLM.generate's) only once finished, so
        that the text of unfinished requests is never decoded (~1.5 ms a step for 32 requests)."""
        parent = self.parents[parent_id]
        return (parent.children[0].params.output_kind != RequestOutputKind.FINAL_ONLY
                or all(c.is_finished for c in parent.children))

    def _execute(self, out: SchedulerOutput) -> ModelRunnerOutput:
        try:
            return self.runner.execute(out)
        except WorkerDiedError:
            raise  # not a request's fault: nothing to isolate
        except Exception as batch_error:
            if len(out.scheduled) == 1:
                self._fail(out.scheduled[0].request, batch_error)
                out.scheduled.clear()
                return ModelRunnerOutput()
            logger.warning("A batched step failed (%s); retrying its %d requests one by one.", batch_error,
                           len(out.scheduled))
        result = ModelRunnerOutput()
        for s in list(out.scheduled):
            try:
                # Each retry carries the finished ids too: the failed plan may not have reached the workers.
                one = self.runner.execute(SchedulerOutput([s], finished_request_ids=out.finished_request_ids))
                result.sampled.update(one.sampled)
                result.prompt_logprobs.update(one.prompt_logprobs)
                result.pooled.update(one.pooled)
            except WorkerDiedError:
                raise
            except Exception as e:
                self._fail(s.request, e)
                out.scheduled.remove(s)
        return result

    def _fail(self, req: Request, error: Exception) -> None:
        logger.error("Request %s failed: %s\n%s", req.request_id, error, traceback.format_exc())
        req.error = f"{type(error).__name__}: {error}"
        req.finish("error")
        self.scheduler.finish(req)

    def _process(self, req: Request, result: ModelRunnerOutput) -> None:
        if req.is_finished:
            return
        if req.request_id in result.pooled:
            req.pooled = result.pooled[req.request_id]
            req.finish("stop")
            self.scheduler.finish(req)
            return
        if req.prompt_logprobs is not None and req.request_id in result.prompt_logprobs:
            req.prompt_logprobs.extend(self._with_text(e) for e in result.prompt_logprobs[req.request_id])
        if req.request_id not in result.sampled:
            return  # a prefill chunk that does not reach the end of the prompt
        token, logprob = result.sampled[req.request_id]
        if req.grammar is not None and not req.grammar.accept_token(token):
            # The mask allowed only tokens the grammar takes; none was left (min_tokens banned the end).
            raise RuntimeError(f"token {token} is outside the request's structured-output grammar")
        req.all_token_ids.append(token)
        if req.first_token_time is None:
            req.first_token_time = time.monotonic()
        if logprob is not None:
            req.cumulative_logprob += logprob[0]
            req.logprobs.append(self._with_text(logprob[1]))
        self._check_stop(req, token)
        if req.is_finished:
            self.scheduler.finish(req)

    def _check_stop(self, req: Request, token: int) -> None:
        p = req.params
        past_min = req.num_output_tokens >= p.min_tokens
        if past_min and not p.ignore_eos and token in p.eos_token_ids:
            req.finish("stop")
        elif past_min and token in p.stop_token_ids:
            req.finish("stop", token)
        if p.stop:
            stop = self.detokenizer.update(req)
            if stop is not None:
                req.finish("stop", stop)
        if not req.is_finished and req.grammar is not None and req.grammar.is_terminated():
            req.finish("stop")  # the grammar is complete and took its end token (even with ignore_eos)
        if not req.is_finished and req.num_output_tokens >= req.max_tokens:
            req.finish("length")

    def _with_text(self, entries: dict) -> dict:
        for token_id, lp in entries.items():
            lp.decoded_token = self.detokenizer.token_text(token_id)
        return entries

    # -- outputs ------------------------------------------------------------------------------------

    def _output(self, parent_id: str, pop: bool) -> RequestOutput | PoolingRequestOutput:
        parent = self.parents[parent_id]
        finished = all(c.is_finished for c in parent.children)
        if finished and pop:
            del self.parents[parent_id]
        first = parent.children[0]
        if first.pooling_params is not None:
            return PoolingRequestOutput(parent_id, PoolingOutput(first.pooled), first.prompt_token_ids, finished,
                                        error=first.error)
        outputs = [
            CompletionOutput(
                index=i, text=self.detokenizer.decode(c),
                token_ids=c.output_token_ids, cumulative_logprob=c.cumulative_logprob,
                logprobs=list(c.logprobs) if c.logprobs is not None else None,  # a snapshot: later steps append
                finish_reason=c.finish_reason, stop_reason=c.stop_reason,
            )
            for i, c in enumerate(parent.children)
        ]
        errors = [c.error for c in parent.children if c.error]
        metrics = RequestMetrics(first.arrival_time, min((c.first_token_time for c in parent.children
                                                          if c.first_token_time is not None), default=None),
                                 max(c.finished_time for c in parent.children) if finished else None)
        return RequestOutput(parent_id, parent.prompt, first.prompt_token_ids, outputs, finished,
                             prompt_logprobs=first.prompt_logprobs, error=errors[0] if errors else None,
                             metrics=metrics)
