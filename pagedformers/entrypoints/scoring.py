"""What the offline LLM and the server share about scoring: how two texts are paired and scored (vLLM's
score_utils)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from transformers import PreTrainedTokenizerBase


def pair_up(data_1: str | Sequence[str], data_2: str | Sequence[str]) -> tuple[list[str], list[str]]:
    """The (data_1[i], data_2[i]) pairs to score: one to one, or one data_1 against every data_2."""
    firsts = [data_1] if isinstance(data_1, str) else list(data_1)
    seconds = [data_2] if isinstance(data_2, str) else list(data_2)
    if len(firsts) == 1:
        firsts = firsts * len(seconds)
    if len(firsts) != len(seconds):
        raise ValueError(f"Scoring pairs the first and second texts one to one (or one first text with every "
                         f"second one): got {len(firsts)} first and {len(seconds)} second texts")
    return firsts, seconds


def cross_encoder_inputs(tokenizer: PreTrainedTokenizerBase, first: str,
                         second: str) -> tuple[list[int], list[int] | None]:
    """(input ids, token type ids or None) of a pair, tokenized together as the cross-encoder was trained."""
    enc = tokenizer(first, second)
    return list(enc["input_ids"]), (list(enc["token_type_ids"]) if "token_type_ids" in enc else None)


def cross_encoder_score(data: torch.Tensor) -> float:
    """A cross-encoder's score: its last label (the only one of a num_labels=1 head)."""
    return float(data.reshape(-1)[-1])
