"""The forward context: what a paged-attention call needs that does not travel through the HF model.

Set by the model runner around one model call (`with forward_context(...)`), never a
global that is set and reset by hand.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field

import torch

from pagedformers.attention.backends import AttentionBackend
from pagedformers.attention.kv_cache import KVCaches, LayerKVSpec
from pagedformers.attention.metadata import AttentionMetadata, PrefillSpan
from pagedformers.attention.torch_backend import TorchAttentionBackend


@dataclass
class AttentionCall:
    """One attention layer's call, as a graph capture sees it (ForwardContext.capture)."""
    query: torch.Tensor
    key: torch.Tensor
    value: torch.Tensor
    run: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]  # the layer's paged attention, bound
    is_shape_static: bool  # run's Python decides from shapes and the step's layout only (AttentionBackend)


@dataclass
class ForwardContext:
    """Caches and probe results are keyed by attention call: the n-th call of a forward pass is layer n.

    NOTE: not by `module.layer_idx`: a module may run several times per pass (HRM's recurrent
    cycles), each time with its own K/V, and some attention modules have no layer_idx at all.
    """

    metadata: AttentionMetadata
    # call index -> (k_cache, v_cache); None for a probe run, which fills kv_specs instead.
    kv_caches: KVCaches | None
    kv_specs: dict[int, LayerKVSpec] = field(default_factory=dict)
    causal_layers: dict[int, bool] = field(default_factory=dict)  # probe: call index -> module.is_causal
    kwargs_seen: set[int] = field(default_factory=set)  # probe: calls that received PROBE_KWARG
    layer_ids: dict[int, int | None] = field(default_factory=dict)  # probe: call index -> module.layer_idx
    masked_calls: set[int] = field(default_factory=set)  # probe: calls given an attention_mask of the model's own
    windows: dict[int, int | None] = field(default_factory=dict)  # probe: call index -> the sliding window passed
    num_calls: int = 0
    positions: torch.Tensor | None = None  # [T], recorded for attention that depends on positions
    # The shell handed the model a dense causal mask over one request's context (models with indexers, see
    # adapter/state_cache.feed_indexer_masks): attention then honours the mask and top-k `indices` layers pass.
    model_masks: bool = False
    backend: AttentionBackend = field(default_factory=TorchAttentionBackend)
    # A graph capture's hook: each attention call goes through it instead of running (it may run the call, or
    # record it as one op of its own that runs it on replay).
    capture: Callable[[AttentionCall], torch.Tensor] | None = None
    # Cross-attention layers (interface.CROSS_ATTENTION): each request's (first row, end row, first key, end key),
    # its rows attending to its own image states' keys only; rows in none attend to nothing (their output is 0).
    cross_blocks: list[tuple[int, int, int, int]] = field(default_factory=list)

    @classmethod
    def for_probe(cls, device: str | torch.device) -> ForwardContext:
        """A probe run's context: one prompt of two tokens and no KV cache; attention records each layer's K/V
        shape (and more, for the compatibility check) and attends within the prompt."""
        positions = torch.arange(2, device=device)
        meta = AttentionMetadata(slot_mapping=positions, num_decodes=0, decode_block_tables=None,
                                 decode_seq_lens=None, prefills=[PrefillSpan(0, 2, 0, None)])
        return cls(metadata=meta, kv_caches=None)

    def next_call(self) -> int:
        self.num_calls += 1
        return self.num_calls - 1


# Passed to the base model in a probe run; it reaches our attention function only if every
# layer passes **kwargs down (rule 1 of transformers' "as a backend" contract).
PROBE_KWARG = "pagedformers_probe"

_current: ContextVar[ForwardContext | None] = ContextVar("pagedformers_forward_context", default=None)


@contextmanager
def forward_context(ctx: ForwardContext) -> Iterator[ForwardContext]:
    token = _current.set(ctx)
    try:
        yield ctx
    finally:
        _current.reset(token)


def get_forward_context() -> ForwardContext:
    ctx = _current.get()
    if ctx is None:
        raise RuntimeError(
            "pagedformers attention was called outside a forward context: the model must be run "
            "by the pagedformers model runner (or inside `forward_context(...)`)."
        )
    return ctx
