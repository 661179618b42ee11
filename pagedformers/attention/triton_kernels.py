"""Triton kernels of the paged KV cache: the write of a step's keys and values, and the decodes' attention over the
cache (the prefill spans' tiled kernel is triton_prefill.py's; both share `attend_block`).

Portable Triton: they run on CUDA GPUs, and on a CPU in Triton's interpreter (TRITON_INTERPRET=1, float32),
which is how CI checks them against the plain PyTorch backend. `torch_backend.py` is their reference.

A decode's program (row, kv_head, split) attends the G query heads that share a KV head (the rows of its dots:
GQA without repeating K/V) over its sequence's context, block by block through the block table, with an online
softmax. Few rows over long contexts would leave most of a GPU idle, so the context may be cut into splits: each
program then writes its partial max, sum and unnormalised output, and merge_splits_kernel combines them
(log-sum-exp), counting the sinks once.

No calls of triton.language's standard library jit functions (tl.max, tl.sum, tl.zeros, tl.cdiv): they are
decorated when triton is imported (torch imports it), and if TRITON_INTERPRET=1 was set only after that, the
interpreter cannot call them. Reductions go through tl.reduce, with the combine functions tl.max, tl.min and tl.sum
use: the interpreter knows those and reduces with one numpy call, never calling them, where any other combine
function is called per element in Python (most of the interpreter's time, and on CPython 3.11 the deep calls
thrashed its frame stack's memory: 10x the page faults); compiled, they are combine functions like any other.
"""

from __future__ import annotations

import triton
import triton.language as tl

max_combine = tl.standard._elementwise_max  # as tl.max reduces
min_combine = tl.standard._elementwise_min  # as tl.min reduces
sum_combine = tl.standard._sum_combine  # as tl.sum reduces


@triton.jit
def write_kv_kernel(key_ptr, value_ptr, k_cache_ptr, v_cache_ptr, slots_ptr,
                    stride_kt, stride_kh, stride_vt, stride_vh,
                    stride_kcb, stride_kch, stride_kcs, stride_vcb, stride_vch, stride_vcs,
                    BLOCK_SIZE: tl.constexpr, HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr,
                    V_DIM: tl.constexpr, DV_PAD: tl.constexpr):
    """Program (token, kv_head): its key and value rows into their cache slot; none for a negative slot (a padded
    row of a captured decode batch: vLLM's PAD_SLOT_ID)."""
    t = tl.program_id(0).to(tl.int64)  # t * stride passes 2^31 in long prefills of wide models
    h = tl.program_id(1)
    slot = tl.load(slots_ptr + t)
    block = slot // BLOCK_SIZE
    offset = slot % BLOCK_SIZE
    d = tl.arange(0, D_PAD)
    k = tl.load(key_ptr + t * stride_kt + h * stride_kh + d, mask=d < HEAD_DIM)
    # slot >= 0 broadcast as a block: the interpreter rejects a scalar condition and'ed into a mask
    tl.store(k_cache_ptr + block * stride_kcb + h * stride_kch + offset * stride_kcs + d, k,
             mask=(d < HEAD_DIM) & (d * 0 + slot >= 0))
    dv = tl.arange(0, DV_PAD)
    v = tl.load(value_ptr + t * stride_vt + h * stride_vh + dv, mask=dv < V_DIM)
    tl.store(v_cache_ptr + block * stride_vcb + h * stride_vch + offset * stride_vcs + dv, v,
             mask=(dv < V_DIM) & (dv * 0 + slot >= 0))


@triton.jit
def start_softmax(sinks_ptr, alibi_ptr, heads, ok, ROWS: tl.constexpr, DV_PAD: tl.constexpr,
                  USE_SINKS: tl.constexpr, USE_ALIBI: tl.constexpr):
    """The online softmax's state before any key, for ROWS rows of query heads `heads` (`ok`: real rows): running
    max, sum, output, and each row's ALiBi slope. A sink is a key every head sees with its own logit and no value:
    it only adds to the sum."""
    m = tl.full([ROWS], float("-inf"), tl.float32)
    total = tl.full([ROWS], 0.0, tl.float32)
    if USE_SINKS:
        m = tl.load(sinks_ptr + heads, mask=ok, other=0.0).to(tl.float32)
        total = tl.full([ROWS], 1.0, tl.float32)
    slopes = m
    if USE_ALIBI:
        slopes = tl.load(alibi_ptr + heads, mask=ok, other=0.0).to(tl.float32)
    return m, total, tl.full([ROWS, DV_PAD], 0.0, tl.float32), slopes


