"""PoolerConfig: how a pooling model turns hidden states into one output (vLLM's names)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

POOLING_TYPES = ("CLS", "MEAN", "LAST", "ALL", "STEP")


@dataclass(frozen=True)
class PoolerConfig:
    """None in a field: the model's default (Sentence-Transformers metadata, else the head's own)."""
    pooling_type: str | None = None  # CLS, MEAN, LAST, ALL or STEP
    normalize: bool | None = None
    activation: bool | None = None
    dimensions: int | None = None
    step_tag_id: int | None = None  # STEP: pool the tokens equal to this id
    returned_token_ids: list[int] | None = None  # STEP: keep these label columns

    def __post_init__(self) -> None:
        if self.pooling_type is not None and self.pooling_type.upper() not in POOLING_TYPES:
            raise ValueError(f"pooling_type={self.pooling_type!r} is not one of {POOLING_TYPES}")

    @classmethod
    def from_value(cls, value: PoolerConfig | dict[str, Any] | None) -> PoolerConfig:
        """A PoolerConfig from what the user passed; TypeError names unknown keys."""
        if isinstance(value, PoolerConfig):
            return value
        valid = sorted(f.name for f in dataclasses.fields(cls))
        unknown = sorted(set(value or {}) - set(valid))
        if unknown:
            raise TypeError(f"Unknown pooler_config key(s) {unknown}. Valid keys: {', '.join(valid)}")
        return cls(**(value or {}))

    def merged(self, defaults: dict[str, Any]) -> PoolerConfig:
        """Fill the fields left None from defaults (e.g. Sentence-Transformers metadata)."""
        values = {k: v if v is not None else defaults.get(k) for k, v in dataclasses.asdict(self).items()}
        return PoolerConfig(**values)
