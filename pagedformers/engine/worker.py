"""A worker: one rank's model shard and KV cache, running the forward pass of each step plan.

Conv / linear-attention hybrids (`model.needs_per_request_state`) also keep each request's layer state
here, keyed by request id: created at position 0, carried across prefill chunks and decodes, dropped when
the request ends. They run one request per forward, which is slower than one flat batch.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, TypeVar

import torch
import torch.distributed as dist
from torch import nn
from transformers.cache_utils import Cache

from pagedformers.adapter.resolve import resolve_model_cls
from pagedformers.attention import ForwardContext, forward_context
from pagedformers.attention.kv_cache import LayerKVSpec, allocate_kv_caches, zero_blocks
from pagedformers.config import EngineConfig
from pagedformers.engine.decode_graphs import DecodeGraphs
from pagedformers.engine.inputs import Chunk, StepPlan, prepare_inputs
from pagedformers.kernels.cpu import kernel_attends
from pagedformers.layers.cpu_linear import pack_linears, record_siblings
from pagedformers.layers.cpu_mlp import fuse_gated_mlps
from pagedformers.layers.cpu_norm import fuse_rms_norms
from pagedformers.loading.weights import iterate_weights
from pagedformers.logger import init_logger
from pagedformers.parallel_plans import SINGLE, ParallelState, apply_parallel_plans

logger = init_logger(__name__)

R = TypeVar("R")

_GiB = 1 << 30


@dataclass
class WorkerOutput:
    hidden: torch.Tensor | None  # [T, hidden] final hidden states (where this rank has them)
    logits: torch.Tensor | None  # [len(plan.logit_rows), vocab] float32


def build_model(config: EngineConfig, state: ParallelState = SINGLE) -> nn.Module:
    """Resolve the implementation, build it on meta, split it for this rank, load its weights.
    Its linears are packed later (Worker.__init__), once a probe forward showed which share an input."""
    model = resolve_model_cls(config)(config)
    apply_parallel_plans(model, state)
    meta_lm = model.meta_causal_lm()
    weights = iterate_weights(config.model.path, config.model.gguf_file, meta_lm)
    model.load_weights(weights, model.checkpoint_name_map(meta_lm))
    fuse_rms_norms(model, config.model.dtype, config.device.device)  # also builds or loads the CPU kernels, now
    return model


class Worker:
    def __init__(self, config: EngineConfig, state: ParallelState = SINGLE) -> None:
        self.config = config
        self.state = state
        torch.manual_seed(config.model.seed)
        self.model = build_model(config, state)
        with record_siblings(self.model) as siblings:
            self.kv_specs = self.model.probe_kv_specs()
        pack_linears(self.model, config.model.dtype, config.device.device, siblings)
        fuse_gated_mlps(self.model, config.model.dtype, config.device.device)
        self.num_blocks = num_kv_blocks(config, self.kv_specs)
        self.per_request_state = getattr(self.model, "needs_per_request_state", False)
        self.request_states: dict[str, Cache] = {}
        self.decode_graphs = DecodeGraphs(self.model) if self._traces_decodes() else None
        if self.per_request_state:
            logger.info("%s keeps conv / linear-attention state per request: each step runs one forward per "
                        "request (slower than one flat batch).", type(self.model.model).__name__)

    def apply_model(self, fn: Callable[[nn.Module], R]) -> R:
        """fn(model); traced decode graphs are dropped, as fn may have changed the modules they recorded."""
        if self.decode_graphs is not None:
            self.decode_graphs.clear()
        return fn(self.model)

    def _traces_decodes(self) -> bool:
        """Decode graphs: single-rank CPU models whose layers keep no per-request state of their own."""
        return (not self.config.device.enforce_eager and self.config.device.device == "cpu" and self.state.tp_size == 1
                and self.state.pp_size == 1 and not self.per_request_state)

    def allocate_kv_cache(self, num_blocks: int) -> None:
        """Called once every rank agreed on num_blocks (the smallest of their budgets)."""
        self.num_blocks = num_blocks
        self.kv_caches = allocate_kv_caches(self.kv_specs, num_blocks, self.config.cache.block_size,
                                            self.config.model.dtype, self.config.device.device)
        # Only the plain PyTorch decode path reads whole blocks, unwritten rows included (masked).
        self.zero_fresh_blocks = not all(kernel_attends(s.head_dim, s.v_head_dim, self.config.model.dtype,
                                                        self.config.device.device) for s in self.kv_specs.values())

    @torch.inference_mode()
    def execute(self, plan: StepPlan) -> WorkerOutput:
        """Run this rank's part of the step. With pipeline stages, hidden states go stage to stage and
        the last stage's logits come back to rank 0 (the driver), which returns them."""
        if plan.fresh_blocks and self.kv_caches and self.zero_fresh_blocks:
            zero_blocks(self.kv_caches, plan.fresh_blocks)
        for request_id in plan.finished_request_ids:
            self.request_states.pop(request_id, None)
        if self.per_request_state:
            hidden = torch.cat([self._execute_chunk(c) for c in plan.chunks])
            logits = self.model.compute_logits(_take_rows(hidden, plan.logit_rows)) if plan.logit_rows else None
            return WorkerOutput(hidden, logits)
        step = prepare_inputs(plan.chunks, self.config.cache.block_size, self.config.device.device)
        extra = step.model_kwargs()
        if not self.state.is_first_stage:
            self.model.pp_stage_input = self._recv((len(step.input_ids), self.config.model.text_config.hidden_size),
                                                   self.config.model.dtype, self.state.prev_rank)
        try:
            hidden = None
            if self.decode_graphs is not None and not extra and step.metadata.num_decodes == len(step.input_ids):
                hidden = self.decode_graphs.forward(step, self.kv_caches, plan.decode_steps_ahead)
            if hidden is None:
                with forward_context(ForwardContext(step.metadata, self.kv_caches)):
                    hidden = self.model(step.input_ids, step.positions, **extra)
        finally:
            self.model.pp_stage_input = None
        if not self.state.is_last_stage:
            dist.send(hidden.float().contiguous(), self.state.next_rank)  # float32 on the wire: gloo-safe
            hidden = None
        logits = (self.model.compute_logits(_take_rows(hidden, plan.logit_rows))
                  if plan.logit_rows and hidden is not None else None)
        if self.state.pp_size > 1 and plan.logit_rows:
            logits = self._logits_to_driver(logits, len(plan.logit_rows))
        return WorkerOutput(hidden, logits)

    def _execute_chunk(self, chunk: Chunk) -> torch.Tensor:
        """One request's chunk as its own [1, n] row, with its own state -> hidden states [n, hidden]."""
        if chunk.start == 0:  # a new request, or one preempted and now recomputed
            self.request_states[chunk.request_id] = self.model.create_state()
        state = self.request_states.get(chunk.request_id)
        if state is None or state.num_seen_tokens != chunk.start:
            raise RuntimeError(f"Request {chunk.request_id!r} resumes at position {chunk.start}, but its layer state "
                               f"holds {'nothing' if state is None else state.num_seen_tokens} tokens (a failed step "
                               "advanced it): it cannot continue.")
        pieces = [chunk] if chunk.start == 0 or self.model.resumes_prefill else _one_token_chunks(chunk)
        try:
            hidden = torch.cat([self._forward(piece, state) for piece in pieces])
        except Exception:
            del self.request_states[chunk.request_id]  # some layers may have advanced it: never reuse it
            raise
        state.num_seen_tokens += len(chunk.token_ids)
        return hidden

    def _forward(self, chunk: Chunk, state: Cache) -> torch.Tensor:
        step = prepare_inputs([chunk], self.config.cache.block_size, self.config.device.device)
        extra = step.model_kwargs()
        with forward_context(ForwardContext(step.metadata, self.kv_caches)):
            return self.model(step.input_ids, step.positions, state=state, **extra)

    def _logits_to_driver(self, logits: torch.Tensor | None, num_rows: int) -> torch.Tensor | None:
        last_stage_head = (self.state.pp_size - 1) * self.state.tp_size
        if self.state.rank == last_stage_head:
            dist.send(logits.contiguous(), 0)
        elif self.state.rank == 0:
            return self._recv((num_rows, self.config.model.text_config.vocab_size), torch.float32, last_stage_head)
        return logits

    def _recv(self, shape: tuple[int, ...], dtype: torch.dtype, src: int) -> torch.Tensor:
        buffer = torch.empty(shape, dtype=torch.float32, device=self.config.device.device)
        dist.recv(buffer, src)
        return buffer.to(dtype)


