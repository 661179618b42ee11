"""PoolingParams: how one pooling request is pooled (vLLM's names)."""

from __future__ import annotations

from dataclasses import dataclass

PoolingTask = str  # "embed" | "token_embed" | "classify" | "token_classify" | "score" | "reward"
POOLING_TASKS = ("embed", "token_embed", "classify", "token_classify", "score", "reward")
# What a pooling model's head serves (config.PoolingHead -> its tasks, the first the default).
TASKS_BY_HEAD: dict[str, tuple[PoolingTask, ...]] = {
    "embed": ("embed", "token_embed"),
    "classify": ("classify", "score", "reward"),
    "token_classify": ("token_classify", "reward"),
}


@dataclass
class PoolingParams:
    dimensions: int | None = None  # Matryoshka: keep the first `dimensions` of each embedding
    normalize: bool | None = None  # embeddings: L2-normalise (default: the model's pooler config)
    activation: bool | None = None  # classification: sigmoid / softmax (default: on)
    truncate_prompt_tokens: int | None = None  # keep only the last k prompt tokens
    task: PoolingTask | None = None  # set by LLM.encode / embed / classify / score / reward

    def __post_init__(self) -> None:
        if self.dimensions is not None and self.dimensions < 1:
            raise ValueError(f"PoolingParams.dimensions={self.dimensions!r} is invalid: dimensions must be >= 1")
        if self.truncate_prompt_tokens is not None and self.truncate_prompt_tokens < 1:
            raise ValueError(f"PoolingParams.truncate_prompt_tokens={self.truncate_prompt_tokens!r} is invalid: "
                             "truncate_prompt_tokens must be >= 1")
        if self.task is not None and self.task not in POOLING_TASKS:
            raise ValueError(f"PoolingParams.task={self.task!r} is not one of {POOLING_TASKS}")
