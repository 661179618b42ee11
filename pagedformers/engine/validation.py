"""Checks a request must pass before any model work: the errors a user can fix."""

from __future__ import annotations

from pagedformers.config import EngineConfig
from pagedformers.pooling_params import PoolingParams
from pagedformers.sampling_params import SamplingParams


def check_request(config: EngineConfig, num_blocks: int, prompt_token_ids: list[int],
                  params: SamplingParams | PoolingParams, name: str = "The prompt") -> None:
    """Raise ValueError naming the prompt and the limit it breaks."""
    n, limit = len(prompt_token_ids), config.model.max_model_len
    pooling = isinstance(params, PoolingParams)
    if pooling != (config.model.runner == "pooling"):
        raise ValueError(
            "This model runs with runner='pooling': use embed / classify / score / encode, not generate."
            if not pooling else
            "This model runs with runner='generate': pooling needs runner='pooling' (or convert='embed').")
    if n == 0:
        raise ValueError(f"{name} is empty: it needs at least one token")
    if pooling and n > limit:
        raise ValueError(f"{name} has {n} tokens, longer than max_model_len={limit} "
                         "(set PoolingParams.truncate_prompt_tokens to keep only the last ones)")
    if not pooling and n >= limit:
        raise ValueError(f"{name} has {n} tokens, which leaves no room to generate within max_model_len={limit}")
    vocab = config.model.text_config.vocab_size
    bad = [t for t in prompt_token_ids if not 0 <= t < vocab]
    if bad:
        raise ValueError(f"{name} has token ids outside the vocabulary [0, {vocab}): {bad[:5]}")
    if pooling:
        _check_pooling(config, params, name)
        return
    worst_case = min(n + (params.max_tokens or limit), limit)
    blocks = -(-worst_case // config.cache.block_size)
    if blocks > num_blocks:
        raise ValueError(
            f"{name} can never fit the KV cache: {worst_case} tokens (prompt + max_tokens) need {blocks} blocks "
            f"of {config.cache.block_size} tokens, the cache has {num_blocks}. Lower max_tokens "
            "or give the cache more memory (kv_cache_memory_bytes)."
        )


def _check_pooling(config: EngineConfig, params: PoolingParams, name: str) -> None:
    from pagedformers.pooling_params import TASKS_BY_HEAD

    tasks = TASKS_BY_HEAD[config.model.pooling_head]
    if params.task is not None and params.task not in tasks:
        raise ValueError(f"{name}: this model does not support the pooling task {params.task!r}; it supports "
                         f"{list(tasks)}")
    hidden = config.model.text_config.hidden_size
    if params.dimensions is not None and config.model.pooling_head == "embed" and params.dimensions > hidden:
        raise ValueError(f"{name}: PoolingParams.dimensions={params.dimensions} exceeds the embedding size {hidden}")
