"""Triton kernels of the paged KV cache: the write of a step's keys and values, and attention over the cache.

Portable Triton: they run on CUDA GPUs, and on a CPU in Triton's interpreter (TRITON_INTERPRET=1, float32),
which is how CI checks them against the plain PyTorch backend. `torch_backend.py` is their reference.

Attention treats every query token alike, a decode or one token of a (chunked) prefill: program (row, kv_head)
attends the G query heads that share a KV head (the rows of its dots: GQA without repeating K/V) over the
first `ctx_len` positions of its sequence, block by block through the block table, with an online softmax.
A prefill's keys are written to the cache first, so its token j simply sees positions < num_cached + j + 1.

No jit functions of triton.language's standard library (tl.max, tl.sum, tl.zeros, tl.cdiv): they are decorated
when triton is imported (torch imports it), and if TRITON_INTERPRET=1 was set only after that, the interpreter
cannot call them. Reductions go through tl.reduce with combine functions of this module's own.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _maximum(a, b):
    return tl.maximum(a, b)


@triton.jit
def _add(a, b):
    return a + b


@triton.jit
def write_kv_kernel(key_ptr, value_ptr, k_cache_ptr, v_cache_ptr, slots_ptr,
                    stride_kt, stride_kh, stride_vt, stride_vh,
                    stride_kcb, stride_kch, stride_kcs, stride_vcb, stride_vch, stride_vcs,
                    BLOCK_SIZE: tl.constexpr, HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr,
                    V_DIM: tl.constexpr, DV_PAD: tl.constexpr):
    """Program (token, kv_head): its key and value rows into their cache slot."""
    t = tl.program_id(0)
    h = tl.program_id(1)
    slot = tl.load(slots_ptr + t)
    if slot >= 0:
        block = slot // BLOCK_SIZE
        offset = slot % BLOCK_SIZE
        d = tl.arange(0, D_PAD)
        k = tl.load(key_ptr + t * stride_kt + h * stride_kh + d, mask=d < HEAD_DIM)
        tl.store(k_cache_ptr + block * stride_kcb + h * stride_kch + offset * stride_kcs + d, k, mask=d < HEAD_DIM)
        dv = tl.arange(0, DV_PAD)
        v = tl.load(value_ptr + t * stride_vt + h * stride_vh + dv, mask=dv < V_DIM)
        tl.store(v_cache_ptr + block * stride_vcb + h * stride_vch + offset * stride_vcs + dv, v, mask=dv < V_DIM)


@triton.jit
def paged_attention_kernel(out_ptr, q_ptr, k_cache_ptr, v_cache_ptr, tables_ptr, lens_ptr, sinks_ptr, alibi_ptr,
                           first_row, stride_qt, stride_qh, stride_ot, stride_oh,
                           stride_kcb, stride_kch, stride_kcs, stride_vcb, stride_vch, stride_vcs, stride_table,
                           scale, softcap, window,
                           GROUP: tl.constexpr, GROUP_PAD: tl.constexpr, HEAD_DIM: tl.constexpr,
                           D_PAD: tl.constexpr, V_DIM: tl.constexpr, DV_PAD: tl.constexpr,
                           BLOCK_SIZE: tl.constexpr, USE_SOFTCAP: tl.constexpr, USE_WINDOW: tl.constexpr,
                           USE_SINKS: tl.constexpr, USE_ALIBI: tl.constexpr):
    """Program (i, kv_head): query row first_row + i, its table row i and context length lens[i]."""
    i = tl.program_id(0)
    kv_head = tl.program_id(1)
    t = first_row + i
    ctx_len = tl.load(lens_ptr + i)
    g = tl.arange(0, GROUP_PAD)
    heads = kv_head * GROUP + g
    head_ok = g < GROUP
    d = tl.arange(0, D_PAD)
    dv = tl.arange(0, DV_PAD)
    q = tl.load(q_ptr + t * stride_qt + heads[:, None] * stride_qh + d[None, :],
                mask=head_ok[:, None] & (d[None, :] < HEAD_DIM), other=0.0)
    if USE_SINKS:  # a sink is a key every head sees with its own logit and no value: it only adds to the sum
        m = tl.load(sinks_ptr + heads, mask=head_ok, other=0.0).to(tl.float32)
        total = tl.full([GROUP_PAD], 1.0, tl.float32)
    else:
        m = tl.full([GROUP_PAD], float("-inf"), tl.float32)
        total = tl.full([GROUP_PAD], 0.0, tl.float32)
    acc = tl.full([GROUP_PAD, DV_PAD], 0.0, tl.float32)
    if USE_ALIBI:
        slopes = tl.load(alibi_ptr + heads, mask=head_ok, other=0.0).to(tl.float32)
    start = 0
    if USE_WINDOW:  # the last `window` positions, the query's own included
        start = tl.maximum(ctx_len - window, 0)
    s_off = tl.arange(0, BLOCK_SIZE)
    for b in range(start // BLOCK_SIZE, (ctx_len + BLOCK_SIZE - 1) // BLOCK_SIZE):  # each holds a visible key
        block = tl.load(tables_ptr + i * stride_table + b)
        pos = b * BLOCK_SIZE + s_off
        visible = (pos < ctx_len) & (pos >= start)
        k = tl.load(k_cache_ptr + block * stride_kcb + kv_head * stride_kch + s_off[:, None] * stride_kcs + d[None, :],
                    mask=visible[:, None] & (d[None, :] < HEAD_DIM), other=0.0)
        scores = tl.dot(q, tl.trans(k), input_precision="ieee") * scale  # [G, BLOCK_SIZE]; float32 not TF32
        if USE_SOFTCAP:  # softcap * tanh(x / softcap), tanh written with exp (portable to the interpreter)
            scores = softcap * (1.0 - 2.0 / (tl.exp(2.0 * scores / softcap) + 1.0))
        if USE_ALIBI:
            scores += slopes[:, None] * pos[None, :].to(tl.float32)
        scores = tl.where(visible[None, :], scores, float("-inf"))
        m_new = tl.maximum(m, tl.reduce(scores, 1, _maximum))
        p = tl.exp(scores - m_new[:, None])
        alpha = tl.exp(m - m_new)
        v = tl.load(v_cache_ptr + block * stride_vcb + kv_head * stride_vch + s_off[:, None] * stride_vcs + dv[None, :],
                    mask=visible[:, None] & (dv[None, :] < V_DIM), other=0.0)
        total = total * alpha + tl.reduce(p, 1, _add)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision="ieee")
        m = m_new
    out = acc / total[:, None]
    tl.store(out_ptr + t * stride_ot + heads[:, None] * stride_oh + dv[None, :], out.to(out_ptr.dtype.element_ty),
             mask=head_ok[:, None] & (dv[None, :] < V_DIM))
