"""The CUDA platform's sampling kernels, run on this CPU in Triton's interpreter: greedy picks against torch.argmax,
draws against the host sampler's own `draw` at the same uniform numbers, then the sampler's device path (the code
a GPU runs) against its host path."""


import pytest
import torch

from pagedformers import LLM, SamplingParams, StructuredOutputsParams
from pagedformers.engine.request import Request
from pagedformers.engine.sampler import Sampler, draw, draw_table
from pagedformers.tools.tiny_models import save_tiny_model
from support.triton_interpret import triton_interpreted


@pytest.fixture(scope="module")
def cuda():
    """The platform and its kernels, imported with TRITON_INTERPRET=1 (Triton decides at a kernel's definition)."""
    with triton_interpreted():
        from pagedformers.platforms.cuda import PLATFORM, sampling
        yield PLATFORM, sampling


def test_argmax_has_torch_ties_and_nans(cuda):
    _, sampling = cuda
    x = torch.randint(-3, 3, (7, 100), generator=torch.Generator().manual_seed(0)).float()
    x[0, [20, 60]] = 5.0  # a tie across blocks: the first
    x[1, 76] = 5.0  # in the last, partial block
    x[2, [40, 70]] = float("nan")  # NaN wins, the first one
    x[3] = float("-inf")
    x[4, 30], x[4, 50] = float("inf"), float("nan")
    x[5, 10] = float("inf")
    view = x[:, :77]  # a vocabulary off the block size; rows strided
    assert torch.equal(sampling.argmax_rows(view, block=16), view.argmax(dim=-1))
    assert sampling.argmax_rows(view[:0], block=16).shape == (0,)


def _settings(vocab: int) -> list[dict]:
    alone = [{"temperature": 0.6}, {"temperature": 2.0}, {"min_p": 0.1}, {"top_k": 5}, {"top_p": 0.8}]
    combined = [{"temperature": 0.8, "min_p": 0.02, "top_k": 20, "top_p": 0.9}, {"temperature": 1.3, "top_p": 0.95},
                {"min_p": 0.05, "top_k": 12}, {"top_k": vocab + 5, "top_p": 0.5}, {"top_k": vocab - 1},
                {"temperature": 0.05, "top_p": 0.99}, {"top_k": 1}, {"top_p": 1e-6}, {"min_p": 1.0}]
    return alone + combined


@pytest.mark.parametrize("vocab,block", [(37, 16), (300, 64)])  # neither a multiple of the block
def test_draws_are_the_host_samplers(cuda, vocab, block):
    """Every setting alone and combined (top_k past the vocabulary too), three rows each, some with removed (-inf)
    tokens; rows without a distribution (NaN, +inf, all -inf) keep their argmax; greedy rows are not touched."""
    _, sampling = cuda
    g = torch.Generator().manual_seed(vocab)
    settings = _settings(vocab) * 3
    logits = torch.randn(len(settings) + 4, vocab, generator=g) * 1.5
    logits[::4, ::3] = float("-inf")
    logits[-4, 5], logits[-3, 7], logits[-2] = float("nan"), float("inf"), float("-inf")
    rows = list(range(len(settings))) + [len(settings) + 1, len(settings) + 2, len(settings) + 3]  # one is greedy
    params = [SamplingParams(**s) for s in settings] + [SamplingParams()] * 3
    uniforms = torch.rand(len(rows), 1, dtype=torch.float64, generator=g)
    argmax = logits.argmax(dim=-1)
    expected = argmax.clone()
    expected[rows] = draw(logits[rows], params, uniforms, argmax[rows])
    ours = argmax.clone()
    sampling.draw_rows(logits, draw_table(rows, params, uniforms, vocab), ours, block=block)
    assert ours.tolist() == expected.tolist()
    assert (expected != argmax).sum() > len(rows) // 4  # draws, not argmaxes: the comparison could fail


