"""Paged attention over scattered blocks equals dense attention computed per sequence."""

import pytest
import torch

from pagedformers.attention import AttentionParams, TorchAttentionBackend
from pagedformers.engine.inputs import Chunk, prepare_inputs

H, H_KV, D, BS, NUM_BLOCKS = 4, 2, 8, 4, 64
BACKEND = TorchAttentionBackend()


def _reference(q, k, v, start, scale, window, softcap, sinks):
    """q [n, H, D] at positions start.., k/v [L, H_kv, D]: eager causal attention, one query at a time."""
    k = k.repeat_interleave(H // H_KV, dim=1)
    v = v.repeat_interleave(H // H_KV, dim=1)
    out = []
    for j in range(q.shape[0]):
        pos = start + j
        lo = 0 if window is None else max(0, pos - window + 1)
        scores = torch.einsum("hd,lhd->hl", q[j], k[lo:pos + 1]) * scale
        if softcap:
            scores = torch.tanh(scores / softcap) * softcap
        if sinks is not None:
            scores = torch.cat([scores, sinks[:, None]], dim=-1)
        probs = torch.softmax(scores, dim=-1)[:, : pos + 1 - lo]
        out.append(torch.einsum("hl,lhd->hd", probs, v[lo:pos + 1]))
    return torch.stack(out)


@pytest.mark.parametrize("window, softcap, with_sinks", [(None, None, False), (5, None, False), (None, 20.0, True)])
def test_mixed_batch_matches_dense(window, softcap, with_sinks):
    torch.manual_seed(0)
    # (context length, tokens already cached): decodes, a fresh prefill, a chunk after a cached prefix.
    seqs = [(7, 0), (9, 8), (13, 6), (3, 2), (17, 16)]
    k_cache = torch.randn(NUM_BLOCKS, H_KV, BS, D)  # garbage where nothing was written
    v_cache = torch.randn(NUM_BLOCKS, H_KV, BS, D)
    blocks = torch.randperm(NUM_BLOCKS).tolist()
    chunks, keys, values, queries = [], [], [], []
    for length, cached in seqs:
        table = [blocks.pop() for _ in range(-(-length // BS))]
        k, v = torch.randn(length, H_KV, D), torch.randn(length, H_KV, D)
        if cached:  # what earlier steps wrote
            written = prepare_inputs([Chunk(0, [0] * cached, table)], BS, "cpu").metadata
            BACKEND.write_kv(k_cache, v_cache, k[:cached], v[:cached], written)
        chunks.append(Chunk(cached, [0] * (length - cached), table))
        keys.append(k)
        values.append(v)
        queries.append(torch.randn(length - cached, H, D))
    order = [i for i, c in enumerate(chunks) if c.is_decode] + [i for i, c in enumerate(chunks) if not c.is_decode]
    assert order != list(range(len(seqs)))  # the batch really gets reordered: decodes first
    step = prepare_inputs([chunks[i] for i in order], BS, "cpu")
    row_starts = [sum(len(chunks[j].token_ids) for j in order[:n]) for n in range(len(order))]
    q = torch.cat([queries[i] for i in order])
    k_new = torch.cat([keys[i][seqs[i][1]:] for i in order])
    v_new = torch.cat([values[i][seqs[i][1]:] for i in order])
    BACKEND.write_kv(k_cache, v_cache, k_new, v_new, step.metadata)
    sinks = torch.randn(H) if with_sinks else None
    params = AttentionParams(0.3, window=window, softcap=softcap, sinks=sinks)
    out = BACKEND.forward(q, k_new, v_new, k_cache, v_cache, step.metadata, params)
    for row_start, i in zip(row_starts, order):
        n = seqs[i][0] - seqs[i][1]
        expected = _reference(queries[i], keys[i], values[i], seqs[i][1], 0.3, window, softcap, sinks)
        torch.testing.assert_close(out[row_start:row_start + n], expected, atol=1e-5, rtol=1e-5)


def test_bidirectional_for_encoders():
    torch.manual_seed(0)
    step = prepare_inputs([Chunk(0, list(range(6)), [0, 1])], BS, "cpu")
    q, k, v = torch.randn(6, H, D), torch.randn(6, H_KV, D), torch.randn(6, H_KV, D)
    cache = torch.zeros(2, BS, H_KV, D)
    out = BACKEND.forward(q, k, v, cache, cache, step.metadata, AttentionParams(0.5, causal=False))
    kk, vv = k.repeat_interleave(2, 1), v.repeat_interleave(2, 1)
    probs = torch.softmax(torch.einsum("qhd,khd->hqk", q, kk) * 0.5, dim=-1)
    torch.testing.assert_close(out, torch.einsum("hqk,khd->qhd", probs, vv), atol=1e-5, rtol=1e-5)
