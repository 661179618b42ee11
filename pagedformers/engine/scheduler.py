"""Continuous batching under a token budget.

Each step: running requests first (decodes and unfinished prefill chunks, in arrival
order), then waiting requests while the budget, `max_num_seqs` and the block pool
allow. A request that cannot get a block preempts the newest running request, which
frees its blocks and is recomputed later (its tokens so far become its prompt).
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from pagedformers.engine.kv_cache_manager import KVCacheManager
from pagedformers.engine.request import Request, RequestStatus


@dataclass
class ScheduledRequest:
    request: Request
    start: int  # the request's num_computed_tokens when scheduled: this chunk's first position
    num_new_tokens: int
    block_table: list[int]  # the request's KV blocks, in order
    will_sample: bool  # the chunk reaches the end of the request's tokens: the step yields its next token


@dataclass
class SchedulerOutput:
    scheduled: list[ScheduledRequest] = field(default_factory=list)
    preempted: list[Request] = field(default_factory=list)
    fresh_blocks: list[int] = field(default_factory=list)  # first use: to be zeroed before the step
    finished_request_ids: list[str] = field(default_factory=list)  # finished, aborted or preempted since last step
    stable_steps: int = 0  # see Scheduler._stable_steps

    @property
    def num_tokens(self) -> int:
        return sum(s.num_new_tokens for s in self.scheduled)


class Scheduler:
    def __init__(self, kv_manager: KVCacheManager, max_num_seqs: int, max_num_batched_tokens: int,
                 max_loras: int = 0) -> None:
        self.kv = kv_manager
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.max_loras = max_loras  # LoRA slots: most distinct adapters among running requests
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self.num_preemptions = 0
        self.finished_request_ids: list[str] = []  # since the last schedule()

    @property
    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def add(self, req: Request) -> None:
        self.waiting.append(req)

    def schedule(self) -> SchedulerOutput:
        out = SchedulerOutput()
        budget = self._schedule_running(out, self.max_num_batched_tokens)
        if not out.preempted:
            self._schedule_waiting(out, budget)
        out.fresh_blocks = self.kv.take_fresh_blocks()
        if out.scheduled:  # else they wait for the next step that runs: its plan tells the workers
            out.finished_request_ids, self.finished_request_ids = self.finished_request_ids, []
        out.stable_steps = self._stable_steps(out)
        return out

    def _stable_steps(self, out: SchedulerOutput) -> int:
        """How many more steps this decode batch keeps its requests unless one stops before its max_tokens: 0
        unless every scheduled request decodes and none waits. A platform that captures a graph per batch size
        (decode graphs on CPU) weighs the capture against it."""
        if self.waiting or not out.scheduled or any(s.num_new_tokens != 1 or s.start == 0 for s in out.scheduled):
            return 0
        return min(s.request.max_tokens - s.request.num_output_tokens for s in out.scheduled)

    def _schedule_running(self, out: SchedulerOutput, budget: int) -> int:
        i = 0
        while i < len(self.running) and budget > 0:
            req = self.running[i]
            num_new = _chunk_len(req, req.num_computed_tokens, min(req.num_tokens - req.num_computed_tokens, budget))
            if num_new == 0:  # its next bidirectional range does not fit in what is left of the budget
                i += 1
                continue
            while not self.kv.allocate(req, num_new):
                victim = self.running.pop()
                self._preempt(victim, out)
                if victim is req:
                    return budget
            out.scheduled.append(self._scheduled(req, num_new))
            budget -= num_new
            i += 1
        return budget

    def _schedule_waiting(self, out: SchedulerOutput, budget: int) -> None:
        while self.waiting and budget > 0 and len(self.running) < self.max_num_seqs:
            req = self.waiting[0]
            if req.lora_request is not None and not self._adapter_fits(req.lora_request.lora_int_id):
                break  # its adapter needs a slot that running requests hold: it waits (first come, first served)
            if req.pooling_params is not None:  # whole prompts only (bidirectional encoders need them)
                if req.num_tokens > budget and out.scheduled:
                    break
                cached, num_cached, num_new = [], 0, req.num_tokens
            else:
                cached = self.kv.lookup_prefix(req)
                num_cached = len(cached) * self.kv.block_size
                num_new = _chunk_len(req, num_cached, min(req.num_tokens - num_cached, budget))
                if num_new == 0:
                    break  # its next bidirectional range waits for a step with budget for it whole
            if not self.kv.allocate(req, num_new, cached):
                break
            self.waiting.popleft()
            self.kv.record_lookup(req.num_tokens, num_cached)
            req.num_computed_tokens = num_cached
            req.num_cached_tokens = num_cached
            req.status = RequestStatus.RUNNING
            self.running.append(req)
            out.scheduled.append(self._scheduled(req, num_new))
            budget -= num_new

    def _adapter_fits(self, lora_id: int) -> bool:
        """Whether running it keeps the running requests' distinct LoRA adapters within the slots (max_loras)."""
        running = {r.lora_request.lora_int_id for r in self.running if r.lora_request is not None}
        return lora_id in running or len(running) < self.max_loras

    def _scheduled(self, req: Request, num_new: int) -> ScheduledRequest:
        start = req.num_computed_tokens
        return ScheduledRequest(req, start, num_new, self.kv.block_tables[req.request_id],
                                start + num_new == req.num_tokens)

    def _preempt(self, req: Request, out: SchedulerOutput) -> None:
        self.kv.free(req)
        req.num_computed_tokens = 0
        req.status = RequestStatus.WAITING
        self.waiting.appendleft(req)
        self.num_preemptions += 1
        out.preempted.append(req)
        self.finished_request_ids.append(req.request_id)

    def update_after_step(self, out: SchedulerOutput) -> None:
        """Advance computed counts and register newly full blocks with the prefix cache."""
        for s in out.scheduled:
            s.request.num_computed_tokens += s.num_new_tokens
            self.kv.cache_full_blocks(s.request)

    def finish(self, req: Request) -> None:
        """Drop a finished (or aborted) request and free its blocks."""
        if req in self.running:
            self.running.remove(req)
        elif req in self.waiting:
            self.waiting.remove(req)
        self.kv.free(req)
        self.finished_request_ids.append(req.request_id)


def _chunk_len(req: Request, start: int, num_new: int) -> int:
    """num_new, cut so that the chunk does not end inside one of the prompt's bidirectional ranges (0: it
    cannot run this step)."""
    media = req.multi_modal_inputs
    if media is None or not media.bidirectional:
        return num_new
    return media.chunk_end(start, start + num_new) - start
