"""Paged attention on CPU: plain PyTorch, and a compiled kernel for bf16 decodes and short prefills.

bf16 decodes run the compiled kernel of kernels/cpu.py where this machine has one (it reads the
KV blocks in place), and so do the tokens of short causal prefills, each as a query of its own.
Otherwise decodes are attended together in two batched matmuls over their
gathered, padded contexts (grouped by KV head: no K/V repeat). SDPA's CPU kernel handles a query length
of 1 poorly (6 ms against 0.4 ms for 32 decodes x 256 context, bf16, 2 cores). Each
prefill span goes through SDPA (flash kernel, no scores materialised). No per-token
Python loop.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from pagedformers.attention.kv_cache import gather_blocks
from pagedformers.attention.metadata import AttentionMetadata
from pagedformers.kernels.cpu import cpu_kernel_isa, cpu_kernels, kernel_fits

# Prefill tokens whose context is at most this long go through the decode kernel as single-token queries;
# longer ones through SDPA, whose blocked flash kernel reuses keys across queries. 2 cores, 16 query / 4 KV
# heads of 64, a layer:
# - AVX512-BF16 (Zen 4): 16 prompts x 128 tokens 5.3 against 14.3 ms in SDPA, 2 x 1024 36 against 52 ms,
#   1 x 2048 82 against 128 ms: up to 1024;
# - AVX2 (Zen 3): 16 x 128 18 against 26 ms, 4 x 512 60 against 61, 2 x 1024 94 against 80: up to 512.
KERNEL_MAX_CONTEXT = 512 if cpu_kernel_isa() == "avx2" else 1024


def paged_attention(
    query: torch.Tensor,  # [T, H, D]
    key: torch.Tensor,  # [T, H_kv, D] the new tokens' keys (already written to the cache)
    value: torch.Tensor,  # [T, H_kv, Dv]
    k_cache: torch.Tensor | None,  # [num_blocks, H_kv, block_size, D]; None when nothing is cached (probe)
    v_cache: torch.Tensor | None,
    meta: AttentionMetadata,
    scale: float,
    causal: bool = True,
    window: int | None = None,
    softcap: float | None = None,
    sinks: torch.Tensor | None = None,  # [H] per-head sink logits
    chunk: int | None = None,  # chunked attention (Llama 4): keys in the query's own chunk only
) -> torch.Tensor:  # [T, H, Dv]
    out = query.new_empty(query.shape[0], query.shape[1], value.shape[-1])
    nd = meta.num_decodes
    kernel = cpu_kernels() if causal and kernel_fits(query, k_cache, v_cache) else None
    covered: set[int] = set()
    if kernel is not None:
        runs, covered = meta.single_token_queries(k_cache.shape[2], KERNEL_MAX_CONTEXT)
        for start, end, tables, lens in runs:
            kernel.decode_attention(_rows(query, start, end, contiguous=True), k_cache, v_cache, tables, lens,
                                    _NO_SINKS if sinks is None else sinks, _rows(out, start, end), scale,
                                    window or 0, chunk or 0, softcap or 0.0)
    elif nd:
        rows = meta.cache_rows(k_cache.shape[1])
        k, v = gather_blocks(k_cache, rows, nd), gather_blocks(v_cache, rows, nd)  # [B_d, H_kv, L, D]
        _attend_decodes(query[:nd], k, v, meta.decode_bias(window, chunk), scale, softcap, sinks, out[:nd])
    for i, span in enumerate(meta.prefills):
        if i in covered:
            continue
        s, e = span.q_start, span.q_end
        q = query[s:e].transpose(0, 1)[None]  # [1, H, n, D]
        if span.kv_blocks is None:
            k, v = key[s:e].transpose(0, 1)[None], value[s:e].transpose(0, 1)[None]  # [1, H_kv, kv_len, D]
        else:
            rows = meta.cache_rows(k_cache.shape[1], i)
            k = gather_blocks(k_cache, rows, 1)[:, :, : span.kv_len]
            v = gather_blocks(v_cache, rows, 1)[:, :, : span.kv_len]
        mask = meta.prefill_mask(i, window, causal, chunk)
        out[s:e] = attend(q, k, v, mask, scale, causal and mask is None, softcap, sinks)[0].transpose(0, 1)
    return out


# Decode graphs replay every op of a step, and each costs a few microseconds, more between weight reads that
# leave the caches cold: where a call needs no slice or no sinks, none is recorded.
_NO_SINKS = torch.empty(0, dtype=torch.float32)


def _rows(t: torch.Tensor, start: int, end: int, contiguous: bool = False) -> torch.Tensor:
    rows = t if start == 0 and end == t.shape[0] else t[start:end]
    return rows.contiguous() if contiguous and not rows.is_contiguous() else rows


def _attend_decodes(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor, scale: float,
                    softcap: float | None, sinks: torch.Tensor | None, out: torch.Tensor) -> None:
    """q [B, H, D], k/v [B, H_kv, L, D], bias [B, 1, 1, L] (0 / -inf) -> out [B, H, Dv] (contiguous).

    The G = H / H_kv query heads sharing a KV head are the rows of one matmul: no K/V repeat."""
    b, h, d = q.shape
    h_kv = k.shape[1]
    scores = torch.matmul(q.view(b, h_kv, h // h_kv, d), k.transpose(-1, -2)).float().mul_(scale)  # [B, H_kv, G, L]
    if softcap is not None:
        scores = torch.tanh(scores / softcap) * softcap
    scores = scores.add_(bias)
    if sinks is not None:
        sink = sinks.float().view(1, h_kv, h // h_kv, 1).expand(b, -1, -1, 1)
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
