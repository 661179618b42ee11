"""The driver's side of a step: plan it for the workers, then sample, pool and take prompt logprobs."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from pagedformers.config import EngineConfig
from pagedformers.engine.inputs import StepPlan, make_chunk, order_for_step
from pagedformers.engine.lora_slots import LoRASlots
from pagedformers.engine.sampler import Sampler, batched_logprob_entries
from pagedformers.engine.scheduler import ScheduledRequest, SchedulerOutput
from pagedformers.outputs import Logprob

if TYPE_CHECKING:
    from pagedformers.engine.executor import Executor


@dataclass
class ModelRunnerOutput:
    sampled: dict[str, tuple[int, tuple[float, dict[int, Logprob]] | None]] = field(default_factory=dict)
    prompt_logprobs: dict[str, list[dict[int, Logprob]]] = field(default_factory=dict)
    pooled: dict[str, torch.Tensor] = field(default_factory=dict)


@dataclass
class _Rows:
    """Where each request's needs sit in the plan's logit rows."""
    sample: dict[int, int] = field(default_factory=dict)  # order index -> logit row
    prompt: dict[int, tuple[int, int, int]] = field(default_factory=dict)  # order index -> (first, count, start)


class ModelRunner:
    def __init__(self, config: EngineConfig, executor: Executor) -> None:
        self.config = config
        self.executor = executor
        self.sampler = Sampler(config.model.seed)
        self.lora_slots = LoRASlots(config.lora.max_loras) if config.lora.enabled else None

    def execute(self, out: SchedulerOutput) -> ModelRunnerOutput:
        order = order_for_step(out.scheduled)
        row_starts = _row_starts(order)
        logit_rows, rows = _logit_rows(order, row_starts)
        loads = self.lora_slots.assign([s.request.lora_request for s in order if s.request.lora_request]) \
            if self.lora_slots else []
        slots = [self.lora_slots.slot(s.request.lora_request) if self.lora_slots else -1 for s in order]
        plan = StepPlan([make_chunk(s, slot) for s, slot in zip(order, slots)], logit_rows, out.fresh_blocks,
                        out.finished_request_ids, out.stable_steps, loads)
        try:
            wout = self.executor.execute(plan)
        except Exception:
            if self.lora_slots:
                self.lora_slots.forget(loads)
            raise
        result = ModelRunnerOutput()
        for i, s in enumerate(order):
            if s.request.pooling_params is not None:
                hidden = wout.hidden[row_starts[i]:row_starts[i] + s.num_new_tokens]
                result.pooled[s.request.request_id] = self.executor.driver_worker.pool(
                    hidden, s.request.all_token_ids, s.request.pooling_params).cpu()
        for i, (first, count, start) in rows.prompt.items():
            self._prompt_logprobs(order[i], wout.logits[first:first + count], start, result)
        if rows.sample:
            reqs = [order[i].request for i in rows.sample]
            picked = list(rows.sample.values())
            # Usually every logit row is sampled, in order: then a 4 MB gather (~0.3 ms at 32 x 32000) is skipped.
            logits = wout.logits if picked == list(range(len(wout.logits))) else wout.logits[picked]
            sampled = self.sampler(logits, reqs)
            for r, token, lp in zip(reqs, sampled.token_ids, sampled.logprobs):
                result.sampled[r.request_id] = (token, lp)
        return result

    def _prompt_logprobs(self, s: ScheduledRequest, logits: torch.Tensor, start: int,
                         result: ModelRunnerOutput) -> None:
        """Logprobs of each prompt token given the ones before it."""
        req = s.request
        logprobs = torch.log_softmax(logits.float(), dim=-1)
        targets = torch.tensor(req.all_token_ids[start + 1:start + 1 + logits.shape[0]]).to(logprobs.device)
        # All rows in one copy to the host (a GPU syncs once, not a few times a token)
        ks = [req.params.prompt_logprobs] * len(targets)
        rows = batched_logprob_entries(logprobs, targets, ks)
        result.prompt_logprobs[req.request_id] = [entries for _, entries in rows]


def _row_starts(order: list[ScheduledRequest]) -> list[int]:
    starts, total = [], 0
    for s in order:
        starts.append(total)
        total += s.num_new_tokens
    return starts


def _logit_rows(order: list[ScheduledRequest], row_starts: list[int]) -> tuple[list[int], _Rows]:
    logit_rows, rows = [], _Rows()
    for i, s in enumerate(order):
        req = s.request
        if req.pooling_params is not None:
            continue
        # Prompt logprobs: rows start .. end-1 predict prompt tokens start+1 .. end.
        end = min(s.start + s.num_new_tokens, req.num_prompt_tokens - 1)
        if req.params.prompt_logprobs is not None and end > s.start:
            rows.prompt[i] = (len(logit_rows), end - s.start, s.start)
            logit_rows.extend(range(row_starts[i], row_starts[i] + end - s.start))
        if s.will_sample:
            rows.sample[i] = len(logit_rows)
            logit_rows.append(row_starts[i] + s.num_new_tokens - 1)
    return logit_rows, rows
