"""Tokenizer and end-of-sequence ids for a model source."""

from __future__ import annotations

from transformers import AutoTokenizer, GenerationConfig, PreTrainedTokenizerBase

from pagedformers.config import EngineConfig


def load_tokenizer(config: EngineConfig) -> PreTrainedTokenizerBase:
    return AutoTokenizer.from_pretrained(
        config.model.tokenizer_path,
        trust_remote_code=config.model.trust_remote_code,
        gguf_file=config.model.tokenizer_gguf_file,
    )


def eos_token_ids(config: EngineConfig, tokenizer: PreTrainedTokenizerBase) -> frozenset[int]:
    """generation_config.json's eos ids when present (they may list several), else the config's; plus the
    tokenizer's."""
    ids: set[int] = set()
    try:
        ids |= _as_set(GenerationConfig.from_pretrained(config.model.path).eos_token_id)
    except OSError:
        ids |= _as_set(getattr(config.model.text_config, "eos_token_id", None))
    ids |= _as_set(tokenizer.eos_token_id)
    return frozenset(ids)


def _as_set(value: int | list[int] | None) -> set[int]:
    if value is None:
        return set()
    return {value} if isinstance(value, int) else set(value)
