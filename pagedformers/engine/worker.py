"""A worker: one rank's model shard and KV cache, running the forward pass of each step plan.

Models with per-request state (`SupportsPerRequestState`: conv / linear-attention hybrids) also keep each
request's layer state here, keyed by request id: created at position 0, carried across prefill chunks and
decodes, dropped when the request ends. They run one request per forward, which is slower than one flat batch.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

import torch
import torch.distributed as dist
from torch import nn
from transformers.cache_utils import Cache

from pagedformers.adapter.base import TransformersBase
from pagedformers.adapter.compat import keeps_prompt_in_window
from pagedformers.attention.kv_cache import LayerKVSpec, allocate_kv_caches, zero_blocks
from pagedformers.config import EngineConfig
from pagedformers.engine.inputs import Chunk, StepPlan, prepare_inputs
from pagedformers.engine.parity_guard import check_hf_parity
from pagedformers.logger import init_logger
from pagedformers.model.interface import SupportsGeneration, SupportsPerRequestState, SupportsPooling
from pagedformers.model.loader import load_model
from pagedformers.parallel_plans import SINGLE, ParallelState
from pagedformers.pooling_params import PoolingParams

logger = init_logger(__name__)

R = TypeVar("R")

_GiB = 1 << 30


@dataclass
class WorkerOutput:
    hidden: torch.Tensor | None  # [T, hidden] final hidden states (where this rank has them)
    logits: torch.Tensor | None  # [len(plan.logit_rows), vocab]: the model's dtype or float32 (compute_logits)


class Worker:
    def __init__(self, config: EngineConfig, state: ParallelState = SINGLE) -> None:
        self.config = config
        self.state = state
        self.model, self.forward, self.kv_specs, self.platform, self.lora = load_model(config, state)
        self.num_blocks = num_kv_blocks(config, self.kv_specs, self.platform.default_kv_cache_bytes)
        self.request_states: dict[str, Cache] | None = None
        self.done_chunks: dict[str, tuple[int, torch.Tensor]] = {}  # request -> its last chunk's start, hidden
        self.failed_chunks: dict[str, Exception] = {}  # request -> why its last chunk failed
        if isinstance(self.model, SupportsPerRequestState):
            self.request_states = {}
            logger.info("%s keeps layer state per request (conv / linear-attention states, indexer keys): each "
                        "step runs one forward per request (slower than one flat batch).", type(self.model).__name__)
        self.kv_caches = {}

    def apply_model(self, fn: Callable[[nn.Module], R]) -> R:
        """fn(model); what the platform derived from the modules (captured graphs) is dropped, as fn may have
        changed them."""
        self.forward.reset()
        return fn(self.model)

    def allocate_kv_cache(self, num_blocks: int) -> None:
        """Called once every rank agreed on num_blocks (the smallest of their budgets)."""
        self.num_blocks = num_blocks
        self.forward.reset()  # graphs captured over earlier caches would write to freed memory
        self.kv_caches = allocate_kv_caches(self.kv_specs, num_blocks, self.config.cache.block_size,
                                            self.config.model.dtype, self.config.device.device)
        # Layers whose window keeps the prompt attend through the plain masked path, whatever the backend's kernels
        dtype = self.config.model.dtype
        self.zero_fresh_blocks = keeps_prompt_in_window(self.config.model.hf_config) or any(
            self.forward.attention.reads_unwritten_rows(spec, dtype) for spec in self.kv_specs.values())
        with torch.inference_mode():
            self.forward.prepare(self.kv_caches)

    @torch.inference_mode()
    def check_hf_parity(self) -> None:
        """The load-time guard (parity_guard.py), for transformers shells that generate, in one process: a model
        whose paged attention diverges from transformers' own is refused, not served wrong."""
        model, config = self.model, self.config
        if not (config.model.check_hf_parity and isinstance(model, TransformersBase) and self.request_states is None
                and config.model.runner == "generate" and config.parallel.world_size == 1):
            logger.debug("No parity guard: native models, hybrids, pooling and parallel ranks skip it")
            return
        block_size, device = config.cache.block_size, config.device.device
        check_hf_parity(model, lambda chunk: self.forward(prepare_inputs([chunk], block_size, device), self.kv_caches),
                        config.model.dtype, block_size, device)

    def pool(self, hidden: torch.Tensor, token_ids: list[int], params: PoolingParams) -> torch.Tensor:
        assert isinstance(self.model, SupportsPooling), "pooling requests reach pooling models only"
        return self.model.pool(hidden, token_ids, params)

    @torch.inference_mode()
    def execute(self, plan: StepPlan) -> WorkerOutput:
        """Run this rank's part of the step. With pipeline stages, hidden states go stage to stage and
        the last stage's logits come back to rank 0 (the driver), which returns them."""
        try:
            return self._execute(plan)
        finally:
            if self.lora is not None:  # a later forward outside a step (apply_model) runs the base
                self.lora.set_batch([], [])

    def _execute(self, plan: StepPlan) -> WorkerOutput:
        if plan.fresh_blocks and self.kv_caches and self.zero_fresh_blocks:
            zero_blocks(self.kv_caches, plan.fresh_blocks)
        if self.lora is not None:
            for slot, adapter in plan.lora_loads:
                self.lora.load(slot, adapter)
            self.lora.set_batch([c.lora_slot for c in plan.chunks], [len(c.token_ids) for c in plan.chunks])
        if self.request_states is not None:
            for request_id in plan.finished_request_ids:
                self.request_states.pop(request_id, None)
                self.done_chunks.pop(request_id, None)
                self.failed_chunks.pop(request_id, None)
            hidden = torch.cat([self._execute_chunk(c) for c in plan.chunks])
            return WorkerOutput(hidden, self._logits(hidden, plan.logit_rows))
        inputs = prepare_inputs(plan.chunks, self.config.cache.block_size, self.config.device.device,
                                plan.stable_steps)
        stage = {}
        if not self.state.is_first_stage:
            stage["stage_input"] = self._recv((len(inputs.input_ids), self.config.model.text_config.hidden_size),
                                              self.config.model.dtype, self.state.prev_rank)
        hidden = self.forward(inputs, self.kv_caches, **stage)
        if not self.state.is_last_stage:
            dist.send(hidden.float().contiguous(), self.state.next_rank)  # float32 on the wire: gloo-safe
            hidden = None
        logits = self._logits(hidden, plan.logit_rows) if hidden is not None else None
        if self.state.pp_size > 1 and plan.logit_rows:
            logits = self._logits_to_driver(logits, len(plan.logit_rows))
        return WorkerOutput(hidden, logits)

    def _logits(self, hidden: torch.Tensor, rows: list[int]) -> torch.Tensor | None:
        if not rows:
            return None
        assert isinstance(self.model, SupportsGeneration), "logit rows are planned for generation models only"
        return self.model.compute_logits(_take_rows(hidden, rows))

    def _execute_chunk(self, chunk: Chunk) -> torch.Tensor:
        """One request's chunk as its own [1, n] row, with its own state -> hidden states [n, hidden]."""
        error = self.failed_chunks.pop(chunk.request_id, None)
        if error is not None and chunk.start > 0:  # the engine's retry of a chunk whose state the failure dropped:
            raise error  # its cause, not the lost state (from position 0 a fresh state may well succeed alone)
        done = self.done_chunks.pop(chunk.request_id, None)
        if done is not None and done[0] == chunk.start and done[1].shape[0] == len(chunk.token_ids):
            return done[1]  # ran in a step that failed on another request: its state moved past it already
        if chunk.start == 0:  # a new request, or one preempted and now recomputed
            self.request_states[chunk.request_id] = self.model.create_state()
        state = self.request_states.get(chunk.request_id)
        if state is None or state.num_seen_tokens != chunk.start:
            raise RuntimeError(f"Request {chunk.request_id!r} resumes at position {chunk.start}, but its layer state "
                               f"holds {'nothing' if state is None else state.num_seen_tokens} tokens (a failed step "
                               "advanced it): it cannot continue.")
        pieces = [chunk] if chunk.start == 0 or self.model.resumes_prefill else _one_token_chunks(chunk)
        try:
            hidden = torch.cat([self._forward_with_state(piece, state) for piece in pieces])
        except Exception as e:
            del self.request_states[chunk.request_id]  # some layers may have advanced it: never reuse it
            self.failed_chunks[chunk.request_id] = e
            raise
        state.num_seen_tokens += len(chunk.token_ids)
        # Kept until the step's outcome is known: if a later request of the step fails, the engine runs each request
        # again on its own, and this one's state cannot run the chunk twice.
        self.done_chunks[chunk.request_id] = (chunk.start, hidden)
        return hidden

    def _forward_with_state(self, chunk: Chunk, state: Cache) -> torch.Tensor:
        inputs = prepare_inputs([chunk], self.config.cache.block_size, self.config.device.device)
        if self.lora is not None:
            self.lora.set_batch([chunk.lora_slot], [len(chunk.token_ids)])
        return self.forward(inputs, self.kv_caches, state=state)

    def _logits_to_driver(self, logits: torch.Tensor | None, num_rows: int) -> torch.Tensor | None:
        last_stage_head = (self.state.pp_size - 1) * self.state.tp_size
        if self.state.rank == last_stage_head:
            dist.send(logits.float().contiguous(), 0)  # float32 on the wire, as _recv takes it
        elif self.state.rank == 0:
            return self._recv((num_rows, self.config.model.text_config.vocab_size), torch.float32, last_stage_head)
        return logits

    def _recv(self, shape: tuple[int, ...], dtype: torch.dtype, src: int) -> torch.Tensor:
        buffer = torch.empty(shape, dtype=torch.float32, device=self.config.device.device)
        dist.recv(buffer, src)
        return buffer.to(dtype)


