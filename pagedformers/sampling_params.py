"""SamplingParams: how one request is sampled and when it stops (vLLM's names and defaults)."""

from __future__ import annotations

import enum
import json
import math
from dataclasses import dataclass, field
from typing import Any

_GREEDY_EPS = 1e-5
_INT64_MAX = 2**63 - 1  # what the engine's tensors (top-k, seeds, token ids) hold
_INTS = ("n", "top_k", "max_tokens", "min_tokens", "logprobs", "prompt_logprobs", "seed")
_FLOATS = ("temperature", "top_p", "min_p", "presence_penalty", "frequency_penalty", "repetition_penalty")


class RequestOutputKind(enum.IntEnum):
    """What LLMEngine.step reports for a request: its whole output so far every step, or only its final
    output (LLM.generate's choice: the text of unfinished requests is then never decoded)."""

    CUMULATIVE = 0
    DELTA = 1  # vLLM's name, kept so that code naming it gets a clear error: not supported here
    FINAL_ONLY = 2


@dataclass(frozen=True)
class StructuredOutputsParams:
    """Constrain a request's output to a JSON schema, a regex, one of some choices, an EBNF grammar, or any JSON
    object (vLLM's names; exactly one of them). The engine masks, at every step, the tokens that would leave
    the language, so the finished output parses (unless max_tokens cuts it short: finish_reason "length")."""

    json: str | dict[str, Any] | None = None  # a JSON schema, as a dict or its text
    regex: str | None = None
    choice: list[str] | None = None
    grammar: str | None = None  # EBNF (GBNF-style: `root ::= ...`)
    json_object: bool | None = None  # any JSON object
    disable_any_whitespace: bool = False  # JSON without free whitespace: compact, and fewer tokens to sample

    def __post_init__(self) -> None:
        kinds = self.kinds
        _check(len(kinds) == 1, "structured_outputs", self, "must set exactly one of json, regex, choice, grammar "
               f"and json_object (it sets {kinds or 'none'})")
        if self.choice is not None:
            _check(isinstance(self.choice, (list, tuple)) and bool(self.choice)
                   and all(isinstance(c, str) and c for c in self.choice), "structured_outputs.choice",
                   self.choice, "must be a non-empty list of non-empty strings")
            object.__setattr__(self, "choice", list(self.choice))
        if isinstance(self.json, str):
            try:
                json.loads(self.json)
            except ValueError as e:
                _check(False, "structured_outputs.json", self.json, f"must be a JSON schema: {e}")
        else:
            _check(self.json is None or isinstance(self.json, dict), "structured_outputs.json", self.json,
                   "must be a JSON schema (a dict or its text)")
        for name in ("regex", "grammar"):
            value = getattr(self, name)
            _check(value is None or isinstance(value, str), f"structured_outputs.{name}", value, "must be a string")

    @property
    def kinds(self) -> list[str]:
        return [k for k in ("json", "regex", "choice", "grammar") if getattr(self, k) is not None] + (
            ["json_object"] if self.json_object else [])

    @property
    def key(self) -> tuple[str, str, bool]:
        """What the compiled grammar depends on: (kind, spec, compact), hashable."""
        kind = self.kinds[0]
        spec = getattr(self, kind)
        if kind == "json" and isinstance(spec, dict) or kind == "choice":
            spec = json.dumps(spec)  # keys in their order: a schema's property order is the output's
        return kind, str(spec), self.disable_any_whitespace


@dataclass
class SamplingParams:
    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0 or -1: no top-k
    min_p: float = 0.0
    seed: int | None = None
    max_tokens: int | None = 16  # None: up to max_model_len
    min_tokens: int = 0
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    ignore_eos: bool = False
    include_stop_str_in_output: bool = False
    logprobs: int | None = None
    prompt_logprobs: int | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    skip_special_tokens: bool = True
    output_kind: RequestOutputKind = RequestOutputKind.CUMULATIVE
    structured_outputs: StructuredOutputsParams | None = None
    # Filled by the engine: the model's end-of-sequence ids (generation_config.json).
    eos_token_ids: frozenset[int] = field(default_factory=frozenset, repr=False)

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        self.stop = list(self.stop or [])
        self.stop_token_ids = list(self.stop_token_ids or [])
        if self.top_k == -1:
            self.top_k = 0
        self._verify()

    @property
    def is_greedy(self) -> bool:
        return self.temperature < _GREEDY_EPS

    @property
    def has_penalties(self) -> bool:
        return self.presence_penalty != 0.0 or self.frequency_penalty != 0.0 or self.repetition_penalty != 1.0

    def _verify(self) -> None:
        for name in _INTS:  # first: the range checks below compare them
            value = getattr(self, name)
            _check(value is None or (isinstance(value, int) and not isinstance(value, bool)), name, value,
                   "must be an integer")
            _check(value is None or abs(value) <= _INT64_MAX, name, value, f"must be within +-{_INT64_MAX} (int64)")
        for name in _FLOATS:
            value = getattr(self, name)
            _check(isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value), name,
                   value, "must be a finite number")
        _check(self.n >= 1, "n", self.n, "must be >= 1")
        _check(self.temperature >= 0.0, "temperature", self.temperature, "must be >= 0")
        _check(0.0 < self.top_p <= 1.0, "top_p", self.top_p, "must be in (0, 1]")
        _check(self.top_k >= 0, "top_k", self.top_k, "must be -1 (disabled), 0 (disabled) or a positive integer")
        _check(0.0 <= self.min_p <= 1.0, "min_p", self.min_p, "must be in [0, 1]")
        _check(self.max_tokens is None or self.max_tokens >= 1, "max_tokens", self.max_tokens, "must be >= 1")
        _check(self.min_tokens >= 0, "min_tokens", self.min_tokens, "must be >= 0")
        if self.max_tokens is not None:
            _check(self.min_tokens <= self.max_tokens, "min_tokens", self.min_tokens, "must be <= max_tokens")
        _check(self.logprobs is None or self.logprobs >= 0, "logprobs", self.logprobs, "must be >= 0")
        _check(self.prompt_logprobs is None or self.prompt_logprobs >= 0, "prompt_logprobs",
               self.prompt_logprobs, "must be >= 0")
        _check(-2.0 <= self.presence_penalty <= 2.0, "presence_penalty", self.presence_penalty, "must be in [-2, 2]")
        _check(-2.0 <= self.frequency_penalty <= 2.0, "frequency_penalty", self.frequency_penalty,
               "must be in [-2, 2]")
        _check(self.repetition_penalty > 0.0, "repetition_penalty", self.repetition_penalty, "must be > 0")
        _check(all(isinstance(s, str) and s for s in self.stop), "stop", self.stop, "must be non-empty strings")
        _check(all(isinstance(t, int) and not isinstance(t, bool) and 0 <= t <= _INT64_MAX
                   for t in self.stop_token_ids), "stop_token_ids", self.stop_token_ids,
               "must be non-negative token ids")
        _check(self.structured_outputs is None or isinstance(self.structured_outputs, StructuredOutputsParams),
               "structured_outputs", self.structured_outputs, "must be a StructuredOutputsParams")
        _check(self.output_kind in (RequestOutputKind.CUMULATIVE, RequestOutputKind.FINAL_ONLY), "output_kind",
               self.output_kind, "must be CUMULATIVE or FINAL_ONLY (DELTA is not supported)")


def _check(ok: bool, name: str, value: object, rule: str) -> None:
    if not ok:
        raise ValueError(f"SamplingParams.{name}={value!r} is invalid: {name} {rule}")
