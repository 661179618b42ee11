"""Batched sampling: one pass over the [N, vocab] logits of every request that samples this step.

Order: logprobs are taken from the raw logits (as vLLM does); then min_tokens masking, penalties, structured-output
grammar masks, greedy argmax or temperature -> min-p -> top-k -> top-p -> draw. A draw inverts the row's
cumulative distribution at one uniform number, taken from a seeded request's own generator, so a seeded request
samples the same tokens whatever else is in the batch. (The exponential race, argmax p / Exp(1), needs a random
number per vocabulary entry: ATen's exponential_ took 15 ms for 32 rows of 32K tokens on 2 Zen 5 cores, and the
draw 22 ms in all, against ~7 ms for this whole call.) "Whatever else is in the batch" holds for the same logits:
a linear whose row counts split between two matmuls (linear_backend="auto" on some CPUs, platforms/cpu/
linear_choice.py) can give a row other logits in a batch of another size.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from pagedformers.engine.request import Request
from pagedformers.engine.structured_outputs import GrammarMasks
from pagedformers.outputs import Logprob
from pagedformers.platforms import argmax_rows


class SamplerOutput(NamedTuple):
    token_ids: list[int]
    logprobs: list[tuple[float, dict[int, Logprob]] | None]  # (sampled token's logprob, top entries)


class Sampler:
    def __init__(self, seed: int) -> None:
        self.generator = torch.Generator()
        self.generator.manual_seed(seed)
        self.grammar_masks = GrammarMasks()

    @torch.inference_mode()
    def __call__(self, logits: torch.Tensor, reqs: list[Request]) -> SamplerOutput:
        logits = logits.float().cpu()
        raw_logprobs = torch.log_softmax(logits, dim=-1) if any(r.params.logprobs is not None for r in reqs) else None
        constrained = [i for i, r in enumerate(reqs) if r.grammar is not None]
        if constrained or any(r.num_output_tokens < r.params.min_tokens or r.params.has_penalties for r in reqs):
            logits = logits.clone()  # edited in place below; a 4 MB copy per step that greedy skips
            _mask_eos_before_min_tokens(logits, reqs)
            _apply_penalties(logits, reqs)
            if constrained:
                self.grammar_masks.apply(logits, constrained, [reqs[i].grammar for i in constrained])
        token_ids = self._pick(logits, reqs).tolist()
        logprobs = [
            logprob_entries(raw_logprobs[i], token_ids[i], r.params.logprobs) if r.params.logprobs is not None
            else None
            for i, r in enumerate(reqs)
        ]
        return SamplerOutput(token_ids, logprobs)

    def _pick(self, logits: torch.Tensor, reqs: list[Request]) -> torch.Tensor:
        token_ids = argmax_rows(logits)
        rows = [i for i, r in enumerate(reqs) if not r.params.is_greedy]
        if not rows:
            return token_ids
        # NOTE: every [rows, vocab] temporary is a fresh multi-MB allocation that page-faults in; the steps below
        # make three, not seven (the row gather, too, only when some rows are greedy).
        weights = _filtered_weights(logits if len(rows) == len(reqs) else logits[rows],
                                    [reqs[i].params for i in rows])
        # In float64 so that the sum over a large vocabulary keeps its rarest tokens' share.
        cdf = weights.cumsum(dim=-1, dtype=torch.float64)
        total = cdf[:, -1:]
        # Strictly below the total, so that the first bound above it is a kept token's (rounding cannot land a
        # draw past the vocabulary, nor on a removed token at its end).
        target = torch.minimum(self._uniforms(rows, reqs) * total, torch.nextafter(total, torch.zeros_like(total)))
        drawn = torch.searchsorted(cdf, target, right=True)[:, 0]
        # A row with a NaN or an infinite logit has no distribution to draw from: it keeps its argmax, a token id
        # at least (the draw would be the vocabulary's size, out of range for the next step's embedding).
        sampled = token_ids[rows]
        token_ids[rows] = torch.where(torch.isfinite(total[:, 0]) & (total[:, 0] > 0), drawn, sampled)
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


def _mask_eos_before_min_tokens(logits: torch.Tensor, reqs: list[Request]) -> None:
    for i, r in enumerate(reqs):
        if r.num_output_tokens < r.params.min_tokens:
            banned = list(r.params.stop_token_ids) + ([] if r.params.ignore_eos else list(r.params.eos_token_ids))
            if banned:
                logits[i, banned] = float("-inf")


def _apply_penalties(logits: torch.Tensor, reqs: list[Request]) -> None:
    vocab = logits.shape[-1]
    for i, r in enumerate(reqs):
        p = r.params
        if not p.has_penalties:
            continue
        if p.repetition_penalty != 1.0:  # HF/vLLM semantics, over prompt and output tokens
            seen = torch.zeros(vocab, dtype=torch.bool)
            seen[torch.tensor(r.all_token_ids, dtype=torch.long).clamp_(max=vocab - 1)] = True
            row = logits[i]
            penalised = torch.where(row > 0, row / p.repetition_penalty, row * p.repetition_penalty)
            logits[i] = torch.where(seen, penalised, row)
        if p.frequency_penalty or p.presence_penalty:  # OpenAI semantics, over output tokens only
            counts = torch.bincount(torch.tensor(r.output_token_ids, dtype=torch.long), minlength=vocab)[:vocab]
            logits[i] -= p.frequency_penalty * counts + p.presence_penalty * (counts > 0)


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
    entries = {token_id: Logprob(sampled, int((row > sampled).sum()) + 1)}
    if k:
        values, ids = row.topk(k)
        for rank, (v, t) in enumerate(zip(values.tolist(), ids.tolist()), start=1):
            entries.setdefault(t, Logprob(v, rank))
    return sampled, entries
