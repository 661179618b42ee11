"""The prefill spans' Triton attention kernel: query tiles, so that each cache block is loaded once for many
queries rather than once per query token (the decodes' kernel is triton_kernels.py's, as are the rules both follow).

A program takes up to BLOCK_Q consecutive tokens of one span times the G query heads of one KV head: BLOCK_M =
BLOCK_Q * G rows of its dots, row r being token r // G and head r % G (as vLLM's unified Triton attention lays
them). It walks the keys TILE_N positions at a time, whatever the cache's block size (a 16-token block would make
small dots). The span's keys are already in the cache, so its token j, at position p0 + j, sees positions
< p0 + j + 1, the window, soft-capping, sinks and ALiBi applying as in the decode kernel; a token in a bidirectional
range (Gemma 3's images) sees the range's keys ahead of it too, and behind it past the window where the model says.
"""

from __future__ import annotations

import triton
import triton.language as tl

from pagedformers.attention.triton_kernels import attend_block, max_combine, min_combine, start_softmax


@triton.jit
def prefill_tiles_kernel(out_ptr, q_ptr, k_cache_ptr, v_cache_ptr, tiles_ptr, tables_ptr, bounds_ptr, sinks_ptr,
                         alibi_ptr, stride_qt, stride_qh, stride_ot, stride_oh,
                         stride_kcb, stride_kch, stride_kcs, stride_vcb, stride_vch, stride_vcs, stride_table,
                         scale, softcap, window,
                         GROUP: tl.constexpr, BLOCK_M: tl.constexpr, HEAD_DIM: tl.constexpr,
                         D_PAD: tl.constexpr, V_DIM: tl.constexpr, DV_PAD: tl.constexpr,
                         BLOCK_SIZE: tl.constexpr, TILE_N: tl.constexpr, USE_SOFTCAP: tl.constexpr,
                         USE_WINDOW: tl.constexpr, USE_SINKS: tl.constexpr, USE_ALIBI: tl.constexpr,
                         USE_RANGES: tl.constexpr):
    """Program (tile, kv_head): tiles[tile] = (first row, tokens, position of the first, row of `tables`);
    USE_RANGES: bounds [T, 2] widen each row's keys to its bidirectional range (PrefillTiles.bounds)."""
    tile = tl.program_id(0)
    kv_head = tl.program_id(1)
    first_row = tl.load(tiles_ptr + tile * 4)
    num_q = tl.load(tiles_ptr + tile * 4 + 1)
    first_pos = tl.load(tiles_ptr + tile * 4 + 2)
    table = tl.load(tiles_ptr + tile * 4 + 3)
    r = tl.arange(0, BLOCK_M)
    token = r // GROUP
    heads = kv_head * GROUP + r % GROUP
    row_ok = token < num_q  # BLOCK_M need not be a multiple of G: the rows past BLOCK_Q * G are idle
    rows = first_row.to(tl.int64) + token  # rows * stride passes 2^31 in long prefills of wide models
    d = tl.arange(0, D_PAD)
    dv = tl.arange(0, DV_PAD)
    q = tl.load(q_ptr + rows[:, None] * stride_qt + heads[:, None] * stride_qh + d[None, :],
                mask=row_ok[:, None] & (d[None, :] < HEAD_DIM), other=0.0)
    m, total, acc, slopes = start_softmax(sinks_ptr, alibi_ptr, heads, row_ok, BLOCK_M, DV_PAD, USE_SINKS, USE_ALIBI)
    # Each row sees the keys [start, end): causal, the last `window` positions, its own included
    end = tl.where(row_ok, first_pos + token + 1, 0)
    start = tl.full([BLOCK_M], 0, tl.int32)
    if USE_WINDOW:
        start = tl.maximum(first_pos + token + 1 - window, 0)
    if USE_RANGES:
        end = tl.maximum(end, tl.load(bounds_ptr + rows * 2 + 1, mask=row_ok, other=0))
        start = tl.minimum(start, tl.load(bounds_ptr + rows * 2, mask=row_ok, other=first_pos))
    tile_start = tl.reduce(tl.where(row_ok, start, first_pos), 0, min_combine)
    tile_end = tl.reduce(end, 0, max_combine)
    n_off = tl.arange(0, TILE_N)
    for t in range(tile_start // TILE_N, (tile_end + TILE_N - 1) // TILE_N):
        pos = t * TILE_N + n_off
        needed = (pos < tile_end) & (pos >= tile_start)  # seen by some row
        # The keys' tile is TILE_N positions whatever the cache's block size: each position's block and slot
        block = tl.load(tables_ptr + table * stride_table + pos // BLOCK_SIZE, mask=needed, other=0)
        slot = pos % BLOCK_SIZE
        k = tl.load(k_cache_ptr + block[:, None] * stride_kcb + kv_head * stride_kch + slot[:, None] * stride_kcs
                    + d[None, :], mask=needed[:, None] & (d[None, :] < HEAD_DIM), other=0.0)
        v = tl.load(v_cache_ptr + block[:, None] * stride_vcb + kv_head * stride_vch + slot[:, None] * stride_vcs
                    + dv[None, :], mask=needed[:, None] & (dv[None, :] < V_DIM), other=0.0)
        visible = (pos[None, :] < end[:, None]) & (pos[None, :] >= start[:, None])
        m, total, acc = attend_block(q, k, v, visible, pos, slopes, m, total, acc, scale, softcap,
                                     USE_SOFTCAP, USE_ALIBI)
    out = acc / tl.where(row_ok, total, 1.0)[:, None]  # idle rows saw no key: no 0 / 0
    tl.store(out_ptr + rows[:, None] * stride_ot + heads[:, None] * stride_oh + dv[None, :],
             out.to(out_ptr.dtype.element_ty), mask=row_ok[:, None] & (dv[None, :] < V_DIM))
