"""The attention function transformers calls for `config._attn_implementation = "pagedformers"`.

Registered with `transformers.AttentionInterface`. It is deliberately absent from the
mask interface, so transformers builds no dense mask and passes `attention_mask=None`:
causality and sliding windows come from our metadata.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import AttentionInterface

from pagedformers.attention.context import PROBE_KWARG, get_forward_context
from pagedformers.attention.kv_cache import LayerKVSpec, write_kv
from pagedformers.attention.torch_backend import paged_attention

ATTN_IMPLEMENTATION = "pagedformers"


def paged_attention_forward(
    module: nn.Module,
    query: torch.Tensor,  # [1, H, T, D]
    key: torch.Tensor,  # [1, H_kv, T, D]
    value: torch.Tensor,  # [1, H_kv, T, Dv]
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    sliding_window: int | None = None,
    softcap: float | None = None,
    s_aux: torch.Tensor | None = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    ctx = get_forward_context()
    layer_idx = module.layer_idx
    q, k, v = (t[0].transpose(0, 1) for t in (query, key, value))  # [T, H, D]
    causal = getattr(module, "is_causal", True)
    if ctx.kv_caches is None:  # probe run: learn this layer's KV shape, attend within the step
        ctx.kv_specs[layer_idx] = LayerKVSpec(k.shape[1], k.shape[2], v.shape[2])
        ctx.causal_layers[layer_idx] = bool(causal)
        if kwargs.get(PROBE_KWARG):
            ctx.kwargs_seen.add(layer_idx)
        k_cache, v_cache = k[None], v[None]
    else:
        k_cache, v_cache = ctx.kv_caches[layer_idx]
        if causal:  # encoder-only models attend within the step and keep nothing
            write_kv(k_cache, v_cache, k, v, ctx.metadata.slot_mapping)
    scale = scaling if scaling is not None else q.shape[-1] ** -0.5
    out = paged_attention(q, k, v, k_cache, v_cache, ctx.metadata, scale, causal=causal,
                          window=sliding_window or None, softcap=softcap or None, sinks=s_aux)
    return out[None], None  # [1, T, H, Dv], like sdpa_attention_forward


def register() -> None:
    AttentionInterface.register(ATTN_IMPLEMENTATION, paged_attention_forward)
