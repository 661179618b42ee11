"""The CPU attention backend (the compiled bf16 decode-attention kernel) equals the plain PyTorch backend (itself
checked against dense attention in tests/attention/test_torch_backend.py) run in float32 on the same bf16 values."""

import dataclasses

import pytest
import torch

from pagedformers.attention import AttentionMetadata, AttentionParams, TorchAttentionBackend
from pagedformers.platforms.cpu.attention import CpuAttentionBackend, default_max_kernel_context
from pagedformers.platforms.cpu.kernels import cpu_kernel_isa, cpu_kernels

pytestmark = pytest.mark.skipif(cpu_kernel_isa() is None,
                                reason="the kernel needs AVX512-BF16 or AVX2 (this CPU has neither)")
TORCH = TorchAttentionBackend()


def _both(q, key, value, k_cache, v_cache, meta, params, cpu=None):
    """(the CPU backend on bf16, the torch backend on the same values in float32)."""
    out = (cpu or CpuAttentionBackend()).forward(q, key, value, k_cache, v_cache, meta, params)
    expected = TORCH.forward(q.float(), key.float(), value.float(), k_cache.float(), v_cache.float(), meta, params)
    return out, expected


def _decode_batch(seq_lens: list[int], block_size: int, h_kv: int, d: int, dv: int, num_blocks: int = 96):
    torch.manual_seed(0)
    k_cache = torch.randn(num_blocks, h_kv, block_size, d).bfloat16()
    v_cache = torch.randn(num_blocks, h_kv, block_size, dv).bfloat16()
    width = -(-max(seq_lens) // block_size)
    free = torch.randperm(num_blocks).tolist()
    tables = []
    for n in seq_lens:  # scattered blocks, padded with the sequence's first one like prepare_inputs does
        used = [free.pop() for _ in range(-(-n // block_size))]
        tables.append(used + [used[0]] * (width - len(used)))
    meta = AttentionMetadata(slot_mapping=torch.zeros(len(seq_lens), dtype=torch.long), num_decodes=len(seq_lens),
                             decode_block_tables=torch.tensor(tables), decode_seq_lens=torch.tensor(seq_lens),
                             prefills=[], decode_context_len=width * block_size)
    return k_cache, v_cache, meta


@pytest.mark.parametrize("h, h_kv, d, dv, block_size", [
    (16, 4, 64, 64, 16), (8, 8, 32, 32, 16), (6, 2, 128, 128, 4), (8, 1, 64, 48, 8), (12, 4, 96, 32, 32)])
@pytest.mark.parametrize("window, chunk, softcap, with_sinks", [
    (None, None, None, False), (7, None, None, False), (None, 16, None, False), (None, None, 30.0, True)])
def test_kernel_matches_torch_path(h, h_kv, d, dv, block_size, window, chunk, softcap, with_sinks):
    assert cpu_kernels() is not None  # the machine can build it: a build failure must fail here
    seq_lens = [1, 5, 16, 17, 40, 63]  # shorter and longer than one 16-key step, odd tails
    k_cache, v_cache, meta = _decode_batch(seq_lens, block_size, h_kv, d, dv)
    q = torch.randn(len(seq_lens), h, d).bfloat16()
    sinks = torch.randn(h) if with_sinks else None
    params = AttentionParams(d ** -0.5, window=window, softcap=softcap, sinks=sinks, chunk=chunk)
    # key/value of the new tokens are already in the cache; decodes do not read them
    out, expected = _both(q, v_cache[:0, 0, 0], v_cache[:0, 0, 0], k_cache, v_cache, meta, params)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), expected, atol=2e-2, rtol=2e-2)


def test_non_contiguous_query_rows_are_read_right():
    """The shell hands attention a transposed [T, H, D] view; the kernel must see the rows in order."""
    k_cache, v_cache, meta = _decode_batch([9, 30, 2], 16, 2, 64, 64)
    q = torch.randn(8, 3, 64).bfloat16().transpose(0, 1)  # [3, 8, 64], not contiguous
    out, expected = _both(q, v_cache[:0, 0, 0], v_cache[:0, 0, 0], k_cache, v_cache, meta, AttentionParams(0.125))
    torch.testing.assert_close(out.float(), expected, atol=2e-2, rtol=2e-2)


def test_bf16_engine_decodes_match_hf_forward(tmp_path):
    """End to end: the logprobs of bf16 greedy decodes (kernel attention, head_dim 32) against HF's float32
    forward over the same prompt + generated tokens. bf16 rounding alone moves them by ~0.04 on average
    (0.17 at most) with or without the kernel on this random model; a wrong attention moves them far more."""
    from transformers import AutoModelForCausalLM

    from pagedformers import LLM, SamplingParams
    from pagedformers.tools.tiny_models import build_tokenizer, save_tiny_model

    path = save_tiny_model(tmp_path, "llama", hidden_size=128, intermediate_size=256)  # 4 heads of 32, 2 KV heads
    tok = build_tokenizer()
    prompts = [tok.encode(t) for t in ("the paged cache", "a longer prompt that spans a few blocks of keys", "x")]
    llm = LLM(model=str(path), dtype="bfloat16", kv_cache_memory_bytes=1 << 24, block_size=16)
    params = SamplingParams(temperature=0.0, max_tokens=40, ignore_eos=True, logprobs=0)
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    for prompt, out in zip(prompts, outs):
        gen = out.outputs[0].token_ids
        ours = torch.tensor([d[t].logprob for d, t in zip(out.outputs[0].logprobs, gen)])
        with torch.no_grad():
            logits = hf(torch.tensor([prompt + gen])).logits[0, len(prompt) - 1:-1]
        expected = torch.log_softmax(logits, -1).gather(1, torch.tensor(gen)[:, None])[:, 0]
        error = (ours - expected).abs()
        assert error.mean() < 0.07 and error.max() < 0.3, (error.mean(), error.max())


def _mixed_batch(block_size: int, h_kv: int, d: int):
    """One decode, then prefill spans: fresh, after a cached prefix, one longer than the kernel takes (in
    test_short_prefills_*), and a last fresh one. Their new keys and values are in the cache, as the
    attention layer leaves them before attending."""
    from pagedformers.attention.metadata import PrefillSpan

    torch.manual_seed(0)
    num_blocks = 64
    k_cache, v_cache = (torch.randn(num_blocks, h_kv, block_size, d).bfloat16() for _ in range(2))
    free = torch.randperm(num_blocks).tolist()
    # (tokens cached before this step, new tokens): the decode first
    seqs = [(20, 1), (0, 13), (10, 7), (0, 30), (0, 5)]
    tables, slots, spans, row = [], [], [], 0
    for cached, new in seqs:
        blocks = [free.pop() for _ in range(-(-(cached + new) // block_size))]
        tables.append(blocks)
        slots += [blocks[p // block_size] * block_size + p % block_size for p in range(cached, cached + new)]
        if new > 1:
            spans.append(PrefillSpan(row, row + new, cached, torch.tensor(blocks) if cached else None))
        row += new
    slots = torch.tensor(slots)
    meta = AttentionMetadata(slot_mapping=slots, num_decodes=1, decode_block_tables=torch.tensor([tables[0]]),
                             decode_seq_lens=torch.tensor([21]), prefills=spans,
                             decode_context_len=len(tables[0]) * block_size)
    key = k_cache[slots // block_size, :, slots % block_size]
    value = v_cache[slots // block_size, :, slots % block_size]
    return k_cache, v_cache, key, value, meta


@pytest.mark.parametrize("window, chunk, softcap, with_sinks", [
    (None, None, None, False), (9, None, None, False), (None, 8, None, False), (None, None, 30.0, True)])
def test_short_prefills_on_the_kernel_match_torch_path(window, chunk, softcap, with_sinks):
    k_cache, v_cache, key, value, meta = _mixed_batch(8, 2, 64)
    runs, covered = meta.single_token_queries(8, 25)
    assert [(s, e) for s, e, _, _ in runs] == [(0, 21), (51, 56)] and covered == {0, 1, 3}
    q = torch.randn(key.shape[0], 6, 64).bfloat16()
    params = AttentionParams(0.125, window=window, softcap=softcap, sinks=torch.randn(6) if with_sinks else None,
                             chunk=chunk)
    # up to 25 keys on the kernel: the 30-token span goes to SDPA, splitting the runs
    out, expected = _both(q, key, value, k_cache, v_cache, meta, params, CpuAttentionBackend(max_kernel_context=25))
    torch.testing.assert_close(out.float(), expected, atol=2e-2, rtol=2e-2)


def test_windows_that_keep_the_prompt_take_the_masked_path():
    """R-SWA (AttentionParams.keep_prompt): the kernel's window is one range, so such layers run the plain masked
    path, decodes and prefill spans (a chunk past its prompt, as after a preemption) alike, never a traced graph."""
    k_cache, v_cache, key, value, meta = _mixed_batch(8, 2, 64)
    meta.decode_prompt_lens = [6]
    meta.prefills = [dataclasses.replace(span, num_prompt=n) for span, n in zip(meta.prefills, [9, 4, 30, 5])]
    q = torch.randn(key.shape[0], 6, 64).bfloat16()
    params = AttentionParams(0.125, window=3, keep_prompt=True)
    out, expected = _both(q, key, value, k_cache, v_cache, meta, params)
    torch.testing.assert_close(out.float(), expected, atol=2e-2, rtol=2e-2)
    plain = TORCH.forward(q.float(), key.float(), value.float(), k_cache.float(), v_cache.float(), meta,
                          AttentionParams(0.125, window=3))
    assert not torch.allclose(plain, expected, atol=0.1)  # the prompt really widens those windows
    decodes = _decode_batch([9, 30], 16, 2, 64, 64)[2]
    assert not CpuAttentionBackend().is_shape_static(q[:2], k_cache, v_cache, decodes, params)


def test_unzeroed_cache_never_leaks_into_bf16_outputs(tmp_path):
    """With the kernel attending every layer, fresh blocks are not zeroed: NaN garbage in the cache must
    change nothing (tokens and logprobs equal to a run on a zero-filled cache)."""
    from pagedformers import LLM, SamplingParams
    from pagedformers.tools.tiny_models import save_tiny_model

    path = save_tiny_model(tmp_path, "llama", hidden_size=128, intermediate_size=256)  # head_dim 32
    params = SamplingParams(temperature=0.0, max_tokens=20, ignore_eos=True, logprobs=0)
    prompts = [{"prompt_token_ids": [(7 * i + j) % 250 + 3 for j in range(5 + 9 * i)]} for i in range(4)]
    outs = []
    for garbage in (0.0, float("nan")):
        llm = LLM(model=str(path), dtype="bfloat16", kv_cache_memory_bytes=1 << 22, enable_prefix_caching=False)
        worker = llm.llm_engine.executor.driver_worker
        assert not worker.zero_fresh_blocks
        for k_cache, v_cache in worker.kv_caches.values():
            k_cache.fill_(garbage)
            v_cache.fill_(garbage)
        outs.append([(o.outputs[0].token_ids, [next(iter(d.values())).logprob for d in o.outputs[0].logprobs])
                     for o in llm.generate(prompts, params, use_tqdm=False)])
    assert outs[0] == outs[1]


def test_bf16_prefill_on_the_kernel_matches_hf_forward(tmp_path):
    """Prompt logprobs (the prefill path: prompts attend on the kernel, one query per token) against HF's
    float32 forward, and no further from it than SDPA's prefill (the same roundings elsewhere)."""
    from transformers import AutoModelForCausalLM

    from pagedformers import LLM, SamplingParams
    from pagedformers.tools.tiny_models import save_tiny_model

    path = save_tiny_model(tmp_path, "llama", hidden_size=128, intermediate_size=256)
    prompts = [[(11 * i + 5 * j) % 250 + 3 for j in range(n)] for i, n in enumerate((70, 23, 41))]
    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    with torch.no_grad():
        expected = [torch.log_softmax(hf(torch.tensor([p])).logits[0, :-1], -1)
                    .gather(1, torch.tensor(p[1:])[:, None])[:, 0] for p in prompts]
    llm = LLM(model=str(path), dtype="bfloat16", kv_cache_memory_bytes=1 << 24, enable_prefix_caching=False)
    params = SamplingParams(temperature=0.0, max_tokens=1, prompt_logprobs=0)
    errors, on_kernel = {}, default_max_kernel_context()
    for max_context in (on_kernel, 0):  # the kernel, then SDPA for every prompt
        llm.llm_engine.executor.driver_worker.forward.attention.max_kernel_context = max_context
        outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
        errors[max_context] = torch.cat([
            (torch.tensor([d[t].logprob for d, t in zip(o.prompt_logprobs[1:], p[1:])]) - e).abs()
            for o, p, e in zip(outs, prompts, expected)])
    kernel, sdpa = errors[on_kernel], errors[0]
    assert not torch.equal(kernel, sdpa)  # two different paths really ran
    assert kernel.mean() < 0.07 and kernel.max() < 0.3, (kernel.mean(), kernel.max())
    assert kernel.mean() < 1.5 * sdpa.mean() + 1e-3, (kernel.mean(), sdpa.mean())
