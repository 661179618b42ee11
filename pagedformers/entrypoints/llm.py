"""LLM: the offline entry point, with vLLM's names (generate, chat, apply_model, get_tokenizer)."""

from __future__ import annotations

import dataclasses
import itertools
from typing import Any, Callable, Sequence, TypeVar, Union

import torch

from torch import nn
from tqdm.auto import tqdm
from transformers import PreTrainedTokenizerBase

from pagedformers.config import EngineArgs
from pagedformers.engine.llm_engine import LLMEngine
from pagedformers.engine.validation import check_request
from pagedformers.entrypoints.data_parallel import DataParallelReplicas
from pagedformers.entrypoints.multimodal import MultiModalProcessor
from pagedformers.entrypoints.pooling_utils import cross_encoder_inputs, cross_encoder_score, pair_up, supported_tasks
from pagedformers.loading.gguf_once import gguf_parsed_once
from pagedformers.loading.model_files import create_engine_config
from pagedformers.loading.tokenizer import load_tokenizer
from pagedformers.outputs import (ClassificationOutput, ClassificationRequestOutput, EmbeddingOutput,
                                  EmbeddingRequestOutput, PoolingRequestOutput, RequestOutput, ScoringOutput,
                                  ScoringRequestOutput)
from pagedformers.pooling_params import PoolingParams
from pagedformers.sampling_params import RequestOutputKind, SamplingParams

R = TypeVar("R")
TokensPrompt = dict  # {"prompt_token_ids": [...]} (or {"prompt": "..."})
PromptType = Union[str, TokensPrompt]
Conversation = list[dict[str, Any]]


