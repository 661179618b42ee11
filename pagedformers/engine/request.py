"""A request as the engine tracks it: tokens, progress through the KV cache, and its outputs."""

from __future__ import annotations

import enum
import time

import torch
from xgrammar import GrammarMatcher

from pagedformers.lora import LoRARequest
from pagedformers.multimodal_inputs import MultiModalInputs
from pagedformers.outputs import Logprob
from pagedformers.pooling_params import PoolingParams
from pagedformers.sampling_params import SamplingParams


class RequestStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


class Request:
    """One sequence. NOTE: `all_token_ids[:num_computed_tokens]` are exactly the tokens whose
    K/V sit in the cache; after preemption num_computed_tokens drops to 0 and they are recomputed."""

    def __init__(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams,
                 max_tokens: int, arrival: int, pooling_params: PoolingParams | None = None,
                 token_type_ids: list[int] | None = None,
                 multi_modal_inputs: MultiModalInputs | None = None, parent_id: str | None = None,
                 lora_request: LoRARequest | None = None) -> None:
        self.request_id = request_id
        self.parent_id = request_id if parent_id is None else parent_id  # the user's request: n sequences share it
        self.params = params
        self.num_prompt_tokens = len(prompt_token_ids)
        self.all_token_ids = list(prompt_token_ids)
        self.max_tokens = max_tokens  # max_tokens capped so that prompt + output <= max_model_len
        self.arrival = arrival
        self.arrival_time = time.monotonic()
        self.first_token_time: float | None = None
        self.finished_time: float | None = None
        self.num_computed_tokens = 0
        self.num_cached_tokens = 0  # prompt tokens served by the prefix cache at admission
        self.status = RequestStatus.WAITING
        self.generator = _make_generator(params.seed)
        self.logprobs: list[dict[int, Logprob]] | None = [] if params.logprobs is not None else None
        self.prompt_logprobs: list[dict[int, Logprob] | None] | None = (
            [None] if params.prompt_logprobs is not None else None
        )
        self.cumulative_logprob = 0.0 if params.logprobs is not None else None
        self.text = ""
        self.finish_reason: str | None = None
        self.stop_reason: int | str | None = None
        self.error: str | None = None
        # Pooling requests run their whole prompt in one step and end with `pooled` set.
        self.pooling_params = pooling_params
        self.token_type_ids = token_type_ids
        self.multi_modal_inputs = multi_modal_inputs  # media whose features replace placeholder embeddings
        self.pooled: torch.Tensor | None = None
        self.lora_request = lora_request  # the adapter it runs with (None: the base model)
        self.grammar: GrammarMatcher | None = None  # structured outputs: where this sequence is in its grammar

    @property
    def num_tokens(self) -> int:
        return len(self.all_token_ids)

    @property
    def prompt_token_ids(self) -> list[int]:
        return self.all_token_ids[: self.num_prompt_tokens]

    @property
    def output_token_ids(self) -> list[int]:
        return self.all_token_ids[self.num_prompt_tokens:]

    @property
    def num_output_tokens(self) -> int:
        return len(self.all_token_ids) - self.num_prompt_tokens

    @property
    def is_finished(self) -> bool:
        return self.status == RequestStatus.FINISHED

    def finish(self, reason: str, stop_reason: int | str | None = None) -> None:
        self.status = RequestStatus.FINISHED
        self.finished_time = time.monotonic()
        self.finish_reason = reason
        self.stop_reason = stop_reason


def _make_generator(seed: int | None) -> torch.Generator | None:
    if seed is None:
        return None
    generator = torch.Generator()
    generator.manual_seed(seed)
    return generator
