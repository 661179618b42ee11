"""Per-request state of non-attention layers (convolutions, SSMs, linear attention), kept in the model's own cache.

The paged KV cache holds attention keys and values only. Conv, Mamba and linear-attention layers
instead carry a small state from token to token, which transformers' layers already read and
update through their `past_key_values` (`get_conv_state` / `update_conv_state`, recurrent states,
MiniMax's `get_linear_cache`). So each request gets an instance of the very cache class its model
builds for itself in `forward` (e.g. `DynamicCache(config)` with conv / linear-attention layers),
subclassed so that `update` keeps no keys or values: the attention layers' K/V pass straight
through to our attention function, which writes them to the paged cache.

Older designs (RecurrentGemma) keep the state on their modules instead (`conv1d_state`,
`recurrent_states`): the probe finds those attributes, and each request's values are put back
on the modules before its forward and taken off after it (`module_values`).

NOTE: such a state cannot be shared between requests or rebuilt from cached KV blocks, so these
models run one request per forward (its chunk as its own [1, n] row) and without prefix caching.
"""

from __future__ import annotations

import functools
import inspect

import torch
from torch import nn
from transformers import PretrainedConfig
from transformers.cache_utils import Cache

from pagedformers.attention import get_forward_context

ModuleAttribute = tuple[nn.Module, str]

# Layer kinds (`layer_types`) whose state a per-request cache carries; attention kinds are listed in compat.
# "indexed_attention" (DeepSeek-V3.2-style sparse attention): softmax attention over the paged KV cache whose
# indexer keeps one key per past token in the cache (`update_indexer`) and picks each query's top-k from them.
STATE_LAYER_TYPES = frozenset({"conv", "linear_attention", "hybrid", "hybrid_sliding", "indexed_attention"})


def _pass_through(self: Cache, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int,
                  *args, **kwargs) -> tuple[torch.Tensor, torch.Tensor]:
    return key_states, value_states


def _num_seen_tokens(self: Cache, layer_idx: int = 0) -> int:
    return self.num_seen_tokens


@functools.cache
def paged_cache_class(cache_cls: type[Cache]) -> type[Cache]:
    """`cache_cls` whose attention layers store nothing; `num_seen_tokens` counts the tokens it has carried."""
    return type(f"Paged{cache_cls.__name__}", (cache_cls,), {
        "update": _pass_through,
        "get_seq_length": _num_seen_tokens,  # the past length, as transformers' own caches report it
        "num_seen_tokens": 0,
        "__module__": __name__,
    })


def create_state_cache(cache_cls: type[Cache], text_config: PretrainedConfig) -> Cache:
    """A fresh, empty state for one request (`cache_cls` from `paged_cache_class`)."""
    if "config" in inspect.signature(cache_cls.__init__).parameters:  # DynamicCache: layer kinds from the config
        cache = cache_cls(config=text_config)
    else:
        cache = cache_cls()
    cache.module_values = {}  # state kept on modules: attribute -> this request's value (None: start afresh)
    return cache


def feed_indexer_masks(model: nn.Module) -> None:
    """Indexers score each query against all of its request's cached index keys, masked by the causal mask
    transformers would build (`attention_mask[:, 0]`); with our attention transformers builds none. So the text
    model whose decoder layers hold indexers (its config lists indexed_attention layers; not a vision tower) is
    handed that mask: [1, 1, n, past + n], bool, key j visible to query i where j <= past + i (the row is one
    request's, its past counted by its state cache)."""
    hooked = False
    for module in model.modules():
        layer_types = getattr(getattr(module, "config", None), "layer_types", None) or ()
        if isinstance(getattr(module, "layers", None), nn.ModuleList) and "indexed_attention" in layer_types and \
                "attention_mask" in inspect.signature(module.forward).parameters:
            module.register_forward_pre_hook(_causal_mask, with_kwargs=True)
            hooked = True
    if not hooked:
        raise ValueError(f"{type(model).__name__} has indexed_attention layers, but no module that runs them takes an "
                         "attention_mask beside a `layers` list: the shell cannot hand its indexers their mask")


def _causal_mask(module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
    if kwargs.get("attention_mask") is not None:
        return None
    rows = kwargs.get("inputs_embeds") if kwargs.get("inputs_embeds") is not None else kwargs.get("input_ids")
    cache = kwargs.get("past_key_values")
    past, n = (cache.get_seq_length() if cache is not None else 0), rows.shape[1]
    queries = torch.arange(past, past + n, device=rows.device)[:, None]
    kwargs["attention_mask"] = (torch.arange(past + n, device=rows.device)[None, :] <= queries)[None, None]
    get_forward_context().model_masks = True
    return args, kwargs


def plain_attributes(model: nn.Module) -> dict[ModuleAttribute, object]:
    """Every module's plain attributes (not parameters, buffers or submodules) and their current values."""
    return {(m, name): value for m in model.modules() for name, value in vars(m).items()}


def tensor_attributes_set_since(model: nn.Module, before: dict[ModuleAttribute, object]) -> list[ModuleAttribute]:
    """The plain tensor attributes that were (re)assigned since `before = plain_attributes(model)`."""
    return [key for key, value in plain_attributes(model).items()
            if isinstance(value, torch.Tensor) and before.get(key) is not value]
