"""Batched sampling: one pass over the [N, vocab] logits of every request that samples this step.

Order: logprobs are taken from the raw logits (as vLLM does); then min_tokens masking,
penalties, structured-output grammar masks, greedy argmax or temperature -> min-p -> top-k -> top-p -> draw. Draws use
the exponential-race trick (argmax p / Exp(1)), with each seeded request's own
generator, so a seeded request samples the same tokens whatever else is in the batch.
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
        probs = _filtered_probs(logits[rows], [reqs[i].params for i in rows])
        noise = torch.empty_like(probs)
        seeded = [j for j, i in enumerate(rows) if reqs[i].generator is not None]
        if not seeded:
            noise.exponential_(generator=self.generator)
        elif len(seeded) < len(rows):  # only the unseeded rows from the engine's generator: no draw wasted
            unseeded = [j for j, i in enumerate(rows) if reqs[i].generator is None]
            noise[unseeded] = torch.empty(len(unseeded), probs.shape[1]).exponential_(generator=self.generator)
        for j in seeded:
            noise[j].exponential_(generator=reqs[rows[j]].generator)
        token_ids[rows] = argmax_rows(probs / noise)
        return token_ids


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


def _filtered_probs(logits: torch.Tensor, params: list) -> torch.Tensor:
    temps = torch.tensor([p.temperature for p in params], dtype=torch.float32)[:, None]
    probs = torch.softmax(logits / temps, dim=-1)
    min_p = torch.tensor([p.min_p for p in params])[:, None]
    if (min_p > 0).any():
        probs = probs.masked_fill(probs < min_p * probs.max(dim=-1, keepdim=True).values, 0.0)
    top_k = [p.top_k for p in params]
    top_p = torch.tensor([p.top_p for p in params])[:, None]
    if any(top_k) or (top_p < 1.0).any():
        sorted_probs, order = probs.sort(dim=-1, descending=True)
        rank = torch.arange(probs.shape[-1])[None, :]
        k = torch.tensor([k or probs.shape[-1] for k in top_k])[:, None]
        # Keep a token if it is in the top k and the mass before it is below top_p (the first always stays).
        mass_before = sorted_probs.cumsum(dim=-1) - sorted_probs
        keep = (rank < k) & (mass_before < top_p * sorted_probs.sum(dim=-1, keepdim=True))
        probs = torch.zeros_like(probs).scatter_(-1, order, sorted_probs * keep)
    return probs


def logprob_entries(row: torch.Tensor, token_id: int, k: int) -> tuple[float, dict[int, Logprob]]:
    """The chosen token's logprob and rank, plus the k most likely tokens (row: [vocab] logprobs)."""
    sampled = float(row[token_id])
    entries = {token_id: Logprob(sampled, int((row > sampled).sum()) + 1)}
    if k:
        values, ids = row.topk(k)
        for rank, (v, t) in enumerate(zip(values.tolist(), ids.tolist()), start=1):
            entries.setdefault(t, Logprob(v, rank))
    return sampled, entries
