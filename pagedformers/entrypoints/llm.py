"""LLM: the offline entry point, with vLLM's names (generate, chat, apply_model, get_tokenizer)."""

from __future__ import annotations

import itertools
from typing import Any, Callable, Sequence, TypeVar, Union

from torch import nn
from tqdm.auto import tqdm
from transformers import PreTrainedTokenizerBase

from pagedformers.config import EngineConfig
from pagedformers.engine.llm_engine import LLMEngine
from pagedformers.outputs import RequestOutput
from pagedformers.sampling_params import SamplingParams

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
        self.config = EngineConfig.from_kwargs(model=model, **kwargs)
        self.llm_engine = LLMEngine(self.config)
        self._ids = itertools.count()

    def get_tokenizer(self) -> PreTrainedTokenizerBase:
        return self.llm_engine.tokenizer

    def apply_model(self, func: Callable[[nn.Module], R]) -> list[R]:
        """Run func on the model of every worker and return the results, one per worker."""
        return self.llm_engine.executor.apply_model(func)

    def generate(
        self,
        prompts: PromptType | Sequence[PromptType],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
        use_tqdm: bool = True,
    ) -> list[RequestOutput]:
        prompts = [prompts] if isinstance(prompts, (str, dict)) else list(prompts)
        params = _per_prompt(sampling_params, len(prompts))
        encoded = [self._encode(p, i) for i, p in enumerate(prompts)]
        for i, (ids, _) in enumerate(encoded):  # every request is checked before any model work
            self.llm_engine.validate_request(ids, params[i], f"Prompt {i}")
        return self._run(encoded, params, use_tqdm)

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

    def _run(self, encoded: list[tuple[list[int], str | None]], params: list[SamplingParams],
             use_tqdm: bool) -> list[RequestOutput]:
        engine = self.llm_engine
        ids = [str(next(self._ids)) for _ in encoded]
        for request_id, (token_ids, text), p in zip(ids, encoded, params):
            engine.add_request(request_id, token_ids, p, prompt=text)
        done: dict[str, RequestOutput] = {}
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


def _per_prompt(params: SamplingParams | Sequence[SamplingParams] | None, n: int) -> list[SamplingParams]:
    if params is None:
        return [SamplingParams()] * n
    if isinstance(params, SamplingParams):
        return [params] * n
    params = list(params)
    if len(params) != n:
        raise ValueError(f"Got {len(params)} SamplingParams for {n} prompts: pass one, or one per prompt")
    return params
