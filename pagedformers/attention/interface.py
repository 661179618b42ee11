"""The attention function transformers calls for `config._attn_implementation = "pagedformers"`.

Registered with `transformers.AttentionInterface`. It is deliberately absent from the
mask interface, so transformers builds no dense mask and passes `attention_mask=None`:
causality, sliding windows and chunks come from our metadata. A model that builds a mask of
its own (a learned bias, a sparse pattern) is refused by the compatibility check. Cross-attention modules
(Mllama's, IDEFICS's: marked at load, mark_cross_attention) are the exception: their keys and values come from
image states, not the prompt, so they keep nothing in the paged cache and attend unpaged with the model's own mask.
"""

from __future__ import annotations

import functools

import torch
from torch import nn
from transformers import AttentionInterface

from pagedformers.attention.backends import AttentionParams
from pagedformers.attention.context import PROBE_KWARG, AttentionCall, ForwardContext, get_forward_context
from pagedformers.attention.kv_cache import LayerKVSpec
from pagedformers.attention.torch_backend import attend_selected

ATTN_IMPLEMENTATION = "pagedformers"
QUERY_TEMPERATURE = "pagedformers_query_temperature"  # module attribute set by take_over_query_temperature
ALIBI_SLOPES = "pagedformers_alibi_slopes"  # module attribute of a native ALiBi layer: [H] its heads' slopes
CROSS_ATTENTION = "pagedformers_cross_attention"  # module attribute: its keys come from image states (mark_cross)
LAYER_KIND = "pagedformers_layer_kind"  # module attribute: _layer_kind's answer, cached
# Sliding-window kinds whose window keeps the request's whole prompt too (R-SWA: Unlimited-OCR). Their attention
# passes no window: transformers builds their mask from config.sliding_window and its cache's prefill length.
PROMPT_WINDOW_LAYER_TYPES = frozenset({"reference_sliding_attention"})


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
    if CROSS_ATTENTION in module.__dict__:  # keys from image states: nothing to keep, no call of the paged layers
        return _cross_attend(query, key, value, attention_mask, scaling, ctx.cross_blocks), None
    run = functools.partial(_attend, module, attention_mask, scaling, sliding_window, softcap, s_aux, kwargs)
    if ctx.capture is not None:
        call = AttentionCall(query, key, value, run, _is_shape_static(module, query, sliding_window, softcap, ctx))
        return ctx.capture(call), None
    return run(query, key, value), None


def _is_shape_static(module: nn.Module, query: torch.Tensor, window: int | None, softcap: float | None,
                     ctx: ForwardContext) -> bool:
    """Whether this call's Python decides from shapes and the step's layout only: its backend's, and ours (the
    query temperature reads positions recorded by a hook)."""
    caches = ctx.kv_caches.get(ctx.num_calls) if ctx.kv_caches is not None else None
    if caches is None or not getattr(module, "is_causal", True) or QUERY_TEMPERATURE in module.__dict__:
        return False
    params = AttentionParams(1.0, window=_window(module, window), softcap=softcap or None,
                             chunk=_attention_chunk(module), alibi=getattr(module, ALIBI_SLOPES, None),
                             keep_prompt=_keeps_prompt(module))
    return ctx.backend.is_shape_static(query, *caches, ctx.metadata, params)


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
        ctx.windows[layer] = _window(module, sliding_window)
        if attention_mask is not None:  # transformers builds none for us: the model made its own
            ctx.masked_calls.add(layer)
        if kwargs.get(PROBE_KWARG):
            ctx.kwargs_seen.add(layer)
        k_cache = v_cache = None
    else:
        k_cache, v_cache = ctx.kv_caches[layer]
        if causal:  # encoder-only models attend within the step and keep nothing
            ctx.backend.write_kv(k_cache, v_cache, k, v, ctx.metadata)
    if QUERY_TEMPERATURE in module.__dict__:
        q = _apply_query_temperature(q, module.__dict__[QUERY_TEMPERATURE], ctx.positions)
    params = AttentionParams(scaling if scaling is not None else q.shape[-1] ** -0.5, causal=bool(causal),
                             window=_window(module, sliding_window), softcap=softcap or None, sinks=s_aux,
                             chunk=_attention_chunk(module), alibi=getattr(module, ALIBI_SLOPES, None),
                             keep_prompt=_keeps_prompt(module))
    if ctx.model_masks:  # sparse attention: the keys an indexer picked, as indices or folded into the mask
        if params.keep_prompt or params.chunk or params.alibi is not None or not params.causal:
            raise NotImplementedError("indexed attention with a prompt-keeping window, chunks, ALiBi or non-causal "
                                      "layers: attend_selected does not build those masks")
        indices = kwargs.get("indices")
        mask = attention_mask[0, 0] if attention_mask is not None else None
        return attend_selected(q, k, v, k_cache, v_cache, ctx.metadata, params,
                               indices[0] if indices is not None else None, mask)[None]
    out = ctx.backend.forward(q, k, v, k_cache, v_cache, ctx.metadata, params)
    return out[None]  # [1, T, H, Dv], like sdpa_attention_forward


