"""Batched sampling: one pass over the [N, vocab] logits of every request that samples this step.

Order: logprobs are taken from the raw logits (as vLLM does); then min_tokens masking, penalties, structured-output
grammar masks, greedy argmax or temperature -> min-p -> top-k -> top-p -> draw. A draw inverts the row's
cumulative distribution at one uniform number, taken from a seeded request's own generator, so a seeded request
samples the same tokens whatever else is in the batch. (The exponential race, argmax p / Exp(1), needs a random
number per vocabulary entry: ATen's exponential_ took 15 ms for 32 rows of 32K tokens on 2 Zen 5 cores, and the
draw 22 ms in all, against ~7 ms for this whole call.) "Whatever else is in the batch" holds for the same logits:
a linear whose row counts split between two matmuls (linear_backend="auto" on some CPUs, platforms/cpu/
linear_choice.py) can give a row other logits in a batch of another size.

Where the platform draws on the device (CUDA: Platform.draws_on_device), the logits stay there: the same masks and
penalties apply in place, the platform's kernels pick greedy rows and make the draw (no sort: platforms/cuda/
sampling.py) at the same uniform numbers, and only token ids and the logprobs asked for come to the host.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from pagedformers.engine.request import Request
from pagedformers.engine.structured_outputs import GrammarMasks
from pagedformers.outputs import Logprob
from pagedformers.platforms import Platform, get_platform
from pagedformers.sampling_params import SamplingParams


class SamplerOutput(NamedTuple):
    token_ids: list[int]
    logprobs: list[tuple[float, dict[int, Logprob]] | None]  # (sampled token's logprob, top entries)


class Sampler:
    def __init__(self, seed: int, platform: Platform | None = None) -> None:
        """`platform` picks the tokens; by default the platform of the device that holds each step's logits (a test
        runs the CUDA platform's kernels on CPU tensors, in Triton's interpreter)."""
        self.generator = torch.Generator()
        self.generator.manual_seed(seed)
        self.grammar_masks = GrammarMasks()
        self.platform = platform

    @torch.inference_mode()
    def __call__(self, logits: torch.Tensor, reqs: list[Request]) -> SamplerOutput:
        platform = self.platform or get_platform(logits.device.type)
        if platform.draws_on_device:
            return self._sample_on_device(logits.float(), reqs, platform)
        logits = platform.host_logits(logits)
        raw_logprobs = torch.log_softmax(logits, dim=-1) if any(r.params.logprobs is not None for r in reqs) else None
        logits = self._masked(logits, reqs)
        token_ids = self._pick(logits, reqs, platform).tolist()
        logprobs = [
            logprob_entries(raw_logprobs[i], token_ids[i], r.params.logprobs) if r.params.logprobs is not None
            else None
            for i, r in enumerate(reqs)
        ]
        return SamplerOutput(token_ids, logprobs)

    def _sample_on_device(self, logits: torch.Tensor, reqs: list[Request], platform: Platform) -> SamplerOutput:
        """The same picks with the logits left where they are (a GPU's): the platform's kernels draw, and only the
        token ids and the logprobs asked for come back. Grammar masks are filled on the host (xgrammar's matchers)
        and copied over, a bit a token."""
        asked = [i for i, r in enumerate(reqs) if r.params.logprobs is not None]
        raw_logprobs = torch.log_softmax(logits[asked], dim=-1) if asked else None
        logits = self._masked(logits, reqs)
        token_ids = platform.argmax_rows(logits)
        rows = [i for i, r in enumerate(reqs) if not r.params.is_greedy]
        if rows:
            table = draw_table(rows, [reqs[i].params for i in rows], self._uniforms(rows, reqs), logits.shape[-1])
            platform.draw_rows(logits, table.to(logits.device), token_ids)  # one small copy to the device
        logprobs: list[tuple[float, dict[int, Logprob]] | None] = [None] * len(reqs)
        if asked:
            for i, entries in zip(asked, batched_logprob_entries(raw_logprobs, token_ids[asked],
                                                                  [reqs[i].params.logprobs for i in asked])):
                logprobs[i] = entries
        return SamplerOutput(token_ids.tolist(), logprobs)

    def _masked(self, logits: torch.Tensor, reqs: list[Request]) -> torch.Tensor:
        """The logits after min_tokens masking, penalties and grammar masks: a copy where any applies."""
        constrained = [i for i, r in enumerate(reqs) if r.grammar is not None]
        if constrained or any(r.num_output_tokens < r.params.min_tokens or r.params.has_penalties for r in reqs):
            logits = logits.clone()  # edited in place below; a 4 MB copy per step that greedy skips
            _mask_eos_before_min_tokens(logits, reqs)
            _apply_penalties(logits, reqs)
            if constrained:
                self.grammar_masks.apply(logits, constrained, [reqs[i].grammar for i in constrained])
        return logits

    def _pick(self, logits: torch.Tensor, reqs: list[Request], platform: Platform) -> torch.Tensor:
        token_ids = platform.argmax_rows(logits)
        rows = [i for i, r in enumerate(reqs) if not r.params.is_greedy]
        if not rows:
            return token_ids
        uniforms = self._uniforms(rows, reqs)
        vocab = logits.shape[-1]
        if platform.draws_plain_rows(logits):
            # Rows without top-k or top-p in the platform's kernel, in place (no sort, no [rows, vocab] temporaries:
            # 0.35 against 1.9-8.7 ms for 32 rows of 32K tokens on 2 Zen 5 cores, benchmarks/sampling.py).
            plain = [j for j, i in enumerate(rows) if _is_plain(reqs[i].params, vocab)]
            if plain:
                table = draw_table([rows[j] for j in plain], [reqs[rows[j]].params for j in plain], uniforms[plain],
                                   vocab)
                platform.draw_rows(logits, table, token_ids)
                kept = sorted(set(range(len(rows))) - set(plain))
                rows, uniforms = [rows[j] for j in kept], uniforms[kept]
                if not rows:
                    return token_ids
        sub = logits if len(rows) == len(reqs) else logits[rows]  # a gather only when some rows are greedy
        token_ids[rows] = draw(sub, [reqs[i].params for i in rows], uniforms, token_ids[rows])
        return token_ids

    def _uniforms(self, rows: list[int], reqs: list[Request]) -> torch.Tensor:
        """One uniform number in [0, 1) a row, from its request's generator where it is seeded."""
        uniforms = torch.empty(len(rows), 1, dtype=torch.float64)
        unseeded = [j for j, i in enumerate(rows) if reqs[i].generator is None]
        if unseeded:
            uniforms[unseeded] = torch.rand(len(unseeded), 1, dtype=torch.float64, generator=self.generator)
        for j, i in enumerate(rows):
            if reqs[i].generator is not None:
                uniforms[j] = torch.rand(1, dtype=torch.float64, generator=reqs[i].generator)
        return uniforms


def draw(logits: torch.Tensor, params: list[SamplingParams], uniforms: torch.Tensor,
         fallback: torch.Tensor) -> torch.Tensor:
    """Each row's draw at its uniform number (uniforms: float64 [rows, 1]): the first token whose cumulative
    weight exceeds u * total; `fallback` (the argmax) where the row has no distribution."""
    # NOTE: every [rows, vocab] temporary is a fresh multi-MB allocation that page-faults in; the steps below
    # make three, not seven.
    weights = _filtered_weights(logits, params)
    # In float64 so that the sum over a large vocabulary keeps its rarest tokens' share.
    cdf = weights.cumsum(dim=-1, dtype=torch.float64)
    total = cdf[:, -1:]
    # Strictly below the total, so that the first bound above it is a kept token's (rounding cannot land a
    # draw past the vocabulary, nor on a removed token at its end).
    target = torch.minimum(uniforms * total, torch.nextafter(total, torch.zeros_like(total)))
    drawn = torch.searchsorted(cdf, target, right=True)[:, 0]
    # A row with a NaN or an infinite logit has no distribution to draw from: it keeps its argmax, a token id
    # at least (the draw would be the vocabulary's size, out of range for the next step's embedding).
    return torch.where(torch.isfinite(total[:, 0]) & (total[:, 0] > 0), drawn, fallback)


def draw_table(rows: list[int], params: list[SamplingParams], uniforms: torch.Tensor, vocab: int) -> torch.Tensor:
    """Platform.draw_rows's table: (row, temperature, min_p, top_k, top_p, uniform) a drawn row, float64 (exact
    for the row and top_k; the floats round to float32 in the kernel as torch.tensor rounds them here)."""
    params = torch.tensor([[i, p.temperature, p.min_p, min(p.top_k, vocab), p.top_p] for i, p in zip(rows, params)],
                          dtype=torch.float64)
    return torch.cat([params, uniforms], dim=1)


def _is_plain(params: SamplingParams, vocab: int) -> bool:
    """Neither top-k nor top-p: the row's draw needs no sort."""
    return (not params.top_k or params.top_k >= vocab) and params.top_p >= 1.0


def _mask_eos_before_min_tokens(logits: torch.Tensor, reqs: list[Request]) -> None:
    for i, r in enumerate(reqs):
        if r.num_output_tokens < r.params.min_tokens:
            banned = list(r.params.stop_token_ids) + ([] if r.params.ignore_eos else list(r.params.eos_token_ids))
            if banned:
                logits[i, banned] = float("-inf")


def _apply_penalties(logits: torch.Tensor, reqs: list[Request]) -> None:
    """Repetition (HF/vLLM semantics, over prompt and output tokens), frequency and presence (OpenAI's, over output
    tokens) penalties, in place, for all the rows that have them at once: on a GPU, one copy of their token ids a
    kind, not a copy and a sync a row."""
    repeated = [i for i, r in enumerate(reqs) if r.params.repetition_penalty != 1.0]
    if repeated:
        rows = logits[repeated]
        seen = torch.zeros_like(rows, dtype=torch.bool)
        seen[_token_rows(logits, [reqs[i].all_token_ids for i in repeated])] = True
        penalty = _column(logits, [reqs[i].params.repetition_penalty for i in repeated])
        logits[repeated] = torch.where(seen, torch.where(rows > 0, rows / penalty, rows * penalty), rows)
    counted = [i for i, r in enumerate(reqs) if r.params.frequency_penalty or r.params.presence_penalty]
    if counted:
        counts = torch.zeros(len(counted), logits.shape[-1], dtype=torch.long, device=logits.device)
        where = _token_rows(logits, [reqs[i].output_token_ids for i in counted])
        counts.index_put_(where, torch.ones_like(where[1]), accumulate=True)
        frequency = _column(logits, [reqs[i].params.frequency_penalty for i in counted])
        presence = _column(logits, [reqs[i].params.presence_penalty for i in counted])
        logits[counted] -= frequency * counts + presence * (counts > 0)


def _token_rows(logits: torch.Tensor, token_ids: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    """(row, token) index pairs of each row's tokens, on the logits' device (ids past the vocabulary at its last)."""
    rows = [j for j, ids in enumerate(token_ids) for _ in ids]
    flat = [t for ids in token_ids for t in ids]
    pairs = torch.tensor([rows, flat], dtype=torch.long).to(logits.device)
    return pairs[0], pairs[1].clamp_(max=logits.shape[-1] - 1)


def _column(logits: torch.Tensor, values: list[float]) -> torch.Tensor:
    """[rows, 1] float32 values on the logits' device: a row's penalty as the per-row code's Python float was."""
    return torch.tensor(values, dtype=torch.float32).to(logits.device)[:, None]


def _filtered_weights(logits: torch.Tensor, params: list) -> torch.Tensor:
    """Each row's sampling weights, softmax(logits / temperature) up to its row's scale (the largest is 1), with
    the tokens that min-p, top-k and top-p remove at 0. Only ratios matter to the draw, so the rows are not
    normalised."""
    temps = torch.tensor([p.temperature for p in params], dtype=torch.float32)[:, None]
    weights = logits / temps
    weights -= weights.max(dim=-1, keepdim=True).values
    weights.exp_()
    min_p = torch.tensor([p.min_p for p in params])[:, None]
    if (min_p > 0).any():
        weights.masked_fill_(weights < min_p, 0.0)  # min-p is relative to the most likely token, here 1
    top_k = [p.top_k for p in params]
    top_p = torch.tensor([p.top_p for p in params])[:, None]
    if any(top_k) or (top_p < 1.0).any():
        sorted_weights, order = weights.sort(dim=-1, descending=True)
        rank = torch.arange(weights.shape[-1])[None, :]
        k = torch.tensor([k or weights.shape[-1] for k in top_k])[:, None]
        # Keep a token if it is in the top k and the mass before it is below top_p (the first always stays).
        mass_before = sorted_weights.cumsum(dim=-1) - sorted_weights
        keep = (rank < k) & (mass_before < top_p * sorted_weights.sum(dim=-1, keepdim=True))
        weights = torch.zeros_like(weights).scatter_(-1, order, sorted_weights * keep)
    return weights


def logprob_entries(row: torch.Tensor, token_id: int, k: int) -> tuple[float, dict[int, Logprob]]:
    """The chosen token's logprob and rank, plus the k most likely tokens (row: [vocab] logprobs)."""
    sampled = float(row[token_id])
    values, ids = row.topk(k) if k else (row[:0], row[:0])
    return sampled, _entries(token_id, sampled, int((row > sampled).sum()) + 1, values.tolist(), ids.tolist())


def batched_logprob_entries(rows: torch.Tensor, token_ids: torch.Tensor,
                             ks: list[int]) -> list[tuple[float, dict[int, Logprob]]]:
    """logprob_entries of each row (rows: [n, vocab] logprobs, on any device), brought to the host in one copy:
    float64 holds the float32 logprobs, the ranks and the token ids exactly."""
    sampled = rows.gather(1, token_ids[:, None])
    ranks = (rows > sampled).sum(dim=-1, keepdim=True) + 1
    values, ids = rows.topk(max(ks), dim=-1)
    width = values.shape[1]
    table = torch.cat([t.double() for t in (token_ids[:, None], sampled, ranks, values, ids)], dim=1).cpu().tolist()
    return [(row[1], _entries(int(row[0]), row[1], int(row[2]), row[3:3 + k], [int(t) for t in row[3 + width:][:k]]))
            for row, k in zip(table, ks)]


def _entries(token_id: int, sampled: float, rank: int, values: list[float], ids: list[int]) -> dict[int, Logprob]:
    entries = {token_id: Logprob(sampled, rank)}
    for top_rank, (v, t) in enumerate(zip(values, ids), start=1):
        entries.setdefault(t, Logprob(v, top_rank))
    return entries
