"""The Triton kernels, run in Triton's interpreter on this CPU (float32): against the plain PyTorch backend on small
shapes, then the whole engine on attention_backend="triton" against HF generate."""


import pytest
import torch

from pagedformers import LLM, SamplingParams
from pagedformers.attention import AttentionParams, create_attention_backend
from pagedformers.engine.inputs import Chunk, prepare_inputs
from pagedformers.multimodal_inputs import MultiModalInputs
from pagedformers.tools.family_check import (
    compare,
    hf_greedy_logprobs,
    pagedformers_greedy,
    prompt_token_ids,
    save_tiny_family,
)
from pagedformers.tools.tiny_models import hf_greedy, save_tiny_model
from support.triton_interpret import triton_interpreted


@pytest.fixture(scope="module", autouse=True)
def interpreted():
    """TRITON_INTERPRET=1 while this module runs: Triton reads it when the kernels' module is imported (on the
    first use of the backend), and the CPU platform checks it."""
    with triton_interpreted():
        yield


def _attend(backend_name, chunks, params, q, k, v, caches, block_size, splits=None):
    backend = create_attention_backend(backend_name)
    if backend_name == "triton":  # 16-row query tiles (the smallest): every chunk spans tiles, its last one partial;
        # 16-key steps: two 8-token blocks, or half a 32-token one
        backend.tile_rows, backend.tile_keys, backend.splits = 16, 16, splits
    meta = prepare_inputs(chunks, block_size, "cpu").metadata
    k_cache, v_cache = (c.clone() for c in caches)
    backend.write_kv(k_cache, v_cache, k, v, meta)
    return backend.forward(q, k, v, k_cache, v_cache, meta, params), k_cache, v_cache


