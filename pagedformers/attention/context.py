"""The forward context: what a paged-attention call needs that does not travel through the HF model.

Set by the model runner around one model call (`with forward_context(...)`), never a
global that is set and reset by hand.
"""

from __future__ import annotations

from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Callable, Iterator

import torch

from pagedformers.attention.kv_cache import LayerKVSpec
from pagedformers.attention.metadata import AttentionMetadata


@dataclass
class ForwardContext:
    """Caches and probe results are keyed by attention call: the n-th call of a forward pass is layer n.

    NOTE: not by `module.layer_idx`: a module may run several times per pass (HRM's recurrent
    cycles), each time with its own K/V, and some attention modules have no layer_idx at all.
    """

    metadata: AttentionMetadata
    # call index -> (k_cache, v_cache); None for a probe run, which fills kv_specs instead.
    kv_caches: dict[int, tuple[torch.Tensor, torch.Tensor]] | None
    kv_specs: dict[int, LayerKVSpec] = field(default_factory=dict)
    causal_layers: dict[int, bool] = field(default_factory=dict)  # probe: call index -> module.is_causal
    kwargs_seen: set[int] = field(default_factory=set)  # probe: calls that received PROBE_KWARG
    layer_ids: dict[int, int | None] = field(default_factory=dict)  # probe: call index -> module.layer_idx
    masked_calls: set[int] = field(default_factory=set)  # probe: calls given an attention_mask of the model's own
    num_calls: int = 0
    positions: torch.Tensor | None = None  # [T], recorded for attention that depends on positions
    # Decode graphs (engine/decode_graphs.py): while tracing, each attention call's function, bound to its
    # layer, is appended; while replaying, the traced graph's op calls them by index.
    traced_calls: list[Callable[..., torch.Tensor]] | None = None

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
