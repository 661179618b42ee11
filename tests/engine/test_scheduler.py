from pagedformers.engine.kv_cache_manager import KVCacheManager
from pagedformers.engine.request import Request, RequestStatus
from pagedformers.engine.scheduler import Scheduler
from pagedformers.sampling_params import SamplingParams


def _make(num_blocks=16, block_size=4, max_num_seqs=8, budget=32, prefix=False):
    kv = KVCacheManager(num_blocks, block_size, prefix)
    return Scheduler(kv, max_num_seqs, budget), kv


def _req(rid, n):
    return Request(rid, list(range(1, n + 1)), SamplingParams(), max_tokens=16, arrival=0)


def _run_step(sched, sampled_token=7):
    out = sched.schedule()
    sched.update_after_step(out)
    for s in out.scheduled:
        if s.request.num_computed_tokens == s.request.num_tokens:
            s.request.all_token_ids.append(sampled_token)
    return out


def test_budget_chunks_prefills_and_decodes_go_first():
    sched, _ = _make(budget=10)
    a, b = _req("a", 6), _req("b", 8)
    sched.add(a)
    sched.add(b)
    out = _run_step(sched)
    assert [(s.request.request_id, s.num_new_tokens) for s in out.scheduled] == [("a", 6), ("b", 4)]
    out = _run_step(sched)  # a decodes, b's prefill continues
    assert [(s.request.request_id, s.num_new_tokens) for s in out.scheduled] == [("a", 1), ("b", 4)]
    assert out.scheduled[1].will_sample


def test_max_num_seqs_limits_running():
    sched, _ = _make(max_num_seqs=2)
    for i in range(3):
        sched.add(_req(str(i), 3))
    out = sched.schedule()
    assert [s.request.request_id for s in out.scheduled] == ["0", "1"]
    assert [r.request_id for r in sched.waiting] == ["2"]


def test_preemption_frees_newest_and_requeues_it_first():
    sched, kv = _make(num_blocks=4, block_size=2, budget=64)
    a, b = _req("a", 4), _req("b", 3)
    sched.add(a)
    sched.add(b)
    _run_step(sched)  # a: 4 tokens + 1 sampled, b: 3 + 1, blocks: a 2, b 2 -> pool empty
    assert kv.num_free_blocks == 0
    out = _run_step(sched)  # a needs a 3rd block: b is preempted
    assert [r.request_id for r in out.preempted] == ["b"]
    assert b.status == RequestStatus.WAITING and b.num_computed_tokens == 0
    assert list(sched.waiting) == [b]
    assert [s.request.request_id for s in out.scheduled] == ["a"]


def test_ended_requests_are_reported_once_for_workers_to_drop_their_state():
    sched, _ = _make(num_blocks=4, block_size=2, budget=64)
    a, b, c = _req("a", 4), _req("b", 3), _req("c", 2)
    for r in (a, b, c):
        sched.add(r)
    assert _run_step(sched).finished_request_ids == []  # a and b fill the pool, c waits
    sched.finish(c)  # aborted while waiting
    assert _run_step(sched).finished_request_ids == ["c", "b"]  # a needs a 3rd block: b is preempted
    sched.finish(a)
    assert _run_step(sched).finished_request_ids == ["a"]
    assert _run_step(sched).finished_request_ids == []


def test_prefix_cache_hit_skips_computed_tokens():
    sched, kv = _make(prefix=True)
    a = _req("a", 9)
    sched.add(a)
    _run_step(sched)
    b = _req("b", 9)
    sched.add(b)
    out = _run_step(sched)
    scheduled_b = next(s for s in out.scheduled if s.request is b)
    assert b.num_cached_tokens == 8 and scheduled_b.num_new_tokens == 1
    assert (kv.stats.queries, kv.stats.hits) == (18, 8)
