"""Prometheus metrics of a served engine (vLLM's names, under the `pagedformers:` prefix).

Updated by the engine thread of AsyncLLM after every step; prometheus_client's metrics
are thread-safe, so the server renders them from the event loop at any time. Each
EngineMetrics has its own registry, so several engines can live in one process.
"""

from __future__ import annotations

from dataclasses import dataclass

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from pagedformers.engine.llm_engine import EngineStats
from pagedformers.outputs import PoolingRequestOutput, RequestOutput

_LATENCY_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
                    20.0, 40.0, 80.0)
_E2E_BUCKETS = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0, 240.0,
                480.0, 960.0)


@dataclass
class RequestStats:
    """What the metrics need to remember about one request between steps (times from time.monotonic)."""
    arrival: float
    num_prompt_tokens: int
    last_token: float | None = None
    num_generated: int = 0


class EngineMetrics:
    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
        self.num_running = Gauge("pagedformers:num_requests_running", "Sequences in the running batch.", registry=r)
        self.num_waiting = Gauge("pagedformers:num_requests_waiting", "Sequences waiting to run.", registry=r)
        self.max_num_running = Gauge("pagedformers:num_requests_running_max",
                                     "Most sequences running in one step since the server started.", registry=r)
        self.kv_cache_usage = Gauge("pagedformers:kv_cache_usage_perc", "Share of KV-cache blocks in use (0 to 1).",
                                    registry=r)
        self.prompt_tokens = Counter("pagedformers:prompt_tokens",
                                     "Prompt tokens of requests that produced a token or were pooled.", registry=r)
        self.generation_tokens = Counter("pagedformers:generation_tokens", "Generated tokens.", registry=r)
        self.request_success = Counter("pagedformers:request_success", "Finished requests, by finish reason.",
                                       ["finished_reason"], registry=r)
        self.num_preemptions = Counter("pagedformers:num_preemptions", "Sequences preempted (recomputed later).",
                                       registry=r)
        self.prefix_cache_queries = Counter("pagedformers:prefix_cache_queries", "Prompt tokens looked up in the "
                                            "prefix cache.", registry=r)
        self.prefix_cache_hits = Counter("pagedformers:prefix_cache_hits", "Prompt tokens found in the prefix cache.",
                                         registry=r)
        self.time_to_first_token = Histogram("pagedformers:time_to_first_token_seconds", "Time to first token.",
                                             buckets=_LATENCY_BUCKETS, registry=r)
        self.inter_token_latency = Histogram("pagedformers:inter_token_latency_seconds",
                                             "Time between two steps that gave a request tokens.",
                                             buckets=_LATENCY_BUCKETS, registry=r)
        self.e2e_request_latency = Histogram("pagedformers:e2e_request_latency_seconds",
                                             "Time from arrival to the last token.", buckets=_E2E_BUCKETS, registry=r)
        self._max_running = 0
        self._seen = {"preemptions": 0, "queries": 0, "hits": 0}

    def render(self) -> bytes:
        """The Prometheus text exposition format."""
        return generate_latest(self.registry)

    def on_engine_state(self, stats: EngineStats) -> None:
        """Refresh the gauges (and the counters the engine keeps as running totals)."""
        self.num_running.set(stats.num_running)
        self.num_waiting.set(stats.num_waiting)
        self.kv_cache_usage.set(stats.kv_cache_usage)
        if stats.num_running > self._max_running:
            self._max_running = stats.num_running
            self.max_num_running.set(stats.num_running)
        self._add_delta(self.num_preemptions, "preemptions", stats.num_preemptions)
        self._add_delta(self.prefix_cache_queries, "queries", stats.prefix_cache_queries)
        self._add_delta(self.prefix_cache_hits, "hits", stats.prefix_cache_hits)

    def on_output(self, stats: RequestStats, out: RequestOutput | PoolingRequestOutput, now: float) -> None:
        if isinstance(out, PoolingRequestOutput):
            self._on_pooled(out, now - stats.arrival)
            return
        num_generated = sum(len(o.token_ids) for o in out.outputs)
        num_new = num_generated - stats.num_generated
        if num_new > 0:
            if stats.last_token is None:
                self.time_to_first_token.observe(now - stats.arrival)
                self.prompt_tokens.inc(stats.num_prompt_tokens)
            else:
                self.inter_token_latency.observe(now - stats.last_token)
            self.generation_tokens.inc(num_new)
            stats.num_generated, stats.last_token = num_generated, now
        if out.finished:
            reason = "error" if out.error else (out.outputs[0].finish_reason or "stop")
            self.on_finished(reason)
            self.e2e_request_latency.observe(now - stats.arrival)

    def _on_pooled(self, out: PoolingRequestOutput, latency: float) -> None:
        if not out.finished:
            return
        if out.error is None:
            self.prompt_tokens.inc(len(out.prompt_token_ids))  # after truncate_prompt_tokens: what ran
        self.on_finished("error" if out.error else "stop")
        self.e2e_request_latency.observe(latency)

    def on_finished(self, reason: str) -> None:
        self.request_success.labels(finished_reason=reason).inc()

    def _add_delta(self, counter: Counter, key: str, total: int) -> None:
        # The engine's totals only grow; a reset (a new engine) restarts the count from there.
        delta = total - self._seen[key]
        if delta > 0:
            counter.inc(delta)
        self._seen[key] = total