@triton.jit
def attend_block(q, k, v, visible, pos, slopes, m, total, acc, scale, softcap,
                 USE_SOFTCAP: tl.constexpr, USE_ALIBI: tl.constexpr):
    """One step of the online softmax: queries q [R, D] over a block's keys k [S, D] and values v [S, DV] where
    `visible` ([R, S] or [1, S]), key positions pos [S]. Returns the running (max [R], sum [R], output [R, DV])."""
    scores = tl.dot(q, tl.trans(k), input_precision="ieee") * scale  # [R, S]; float32 not TF32
    if USE_SOFTCAP:  # softcap * tanh(x / softcap), tanh written with exp (portable to the interpreter)
        scores = softcap * (1.0 - 2.0 / (tl.exp(2.0 * scores / softcap) + 1.0))
    if USE_ALIBI:
        scores += slopes[:, None] * pos[None, :].to(tl.float32)
    scores = tl.where(visible, scores, float("-inf"))
    m_new = tl.maximum(m, tl.reduce(scores, 1, max_combine))
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # a row with no visible key yet: exp(-inf - -inf) is NaN
    p = tl.exp(scores - m_safe[:, None])
    alpha = tl.exp(m - m_safe)
    total = total * alpha + tl.reduce(p, 1, sum_combine)
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision="ieee")
    return m_new, total, acc


@triton.jit
def paged_attention_kernel(out_ptr, q_ptr, k_cache_ptr, v_cache_ptr, tables_ptr, lens_ptr, sinks_ptr, alibi_ptr,
                           part_ptr, part_acc_ptr, stride_qt, stride_qh, stride_ot, stride_oh,
                           stride_kcb, stride_kch, stride_kcs, stride_vcb, stride_vch, stride_vcs, stride_table,
                           scale, softcap, window,
                           GROUP: tl.constexpr, GROUP_PAD: tl.constexpr, HEAD_DIM: tl.constexpr,
                           D_PAD: tl.constexpr, V_DIM: tl.constexpr, DV_PAD: tl.constexpr,
                           BLOCK_SIZE: tl.constexpr, USE_SOFTCAP: tl.constexpr, USE_WINDOW: tl.constexpr,
                           USE_SINKS: tl.constexpr, USE_ALIBI: tl.constexpr, SPLIT: tl.constexpr):
    """Program (i, kv_head, split): query row i, its table row i and context length lens[i], over the split-th of
    as many even shares of the row's visible blocks as there are splits (each row's own: a captured graph's splits
    are sized for the longest context, its rows' contexts are not). Without SPLIT, its output into out; with SPLIT, its
    [max, sum] into part [rows, heads, splits, 2] and its unnormalised output into part_acc [rows, heads, splits,
    DV], the sinks left to merge_splits_kernel."""
    i = tl.program_id(0)
    kv_head = tl.program_id(1)
    split = tl.program_id(2)
    ctx_len = tl.load(lens_ptr + i)
    g = tl.arange(0, GROUP_PAD)
    heads = kv_head * GROUP + g
    head_ok = g < GROUP
    d = tl.arange(0, D_PAD)
    dv = tl.arange(0, DV_PAD)
    q = tl.load(q_ptr + i * stride_qt + heads[:, None] * stride_qh + d[None, :],
                mask=head_ok[:, None] & (d[None, :] < HEAD_DIM), other=0.0)
    # Splits leave the sinks to merge_splits_kernel
    m, total, acc, slopes = start_softmax(sinks_ptr, alibi_ptr, heads, head_ok, GROUP_PAD, DV_PAD,
                                          USE_SINKS and not SPLIT, USE_ALIBI)
    start = 0
    if USE_WINDOW:  # the last `window` positions, the query's own included
        start = tl.maximum(ctx_len - window, 0)
    s_off = tl.arange(0, BLOCK_SIZE)
    # Each block of the range holds a visible key; a split past the row's blocks runs none
    row_first, row_end = start // BLOCK_SIZE, (ctx_len + BLOCK_SIZE - 1) // BLOCK_SIZE
    share = (row_end - row_first + tl.num_programs(2) - 1) // tl.num_programs(2)
    first_block = row_first + split * share
    end_block = tl.minimum(row_end, first_block + share)
    for b in range(first_block, end_block):
        block = tl.load(tables_ptr + i * stride_table + b)
        pos = b * BLOCK_SIZE + s_off
        visible = (pos < ctx_len) & (pos >= start)
        k = tl.load(k_cache_ptr + block * stride_kcb + kv_head * stride_kch + s_off[:, None] * stride_kcs + d[None, :],
                    mask=visible[:, None] & (d[None, :] < HEAD_DIM), other=0.0)
        v = tl.load(v_cache_ptr + block * stride_vcb + kv_head * stride_vch + s_off[:, None] * stride_vcs + dv[None, :],
                    mask=visible[:, None] & (dv[None, :] < V_DIM), other=0.0)
        m, total, acc = attend_block(q, k, v, visible[None, :], pos, slopes, m, total, acc, scale, softcap,
                                     USE_SOFTCAP, USE_ALIBI)
    if SPLIT:
        num_splits = tl.num_programs(2)
        part = (i * tl.num_programs(1) * GROUP + heads) * num_splits + split
        tl.store(part_ptr + part * 2, m, mask=head_ok)
        tl.store(part_ptr + part * 2 + 1, total, mask=head_ok)
        tl.store(part_acc_ptr + part[:, None] * DV_PAD + dv[None, :], acc, mask=head_ok[:, None])
    else:
        out = acc / tl.where(total > 0.0, total, 1.0)[:, None]  # 0, not NaN, for a padded row's empty context
        tl.store(out_ptr + i * stride_ot + heads[:, None] * stride_oh + dv[None, :],
                 out.to(out_ptr.dtype.element_ty), mask=head_ok[:, None] & (dv[None, :] < V_DIM))


