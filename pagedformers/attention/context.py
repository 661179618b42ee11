"""The forward context: what a paged-attention call needs that does not travel through the HF model.

Set by the model runner around one model call (`with forward_context(...)`), never a
global that is set and reset by hand.
"""

from __future__ import annotations

from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Iterator

import torch

from pagedformers.attention.kv_cache import LayerKVSpec
from pagedformers.attention.metadata import AttentionMetadata


@dataclass
class ForwardContext:
    metadata: AttentionMetadata
    # layer_idx -> (k_cache, v_cache); None for a probe run, which fills kv_specs instead.
    kv_caches: dict[int, tuple[torch.Tensor, torch.Tensor]] | None
    kv_specs: dict[int, LayerKVSpec] = field(default_factory=dict)
    causal_layers: dict[int, bool] = field(default_factory=dict)  # probe: layer_idx -> module.is_causal
    kwargs_seen: set[int] = field(default_factory=set)  # probe: layers that received PROBE_KWARG


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
