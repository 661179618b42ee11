"""A worker: one rank's model shard and KV cache, running the forward pass of each step plan."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from pagedformers.adapter.resolve import resolve_model_cls
from pagedformers.attention import ForwardContext, forward_context
from pagedformers.attention.kv_cache import LayerKVSpec, allocate_kv_caches
from pagedformers.config import EngineConfig
from pagedformers.engine.inputs import StepPlan, prepare_inputs
from pagedformers.loading.weights import iterate_weights
from pagedformers.logger import init_logger

logger = init_logger(__name__)

_GiB = 1 << 30


@dataclass
class WorkerOutput:
    hidden: torch.Tensor | None  # [T, hidden] final hidden states (where this rank has them)
    logits: torch.Tensor | None  # [len(plan.logit_rows), vocab] float32


def build_model(config: EngineConfig) -> nn.Module:
    """Resolve the implementation, build it on meta, load its weights."""
    model = resolve_model_cls(config)(config)
    meta_lm = model.meta_causal_lm()
    weights = iterate_weights(config.model_path, config.gguf_file, meta_lm)
    model.load_weights(weights, model.checkpoint_name_map(meta_lm))
    return model


class Worker:
    def __init__(self, config: EngineConfig) -> None:
        self.config = config
        torch.manual_seed(config.seed)
        self.model = build_model(config)
        self.kv_specs = self.model.probe_kv_specs()
        self.num_blocks = num_kv_blocks(config, self.kv_specs)

    def allocate_kv_cache(self, num_blocks: int) -> None:
        """Called once every rank agreed on num_blocks (the smallest of their budgets)."""
        self.num_blocks = num_blocks
        self.kv_caches = allocate_kv_caches(self.kv_specs, num_blocks, self.config.block_size,
                                            self.config.torch_dtype, self.config.device)

    @torch.inference_mode()
    def execute(self, plan: StepPlan) -> WorkerOutput:
        step = prepare_inputs(plan.chunks, self.config.block_size, self.config.device)
        extra = {} if step.token_type_ids is None else {"token_type_ids": step.token_type_ids}
        with forward_context(ForwardContext(step.metadata, self.kv_caches)):
            hidden = self.model(step.input_ids, step.positions, **extra)
        logits = self.model.compute_logits(hidden[plan.logit_rows]) if plan.logit_rows else None
        return WorkerOutput(hidden, logits)


def num_kv_blocks(config: EngineConfig, kv_specs: dict[int, LayerKVSpec]) -> int:
    bytes_per_block = config.block_size * sum(s.bytes_per_token(config.torch_dtype) for s in kv_specs.values())
    budget = config.kv_cache_memory_bytes or _default_kv_bytes(config.device)
    # No use holding more than every sequence at full length could fill; pooling keeps
    # nothing between steps, so one step's tokens are enough.
    most_useful = config.max_num_seqs * -(-config.max_model_len // config.block_size) + 1
    if config.runner == "pooling":
        most_useful = -(-max(config.max_num_batched_tokens, config.max_model_len) // config.block_size) + \
            config.max_num_seqs
    num_blocks = min(budget // bytes_per_block, most_useful)
    if num_blocks < 1:
        raise ValueError(f"kv_cache_memory_bytes={budget} cannot hold one KV block of {bytes_per_block} bytes")
    logger.info("KV cache: %d blocks of %d tokens (%.2f GiB).", num_blocks, config.block_size,
                num_blocks * bytes_per_block / _GiB)
    return int(num_blocks)


def _default_kv_bytes(device: str) -> int:
    if device.startswith("cuda"):
        free, _ = torch.cuda.mem_get_info()
        return int(free * 0.8)
    with open("/proc/meminfo") as f:
        available = next(int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable"))
    return min(int(available * 0.3), 4 * _GiB)
