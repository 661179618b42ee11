"""CUDA graphs: decode-only steps replayed from a graph captured per batch-size bucket, as vLLM does.

At decode sizes a step's hundreds of kernel launches cost more than their work; a captured graph launches them
all at once. A graph reads its inputs from static buffers: a step of n decodes copies its tokens, positions, cache
slots, block tables and context lengths into the first n rows of the buffers and runs the graph of the smallest
bucket >= n; the rows past n are padding, which writes no KV (slot -1: the Triton write kernel skips it) and whose
outputs are dropped (each row of a decoder's forward is computed on its own).

Graphs are captured at start-up, once the KV cache exists (`prepare`), on padding rows alone. Python runs only at
capture: the forward may decide from shapes alone. One that reads a tensor's value syncs with
the host, which a capture refuses; an attention layer whose backend plans it in Python per step (the capture hook
asks: `AttentionCall.is_shape_static`) is refused here: that bucket stays eager. As a last guard against a Python
decision frozen at capture, the first replay of each bucket is compared with the eager forward of the same inputs,
and a bucket that differs stays eager too.

Device-agnostic but for `capture`: tests pass one that reruns the forward from the buffers, on a CPU in Triton's
interpreter, which runs every other line of this module.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from pagedformers.attention import AttentionBackend, AttentionCall, AttentionMetadata, KVCaches, forward_context
from pagedformers.logger import init_logger
from pagedformers.model.inputs import ModelInputs
from pagedformers.platforms.interface import EagerForward, hooked_module

logger = init_logger(__name__)

PAD_SLOT = -1  # a padding row's cache slot: its keys and values are written nowhere
Capture = Callable[[Callable[[], torch.Tensor]], Callable[[], torch.Tensor]]  # forward -> its replay


def capture_bucket_sizes(max_num_seqs: int) -> list[int]:
    """vLLM's buckets: 1, 2, 4, then every multiple of 8, up to the engine's most decodes a step (512 at most:
    past that a step's launches no longer dominate it)."""
    most = min(max_num_seqs, 512)
    sizes = [s for s in (1, 2, 4) if s < most] + list(range(8, most, 8))
    return sorted(set(sizes + [most]))


def capture_cuda_graph(pool: Any) -> Capture:
    """Capture on the current CUDA device into `pool` (one memory pool shared by every bucket's graph: only one
    replays at a time). Never run in CI (no GPU there)."""

    def capture(forward: Callable[[], torch.Tensor]) -> Callable[[], torch.Tensor]:
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):  # warm-up: Triton compiles, cuBLAS picks its kernels, outside the graph
            forward()
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=pool):
            out = forward()

        def replay() -> torch.Tensor:
            graph.replay()
            return out

        return replay

    return capture


@dataclass
class _StepBuffers:
    """The inputs every graph reads, sized for the largest bucket; bucket b reads the first b rows."""
    input_ids: torch.Tensor  # [B]
    positions: torch.Tensor  # [B]
    slots: torch.Tensor  # [B]
    tables: torch.Tensor  # [B, W]: W blocks hold max_model_len
    lens: torch.Tensor  # [B]

    @classmethod
    def allocate(cls, rows: int, width: int, device: torch.device) -> _StepBuffers:
        def zeros(*shape: int) -> torch.Tensor:
            return torch.zeros(*shape, dtype=torch.long, device=device)

        return cls(zeros(rows), zeros(rows), zeros(rows), zeros(rows, width), zeros(rows))

    def fill(self, inputs: ModelInputs, bucket: int) -> None:
        """This step's rows, then padding up to the bucket."""
        meta, n = inputs.metadata, len(inputs.input_ids)
        self.input_ids[:n].copy_(inputs.input_ids)
        self.positions[:n].copy_(inputs.positions)
        self.slots[:n].copy_(meta.slot_mapping)
        self.tables[:n, :meta.decode_block_tables.shape[1]].copy_(meta.decode_block_tables)
        self.lens[:n].copy_(meta.decode_seq_lens)
        self.pad(n, bucket)

    def pad(self, first: int, bucket: int) -> None:
        """Rows first..bucket as padding: no slot and an empty context (the decode kernel gives 0 for it, reading
        nothing)."""
        for padded, value in ((self.input_ids, 0), (self.positions, 0), (self.slots, PAD_SLOT), (self.lens, 0)):
            padded[first:bucket].fill_(value)
        self.tables[first:bucket].zero_()

    def inputs(self, bucket: int, block_size: int) -> ModelInputs:
        """The bucket's view of the buffers as a step's inputs; every decode's context fits the table's width."""
        tables = self.tables[:bucket]
        meta = AttentionMetadata(slot_mapping=self.slots[:bucket], num_decodes=bucket, decode_block_tables=tables,
                                 decode_seq_lens=self.lens[:bucket], prefills=[],
                                 decode_context_len=tables.shape[1] * block_size)
        return ModelInputs(self.input_ids[:bucket], self.positions[:bucket], meta)