def mark_cross_attention(model: nn.Module) -> None:
    """Mark the model's cross-attention modules (a class named *CrossAttention, or is_cross_attention set), whose
    keys and values come from image states: they attend unpaged (_cross_attend)."""
    for module in model.modules():
        if getattr(module, "is_cross_attention", False) is True or type(module).__name__.endswith("CrossAttention"):
            module.__dict__[CROSS_ATTENTION] = True


def _cross_attend(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, attention_mask: torch.Tensor | None,
                  scaling: float | None, blocks: list[tuple[int, int, int, int]]) -> torch.Tensor:
    """Cross-attention over the flat batch: query [1, H, T, D], key / value [1, H_kv, S, D] (every request's image
    states, concatenated), attention_mask the model's additive [1, 1, T, S] -> [1, T, H, Dv]. Each request's rows
    attend to its own keys only, as in HF's one-request forward (where a row the model masks whole attends to all
    of its request's keys alike); rows of no block (text-only requests) give 0."""
    q, k, v = query[0], key[0], value[0]
    heads, kv_heads = q.shape[0], k.shape[0]
    out = q.new_zeros(q.shape[1], heads, v.shape[-1])
    scale = scaling if scaling is not None else q.shape[-1] ** -0.5
    for rows_lo, rows_hi, keys_lo, keys_hi in blocks:
        rows = rows_hi - rows_lo
        # Grouped-query heads as [H_kv, group, rows]: each KV head's keys serve its group, never repeated (with many
        # image requests the step's keys are large)
        q_block = q[:, rows_lo:rows_hi].reshape(kv_heads, -1, q.shape[-1])
        scores = (q_block @ k[:, keys_lo:keys_hi].transpose(-1, -2) * scale).view(kv_heads, -1, rows,
                                                                                 keys_hi - keys_lo)
        if attention_mask is not None:
            mask = attention_mask[0, :, rows_lo:rows_hi, keys_lo:keys_hi]
            scores = scores + (mask.view(kv_heads, -1, rows, keys_hi - keys_lo) if mask.shape[0] > 1 else mask)
        weights = torch.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype).view(kv_heads, -1, keys_hi - keys_lo)
        out[rows_lo:rows_hi] = (weights @ v[:, keys_lo:keys_hi]).view(heads, rows, -1).transpose(0, 1)
    return out[None]


def _attention_chunk(module: nn.Module) -> int | None:
    """Chunked-attention layers (Llama 4) pass no kwarg: transformers builds their mask from the config."""
    return _layer_kind(module)[0]


def _window(module: nn.Module, sliding_window: int | None) -> int | None:
    """The window the call passes, or, for a layer whose window keeps the prompt (it passes none), the config's."""
    return sliding_window or _layer_kind(module)[1]


def _keeps_prompt(module: nn.Module) -> bool:
    return _layer_kind(module)[1] is not None


def _layer_kind(module: nn.Module) -> tuple[int | None, int | None]:
    """(attention chunk, window that keeps the prompt) that the module's kind in its config's layer_types asks for.
    Read once per module: HF config attribute reads are slow enough to show in a decode step."""
    if LAYER_KIND not in module.__dict__:
        config = getattr(module, "config", None)
        layer_types = getattr(config, "layer_types", None)
        layer_idx = getattr(module, "layer_idx", None)
        kind = layer_types[layer_idx] if layer_types and layer_idx is not None else None
        chunk = getattr(config, "attention_chunk_size", None) if kind == "chunked_attention" else None
        window = getattr(config, "sliding_window", None) if kind in PROMPT_WINDOW_LAYER_TYPES else None
        module.__dict__[LAYER_KIND] = (chunk, window)
    return module.__dict__[LAYER_KIND]


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