class LLM:
    """An offline engine over one model.

    >>> llm = LLM(model="./my-model", dtype="float32")
    >>> llm.generate(["Hello, my name is"], SamplingParams(temperature=0.0, max_tokens=16))
    """

    def __init__(self, model: str, **kwargs: Any) -> None:
        with gguf_parsed_once(model, kwargs.get("gguf_file")):  # config, tokenizer and weights: one parse
            self.config = create_engine_config(EngineArgs.from_kwargs(model=model, **kwargs))
            self._ids = itertools.count()
            self._multi_modal_processor = MultiModalProcessor(self.config)
            self._replicas: DataParallelReplicas | None = None
            if self.config.parallel.data_parallel_size > 1:
                self._replicas = DataParallelReplicas(self.config.local_args(), self.config.parallel.data_parallel_size)
                self._tokenizer = load_tokenizer(self.config)
                self.llm_engine = None
            else:
                self.llm_engine = LLMEngine(self.config)
                self._tokenizer = self.llm_engine.tokenizer

    def shutdown(self) -> None:
        """Stop worker and replica processes; the LLM is unusable afterwards."""
        if self._replicas is not None:
            self._replicas.shutdown()
        else:
            self.llm_engine.executor.shutdown()

    def get_tokenizer(self) -> PreTrainedTokenizerBase:
        return self._tokenizer

    def apply_model(self, func: Callable[[nn.Module], R]) -> list[R]:
        """Run func on the model of every worker (of every replica) and return the results, one per worker."""
        if self._replicas is not None:
            return self._replicas.apply_model(func)
        return self.llm_engine.executor.apply_model(func)

    def _validate(self, prompt_token_ids: list[int], params: SamplingParams | PoolingParams, name: str) -> None:
        num_blocks = self._replicas.num_blocks if self._replicas else self.llm_engine.kv_manager.num_blocks
        check_request(self.config, num_blocks, prompt_token_ids, params, name)

    def generate(
        self,
        prompts: PromptType | Sequence[PromptType],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
        use_tqdm: bool = True,
    ) -> list[RequestOutput]:
        """Prompts are text, {"prompt_token_ids": [...]}, or {"prompt": text with image placeholders,
        "multi_modal_data": {"image": PIL image or a list of them}} (the model's processor expands them)."""
        prompts = [prompts] if isinstance(prompts, (str, dict)) else list(prompts)
        params = _per_prompt(sampling_params, len(prompts), SamplingParams)
        requests = []
        for i, (prompt, p) in enumerate(zip(prompts, params)):  # every request is checked before any model work
            media = None
            if isinstance(prompt, dict) and prompt.get("multi_modal_data"):
                ids, media = self._multi_modal_processor(prompt, f"Prompt {i}")
                text = prompt["prompt"]
            else:
                ids, text = self._encode(prompt, i)
            self._validate(ids, p, f"Prompt {i}")
            requests.append(("generate", ids, p, {"prompt": text, "multi_modal_inputs": media}))
        return self._run(requests, use_tqdm)

    def chat(
        self,
        messages: Conversation | Sequence[Conversation],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
        use_tqdm: bool = True,
        chat_template: str | None = None,
        add_generation_prompt: bool = True,
    ) -> list[RequestOutput]:
        conversations = [messages] if messages and isinstance(messages[0], dict) else list(messages)
        tokenizer = self.get_tokenizer()
        texts = [
            tokenizer.apply_chat_template(conv, tokenize=False, add_generation_prompt=add_generation_prompt,
                                          chat_template=chat_template)
            for conv in conversations
        ]
        # The template already holds the special tokens (BOS etc.): do not add them twice.
        prompts = [{"prompt": t, "prompt_token_ids": tokenizer.encode(t, add_special_tokens=False)} for t in texts]
        return self.generate(prompts, sampling_params, use_tqdm)

    def _encode(self, prompt: PromptType, index: int) -> tuple[list[int], str | None]:
        if isinstance(prompt, str):
            return self.get_tokenizer().encode(prompt), prompt
        if isinstance(prompt, dict) and "prompt_token_ids" in prompt:
            return list(prompt["prompt_token_ids"]), prompt.get("prompt")
        if isinstance(prompt, dict) and "prompt" in prompt:
            return self.get_tokenizer().encode(prompt["prompt"]), prompt["prompt"]
        raise TypeError(f"Prompt {index} must be a str or a dict with 'prompt_token_ids' or 'prompt', "
                        f"got {type(prompt).__name__}")

    # -- pooling --------------------------------------------------------------------------------------

    def encode(
        self,
        prompts: PromptType | Sequence[PromptType],
        pooling_params: PoolingParams | Sequence[PoolingParams] | None = None,
        use_tqdm: bool = True,
        pooling_task: str | None = None,
    ) -> list[PoolingRequestOutput]:
        """Run a pooling task over prompts; `pooling_task` defaults to the model's first one."""
        supported = self.supported_tasks
        task = pooling_task or supported[0]
        if task not in supported:
            raise ValueError(f"This model does not support the pooling task {task!r}; it supports {list(supported)}")
        prompts = [prompts] if isinstance(prompts, (str, dict)) else list(prompts)
        params = [dataclasses.replace(p, task=task)
                  for p in _per_prompt(pooling_params, len(prompts), PoolingParams)]
        encoded = [self._encode(p, i) for i, p in enumerate(prompts)]
        types = [p.get("token_type_ids") if isinstance(p, dict) else None for p in prompts]
        for i, ((ids, _), p) in enumerate(zip(encoded, params)):
            kept = ids[-p.truncate_prompt_tokens:] if p.truncate_prompt_tokens else ids
            self._validate(kept, p, f"Prompt {i}")
        return self._run([("pool", ids, p, {"token_type_ids": t}) for (ids, _), p, t in zip(encoded, params, types)],
                         use_tqdm)

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
        return supported_tasks(self.config)

    def _run(self, items: list[tuple], use_tqdm: bool) -> list[Any]:
        """Add every request, then step the engine until all finish (or hand them to the replicas).

        An item is ("generate" | "pool", token_ids, SamplingParams | PoolingParams, keyword arguments of
        the engine's add_request | add_pooling_request)."""
        if self._replicas is not None:
            outs = self._replicas.run(items)
            for out in outs:  # each replica numbers its own requests
                out.request_id = str(next(self._ids))
            return outs
        engine = self.llm_engine
        ids = [str(next(self._ids)) for _ in items]
        for request_id, (kind, token_ids, params, extra) in zip(ids, items):
            if kind == "generate":  # only final outputs are returned: no text decoded along the way
                final_only = dataclasses.replace(params, output_kind=RequestOutputKind.FINAL_ONLY)
                engine.add_request(request_id, token_ids, final_only, **extra)
            else:
                engine.add_pooling_request(request_id, token_ids, params, **extra)
        done: dict[str, Any] = {}
        with tqdm(total=len(ids), desc="Processed prompts", disable=not use_tqdm) as bar:
            try:
                while len(done) < len(ids):
                    for out in engine.step():
                        if out.finished:
                            done[out.request_id] = out
                            bar.update(1)
            finally:  # e.g. KeyboardInterrupt: leave the engine clean for the next call
                for request_id in ids:
                    if request_id not in done:
                        engine.abort_request(request_id)
        return [done[i] for i in ids]


def _per_prompt(params: Any, n: int, kind: type) -> list:
    if params is None:
        return [kind()] * n
    if isinstance(params, kind):
        return [params] * n
    params = list(params)
    if len(params) != n:
        raise ValueError(f"Got {len(params)} {kind.__name__} for {n} prompts: pass one, or one per prompt")
    return params