@triton.jit
def merge_splits_kernel(out_ptr, part_ptr, part_acc_ptr, sinks_ptr, stride_ot, stride_oh, num_splits,
                        V_DIM: tl.constexpr, DV_PAD: tl.constexpr, SPLITS_PAD: tl.constexpr,
                        USE_SINKS: tl.constexpr):
    """Program (i, head): the splits' partial softmaxes of query row i combined, rescaled to their common max."""
    i = tl.program_id(0)
    head = tl.program_id(1)
    s = tl.arange(0, SPLITS_PAD)
    dv = tl.arange(0, DV_PAD)
    part = (i * tl.num_programs(1) + head) * num_splits + s
    m = tl.load(part_ptr + part * 2, mask=s < num_splits, other=float("-inf"))  # -inf: a split with no key
    total = tl.load(part_ptr + part * 2 + 1, mask=s < num_splits, other=0.0)
    acc = tl.load(part_acc_ptr + part[:, None] * DV_PAD + dv[None, :], mask=(s < num_splits)[:, None], other=0.0)
    m_all = tl.reduce(m, 0, max_combine)
    if USE_SINKS:
        sink = tl.load(sinks_ptr + head).to(tl.float32)
        m_all = tl.maximum(m_all, sink)
    m_all = tl.where(m_all == float("-inf"), 0.0, m_all)  # a padded row's empty context: 0, not NaN
    weight = tl.exp(m - m_all)
    denominator = tl.reduce(weight * total, 0, sum_combine)
    if USE_SINKS:
        denominator += tl.exp(sink - m_all)
    out = tl.reduce(weight[:, None] * acc, 0, sum_combine) / tl.where(denominator > 0.0, denominator, 1.0)
    tl.store(out_ptr + i * stride_ot + head * stride_oh + dv, out.to(out_ptr.dtype.element_ty), mask=dv < V_DIM)
