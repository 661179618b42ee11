"""Paged attention in plain PyTorch: the backend that runs on any device, and the reference for the others.

Decodes are attended together in two batched matmuls over their gathered, padded contexts (grouped by KV
head: no K/V repeat); SDPA's CPU kernel handles a query length of 1 poorly (6 ms against 0.4 ms for 32
decodes x 256 context, bf16, 2 cores). Each prefill span goes through SDPA (flash kernel, no scores
materialised). No per-token Python loop.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from pagedformers.attention.backends import AttentionParams, register_attention_backend
from pagedformers.attention.kv_cache import LayerKVSpec, gather_blocks
from pagedformers.attention.metadata import AttentionMetadata


class TorchAttentionBackend:
    name = "torch"

    def write_kv(self, k_cache: torch.Tensor, v_cache: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                 meta: AttentionMetadata) -> None:
        blocks, offsets = meta.cache_slots(k_cache.shape[2])
        k_cache[blocks, :, offsets] = key.to(k_cache.dtype)
        v_cache[blocks, :, offsets] = value.to(v_cache.dtype)

    def forward(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, k_cache: torch.Tensor | None,
                v_cache: torch.Tensor | None, meta: AttentionMetadata, params: AttentionParams) -> torch.Tensor:
        out = query.new_empty(query.shape[0], query.shape[1], value.shape[-1])
        nd = meta.num_decodes
        if nd:
            rows = meta.cache_rows(k_cache.shape[1])
            k, v = gather_blocks(k_cache, rows, nd), gather_blocks(v_cache, rows, nd)  # [B_d, H_kv, L, D]
            bias = meta.decode_bias(params.window, params.chunk, params.keep_prompt)
            attend_decodes(query[:nd], k, v, bias, params, out[:nd])
        attend_prefills(query, key, value, k_cache, v_cache, meta, params, out)
        return out

    def is_shape_static(self, query: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                        meta: AttentionMetadata, params: AttentionParams) -> bool:
        return False  # its masks and block rows are built and cached in Python per step

    def reads_unwritten_rows(self, spec: LayerKVSpec, dtype: torch.dtype) -> bool:
        return True  # decodes read whole gathered blocks, their unwritten tails masked


register_attention_backend("torch", TorchAttentionBackend)


def attend_prefills(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, k_cache: torch.Tensor | None,
                    v_cache: torch.Tensor | None, meta: AttentionMetadata, params: AttentionParams,
                    out: torch.Tensor, skip: set[int] = frozenset()) -> None:
    """Each prefill span but those in `skip` through SDPA, into its rows of out [T, H, Dv]."""
    for i, span in enumerate(meta.prefills):
        if i in skip:
            continue
        s, e = span.q_start, span.q_end
        q = query[s:e].transpose(0, 1)[None]  # [1, H, n, D]
        if span.kv_blocks is None:
            k, v = key[s:e].transpose(0, 1)[None], value[s:e].transpose(0, 1)[None]  # [1, H_kv, kv_len, D]
        else:
            rows = meta.cache_rows(k_cache.shape[1], i)
            k = gather_blocks(k_cache, rows, 1)[:, :, : span.kv_len]
            v = gather_blocks(v_cache, rows, 1)[:, :, : span.kv_len]
        mask = meta.prefill_mask(i, params.window, params.causal, params.chunk, params.keep_prompt)
        if params.alibi is not None:
            mask = alibi_bias(params.alibi, mask, span.num_cached, span.q_len, params.causal)
        out[s:e] = attend(q, k, v, mask, params.scale, params.causal and mask is None, params.softcap,
                          params.sinks)[0].transpose(0, 1)


def attend_selected(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, k_cache: torch.Tensor | None,
                    v_cache: torch.Tensor | None, meta: AttentionMetadata, params: AttentionParams,
                    indices: torch.Tensor | None, mask: torch.Tensor | None) -> torch.Tensor:
    """One request's queries [n, H, D] over the keys its model picked -> [n, H, Dv]: the positions `indices`
    [n, k] names for each query (the top-k of DeepSeek-V3.2-style sparse attention, which transformers passes as
    `indices`; -1 pads), and those a bool `mask` [n, L] over the request's context keeps (an indexer's selection
    folded into the mask, Qwen4-Exp); causal and windowed as the call asks.

    Both index the request's own context, so a step holds one request only (its indexer keys live in its
    per-request cache, hybrid.py). Every backend's cache has this layout: it reads it in plain PyTorch."""
    if meta.num_decodes + len(meta.prefills) != 1:
        raise RuntimeError("sparse (indexed) attention runs one request per forward: its selected positions are "
                           "its own context's")
    k, v, num_cached = _one_context(key, value, k_cache, v_cache, meta)
    out = []
    for lo in range(0, query.shape[0], _SELECTED_ROWS):  # a tile of queries at a time: the scores of a long
        rows = query[lo:lo + _SELECTED_ROWS]  # prefill over a long context at once would be [H, n, L] floats
        visible = _selected(rows.shape[0], k.shape[2], num_cached + lo, params, indices, mask, lo, query.device)
        out.append(_attend_eager(rows.transpose(0, 1)[None], k, v, visible[None, None], params.scale, False,
                                 params.softcap, params.sinks)[0].transpose(0, 1))
    return torch.cat(out)


_SELECTED_ROWS = 256


