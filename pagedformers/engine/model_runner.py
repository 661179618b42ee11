"""Runs one scheduled step: build inputs, run the model in a forward context, sample."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from pagedformers.adapter.resolve import resolve_model_cls
from pagedformers.attention import ForwardContext, forward_context
from pagedformers.attention.kv_cache import allocate_kv_caches
from pagedformers.config import EngineConfig
from pagedformers.engine.inputs import StepInputs, prepare_inputs
from pagedformers.engine.request import Request
from pagedformers.engine.sampler import Sampler, logprob_entries
from pagedformers.engine.scheduler import SchedulerOutput
from pagedformers.loading.weights import iterate_weights
from pagedformers.logger import init_logger
from pagedformers.outputs import Logprob

logger = init_logger(__name__)

_GiB = 1 << 30


@dataclass
class ModelRunnerOutput:
    sampled: dict[str, tuple[int, tuple[float, dict[int, Logprob]] | None]] = field(default_factory=dict)
    prompt_logprobs: dict[str, list[dict[int, Logprob]]] = field(default_factory=dict)
    pooled: dict[str, torch.Tensor] = field(default_factory=dict)


class ModelRunner:
    def __init__(self, config: EngineConfig) -> None:
        self.config = config
        torch.manual_seed(config.seed)
        model_cls = resolve_model_cls(config)
        self.model = model_cls(config)
        meta_lm = self.model.meta_causal_lm()
        weights = iterate_weights(config.model_path, config.gguf_file, meta_lm)
        self.model.load_weights(weights, self.model.checkpoint_name_map(meta_lm))
        self.kv_specs = self.model.probe_kv_specs()
        self.num_blocks = self._num_kv_blocks()
        self.kv_caches = allocate_kv_caches(self.kv_specs, self.num_blocks, config.block_size, config.torch_dtype,
                                            config.device)
        self.sampler = Sampler(config.seed)

    def _num_kv_blocks(self) -> int:
        cfg = self.config
        bytes_per_block = cfg.block_size * sum(s.bytes_per_token(cfg.torch_dtype) for s in self.kv_specs.values())
        budget = cfg.kv_cache_memory_bytes or _default_kv_bytes(cfg.device)
        # No use holding more than every sequence at full length could fill; pooling keeps
        # nothing between steps, so one step's tokens are enough.
        most_useful = cfg.max_num_seqs * -(-cfg.max_model_len // cfg.block_size) + 1
        if cfg.runner == "pooling":
            most_useful = -(-max(cfg.max_num_batched_tokens, cfg.max_model_len) // cfg.block_size) + cfg.max_num_seqs
        num_blocks = min(budget // bytes_per_block, most_useful)
        if num_blocks < 1:
            raise ValueError(f"kv_cache_memory_bytes={budget} cannot hold one KV block of {bytes_per_block} bytes")
        logger.info("KV cache: %d blocks of %d tokens (%.2f GiB).", num_blocks, cfg.block_size,
                    num_blocks * bytes_per_block / _GiB)
        return int(num_blocks)

    @torch.inference_mode()
    def execute(self, out: SchedulerOutput) -> ModelRunnerOutput:
        step = prepare_inputs(out.scheduled, self.config.block_size, self.config.device)
        extra = {} if step.token_type_ids is None else {"token_type_ids": step.token_type_ids}
        with forward_context(ForwardContext(step.metadata, self.kv_caches)):
            hidden = self.model(step.input_ids, step.positions, **extra)
        result = ModelRunnerOutput()
        self._pool(step, hidden, result)
        self._prompt_logprobs(step, hidden, result)
        rows = [i for i, s in enumerate(step.order) if s.will_sample and s.request.pooling_params is None]
        if rows:
            logits = self.model.compute_logits(hidden[[step.last_row(i) for i in rows]])
            reqs = [step.order[i].request for i in rows]
            sampled = self.sampler(logits, reqs)
            for r, token, lp in zip(reqs, sampled.token_ids, sampled.logprobs):
                result.sampled[r.request_id] = (token, lp)
        return result

    def _pool(self, step: StepInputs, hidden: torch.Tensor, result: ModelRunnerOutput) -> None:
        for i, s in enumerate(step.order):
            req = s.request
            if req.pooling_params is not None:
                rows = hidden[step.row_starts[i]:step.row_starts[i] + s.num_new_tokens]
                result.pooled[req.request_id] = self.model.pool(rows, req.all_token_ids, req.pooling_params).cpu()

    def _prompt_logprobs(self, step: StepInputs, hidden: torch.Tensor, result: ModelRunnerOutput) -> None:
        """Logprobs of each prompt token given the ones before it, for requests that asked."""
        for i, s in enumerate(step.order):
            req: Request = s.request
            k = req.params.prompt_logprobs
            start = s.start
            end = min(start + s.num_new_tokens, req.num_prompt_tokens - 1)  # predicts tokens start+1 .. end
            if k is None or end <= start:
                continue
            rows = slice(step.row_starts[i], step.row_starts[i] + end - start)
            logprobs = torch.log_softmax(self.model.compute_logits(hidden[rows]), dim=-1)
            targets = torch.tensor(req.all_token_ids[start + 1:end + 1])
            result.prompt_logprobs[req.request_id] = [
                logprob_entries(row, int(t), k)[1] for row, t in zip(logprobs, targets)
            ]


def _default_kv_bytes(device: str) -> int:
    if device.startswith("cuda"):
        free, _ = torch.cuda.mem_get_info()
        return int(free * 0.8)
    with open("/proc/meminfo") as f:
        available = next(int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable"))
    return min(int(available * 0.3), 4 * _GiB)
