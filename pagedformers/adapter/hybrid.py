"""Shells for conv / linear-attention hybrids (LFM2, Granite 4.0-H, MiniMax, ZAYA, RecurrentGemma, ...) and for
models with sparse-attention indexers (DeepSeek-V3.2, Mistral Large 4, Qwen4-Exp, ...).

Their attention layers use the paged KV cache; their other layers carry a state from token to token, which
lives in a per-request instance of the model's own cache class (state_cache.py), or, for older designs, on
the modules themselves. An indexer's keys (one per past token, scored against each query to pick its top-k keys)
live in that same per-request cache; the shell hands the text model the causal mask the indexer scores under
(state_cache.feed_indexer_masks), and attention keeps the keys picked (attend_selected).
They declare `SupportsPerRequestState` (model/interface.py): the worker keeps one
state per request and runs each request's chunk as its own forward, without prefix caching.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from transformers.cache_utils import Cache, DynamicCache

from pagedformers.adapter.causal import CausalShell
from pagedformers.adapter.compat import CompatReport, state_layers
from pagedformers.adapter.multimodal import TransformersForMultimodalLM
from pagedformers.adapter.pooling import TransformersForPooling
from pagedformers.adapter.state_cache import (
    ModuleAttribute,
    create_state_cache,
    feed_indexer_masks,
    paged_cache_class,
    plain_attributes,
    tensor_attributes_set_since,
)
from pagedformers.attention import ForwardContext, forward_context
from pagedformers.config import EngineConfig
from pagedformers.model.interface import KVCacheSpecs
from pagedformers.parallel_plans import SINGLE, ParallelState


class PerRequestState:
    """What a shell adds for a hybrid: the probe learns where the model keeps its state, each request gets an
    empty one at its start, and a forward runs with one request's state in place."""

    def __init__(self, config: EngineConfig, parallel: ParallelState = SINGLE) -> None:
        super().__init__(config, parallel)
        self.state_cache_cls: type[Cache] | None = None  # the model's own cache class, learned by the probe
        self.state_attributes: list[ModuleAttribute] = []  # where models like RecurrentGemma keep their state
        if "indexed_attention" in state_layers(self.hf_config):
            feed_indexer_masks(self.model)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, state: Cache | None = None,
                **inputs: torch.Tensor) -> torch.Tensor:
        with self._on_modules(state):
            return super().forward(input_ids, positions, state=state, **inputs)

    @property
    def resumes_prefill(self) -> bool:
        """Whether a multi-token chunk can continue a request's state. RecurrentGemma's recurrent blocks treat
        any multi-token input as a fresh prompt (their convolution restarts), so later chunks go token by token."""
        return not self.state_attributes

    def create_state(self) -> Cache:
        assert self.state_cache_cls is not None, "kv_cache_specs learns the state cache class first"
        return create_state_cache(self.state_cache_cls, self.text_config)

    @torch.inference_mode()
    def kv_cache_specs(self) -> KVCacheSpecs:
        self._learn_state_cache()
        return super().kv_cache_specs()

    def probe_forward(self, positions: torch.Tensor) -> torch.Tensor:
        state = self.create_state()
        hidden = self(torch.zeros_like(positions), positions, state=state)
        if not _holds_tensors(state):
            self._refuse(f"its {', '.join(state_layers(self.hf_config))} layers keep no state in the "
                         f"{type(state).__mro__[1].__name__} the model builds, nor on its modules: the shell cannot "
                         "tell where they keep it, so per-request states cannot be kept apart")
        return hidden

    @contextmanager
    def _on_modules(self, state: Cache | None) -> Iterator[None]:
        """Put a request's state on the modules that keep it (RecurrentGemma) for one forward, then take it off."""
        if state is None or not self.state_attributes:
            yield
            return
        for module, name in self.state_attributes:
            setattr(module, name, state.module_values.get((module, name)))  # None: the layer starts afresh
        try:
            yield
        finally:
            state.module_values = {(m, name): getattr(m, name) for m, name in self.state_attributes}

    def _learn_state_cache(self) -> None:
        """Let the model build its own cache, as in `generate`, to learn its class; a model that returns none
        keeps its state on its modules: learn which attributes."""
        before = plain_attributes(self.model)
        ctx = ForwardContext.for_probe(self.config.device.device)
        positions = ctx.metadata.slot_mapping[None]  # the probe prompt's slots are its positions
        with forward_context(ctx):
            out = self.model(input_ids=torch.zeros_like(positions), position_ids=positions, use_cache=True,
                             return_dict=True)
        cache = getattr(out, "past_key_values", None)
        if isinstance(cache, Cache):
            self.state_cache_cls = paged_cache_class(type(cache))
            return
        self.state_attributes = tensor_attributes_set_since(self.model, before)
        if not self.state_attributes:
            self._refuse(f"its {', '.join(state_layers(self.hf_config))} layers need a state across steps, but the "
                         "model keeps none in a transformers Cache nor on its modules")
        self.state_cache_cls = paged_cache_class(DynamicCache)  # for the attention layers' pass-through updates

    def _refuse(self, reason: str) -> None:
        CompatReport(type(self.model).__name__, unsupported=[reason]).raise_if_broken()


class TransformersHybridForCausalLM(PerRequestState, CausalShell):
    pass


class TransformersHybridForMultimodalLM(PerRequestState, TransformersForMultimodalLM):
    pass


class TransformersHybridForPooling(PerRequestState, TransformersForPooling):
    pass


def _holds_tensors(obj: object, depth: int = 4) -> bool:
    """Whether a cache holds any tensor, in its attributes, their lists and dicts, and their layers'."""
    if isinstance(obj, torch.Tensor):
        return True
    if depth == 0:
        return False
    values = obj.values() if isinstance(obj, dict) else obj if isinstance(obj, (list, tuple)) else \
        vars(obj).values() if hasattr(obj, "__dict__") else ()
    return any(_holds_tensors(v, depth - 1) for v in values)