def _requests() -> list[Request]:
    """Greedy, seeded and unseeded draws, with logprobs, penalties and min_tokens among them."""
    def req(tokens=(1, 2, 3), outputs=(), **params):
        r = Request("r", list(tokens), SamplingParams(**params), max_tokens=16, arrival=0)
        r.all_token_ids += list(outputs)
        return r
    eos_banned = req(temperature=0.9, min_tokens=4, seed=3)
    eos_banned.params.eos_token_ids = frozenset({5})
    return [req(temperature=0.0), req(temperature=0.0, logprobs=3), req(seed=1, temperature=0.9),
            req(seed=2, top_k=10, top_p=0.9, logprobs=2), req(min_p=0.05), eos_banned,
            req(outputs=(4, 4, 9), temperature=0.0, repetition_penalty=1.5, frequency_penalty=0.5),
            req(outputs=(4, 7), temperature=1.5, presence_penalty=0.8, logprobs=0)]


def test_the_samplers_device_path_picks_the_host_tokens(cuda):
    """Sampler(platform=CUDA) on CPU tensors runs what a GPU runs: three steps give the host path's tokens and
    logprobs, the unseeded rows drawing from the sampler's own generator in the same order."""
    platform, _ = cuda
    host, device = Sampler(7), Sampler(7, platform=platform)
    host_reqs, device_reqs = _requests(), _requests()
    g = torch.Generator().manual_seed(0)
    for _ in range(3):
        logits = torch.randn(len(host_reqs), 150, generator=g) * 2
        expected, ours = host(logits, host_reqs), device(logits, device_reqs)
        assert ours.token_ids == expected.token_ids
        assert ours.logprobs == expected.logprobs


def _top_p_rounding_case() -> tuple[torch.Tensor, float, int]:
    """Logits, a top_p and a token that the host's float32 top-p test removes and an exact test keeps: the token's
    float32 mass before it rounds up onto the limit float32(top_p * sum)."""
    g = torch.Generator().manual_seed(0)
    while True:
        x = torch.randn(8, generator=g)
        w = (x - x.max()).exp()  # the host's weights at temperature 1
        ranked, order = w.sort(descending=True)
        total = ranked.sum()
        before, exact = ranked.cumsum(0) - ranked, ranked.double().cumsum(0) - ranked.double()
        for r in range(1, 8):
            top_p = (before[r] / total).item()  # a float32 value
            if before[r] > exact[r] and torch.tensor(top_p) * total == before[r] \
                    and total == ranked.double().sum().float():
                return x, top_p, int(order[r])


def test_top_p_rounds_as_the_host(cuda):
    """At a uniform number that lands on the token under an exact test, the host draws another: so must we."""
    _, sampling = cuda
    x, top_p, token = _top_p_rounding_case()
    w = (x - x.max()).exp().double()
    kept = torch.where(w >= w[token], w, 0.0)
    u = torch.tensor([[(kept[:token].sum() + kept[token] / 2) / kept.sum()]], dtype=torch.float64)
    logits, params = x[None], [SamplingParams(top_p=top_p)]
    expected = draw(logits, params, u, logits.argmax(dim=-1))
    assert expected.item() != token
    ours = logits.argmax(dim=-1)
    sampling.draw_rows(logits, draw_table([0], params, u, 8), ours, block=16)
    assert ours.tolist() == expected.tolist()


def test_the_engine_samples_the_host_tokens_on_the_device_path(cuda, tmp_path):
    """A tiny Llama's seeded generations, one under a grammar (its mask applied where the logits are), give the
    same tokens and logprobs whichever path its sampler takes."""
    platform, _ = cuda
    llm = LLM(str(save_tiny_model(tmp_path / "llama", "llama")), dtype="float32", enforce_eager=True)
    prompts = [{"prompt_token_ids": list(range(5, 12))}, {"prompt_token_ids": list(range(20, 33))}]
    params = [SamplingParams(temperature=0.9, top_k=20, top_p=0.9, seed=1, max_tokens=8, ignore_eos=True, logprobs=2),
              SamplingParams(temperature=1.2, min_p=0.02, seed=2, max_tokens=8,
                             structured_outputs=StructuredOutputsParams(choice=["yes", "no", "maybe later"]))]
    runs = []
    for sampler_platform in (None, platform):
        llm.llm_engine.runner.sampler = Sampler(0, platform=sampler_platform)
        runs.append([(o.outputs[0].token_ids, o.outputs[0].logprobs, o.outputs[0].text)
                     for o in llm.generate(prompts, params, use_tqdm=False)])
    assert runs[0] == runs[1]
    assert runs[0][1][2] in ("yes", "no", "maybe later")