def _selected(n: int, length: int, first: int, params: AttentionParams, indices: torch.Tensor | None,
              mask: torch.Tensor | None, lo: int, device: torch.device) -> torch.Tensor:
    """[n, length] the keys queries at positions first.. see: causal, windowed, and picked (rows lo.. of indices
    and mask)."""
    k_pos = torch.arange(length, device=device)[None, :]
    q_pos = first + torch.arange(n, device=device)[:, None]
    visible = k_pos <= q_pos
    if params.window is not None:
        visible &= k_pos > q_pos - params.window
    if indices is not None:
        picked = indices[lo:lo + n]
        slots = torch.where(picked >= 0, picked, length).long()  # -1 pads go to a dropped column
        visible &= torch.zeros(n, length + 1, dtype=torch.bool, device=device).scatter_(1, slots, True)[:, :-1]
    if mask is not None:
        rows = mask[lo:lo + n] if mask.shape[0] > 1 else mask
        visible &= rows if rows.dtype == torch.bool else rows == 0
    return visible


def _one_context(key: torch.Tensor, value: torch.Tensor, k_cache: torch.Tensor | None, v_cache: torch.Tensor | None,
                 meta: AttentionMetadata) -> tuple[torch.Tensor, torch.Tensor, int]:
    """The single request's K/V [1, H_kv, L, D] (cached and new), and how many were cached before the step."""
    if meta.num_decodes:
        length = int(meta.decode_seq_lens[0])
        rows = meta.cache_rows(k_cache.shape[1])
        return gather_blocks(k_cache, rows, 1)[:, :, :length], gather_blocks(v_cache, rows, 1)[:, :, :length], \
            length - 1
    span = meta.prefills[0]
    if span.kv_blocks is None:
        return key.transpose(0, 1)[None], value.transpose(0, 1)[None], 0
    rows = meta.cache_rows(k_cache.shape[1], 0)
    return gather_blocks(k_cache, rows, 1)[:, :, : span.kv_len], gather_blocks(v_cache, rows, 1)[:, :, : span.kv_len], \
        span.num_cached


def alibi_bias(slopes: torch.Tensor, mask: torch.Tensor | None, num_cached: int, q_len: int,
               causal: bool) -> torch.Tensor:
    """[1, H, q_len, kv_len] float32: slope * key position where visible (`mask`, else causal), -inf elsewhere."""
    kv_len = num_cached + q_len
    if mask is None:
        q_pos = torch.arange(num_cached, kv_len, device=slopes.device)[:, None]
        k_pos = torch.arange(kv_len, device=slopes.device)[None, :]
        mask = (q_pos >= k_pos if causal else torch.ones_like(k_pos, dtype=torch.bool))[None, None]
    positions = torch.arange(kv_len, dtype=torch.float32, device=slopes.device)
    bias = slopes.float()[None, :, None, None] * positions
    return bias.masked_fill(~mask, float("-inf")).expand(1, -1, q_len, -1)


def attend_decodes(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor, params: AttentionParams,
                   out: torch.Tensor) -> None:
    """q [B, H, D], k/v [B, H_kv, L, D], bias [B, 1, 1, L] (0 / -inf) -> out [B, H, Dv] (contiguous).

    The G = H / H_kv query heads sharing a KV head are the rows of one matmul: no K/V repeat."""
    b, h, d = q.shape
    h_kv = k.shape[1]
    scores = torch.matmul(q.view(b, h_kv, h // h_kv, d), k.transpose(-1, -2)).float().mul_(params.scale)  # [B,H_kv,G,L]
    if params.softcap is not None:
        scores = torch.tanh(scores / params.softcap) * params.softcap
    if params.alibi is not None:  # slope * key position, per query head
        positions = torch.arange(scores.shape[-1], dtype=torch.float32, device=scores.device)
        scores = scores + params.alibi.float().view(1, h_kv, h // h_kv, 1) * positions
    scores = scores.add_(bias)
    if params.sinks is not None:
        sink = params.sinks.float().view(1, h_kv, h // h_kv, 1).expand(b, -1, -1, 1)
        probs = torch.softmax(torch.cat([scores, sink], dim=-1), dim=-1)[..., :-1]
    else:
        probs = torch.softmax(scores, dim=-1)
    torch.matmul(probs.to(v.dtype), v, out=out.view(b, h_kv, h // h_kv, -1))


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None, scale: float,
           is_causal: bool, softcap: float | None, sinks: torch.Tensor | None) -> torch.Tensor:
    """q [B, H, Lq, D], k/v [B, H_kv, Lk, D] -> [B, H, Lq, Dv]."""
    if softcap is None and sinks is None:
        gqa = q.shape[1] != k.shape[1]
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=is_causal, scale=scale,
                                              enable_gqa=gqa)
    return _attend_eager(q, k, v, mask, scale, is_causal, softcap, sinks)


def _attend_eager(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None, scale: float,
                  is_causal: bool, softcap: float | None, sinks: torch.Tensor | None) -> torch.Tensor:
    groups = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
    scores = (q @ k.transpose(-1, -2)).float() * scale  # [B, H, Lq, Lk]
    if softcap is not None:
        scores = torch.tanh(scores / softcap) * softcap
    if is_causal:
        lq, lk = scores.shape[-2:]
        mask = torch.ones(lq, lk, dtype=torch.bool, device=q.device).tril(lk - lq)
    if mask is not None and mask.dtype == torch.bool:
        scores = scores.masked_fill(~mask, float("-inf"))
    elif mask is not None:  # an additive bias (ALiBi), -inf where hidden
        scores = scores + mask
    if sinks is not None:
        sink = sinks.float().view(1, -1, 1, 1).expand(*scores.shape[:-1], 1)
        probs = torch.softmax(torch.cat([scores, sink], dim=-1), dim=-1)[..., :-1]
    else:
        probs = torch.softmax(scores, dim=-1)
    return probs.to(v.dtype) @ v
