"""Paged attention over scattered blocks equals dense attention computed per sequence."""

import pytest
import torch
from transformers.masking_utils import (
    and_masks,
    blockwise_overlay,
    causal_mask_function,
    or_masks,
    sliding_window_overlay,
)

from pagedformers.attention import AttentionParams, TorchAttentionBackend, create_attention_backend, torch_backend
from pagedformers.attention.torch_backend import attend_selected
from pagedformers.engine.inputs import Chunk, prepare_inputs
from pagedformers.multimodal_inputs import MultiModalInputs
from pagedformers.platforms.cpu import attention as cpu_attention  # noqa: F401  (registers the "cpu" backend)

H, H_KV, D, BS, NUM_BLOCKS = 4, 2, 8, 4, 64
BACKEND = TorchAttentionBackend()


def _reference(q, k, v, start, scale, window, softcap, sinks, prompt=0):
    """q [n, H, D] at positions start.., k/v [L, H_kv, D]: eager causal attention, one query at a time; a window
    keeps the first `prompt` keys too (R-SWA)."""
    k = k.repeat_interleave(H // H_KV, dim=1)
    v = v.repeat_interleave(H // H_KV, dim=1)
    out = []
    for j in range(q.shape[0]):
        pos = start + j
        keys = [i for i in range(pos + 1) if window is None or pos - i < window or i < prompt]
        scores = torch.einsum("hd,lhd->hl", q[j], k[keys]) * scale
        if softcap:
            scores = torch.tanh(scores / softcap) * softcap
        if sinks is not None:
            scores = torch.cat([scores, sinks[:, None]], dim=-1)
        probs = torch.softmax(scores, dim=-1)[:, : len(keys)]
        out.append(torch.einsum("hl,lhd->hd", probs, v[keys]))
    return torch.stack(out)


@pytest.mark.parametrize("window, softcap, with_sinks, keep_prompt", [
    (None, None, False, False), (5, None, False, False), (None, 20.0, True, False), (3, None, False, True)])
def test_mixed_batch_matches_dense(window, softcap, with_sinks, keep_prompt):
    """keep_prompt: each window keeps its sequence's prompt (R-SWA), prompts shorter than the contexts (decodes past
    the window; a chunk, as after a preemption, whose generated tokens are windowed) or longer (a prompt chunk)."""
    torch.manual_seed(0)
    # (context length, tokens already cached): decodes, a fresh prefill, a chunk after a cached prefix.
    seqs = [(7, 0), (9, 8), (13, 6), (3, 2), (17, 16)]
    prompts = [4, 3, 8, 3, 5] if keep_prompt else [None] * len(seqs)
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
        chunks.append(Chunk(cached, [0] * (length - cached), table, num_prompt_tokens=prompts[len(chunks)]))
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
    params = AttentionParams(0.3, window=window, softcap=softcap, sinks=sinks, keep_prompt=keep_prompt)
    out = BACKEND.forward(q, k_new, v_new, k_cache, v_cache, step.metadata, params)
    for row_start, i in zip(row_starts, order):
        n = seqs[i][0] - seqs[i][1]
        expected = _reference(queries[i], keys[i], values[i], seqs[i][1], 0.3, window, softcap, sinks,
                              prompts[i] or 0)
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


@pytest.mark.parametrize("backend_name", ["torch", "cpu"])
@pytest.mark.parametrize("window, whole", [(None, False), (6, False), (4, False), (4, True)])  # 4: ranges past it
@pytest.mark.parametrize("one_block", [False, True])
def test_bidirectional_ranges_follow_transformers_blockwise_mask(backend_name, window, whole, one_block):
    """Gemma 3's image runs: a chunk over a cached prefix holds two ranges (one begun in the cache); each
    row equals attention under transformers' own mask, AND(sliding_window, OR(causal, blockwise)); whole ranges
    (Gemma 4 unified's, through the generic create_masks_for_generate): OR(AND(sliding_window, causal), blockwise).
    one_block: Molmo2's, both runs one block (one range over them, the text between causal)."""
    torch.manual_seed(0)
    length, cached, ranges = 20, 5, [(3, 9), (12, 16)]
    placeholders, image = [*range(3, 9), *range(12, 16)], {"image": list(range(10))}
    media = MultiModalInputs(image, {}, placeholders, bidirectional=[(3, 16)], bidirectional_runs=ranges,
                             bidirectional_past_window=whole) if one_block else \
        MultiModalInputs(image, {}, placeholders, bidirectional=ranges, bidirectional_past_window=whole)
    table = list(range(-(-length // BS)))
    q = torch.randn(length - cached, H, D)
    k, v = torch.randn(length, H_KV, D), torch.randn(length, H_KV, D)
    backend = create_attention_backend(backend_name)
    k_cache, v_cache = torch.zeros(NUM_BLOCKS, H_KV, BS, D), torch.zeros(NUM_BLOCKS, H_KV, BS, D)
    backend.write_kv(k_cache, v_cache, k[:cached], v[:cached], prepare_inputs([Chunk(0, [0] * cached, table)], BS,
                                                                               "cpu").metadata)
    decode = Chunk(length - 1, [0], [t + len(table) for t in table])  # another sequence, beside it in the step
    step = prepare_inputs([decode, Chunk(cached, [0] * (length - cached), table, multi_modal=media)], BS, "cpu")
    q_all = torch.cat([torch.randn(1, H, D), q])
    k_all, v_all = torch.cat([k[-1:], k[cached:]]), torch.cat([v[-1:], v[cached:]])
    backend.write_kv(k_cache, v_cache, k_all, v_all, step.metadata)
    out = backend.forward(q_all, k_all, v_all, k_cache, v_cache, step.metadata, AttentionParams(0.5, window=window))

    groups = torch.full((1, length), -1)
    for i, (lo, hi) in enumerate(ranges):
        groups[0, lo:hi] = 0 if one_block else i
    mask_fn = or_masks(causal_mask_function, blockwise_overlay(groups))
    if window is not None:
        mask_fn = and_masks(sliding_window_overlay(window), mask_fn)
    if whole:
        mask_fn = or_masks(and_masks(sliding_window_overlay(window), causal_mask_function), blockwise_overlay(groups))
    visible = torch.tensor([[bool(mask_fn(0, 0, torch.tensor(i), torch.tensor(j))) for j in range(length)]
                            for i in range(cached, length)])
    kk, vv = k.repeat_interleave(H // H_KV, 1), v.repeat_interleave(H // H_KV, 1)
    scores = torch.einsum("qhd,khd->hqk", q, kk) * 0.5
    probs = torch.softmax(scores.masked_fill(~visible, float("-inf")), dim=-1)
    torch.testing.assert_close(out[1:], torch.einsum("hqk,khd->qhd", probs, vv), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("length, cached", [(11, 0), (11, 6), (11, 10)])  # a prompt, a later chunk, a decode
@pytest.mark.parametrize("tile", [256, 4])  # the queries in one tile, and in tiles of 4 (the last one short)
def test_attend_selected_keeps_only_the_picked_causal_keys(length, cached, tile, monkeypatch):
    """Sparse attention (indexers): each query attends over the positions it picked (-1 pads dropped) and those a
    bool mask keeps, among its causal keys, its context read from the paged cache."""
    monkeypatch.setattr(torch_backend, "_SELECTED_ROWS", tile)
    torch.manual_seed(0)
    k_cache, v_cache = torch.randn(NUM_BLOCKS, H_KV, BS, D), torch.randn(NUM_BLOCKS, H_KV, BS, D)
    table = torch.randperm(NUM_BLOCKS)[: -(-length // BS)].tolist()
    k, v = torch.randn(length, H_KV, D), torch.randn(length, H_KV, D)
    if cached:
        BACKEND.write_kv(k_cache, v_cache, k[:cached], v[:cached],
                         prepare_inputs([Chunk(0, [0] * cached, table)], BS, "cpu").metadata)
    meta = prepare_inputs([Chunk(cached, [0] * (length - cached), table)], BS, "cpu").metadata
    n = length - cached
    BACKEND.write_kv(k_cache, v_cache, k[cached:], v[cached:], meta)
    indices = torch.randint(-1, length, (n, 3))  # future positions too: causality still applies
    mask = torch.rand(n, length) > 0.3
    q = torch.randn(n, H, D)
    out = attend_selected(q, k[cached:], v[cached:], k_cache, v_cache, meta, AttentionParams(D ** -0.5), indices, mask)
    for j in range(n):
        picked = sorted({int(i) for i in indices[j] if 0 <= i <= cached + j and mask[j, i]})
        if not picked:  # nothing visible: no reference (the model always keeps some)
            continue
        kj, vj = k[picked].repeat_interleave(H // H_KV, 1), v[picked].repeat_interleave(H // H_KV, 1)
        probs = torch.softmax(torch.einsum("hd,lhd->hl", q[j], kj) * D ** -0.5, dim=-1)
        torch.testing.assert_close(out[j], torch.einsum("hl,lhd->hd", probs, vj), atol=1e-5, rtol=1e-5)
