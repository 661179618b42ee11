"""Paged attention in plain PyTorch (the CPU backend).

Decodes are attended together in two batched matmuls over their gathered, padded
contexts (grouped by KV head: no K/V repeat). Measured on 2 cores, bf16, 32 decodes
x 256 context: 0.4 ms against 6 ms for SDPA, whose CPU kernel handles a query
length of 1 poorly. Each prefill span goes through SDPA (flash kernel, no scores
materialised). No per-token Python loop.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from pagedformers.attention.metadata import AttentionMetadata


def paged_attention(
    query: torch.Tensor,  # [T, H, D]
    key: torch.Tensor,  # [T, H_kv, D] the new tokens' keys (already written to the cache)
    value: torch.Tensor,  # [T, H_kv, Dv]
    k_cache: torch.Tensor,  # [num_blocks, block_size, H_kv, D]
    v_cache: torch.Tensor,
    meta: AttentionMetadata,
    scale: float,
    causal: bool = True,
    window: int | None = None,
    softcap: float | None = None,
    sinks: torch.Tensor | None = None,  # [H] per-head sink logits
    chunk: int | None = None,  # chunked attention (Llama 4): keys in the query's own chunk only
) -> torch.Tensor:  # [T, H, Dv]
    out = query.new_empty(query.shape[0], query.shape[1], value.shape[-1])
    k_flat = k_cache.view(-1, *k_cache.shape[2:])
    v_flat = v_cache.view(-1, *v_cache.shape[2:])
    nd = meta.num_decodes
    if nd:
        blocks = meta.decode_block_tables.view(-1)  # whole blocks: one contiguous copy each
        k = k_cache.index_select(0, blocks).view(nd, meta.decode_context_len, *k_cache.shape[2:])  # [B_d, L, H_kv, D]
        v = v_cache.index_select(0, blocks).view(nd, meta.decode_context_len, *v_cache.shape[2:])
        out[:nd] = _attend_decodes(query[:nd], k, v, meta.decode_mask(window, chunk), scale, softcap, sinks)
    for i, span in enumerate(meta.prefills):
        s, e = span.q_start, span.q_end
        q = query[s:e].transpose(0, 1)[None]  # [1, H, n, D]
        if span.kv_slots is None:
            k, v = key[s:e], value[s:e]
        else:
            k, v = k_flat[span.kv_slots], v_flat[span.kv_slots]
        k, v = k.transpose(0, 1)[None], v.transpose(0, 1)[None]  # [1, H_kv, kv_len, D]
        mask = meta.prefill_mask(i, window, causal, chunk)
        out[s:e] = attend(q, k, v, mask, scale, causal and mask is None, softcap, sinks)[0].transpose(0, 1)
    return out


def _attend_decodes(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor, scale: float,
                    softcap: float | None, sinks: torch.Tensor | None) -> torch.Tensor:
    """q [B, H, D], k/v [B, L, H_kv, D], mask [B, 1, 1, L] -> [B, H, Dv]."""
    b, h, d = q.shape
    h_kv = k.shape[2]
    scores = torch.matmul(q.view(b, h_kv, h // h_kv, d), k.permute(0, 2, 3, 1)).float() * scale  # [B, H_kv, G, L]
    if softcap is not None:
        scores = torch.tanh(scores / softcap) * softcap
    scores = scores.masked_fill(~mask, float("-inf"))
    if sinks is not None:
        sink = sinks.float().view(1, h_kv, h // h_kv, 1).expand(b, -1, -1, 1)
        probs = torch.softmax(torch.cat([scores, sink], dim=-1), dim=-1)[..., :-1]
    else:
        probs = torch.softmax(scores, dim=-1)
    out = torch.matmul(probs.to(v.dtype), v.transpose(1, 2))  # [B, H_kv, G, Dv]
    return out.reshape(b, h, -1)


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None, scale: float,
           is_causal: bool, softcap: float | None, sinks: torch.Tensor | None) -> torch.Tensor:
    """q [B, H, Lq, D], k/v [B, H_kv, Lk, D] -> [B, H, Lq, Dv]."""
    if softcap is None and sinks is None:
        gqa = q.shape[1] != k.shape[1]
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=is_causal, scale=scale,
                                              enable_gqa=gqa)
    return _attend_eager(q, k, v, mask, scale, is_causal, softcap, sinks)


def _attend_eager(q, k, v, mask, scale, is_causal, softcap, sinks):
    groups = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
    scores = (q @ k.transpose(-1, -2)).float() * scale  # [B, H, Lq, Lk]
    if softcap is not None:
        scores = torch.tanh(scores / softcap) * softcap
    if is_causal:
        lq, lk = scores.shape[-2:]
        mask = torch.ones(lq, lk, dtype=torch.bool, device=q.device).tril(lk - lq)
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    if sinks is not None:
        sink = sinks.float().view(1, -1, 1, 1).expand(*scores.shape[:-1], 1)
        probs = torch.softmax(torch.cat([scores, sink], dim=-1), dim=-1)[..., :-1]
    else:
        probs = torch.softmax(scores, dim=-1)
    return probs.to(v.dtype) @ v