class CudaGraphs(EagerForward):
    """A model's step forward that replays each decode bucket's captured graph: captured at start-up on padding rows
    (`prepare`), or on the bucket's first use after a reset; each checked against eager on its first real step."""

    def __init__(self, model: nn.Module, attention: AttentionBackend, capture: Capture, bucket_sizes: list[int],
                 max_model_len: int, block_size: int, device: torch.device) -> None:
        super().__init__(model, attention)
        self.capture, self.bucket_sizes, self.block_size = capture, bucket_sizes, block_size
        width = -(-max_model_len // block_size)
        self.buffers = _StepBuffers.allocate(bucket_sizes[-1], width, device)
        self.graphs: dict[int, Callable[[], torch.Tensor]] = {}  # bucket -> its replay
        self.checked: set[int] = set()  # buckets whose replay matched eager on a real step
        self.eager_buckets: set[int] = set()

    def prepare(self, kv_caches: KVCaches) -> None:
        """Capture every bucket now, largest first (so smaller graphs reuse its pool's memory), as vLLM does at
        start-up: serving then never stalls on a capture. The buffers hold padding rows alone, which write and read
        no KV."""
        start = time.perf_counter()
        for bucket in reversed(self.bucket_sizes):
            self._record(bucket, kv_caches)
        logger.info("CUDA graphs for decode steps of %s sequences, captured in %.1f s.",
                    ", ".join(map(str, sorted(self.graphs))) or "no number of", time.perf_counter() - start)

    def reset(self) -> None:
        """Drop every graph: apply_model may have changed the modules they replay."""
        self.graphs.clear()
        self.checked.clear()
        self.eager_buckets.clear()

    def __call__(self, inputs: ModelInputs, kv_caches: KVCaches | None, **model_kwargs: Any) -> torch.Tensor:
        n = len(inputs.input_ids)
        bucket = next((b for b in self.bucket_sizes if b >= n), None)
        if (bucket is None or bucket in self.eager_buckets or model_kwargs or inputs.model_kwargs()
                or not inputs.is_decode_only or kv_caches is None):
            return super().__call__(inputs, kv_caches, **model_kwargs)
        replay = self.graphs.get(bucket) or self._record(bucket, kv_caches)
        if replay is None:
            return super().__call__(inputs, kv_caches)
        self.buffers.fill(inputs, bucket)
        if bucket not in self.checked:
            return self._check(bucket, replay, kv_caches)[:n]
        return replay()[:n].clone()  # the graph's output is overwritten by its next replay

    def _forward(self, bucket: int, kv_caches: KVCaches) -> Callable[[], torch.Tensor]:
        """The bucket's forward over the buffers, as a capture records it."""
        def forward() -> torch.Tensor:
            # Fresh metadata each run: what it derives (masks, slot splits) is then computed inside the capture and
            # recorded, not left over from the warm-up run
            inputs = self.buffers.inputs(bucket, self.block_size)
            ctx = self.context(inputs, kv_caches)
            ctx.capture = _graph_safe
            with forward_context(ctx):
                return self.model(inputs.input_ids, inputs.positions)
        return forward

    def _record(self, bucket: int, kv_caches: KVCaches) -> Callable[[], torch.Tensor] | None:
        """The bucket's graph, captured on padding rows (a capture runs the forward: real rows would write their
        keys and values again, into slots a finished request may have passed on); None (the bucket stays eager)
        where the forward cannot be captured."""
        hooked = hooked_module(self.model)
        if hooked is not None:
            return self._give_up(bucket, f"module {hooked!r} has forward hooks")
        self.buffers.pad(0, bucket)
        try:
            self.graphs[bucket] = self.capture(self._forward(bucket, kv_caches))
        except Exception as e:  # noqa: BLE001 (the eager forward reports the step's own errors)
            return self._give_up(bucket, f"capture failed ({type(e).__name__}: {e})")
        return self.graphs[bucket]

    def _check(self, bucket: int, replay: Callable[[], torch.Tensor], kv_caches: KVCaches) -> torch.Tensor:
        """The filled buffers' hidden states from the eager forward; the graph is kept if its replay gave the same,
        else the bucket stays eager. The eager forward runs last, so its keys and values are those left in the
        cache (the replay wrote the same slots)."""
        replayed = replay().clone()
        eager = self._forward(bucket, kv_caches)()
        if _same(replayed, eager):
            self.checked.add(bucket)
        else:
            del self.graphs[bucket]
            self._give_up(bucket, "its replay differs from the eager forward (the forward decides in Python from "
                                  "values that change per step)")
        return eager

    def _give_up(self, bucket: int, why: str) -> None:
        self.eager_buckets.add(bucket)
        logger.warning("Decode steps of up to %d sequences stay eager: %s.", bucket, why)


def _graph_safe(call: AttentionCall) -> torch.Tensor:
    """Run an attention call whose Python decides from shapes alone; any other would replay its first step's
    decisions (a chunked layer's or a prompt-keeping window's masks, planned per step): the bucket stays eager."""
    if not call.is_shape_static:
        raise NotCapturable("an attention layer plans its work in Python per step (chunked attention, a window "
                            "keeping the prompt, or a layer the attention backend leaves to its reference path)")
    return call.run(call.query, call.key, call.value)


class NotCapturable(RuntimeError):
    pass


def _same(replayed: torch.Tensor, eager: torch.Tensor) -> bool:
    """Equal up to the dtype's rounding: a captured library call may pick another algorithm than eager does, while
    a stale Python decision (a wrong mask, a wrong branch) moves the output far more. Padding rows are compared
    too: both ran them alike."""
    tolerance = 1e-4 if replayed.dtype == torch.float32 else 2e-2
    return replayed.shape == eager.shape and torch.allclose(replayed, eager, rtol=tolerance, atol=tolerance,
                                                             equal_nan=True)
