import torch

from pagedformers.engine.request import Request
from pagedformers.engine.sampler import Sampler, batched_logprob_entries, logprob_entries
from pagedformers.sampling_params import SamplingParams


def _req(tokens=(1, 2, 3), **params):
    return Request("r", list(tokens), SamplingParams(**params), max_tokens=16, arrival=0)


def test_greedy_is_argmax():
    logits = torch.tensor([[0.1, 3.0, 0.2], [5.0, 1.0, 0.0]])
    out = Sampler(0)(logits, [_req(temperature=0.0), _req(temperature=0.0)])
    assert out.token_ids == [1, 0]


def test_top_k_1_and_tiny_top_p_are_greedy():
    logits = torch.randn(4, 50)
    expected = logits.argmax(-1).tolist()
    reqs = [_req(temperature=1.0, top_k=1), _req(temperature=1.0, top_p=1e-6),
            _req(temperature=0.7, min_p=1.0), _req(temperature=1.0, top_k=1, top_p=0.5)]
    assert Sampler(0)(logits, reqs).token_ids == expected


def test_top_k_and_top_p_restrict_the_support():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    seen_k, seen_p = set(), set()
    sampler = Sampler(0)
    for _ in range(300):
        seen_k.add(sampler(logits, [_req(top_k=2)]).token_ids[0])
        seen_p.add(sampler(logits, [_req(top_p=0.7)]).token_ids[0])  # 0.5 + 0.3 covers 0.7
    assert seen_k == {0, 1} and seen_p == {0, 1}


def test_sampling_follows_the_distribution():
    probs = torch.tensor([0.6, 0.3, 0.1])
    sampler = Sampler(1)
    reqs = [_req() for _ in range(2000)]
    tokens = sampler(torch.log(probs).expand(2000, 3), reqs).token_ids
    freq = torch.bincount(torch.tensor(tokens), minlength=3) / 2000
    assert torch.allclose(freq, probs, atol=0.04)


def test_filtered_draws_follow_the_renormalised_distribution():
    # Removed tokens between and after the kept ones: a draw never lands on one, nor past the vocabulary.
    logits = torch.log(torch.tensor([0.1, 0.0, 0.5, 0.25, 0.15])).expand(4000, 5)
    tokens = Sampler(2)(logits, [_req(top_k=3) for _ in range(4000)]).token_ids
    freq = torch.bincount(torch.tensor(tokens), minlength=5) / 4000
    assert torch.allclose(freq, torch.tensor([0.0, 0.0, 0.5, 0.25, 0.15]) / 0.9, atol=0.03)
    assert freq[0] == freq[1] == 0


def test_a_row_without_a_distribution_keeps_a_token_id():
    # NaN, all -inf, +inf: no draw is possible; the row gets its argmax, never the vocabulary's size.
    logits = torch.tensor([[0.0, float("nan"), 1.0], [float("-inf")] * 3, [0.0, float("inf"), 1.0], [0.0, 0.0, 9.0]])
    tokens = Sampler(0)(logits, [_req() for _ in range(4)]).token_ids
    assert tokens[:3] == logits.argmax(-1).tolist()[:3] and tokens[3] in (0, 1, 2)


def test_seeded_request_is_independent_of_batch():
    logits = torch.randn(1, 100)
    alone = [Sampler(0)(logits, [_req(seed=42)]).token_ids[0] for _ in range(1)]
    r = _req(seed=42)
    sampler = Sampler(123)
    batch = torch.cat([torch.randn(3, 100), logits])
    together = sampler(batch, [_req(), _req(), _req(), r]).token_ids[3]
    assert together == alone[0]


def test_min_tokens_masks_eos_and_stop_token_ids():
    logits = torch.tensor([[0.0, 10.0, 9.0, 1.0]])
    r = _req(temperature=0.0, min_tokens=2, stop_token_ids=[2])
    r.params.eos_token_ids = frozenset({1})
    assert Sampler(0)(logits, [r]).token_ids == [3]


def test_penalties():
    logits = torch.tensor([[2.0, 1.9, -1.0]])
    r = _req(tokens=[0], temperature=0.0, repetition_penalty=2.0)  # token 0: 2.0 -> 1.0
    assert Sampler(0)(logits, [r]).token_ids == [1]
    r = Request("r", [5], SamplingParams(temperature=0.0, frequency_penalty=0.2), max_tokens=8, arrival=0)
    r.all_token_ids += [0]  # one output token 0: 2.0 - 0.2 < 1.9
    assert Sampler(0)(logits, [r]).token_ids == [1]


def test_logprobs_are_raw_log_softmax_with_ranks():
    logits = torch.tensor([[1.0, 3.0, 2.0]])
    out = Sampler(0)(logits, [_req(temperature=0.0, logprobs=2)])
    sampled, entries = out.logprobs[0]
    expected = torch.log_softmax(logits[0], -1)
    assert abs(sampled - float(expected[1])) < 1e-6
    assert {t: e.rank for t, e in entries.items()} == {1: 1, 2: 2}


def testbatched_logprob_entries_are_logprob_entries():
    # The device path's one-copy logprobs (engine/sampler.py) against the host's row by row, k = 0 among them.
    rows = torch.log_softmax(torch.randn(3, 50, generator=torch.Generator().manual_seed(0)), dim=-1)
    tokens, ks = torch.tensor([4, 9, 0]), [0, 5, 2]
    expected = [logprob_entries(row, int(t), k) for row, t, k in zip(rows, tokens, ks)]
    assert batched_logprob_entries(rows, tokens, ks) == expected


def test_kernel_and_torch_rows_in_one_batch_draw_as_the_torch_code_alone(monkeypatch):
    # Greedy, plain (the CPU platform's draw kernel where built), top-k, top-p and seeded rows mixed in one batch: each
    # row's token is the one the torch code alone picks, so the uniform numbers stay with their rows when the batch is
    # split between the kernel and torch.
    from pagedformers.platforms.cpu import CpuPlatform

    torch.manual_seed(0)
    logits = torch.randn(12, 300) * 2
    kinds = [dict(temperature=0.0), dict(), dict(top_k=5), dict(temperature=0.5, seed=7), dict(top_p=0.8),
             dict(min_p=0.1, seed=3)]
    reqs = [_req(**kinds[i % len(kinds)]) for i in range(12)]
    split = Sampler(5)(logits, reqs).token_ids
    monkeypatch.setattr(CpuPlatform, "draws_plain_rows", lambda self, logits: False)
    alone = Sampler(5)(logits, [_req(**kinds[i % len(kinds)]) for i in range(12)]).token_ids
    assert split == alone