def _one_token_chunks(chunk: Chunk) -> list[Chunk]:
    types = chunk.token_type_ids
    return [Chunk(chunk.start + i, [token], chunk.block_table, None if types is None else [types[i]], chunk.request_id,
                  num_prompt_tokens=chunk.num_prompt_tokens)
            for i, token in enumerate(chunk.token_ids)]


def num_kv_blocks(config: EngineConfig, kv_specs: dict[int, LayerKVSpec], default_bytes: Callable[..., int]) -> int:
    """The blocks this rank's budget holds (`default_bytes(config)`: the platform's budget when none was given)."""
    block_size, dtype = config.cache.block_size, config.model.dtype
    bytes_per_block = block_size * sum(s.bytes_per_token(dtype) for s in kv_specs.values())
    budget = config.cache.kv_cache_memory_bytes or default_bytes(config)
    # No use holding more than every sequence at full length could fill; pooling keeps
    # nothing between steps, so one step's tokens are enough.
    max_len, max_seqs = config.model.max_model_len, config.scheduler.max_num_seqs
    most_useful = max_seqs * -(-max_len // block_size) + 1
    if config.model.runner == "pooling":
        most_useful = -(-max(config.scheduler.max_num_batched_tokens, max_len) // block_size) + max_seqs
    # No attention layer (a pure state-space model): blocks cost nothing, the scheduler still counts them.
    num_blocks = min(budget // bytes_per_block, most_useful) if bytes_per_block else most_useful
    if num_blocks < 1:
        raise ValueError(f"kv_cache_memory_bytes={budget} cannot hold one KV block of {bytes_per_block} bytes")
    logger.info("KV cache: %d blocks of %d tokens (%.2f GiB).", num_blocks, block_size,
                num_blocks * bytes_per_block / _GiB)
    return int(num_blocks)


def _take_rows(hidden: torch.Tensor, rows: list[int]) -> torch.Tensor:
    """hidden[rows], without an index op (~25 us at batch 1) where rows are all of them in order, as in
    every decode-only step."""
    return hidden if len(rows) == hidden.shape[0] and rows == list(range(len(rows))) else hidden[rows]
