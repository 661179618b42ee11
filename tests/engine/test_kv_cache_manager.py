from pagedformers.engine.kv_cache_manager import KVCacheManager
from pagedformers.engine.request import Request
from pagedformers.sampling_params import SamplingParams


def _req(rid: str, tokens: list[int], **params) -> Request:
    return Request(rid, tokens, SamplingParams(**params), max_tokens=16, arrival=0)


def _computed(kv: KVCacheManager, rid: str, tokens: list[int]) -> Request:
    """A request whose prompt was allocated and computed, its full blocks registered in the prefix cache."""
    req = _req(rid, tokens)
    assert kv.allocate(req, len(tokens))
    req.num_computed_tokens = len(tokens)
    kv.cache_full_blocks(req)
    return req


def test_allocate_and_free_block_ids():
    kv = KVCacheManager(num_blocks=4, block_size=4, enable_prefix_caching=False)
    a = _req("a", list(range(6)))
    assert kv.allocate(a, 6)
    assert kv.block_tables["a"] == [0, 1]
    a.num_computed_tokens = 6
    assert kv.allocate(a, 2)  # positions 6, 7 fit in block 1
    assert kv.block_tables["a"] == [0, 1]
    a.num_computed_tokens = 8
    assert kv.allocate(a, 1)
    assert kv.block_tables["a"] == [0, 1, 2]
    b = _req("b", list(range(8)))
    assert not kv.allocate(b, 8)  # one block left, two needed
    kv.free(a)
    assert kv.num_free_blocks == 4
    assert kv.allocate(b, 8)
    assert kv.block_tables["b"] == [0, 1]  # a's freed blocks before block 3, which was never used


def test_prefix_hits_reuse_blocks_and_keep_one_token_to_compute():
    kv = KVCacheManager(num_blocks=8, block_size=4, enable_prefix_caching=True)
    a = _req("a", list(range(10)))
    assert kv.lookup_prefix(a) == []
    assert kv.allocate(a, 10)
    a.num_computed_tokens = 10
    kv.cache_full_blocks(a)  # blocks 0, 1 are full
    b = _req("b", list(range(8)) + [99, 98])
    hits = kv.lookup_prefix(b)
    assert hits == kv.block_tables["a"][:2]
    assert kv.allocate(b, 2, hits)
    assert kv.block_tables["b"][:2] == hits and kv.ref_counts[hits[0]] == 2
    # An exact repeat of a block-aligned prompt still leaves its last token to compute.
    c = _req("c", list(range(8)))
    assert len(kv.lookup_prefix(c)) == 1


def test_freed_blocks_stay_cached_until_reused():
    kv = KVCacheManager(num_blocks=3, block_size=2, enable_prefix_caching=True)
    a = _computed(kv, "a", [1, 2, 3, 4, 5])
    kv.free(a)
    assert len(kv.lookup_prefix(_req("a2", [1, 2, 3, 4, 5]))) == 2
    big = _req("big", [7] * 6)  # takes every block: the cached ones are evicted
    assert kv.allocate(big, 6)
    assert kv.lookup_prefix(_req("a3", [1, 2, 3, 4, 5])) == []


def test_prompt_logprobs_requests_skip_the_prefix_cache():
    kv = KVCacheManager(num_blocks=4, block_size=2, enable_prefix_caching=True)
    _computed(kv, "a", [1, 2, 3])
    assert kv.lookup_prefix(_req("b", [1, 2, 3], prompt_logprobs=1)) == []


def test_blocks_are_reported_fresh_once():
    kv = KVCacheManager(num_blocks=3, block_size=2, enable_prefix_caching=False)
    a = _req("a", [1, 2, 3])
    kv.allocate(a, 3)
    assert kv.take_fresh_blocks() == [0, 1] and kv.take_fresh_blocks() == []
    kv.free(a)
    kv.allocate(_req("b", [1, 2, 3, 4, 5]), 5)
    assert kv.take_fresh_blocks() == [2]  # 0 and 1 hold finite old values already


def test_without_prefix_caching_freed_blocks_are_reused_before_fresh_ones():
    """The pool's working set stays as small as the load: no walk through (and page faults in) the whole pool."""
    kv = KVCacheManager(num_blocks=64, block_size=4, enable_prefix_caching=False)
    used: set[int] = set()
    for i in range(20):
        r = _req(f"r{i}", list(range(7)))
        assert kv.allocate(r, 7)
        used.update(kv.block_tables[r.request_id])
        kv.free(r)
    assert used == {0, 1}
    assert kv.take_fresh_blocks() == [0, 1]
    assert kv.num_free_blocks == 64


def test_free_tiers_with_prefix_caching():
    """Unhashed freed blocks first, then never-used ones, then cached prefixes (least recently freed first)."""
    kv = KVCacheManager(num_blocks=6, block_size=2, enable_prefix_caching=True)
    a = _computed(kv, "a", [1, 2, 3, 4, 5])  # blocks 0 and 1 full and cached; block 2 holds one token, no hash
    kv.free(a)
    b = _req("b", [9] * 8)
    assert kv.allocate(b, 8)
    assert kv.block_tables["b"] == [2, 3, 4, 5]  # a's unhashed tail, then the never-used blocks
    assert len(kv.lookup_prefix(_req("a2", [1, 2, 3, 4, 5]))) == 2  # a's prefix is still cached
    c = _req("c", [8, 8])
    assert kv.allocate(c, 2)
    assert kv.block_tables["c"] == [1]  # only then a cached block: a's later one, freed first
    assert kv.lookup_prefix(_req("a3", [1, 2, 3, 4, 5])) == [0]


def test_reset_prefix_cache_makes_freed_blocks_reusable_first():
    kv = KVCacheManager(num_blocks=4, block_size=2, enable_prefix_caching=True)
    a = _computed(kv, "a", [1, 2, 3])
    kv.free(a)
    kv.reset_prefix_cache()
    assert kv.lookup_prefix(_req("a2", [1, 2, 3])) == []
    b = _req("b", [5, 6, 7, 8])
    assert kv.allocate(b, 4)
    assert sorted(kv.block_tables["b"]) == [0, 1]  # no never-used block touched
    assert kv.num_free_blocks == 2


def test_a_window_keeping_the_prompt_reuses_blocks_over_the_own_prompt_only():
    """prompt_blocks_only (reference sliding windows): another request's prompt blocks holding the tokens this one
    generated are not taken on its recompute, as those tokens attend windowed here and fully there."""
    kv = KVCacheManager(num_blocks=16, block_size=4, enable_prefix_caching=True, prompt_blocks_only=True)
    _computed(kv, "b", list(range(16)))  # a prompt of P + X + Q, every block cached
    a = _req("a", list(range(4)))
    a.all_token_ids += list(range(4, 12))  # a generated X, then was preempted: its recompute looks up 12 tokens
    assert kv.lookup_prefix(a) == kv.block_tables["b"][:1]  # its prompt's block only
    c = _req("c", list(range(12)))  # the same tokens as a prompt are reusable
    assert kv.lookup_prefix(c) == kv.block_tables["b"][:2]
