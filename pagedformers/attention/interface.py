"""The attention function transformers calls for `config._attn_implementation = "pagedformers"`.

Registered with `transformers.AttentionInterface`. It is deliberately absent from the
mask interface, so transformers builds no dense mask and passes `attention_mask=None`:
causality, sliding windows and chunks come from our metadata. A model that builds a mask of
its own (a learned bias, a sparse pattern) is refused by the compatibility check.
"""

from __future__ import annotations

import functools
from typing import Callable

import torch
from torch import nn
from transformers import AttentionInterface

from pagedformers.attention.context import PROBE_KWARG, ForwardContext, get_forward_context
from pagedformers.attention.kv_cache import LayerKVSpec, write_kv
from pagedformers.attention.torch_backend import paged_attention
from pagedformers.kernels.cpu import kernel_fits

ATTN_IMPLEMENTATION = "pagedformers"
QUERY_TEMPERATURE = "pagedformers_query_temperature"  # module attribute set by take_over_query_temperature
ATTENTION_CHUNK = "pagedformers_attention_chunk"  # module attribute: _attention_chunk's answer, cached

# Decode graphs (engine/decode_graphs.py) trace a decode step's forward. An attention call that the compiled
# kernels handle is recorded as those ops; any other is this op, whose implementation runs the layer's
# attention (bound while tracing) on the live step's metadata.
_graphs_lib = torch.library.Library("pagedformers_graphs", "DEF")
_graphs_lib.define("attention(Tensor query, Tensor key, Tensor value, int call) -> Tensor")


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
    static = (module, attention_mask, scaling, sliding_window, softcap, s_aux, kwargs)
    if ctx.traced_calls is not None and torch.jit.is_tracing() and not _kernel_attends_step(module, query, ctx):
        return _record_attention(ctx, functools.partial(_attend, *static), query, key, value), None
    return _attend(*static, query, key, value), None


def _kernel_attends_step(module: nn.Module, query: torch.Tensor, ctx: ForwardContext) -> bool:
    """Whether this call writes its keys and attends every row in the compiled kernels, its Python deciding
    from shapes and the step's layout only: then a trace may record those ops, the step's slots, block
    tables and context lengths being inputs of the trace (engine/decode_graphs.py)."""
    caches = ctx.kv_caches.get(ctx.num_calls) if ctx.kv_caches is not None else None
    return (caches is not None and getattr(module, "is_causal", True) and QUERY_TEMPERATURE not in module.__dict__
            and ctx.metadata.num_decodes == ctx.metadata.num_tokens and kernel_fits(query, *caches))


def _attend(module: nn.Module, attention_mask: torch.Tensor | None, scaling: float | None,
            sliding_window: int | None, softcap: float | None, s_aux: torch.Tensor | None, kwargs: dict,
            query: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    ctx = get_forward_context()
    layer = ctx.next_call()
    q, k, v = (t[0].transpose(0, 1) for t in (query, key, value))  # [T, H, D]
    causal = getattr(module, "is_causal", True)
    if ctx.kv_caches is None:  # probe run: learn this layer's KV shape, attend within the step
        ctx.kv_specs[layer] = LayerKVSpec(k.shape[1], k.shape[2], v.shape[2])
        ctx.causal_layers[layer] = bool(causal)
        ctx.layer_ids[layer] = getattr(module, "layer_idx", None)
        if attention_mask is not None:  # transformers builds none for us: the model made its own
            ctx.masked_calls.add(layer)
        if kwargs.get(PROBE_KWARG):
            ctx.kwargs_seen.add(layer)
        k_cache = v_cache = None
    else:
        k_cache, v_cache = ctx.kv_caches[layer]
        if causal:  # encoder-only models attend within the step and keep nothing
            write_kv(k_cache, v_cache, k, v, ctx.metadata.cache_slots(k_cache.shape[2]))
    scale = scaling if scaling is not None else q.shape[-1] ** -0.5
    if QUERY_TEMPERATURE in module.__dict__:
        q = _apply_query_temperature(q, module.__dict__[QUERY_TEMPERATURE], ctx.positions)
    out = paged_attention(q, k, v, k_cache, v_cache, ctx.metadata, scale, causal=causal,
                          window=sliding_window or None, softcap=softcap or None, sinks=s_aux,
                          chunk=_attention_chunk(module))
    return out[None]  # [1, T, H, Dv], like sdpa_attention_forward


def _replayed_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, call: int) -> torch.Tensor:
    return get_forward_context().traced_calls[call](query, key, value)


_graphs_lib.impl("attention", _replayed_attention, "CPU")


def _record_attention(ctx: ForwardContext, attend: Callable[..., torch.Tensor], query: torch.Tensor,
                     key: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    """While tracing: keep `attend` (the layer's attention, its static arguments bound) and put one op call
    in the trace in its place."""
    ctx.traced_calls.append(attend)
    return torch.ops.pagedformers_graphs.attention(query, key, value, len(ctx.traced_calls) - 1)


def _attention_chunk(module: nn.Module) -> int | None:
    """Chunked-attention layers (Llama 4) pass no kwarg: transformers builds their mask from the config.
    Read once per module: HF config attribute reads are slow enough to show in a decode step."""
    if ATTENTION_CHUNK not in module.__dict__:
        module.__dict__[ATTENTION_CHUNK] = _read_attention_chunk(module)
    return module.__dict__[ATTENTION_CHUNK]


def _read_attention_chunk(module: nn.Module) -> int | None:
    config = getattr(module, "config", None)
    layer_types = getattr(config, "layer_types", None)
    layer_idx = getattr(module, "layer_idx", None)
    if not layer_types or layer_idx is None or layer_types[layer_idx] != "chunked_attention":
        return None
    return getattr(config, "attention_chunk_size", None)


def take_over_query_temperature(model: nn.Module) -> None:
    """Llama 4's NoPE layers scale their queries by log(floor((pos + 1) / floor_scale) + 1) * attn_scale + 1,
    with positions counted from transformers' own cache, which the shell does not pass: the layer would
    see the flat batch's row numbers. Switch that off in the module and apply it here, from real positions."""
    taken = False
    for module in model.modules():
        if getattr(module, "attn_temperature_tuning", False) and not getattr(module, "use_rope", True):
            module.attn_temperature_tuning = False
            module.__dict__[QUERY_TEMPERATURE] = (float(module.floor_scale), float(module.attn_scale))
            taken = True
    if taken:
        model.register_forward_pre_hook(_record_positions, with_kwargs=True)


def _record_positions(module: nn.Module, args: tuple, kwargs: dict) -> None:
    """The trunk is called with position_ids [1, T]: keep them in the forward context for the layers."""
    position_ids = kwargs.get("position_ids")
    if position_ids is not None:
        get_forward_context().positions = position_ids[0]


def _apply_query_temperature(q: torch.Tensor, temperature: tuple[float, float],
                             positions: torch.Tensor | None) -> torch.Tensor:
    if positions is None:
        raise RuntimeError("this model's attention depends on token positions: call it with position_ids")
    floor_scale, attn_scale = temperature
    scales = torch.log1p(torch.floor((positions.float() + 1.0) / floor_scale)) * attn_scale + 1.0
    return (q * scales[:, None, None]).to(q.dtype)  # q: [T, H, D]


def register() -> None:
    AttentionInterface.register(ATTN_IMPLEMENTATION, paged_attention_forward)