# (block size, query heads, KV heads, head dim, value dim): GQA 1, 2, 4 and MQA; head dims off the powers of 2
SHAPES = [(16, 4, 4, 32, 32), (16, 4, 2, 24, 24), (8, 8, 2, 40, 40), (32, 6, 1, 16, 16), (16, 4, 2, 32, 16)]
PARAMS = {"plain": {}, "window": {"window": 7}, "softcap": {"softcap": 3.0}, "sinks": {"sinks": True},
          "alibi": {"alibi": True}, "window+softcap": {"window": 20, "softcap": 8.0}}


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "bs{}-h{}-kv{}-d{}-dv{}".format(*s))
@pytest.mark.parametrize("case", list(PARAMS))
def test_kernels_match_the_torch_backend(shape, case):
    """A step mixing decodes (one at a block boundary), a fresh prefill and chunked prefills over a cached prefix,
    starting mid-block, every length odd (the prefills in 16-row query tiles: 16 // G tokens, G the query heads of
    a KV head, the 19-token chunk over several tiles); the cache rows the kernel wrote and the output both agree."""
    block_size, heads, kv_heads, dim, v_dim = shape
    torch.manual_seed(hash((shape, case)) % 1000)
    chunks = [Chunk(block_size * 2, [1], [5, 2, 9]), Chunk(36, [1], [0, 1, 3, 4, 6]), Chunk(0, [1] * 5, [7]),
              Chunk(block_size + 3, [1] * 7, [8, 10, 11]), Chunk(5, [1] * 19, [3, 2, 1])]
    n = sum(len(c.token_ids) for c in chunks)
    spec = PARAMS[case]
    params = AttentionParams(0.3, window=spec.get("window"), softcap=spec.get("softcap"),
                             sinks=torch.randn(heads) if spec.get("sinks") else None,
                             alibi=torch.rand(heads) * 0.1 if spec.get("alibi") else None)
    caches = (torch.randn(12, kv_heads, block_size, dim), torch.randn(12, kv_heads, block_size, v_dim))
    q, k, v = torch.randn(n, heads, dim), torch.randn(n, kv_heads, dim), torch.randn(n, kv_heads, v_dim)
    ours, k_ours, v_ours = _attend("triton", chunks, params, q, k, v, caches, block_size)
    ref, k_ref, v_ref = _attend("torch", chunks, params, q, k, v, caches, block_size)
    assert torch.equal(k_ours, k_ref) and torch.equal(v_ours, v_ref)
    torch.testing.assert_close(ours, ref, atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("shape", [SHAPES[1], SHAPES[3]], ids=["gqa2", "mqa"])
@pytest.mark.parametrize("case", ["plain", "sinks", "window+sinks", "softcap+alibi"])
def test_decodes_split_over_their_context_match_the_torch_backend(shape, case):
    """Decodes over 3, 40, 77 and 130 positions in 3 splits (of 48 positions with 16-position blocks, 64 with 32):
    one context shorter than a split, the others across 1, 2 and 3, and with a window of 20 the longest one's
    first splits see no key."""
    block_size, heads, kv_heads, dim, v_dim = shape
    torch.manual_seed(len(case))
    tables = torch.randperm(40).view(4, 10).tolist()
    chunks = [Chunk(n - 1, [1], table) for n, table in zip([3, 40, 77, 130], tables)]
    params = AttentionParams(0.3, window=20 if "window" in case else None, softcap=5.0 if "softcap" in case else None,
                             sinks=torch.randn(heads) + 3 if "sinks" in case else None,
                             alibi=torch.rand(heads) * 0.1 if "alibi" in case else None)
    caches = (torch.randn(40, kv_heads, block_size, dim), torch.randn(40, kv_heads, block_size, v_dim))
    q, k, v = torch.randn(4, heads, dim), torch.randn(4, kv_heads, dim), torch.randn(4, kv_heads, v_dim)
    ours, _, _ = _attend("triton", chunks, params, q, k, v, caches, block_size, splits=3)
    ref, _, _ = _attend("torch", chunks, params, q, k, v, caches, block_size)
    torch.testing.assert_close(ours, ref, atol=2e-5, rtol=1e-4)


def test_the_split_count_fills_the_gpu_only_where_contexts_are_long():
    from pagedformers.attention.triton_backend import decode_splits  # imported under the interpreter only

    assert decode_splits(1, 8, 32768) == 16  # 8 programs, 16 splits of 2k positions make 128
    assert decode_splits(2, 1, 32768) == 64  # capped by the 512 positions a split holds at least
    assert decode_splits(64, 2, 32768) == 1  # 128 programs already
    assert decode_splits(4, 2, 1000) == 1  # too short to split


def test_padded_rows_write_nothing():
    """A negative slot (vLLM's PAD_SLOT_ID: a padded row of a captured decode batch) leaves the cache as it was."""
    torch.manual_seed(0)
    meta = prepare_inputs([Chunk(3, [1], [0]), Chunk(9, [1], [1]), Chunk(0, [1] * 3, [2])], 16, "cpu").metadata
    meta.slot_mapping[[1, 3]] = -1
    k_cache, v_cache = torch.randn(3, 2, 16, 24), torch.randn(3, 2, 16, 16)
    key, value = torch.randn(5, 2, 24), torch.randn(5, 2, 16)
    k_ref, v_ref = k_cache.clone(), v_cache.clone()
    kept = meta.slot_mapping >= 0
    slots = meta.slot_mapping[kept]
    k_ref[slots // 16, :, slots % 16], v_ref[slots // 16, :, slots % 16] = key[kept], value[kept]
    create_attention_backend("triton").write_kv(k_cache, v_cache, key, value, meta)
    assert torch.equal(k_cache, k_ref) and torch.equal(v_cache, v_ref)


@pytest.mark.parametrize("splits", [1, 2])
def test_a_padded_decode_row_attends_to_nothing(splits):
    """A padded decode row (context length 0) comes out 0, not NaN, the others as the torch backend's."""
    torch.manual_seed(splits)
    chunks = [Chunk(40, [1], [0, 1, 2]), Chunk(9, [1], [3])]
    params = AttentionParams(0.3)  # no sinks: their weight would hide a 0 / 0
    caches = (torch.randn(4, 2, 16, 32), torch.randn(4, 2, 16, 32))
    q, k, v = torch.randn(2, 4, 32), torch.randn(2, 2, 32), torch.randn(2, 2, 32)
    ref, k_cache, v_cache = _attend("torch", chunks, params, q, k, v, caches, 16)
    backend = create_attention_backend("triton")
    backend.splits = splits
    meta = prepare_inputs(chunks, 16, "cpu").metadata
    meta.decode_seq_lens[1] = 0
    ours = backend.forward(q, k, v, k_cache, v_cache, meta, params)
    torch.testing.assert_close(ours[0], ref[0], atol=2e-5, rtol=1e-4)
    assert torch.equal(ours[1], torch.zeros_like(ours[1]))


# (the media's flags, the layer's window): Gemma 3's sliding and global layers, Gemma 4's ranges in sliding layers
# only and its ranges whole past the window, Molmo2's runs (left to the PyTorch path)
RANGES = {"sliding": ({}, 5), "global": ({}, None), "sliding-only-global": ({"bidirectional_sliding_only": True}, None),
          "sliding-only-sliding": ({"bidirectional_sliding_only": True}, 4),
          "past-window": ({"bidirectional_past_window": True}, 3),
          "runs": ({"bidirectional_runs": [(6, 8), (12, 16)]}, 5)}


@pytest.mark.parametrize("case", list(RANGES))
def test_bidirectional_ranges_match_the_torch_backend(case):
    """Prefills whose image ranges attend both ways, one over a cached prefix, one fresh with a range across two
    query tiles (8 tokens each) and one at its start, beside a decode: the step equals the torch backend's."""
    torch.manual_seed(len(case))
    flags, window = RANGES[case]
    cached = MultiModalInputs({"image": [0, 1, 2, 3]}, {}, [6, 7, 8, 9], bidirectional=[(6, 10)], **flags)
    fresh = MultiModalInputs({"image": list(range(12))}, {}, [0, 1, 2, *range(7, 16)],
                             bidirectional=[(0, 3), (7, 16)], **flags)
    chunks = [Chunk(20, [1], [5, 2]), Chunk(3, [1] * 11, [7, 8], multi_modal=cached),
              Chunk(0, [1] * 17, [9, 10], multi_modal=fresh)]
    params = AttentionParams(0.3, window=window)
    caches = (torch.randn(12, 2, 16, 32), torch.randn(12, 2, 16, 32))
    q, k, v = torch.randn(29, 4, 32), torch.randn(29, 2, 32), torch.randn(29, 2, 32)
    ours, _, _ = _attend("triton", chunks, params, q, k, v, caches, 16)
    ref, _, _ = _attend("torch", chunks, params, q, k, v, caches, 16)
    torch.testing.assert_close(ours, ref, atol=2e-5, rtol=1e-4)


def test_the_engine_on_triton_matches_hf_with_chunked_prefill_prefix_caching_and_preemption(tmp_path):
    path = str(save_tiny_model(tmp_path / "llama", "llama"))
    prompts = [list(range(5, 12)), list(range(20, 61)), list(range(20, 50)) + [7, 8, 9]]  # 3 shares 2's prefix
    expected = hf_greedy(path, prompts, 12)
    greedy = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)
    # 16-token budget: the 41-token prompt prefills in chunks. 9 blocks of 8 tokens (2 layers x 2 KV heads x
    # (16 + 16) float32 = 512 bytes a token): the three (19, 53 and 45 tokens at the end) cannot all stay resident.
    llm = LLM(path, attention_backend="triton", dtype="float32", max_num_batched_tokens=16, block_size=8,
              kv_cache_memory_bytes=9 * 8 * 512, enable_prefix_caching=True)
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], greedy, use_tqdm=False)
    assert [o.outputs[0].token_ids for o in outs] == expected
    assert llm.llm_engine.get_stats().num_preemptions > 0
    again = llm.generate([{"prompt_token_ids": prompts[2]}], greedy, use_tqdm=False)  # its prefix is cached now
    assert again[0].outputs[0].token_ids == expected[2]
    assert llm.llm_engine.get_stats().prefix_cache_hits > 0


@pytest.mark.parametrize("family", ["gemma2", "gpt_oss"])  # sliding + soft-capping; attention sinks
def test_families_with_windows_softcaps_and_sinks_match_hf(family, tmp_path):
    path = save_tiny_family(family, tmp_path / family)
    prompts = prompt_token_ids()
    worst, mismatch = compare(pagedformers_greedy(path, prompts, attention_backend="triton"),
                              hf_greedy_logprobs(path, prompts))
    assert mismatch is None and worst < 1e-3, (mismatch, worst)


def test_triton_on_cpu_needs_the_interpreter_and_float32(tmp_path, monkeypatch):
    path = str(save_tiny_model(tmp_path / "llama", "llama"))
    with pytest.raises(ValueError, match="dtype='float32'"):
        LLM(path, attention_backend="triton", dtype="bfloat16")
    monkeypatch.delenv("TRITON_INTERPRET")
    with pytest.raises(ValueError, match="TRITON_INTERPRET=1"):
        LLM(path, attention_backend="triton", dtype="float32")
