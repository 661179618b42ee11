"""Structured outputs: a request's grammar (JSON schema, regex, choice, EBNF) as a per-step token mask.

Grammars are compiled by xgrammar once per distinct spec (its compiler caches them) when the input processor
checks the request, so a bad schema is refused before it is queued and the engine only builds a matcher. Each
step the sampler fills the masks of every constrained row at once (xgrammar's batch matcher, on its own
threads) and applies them to the logits together; the engine then advances each row's matcher by the token it
sampled.
"""

from __future__ import annotations

import functools
import json
import re
import threading

import torch
import xgrammar as xgr
from transformers import PreTrainedTokenizerBase

from pagedformers.sampling_params import StructuredOutputsParams


class StructuredOutputs:
    """The grammar compiler of one tokenizer. `vocab_size` is the width of the model's logits, which may exceed
    the tokenizer's (padded embeddings): the extra ids are never allowed."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase, vocab_size: int, eos_token_ids: frozenset[int]) -> None:
        self.tokenizer, self.vocab_size, self.eos_token_ids = tokenizer, vocab_size, sorted(eos_token_ids)
        self._lock = threading.Lock()
        self._built: xgr.GrammarCompiler | None = None

    @property
    def _compiler(self) -> xgr.GrammarCompiler:
        """Built on first use (reading the vocabulary takes ~0.1-1 s), under a lock: the server's front end and
        its engine thread share this object. The tokenizer is only read (its vocabulary), never configured."""
        with self._lock:
            if self._built is None:
                info = xgr.TokenizerInfo.from_huggingface(self.tokenizer, vocab_size=self.vocab_size,
                                                          stop_token_ids=self.eos_token_ids or None)
                self._built = xgr.GrammarCompiler(info)
            return self._built

    def compile(self, params: StructuredOutputsParams) -> xgr.CompiledGrammar:
        """Raises ValueError naming the field whose spec does not compile."""
        kind, spec, compact = params.key
        try:
            return self._compile(kind, spec, compact)
        except (RuntimeError, ValueError) as e:  # xgrammar reports bad specs as RuntimeError
            raise ValueError(f"SamplingParams.structured_outputs.{kind} is invalid: {_first_line(e)}") from None

    @functools.lru_cache(maxsize=256)  # noqa: B019  (one compiler per engine: the cache lives as long)
    def _compile(self, kind: str, spec: str, compact: bool) -> xgr.CompiledGrammar:
        if kind == "json":
            return self._compiler.compile_json_schema(spec, any_whitespace=not compact, strict_mode=True)
        if kind == "json_object":
            return self._compiler.compile_json_schema('{"type": "object"}', any_whitespace=not compact)
        if kind == "regex":
            return self._compiler.compile_regex(spec)
        if kind == "choice":
            # EBNF strings are JSON-quoted; characters as they are (a \ud83d surrogate pair would be two code points)
            choices = " | ".join(json.dumps(c, ensure_ascii=False) for c in json.loads(spec))
            return self._compiler.compile_grammar(f"root ::= {choices}")
        return self._compiler.compile_grammar(spec)

    def matcher(self, params: StructuredOutputsParams, stop_token_ids: list[int]) -> xgr.GrammarMatcher:
        """A fresh matcher at the start of the grammar, one per sequence; where the grammar may end, the
        request's own stop tokens end it as well as the end-of-sequence ones."""
        stops = sorted(set(self.eos_token_ids) | set(stop_token_ids))
        return xgr.GrammarMatcher(self.compile(params), override_stop_tokens=stops or None)


class GrammarMasks:
    """The sampler's side: fill and apply the masks of a step's constrained rows."""

    def __init__(self) -> None:
        self._batch = xgr.BatchGrammarMatcher()
        self._bitmask: torch.Tensor | None = None

    def apply(self, logits: torch.Tensor, rows: list[int], matchers: list[xgr.GrammarMatcher]) -> None:
        """Set to -inf, in place, the logits of tokens each row's grammar forbids (logits: float32 [N, vocab], on
        any device)."""
        vocab = logits.shape[-1]
        bitmask = self._bitmask
        if bitmask is None or bitmask.shape[0] < len(rows) or bitmask.shape[1] * 32 < vocab:
            bitmask = self._bitmask = xgr.allocate_token_bitmask(max(len(rows), 8), vocab)
        bitmask = bitmask[:len(rows)]
        self._batch.batch_fill_next_token_bitmask(matchers, bitmask)
        # Filled on the host; xgrammar applies a mask where the logits are (a GPU's own kernel), so it goes there
        if rows == list(range(logits.shape[0])):
            xgr.apply_token_bitmask_inplace(logits, bitmask.to(logits.device), vocab_size=vocab)
        else:
            xgr.apply_token_bitmask_inplace(logits, _spread(bitmask, rows, logits.shape[0]).to(logits.device),
                                            vocab_size=vocab, indices=rows)


def _spread(bitmask: torch.Tensor, rows: list[int], num_rows: int) -> torch.Tensor:
    """The masks as rows of a [num_rows, words] bitmask, at the logit rows they belong to (others allow all)."""
    full = torch.full((num_rows, bitmask.shape[1]), -1, dtype=bitmask.dtype)
    full[rows] = bitmask
    return full


def _first_line(error: Exception) -> str:
    """xgrammar's message without its C++ source location ("[05:03:47] /project/cpp/x.cc:5082: ...")."""
    lines = [line for line in str(error).splitlines() if line.strip()]
    return re.sub(r"^\[[\d:]+\] \S+:\d+: ", "", lines[0]) if lines else type(error).__name__
