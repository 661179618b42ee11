"""LLM: the offline entry point, with vLLM's names (generate, chat, encode, embed, classify, score, apply_model,
get_tokenizer). Prompts are shaped and checked by the client's input processor, every one before any model
work; the client runs them (in this process, or on data-parallel replicas)."""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

import torch
from torch import nn
from transformers import PreTrainedTokenizerBase

from pagedformers.config import EngineArgs
from pagedformers.engine.client import OfflineClient, Output, create_offline_client
from pagedformers.engine.input_processor import Conversation, PromptType
from pagedformers.engine.llm_engine import LLMEngine
from pagedformers.entrypoints.scoring import cross_encoder_inputs, cross_encoder_score, pair_up
from pagedformers.loading.gguf_once import gguf_parsed_once
from pagedformers.loading.model_files import create_engine_config
from pagedformers.lora import LoRARequest
from pagedformers.outputs import (
    ClassificationOutput,
    ClassificationRequestOutput,
    EmbeddingOutput,
    EmbeddingRequestOutput,
    PoolingRequestOutput,
    RequestOutput,
    ScoringOutput,
    ScoringRequestOutput,
)
from pagedformers.pooling_params import PoolingParams
from pagedformers.sampling_params import SamplingParams

R = TypeVar("R")


class LLM:
    """An offline engine over one model.

    >>> llm = LLM(model="./my-model", dtype="float32")
    >>> llm.generate(["Hello, my name is"], SamplingParams(temperature=0.0, max_tokens=16))
    """

    def __init__(self, model: str, **kwargs: Any) -> None:
        with gguf_parsed_once(model, kwargs.get("gguf_file")):  # config, tokenizer and weights: one parse
            self.config = create_engine_config(EngineArgs.from_kwargs(model=model, **kwargs))
            self._client: OfflineClient = create_offline_client(self.config)
        self._processor = self._client.processor
        self._ids = itertools.count()

    @property
    def llm_engine(self) -> LLMEngine | None:
        """The engine, where it runs in this process (None with data-parallel replicas)."""
        return self._client.llm_engine

    def shutdown(self) -> None:
        """Stop worker and replica processes; the LLM is unusable afterwards. Also done when the LLM is
        garbage-collected, and on leaving `with LLM(...) as llm:`."""
        self._client.shutdown()

    def __enter__(self) -> LLM:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.shutdown()

    def get_tokenizer(self) -> PreTrainedTokenizerBase:
        return self._processor.tokenizer

    def apply_model(self, func: Callable[[nn.Module], R]) -> list[R]:
        """Run func on the model of every worker (of every replica) and return the results, one per worker."""
        return self._client.apply_model(func)

    def generate(
        self,
        prompts: PromptType | Sequence[PromptType],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
        use_tqdm: bool = True,
        lora_request: LoRARequest | Sequence[LoRARequest | None] | None = None,
    ) -> list[RequestOutput]:
        """Prompts are text, token ids, {"prompt_token_ids": [...]}, or {"prompt": text with media placeholders,
        "multi_modal_data": {"image": PIL image or a list of them, "video": frames, a file path or a list of them}}
        (the model's processor expands them).
        `lora_request`: one adapter for every prompt, or one (or None: the base model) per prompt."""
        prompts = _as_list(prompts)
        params = _per_prompt(sampling_params, len(prompts), SamplingParams)
        loras = [lora_request] * len(prompts) if lora_request is None or isinstance(lora_request, LoRARequest) \
            else _per_prompt(lora_request, len(prompts), LoRARequest)
        return self._run(prompts, params, use_tqdm, loras)

    def chat(
        self,
        messages: Conversation | Sequence[Conversation],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
        use_tqdm: bool = True,
        chat_template: str | None = None,
        add_generation_prompt: bool = True,
        lora_request: LoRARequest | Sequence[LoRARequest | None] | None = None,
        tools: list[dict[str, Any]] | None = None,
    ) -> list[RequestOutput]:
        """`tools`: OpenAI-style function definitions for the chat template to render (no parsing offline)."""
        conversations = [messages] if messages and isinstance(messages[0], dict) else list(messages)
        prompts = [self._processor.chat_prompt(conv, chat_template, add_generation_prompt, name=f"Conversation {i}",
                                               tools=tools)
                   for i, conv in enumerate(conversations)]
        return self.generate(prompts, sampling_params, use_tqdm, lora_request)

    def _run(self, prompts: list[PromptType], params: Sequence[SamplingParams | PoolingParams],
             use_tqdm: bool, loras: Sequence[LoRARequest | None] | None = None) -> list[Output]:
        """Every prompt processed (and so checked) first, then all run together."""
        loras = loras or [None] * len(prompts)
        requests = [self._processor.process(str(next(self._ids)), prompt, p, f"Prompt {i}", lora_request=lora)
                    for i, (prompt, p, lora) in enumerate(zip(prompts, params, loras))]
        return self._client.run(requests, use_tqdm)

    # -- pooling --------------------------------------------------------------------------------------

    def encode(
        self,
        prompts: PromptType | Sequence[PromptType],
        pooling_params: PoolingParams | Sequence[PoolingParams] | None = None,
        use_tqdm: bool = True,
        pooling_task: str | None = None,
    ) -> list[PoolingRequestOutput]:
        """Run a pooling task over prompts; `pooling_task` defaults to the model's first one. The input processor
        refuses, by name, a task the model does not serve (and pooling on a generation model)."""
        task = pooling_task or (self.supported_tasks[0] if self.config.model.runner == "pooling" else "embed")
        prompts = _as_list(prompts)
        params = [dataclasses.replace(p, task=task)
                  for p in _per_prompt(pooling_params, len(prompts), PoolingParams)]
        return self._run(prompts, params, use_tqdm)

    def embed(self, prompts: PromptType | Sequence[PromptType],
              pooling_params: PoolingParams | Sequence[PoolingParams] | None = None,
              use_tqdm: bool = True) -> list[EmbeddingRequestOutput]:
        outs = self.encode(prompts, pooling_params, use_tqdm, pooling_task="embed")
        return [EmbeddingRequestOutput(o.request_id, EmbeddingOutput(o.outputs.data.tolist()), o.prompt_token_ids)
                for o in outs]

    def classify(self, prompts: PromptType | Sequence[PromptType],
                 pooling_params: PoolingParams | Sequence[PoolingParams] | None = None,
                 use_tqdm: bool = True) -> list[ClassificationRequestOutput]:
        outs = self.encode(prompts, pooling_params, use_tqdm, pooling_task="classify")
        return [ClassificationRequestOutput(o.request_id, ClassificationOutput(o.outputs.data.tolist()),
                                            o.prompt_token_ids) for o in outs]

    def reward(self, prompts: PromptType | Sequence[PromptType],
               pooling_params: PoolingParams | Sequence[PoolingParams] | None = None,
               use_tqdm: bool = True) -> list[PoolingRequestOutput]:
        """Per-token scores of a reward model."""
        return self.encode(prompts, pooling_params, use_tqdm, pooling_task="reward")

    def score(self, data_1: str | Sequence[str], data_2: str | Sequence[str], use_tqdm: bool = True,
              pooling_params: PoolingParams | None = None) -> list[ScoringRequestOutput]:
        """Relevance of each data_2 to data_1 (one to many, or pairwise): a cross-encoder scores each
        pair; an embedding model gives the cosine similarity of the two embeddings."""
        firsts, seconds = pair_up(data_1, data_2)
        if "score" in self.supported_tasks:
            return self._cross_encode(firsts, seconds, pooling_params or PoolingParams(), use_tqdm)
        if "embed" not in self.supported_tasks:
            raise ValueError(f"This model cannot score: it supports {list(self.supported_tasks)}")
        params = dataclasses.replace(pooling_params or PoolingParams(), normalize=True)
        embeds = self.encode(firsts + seconds, params, use_tqdm, pooling_task="embed")
        a, b = embeds[:len(firsts)], embeds[len(firsts):]
        return [ScoringRequestOutput(x.request_id, ScoringOutput(float(torch.dot(x.outputs.data, y.outputs.data))),
                                     x.prompt_token_ids + y.prompt_token_ids) for x, y in zip(a, b)]

    def _cross_encode(self, firsts: list[str], seconds: list[str], params: PoolingParams,
                      use_tqdm: bool) -> list[ScoringRequestOutput]:
        inputs = [cross_encoder_inputs(self.get_tokenizer(), a, b) for a, b in zip(firsts, seconds)]
        prompts = [{"prompt_token_ids": ids, "token_type_ids": types} for ids, types in inputs]
        outs = self.encode(prompts, params, use_tqdm, pooling_task="score")
        return [ScoringRequestOutput(o.request_id, ScoringOutput(cross_encoder_score(o.outputs.data)),
                                     o.prompt_token_ids) for o in outs]

    @property
    def supported_tasks(self) -> tuple[str, ...]:
        return self._processor.supported_tasks


def _as_list(prompts: PromptType | Sequence[PromptType]) -> list[PromptType]:
    """One prompt (text, a dict, or a flat list of token ids) or a sequence of them."""
    if isinstance(prompts, (str, dict)) or (isinstance(prompts, list) and prompts and isinstance(prompts[0], int)):
        return [prompts]
    return list(prompts)


def _per_prompt(params: Any, n: int, kind: type) -> list:
    if params is None:
        return [kind()] * n
    if isinstance(params, kind):
        return [params] * n
    params = list(params)
    if len(params) != n:
        raise ValueError(f"Got {len(params)} {kind.__name__} for {n} prompts: pass one, or one per prompt")
    return params