def _one_token_chunks(chunk: Chunk) -> list[Chunk]:
    types = chunk.token_type_ids
    return [Chunk(chunk.start + i, [token], chunk.block_table, None if types is None else [types[i]], chunk.request_id)
            for i, token in enumerate(chunk.token_ids)]


def num_kv_blocks(config: EngineConfig, kv_specs: dict[int, LayerKVSpec]) -> int:
    bytes_per_block = config.cache.block_size * sum(s.bytes_per_token(config.model.dtype) for s in kv_specs.values())
    budget = config.cache.kv_cache_memory_bytes or _default_kv_bytes(config.device.device)
    # No use holding more than every sequence at full length could fill; pooling keeps
    # nothing between steps, so one step's tokens are enough.
    most_useful = config.scheduler.max_num_seqs * -(-config.model.max_model_len // config.cache.block_size) + 1
    if config.model.runner == "pooling":
        most_useful = -(-max(config.scheduler.max_num_batched_tokens, config.model.max_model_len) // config.cache.block_size) + \
            config.scheduler.max_num_seqs
    # No attention layer (a pure state-space model): blocks cost nothing, the scheduler still counts them.
    num_blocks = min(budget // bytes_per_block, most_useful) if bytes_per_block else most_useful
    if num_blocks < 1:
        raise ValueError(f"kv_cache_memory_bytes={budget} cannot hold one KV block of {bytes_per_block} bytes")
    logger.info("KV cache: %d blocks of %d tokens (%.2f GiB).", num_blocks, config.cache.block_size,
                num_blocks * bytes_per_block / _GiB)
    return int(num_blocks)


def _default_kv_bytes(device: str) -> int:
    if device.startswith("cuda"):
        free, _ = torch.cuda.mem_get_info()
        return int(free * 0.8)
    with open("/proc/meminfo") as f:
        available = next(int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable"))
    return min(int(available * 0.3), 4 * _GiB)


def _take_rows(hidden: torch.Tensor, rows: list[int]) -> torch.Tensor:
    """hidden[rows], without an index op (~25 us at batch 1) where rows are all of them in order, as in
    every decode-only step."""
    return hidden if len(rows) == hidden.shape[0] and rows == list(range(len(rows))) else hidden[rows]
