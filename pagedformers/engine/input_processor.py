"""The input processor: a request's prompt and parameters, shaped and checked once, for every front end.

`LLM`, the OpenAI server (through AsyncLLM) and data-parallel replicas all hand their prompts here, and what
comes out, an `EngineRequest`, is what the engine runs: token ids (tokenized, or a chat template applied),
media processed by the checkpoint's processor, pooling prompts truncated, the end-of-sequence ids filled in.
A request that can never run raises `InvalidRequest` (a ValueError naming the prompt and the limit) before
any model work.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from transformers import PreTrainedTokenizerBase

from pagedformers.adapter.multimodal_families import image_support, video_support
from pagedformers.config import EngineConfig
from pagedformers.engine.chat_media import media_kinds, split_media
from pagedformers.engine.multimodal_processor import MultiModalProcessor
from pagedformers.engine.structured_outputs import StructuredOutputs
from pagedformers.loading.tokenizer import eos_token_ids
from pagedformers.lora import LoRARequest
from pagedformers.multimodal_inputs import MultiModalInputs
from pagedformers.pooling_params import TASKS_BY_HEAD, PoolingParams
from pagedformers.sampling_params import SamplingParams

# "text", [token ids], {"prompt_token_ids": [...], "prompt": text?, "token_type_ids": [...]?},
# {"prompt": text}, or {"prompt": text with placeholders, "multi_modal_data": {"image": ..., "video": ...}} (vLLM's)
PromptType = str | list[int] | dict[str, Any]
Conversation = list[dict[str, Any]]
Params = SamplingParams | PoolingParams


class InvalidRequest(ValueError):
    """A request that can never run; `param` names the request field at fault, where one is."""

    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.param = param


@dataclass
class EngineRequest:
    """A request shaped and checked by the input processor: what the engine runs."""
    request_id: str
    prompt_token_ids: list[int]
    params: Params
    prompt: str | None = None  # the text, where the request came as text
    token_type_ids: list[int] | None = None  # segment ids of a cross-encoder pair
    multi_modal_inputs: MultiModalInputs | None = None
    lora_request: LoRARequest | None = None

    @property
    def is_pooling(self) -> bool:
        return isinstance(self.params, PoolingParams)


class InputProcessor:
    """NOTE: not thread-safe (HF fast tokenizers are not): each thread that processes prompts has its own."""

    def __init__(self, config: EngineConfig, tokenizer: PreTrainedTokenizerBase, num_kv_blocks: int,
                 structured: StructuredOutputs | None = None,
                 lora_check: Callable[[LoRARequest], None] | None = None) -> None:
        """`structured`: another processor's grammar compiler to share (its cache), as the engine's is.
        `lora_check`: the engine's check of an adapter (raises ValueError); None where LoRA is off."""
        self.config, self.tokenizer, self.num_kv_blocks = config, tokenizer, num_kv_blocks
        self.eos_token_ids = eos_token_ids(config, tokenizer)
        self.multi_modal = MultiModalProcessor(config)
        self.structured = structured or StructuredOutputs(tokenizer, config.model.text_config.vocab_size,
                                                          self.eos_token_ids)
        self.lora_check = lora_check

    @property
    def supported_tasks(self) -> tuple[str, ...]:
        """("generate",) for a generation model, else the pooling tasks of its head (vLLM's names)."""
        model = self.config.model
        return ("generate",) if model.runner != "pooling" else TASKS_BY_HEAD[model.pooling_head]

    def process(self, request_id: str, prompt: PromptType, params: Params, name: str = "The prompt",
                strict_context: bool = False, lora_request: LoRARequest | None = None) -> EngineRequest:
        """Raises InvalidRequest naming `name` for a request that can never run. `strict_context`: the OpenAI
        server's rule and wording, where a max_tokens past max_model_len is refused rather than capped."""
        request = self._tokenize(request_id, prompt, params, name)
        if lora_request is not None:
            self._check_lora(lora_request, name)
            request.lora_request = lora_request
        self._check_runner(request)
        if request.is_pooling:
            self._shape_pooling(request, name)
        else:
            request.params = dataclasses.replace(params, eos_token_ids=self.eos_token_ids)
            if params.structured_outputs is not None:  # compiled now (cached), so a bad spec is refused here
                if params.min_tokens:
                    raise InvalidRequest(f"{name}: SamplingParams.min_tokens={params.min_tokens} cannot be kept with "
                                         "structured_outputs: the grammar may end sooner", "min_tokens")
                try:
                    self.structured.compile(params.structured_outputs)
                except ValueError as e:
                    raise InvalidRequest(f"{name}: {e}", "structured_outputs") from None
        self._check_length(request, name, strict_context)
        if not request.is_pooling:
            self._check_kv_fit(request, name)
        return request

    def chat_prompt(self, conversation: Conversation, chat_template: str | None = None,
                    add_generation_prompt: bool = True, template_kwargs: dict[str, Any] | None = None,
                    name: str = "The conversation", tools: list[dict[str, Any]] | None = None) -> dict[str, Any]:
        """The conversation through the chat template: {"prompt": text, "prompt_token_ids": ids}; with images or
        videos, {"prompt": text, "multi_modal_data": {"image": [...], "video": [...]}} through the model's processor's
        template. `tools`
        (OpenAI's function definitions) are the template's to render; one that ignores them is refused."""
        if media_kinds(conversation):
            if tools:
                raise InvalidRequest(f"{name} has media and tools: tools with images or videos are not supported yet",
                                     "tools")
            return self._media_chat_prompt(conversation, chat_template, add_generation_prompt, template_kwargs, name)
        if chat_template is None and not getattr(self.tokenizer, "chat_template", None):
            raise InvalidRequest("The model's tokenizer has no chat template: pass one (--chat-template on the "
                                 "server, chat_template= offline), or send the prompt as text.")
        messages = [_text_message(m, f"{name}: messages[{i}]") for i, m in enumerate(conversation)]
        try:
            text = self._render(messages, chat_template, add_generation_prompt, template_kwargs, tools)
        except Exception as e:  # a template error is about this request's messages or template
            raise InvalidRequest(f"{name}: could not apply the chat template: {type(e).__name__}: {e}",
                                 "messages") from None
        if tools and text == self._render(messages, chat_template, add_generation_prompt, template_kwargs, None):
            raise InvalidRequest(f"{name}: the chat template does not render tools, so the model would never see "
                                 "them: pass a template that does (chat_template)", "tools")
        # The template already holds the special tokens (BOS etc.): do not add them twice.
        return {"prompt": text, "prompt_token_ids": self.tokenizer.encode(text, add_special_tokens=False)}

    def _media_chat_prompt(self, conversation: Conversation, chat_template: str | None, add_generation_prompt: bool,
                           template_kwargs: dict[str, Any] | None, name: str) -> dict[str, Any]:
        try:
            for modality in media_kinds(conversation):  # before anything is decoded
                reason = (image_support if modality == "image" else video_support)(self.config.model.hf_config)
                if reason:
                    raise ValueError(f"{name} has {modality}s: {reason}")
            messages, media = split_media(conversation, name)
            text = self.multi_modal.render_chat(messages, chat_template, add_generation_prompt, template_kwargs)
        except ValueError as e:
            raise InvalidRequest(str(e), "messages") from None
        return {"prompt": text, "multi_modal_data": media.as_data()}

    def _render(self, messages: Conversation, chat_template: str | None, add_generation_prompt: bool,
                template_kwargs: dict[str, Any] | None, tools: list[dict[str, Any]] | None) -> str:
        return self.tokenizer.apply_chat_template(messages, tokenize=False, chat_template=chat_template,
                                                  add_generation_prompt=add_generation_prompt, tools=tools or None,
                                                  **(template_kwargs or {}))

    # -- shaping ------------------------------------------------------------------------------------

    def _tokenize(self, request_id: str, prompt: PromptType, params: Params, name: str) -> EngineRequest:
        request = self._tokenize_any(request_id, prompt, params, name)
        if request.multi_modal_inputs is None:
            try:
                self.multi_modal.refuse_stray_placeholders(request.prompt_token_ids, (), name)
            except ValueError as e:
                raise InvalidRequest(str(e), "prompt") from None
        return request

    def _tokenize_any(self, request_id: str, prompt: PromptType, params: Params, name: str) -> EngineRequest:
        if isinstance(prompt, str):
            return EngineRequest(request_id, self.tokenizer.encode(prompt), params, prompt)
        if isinstance(prompt, list) and all(isinstance(t, int) for t in prompt):
            return EngineRequest(request_id, list(prompt), params)
        if not isinstance(prompt, dict):
            raise TypeError(f"{name} must be a str, a list of token ids or a dict with 'prompt_token_ids' or "
                            f"'prompt', got {type(prompt).__name__}")
        unknown = sorted(set(prompt) - {"prompt", "prompt_token_ids", "token_type_ids", "multi_modal_data"})
        if unknown:
            raise InvalidRequest(f"{name} has keys {unknown} that pagedformers does not take; it takes 'prompt', "
                                 "'prompt_token_ids', 'token_type_ids' and 'multi_modal_data'")
        text, types = prompt.get("prompt"), prompt.get("token_type_ids")
        if prompt.get("multi_modal_data"):
            ids, media = self.multi_modal(prompt, name)
            return EngineRequest(request_id, ids, params, text, multi_modal_inputs=media)
        if "prompt_token_ids" in prompt:
            return EngineRequest(request_id, list(prompt["prompt_token_ids"]), params, text,
                                 None if types is None else list(types))
        if isinstance(text, str):
            return EngineRequest(request_id, self.tokenizer.encode(text), params, text)
        raise TypeError(f"{name} must have 'prompt_token_ids' or a str 'prompt'")

    def _shape_pooling(self, request: EngineRequest, name: str) -> None:
        """The task checked against the model's head; the prompt truncated as asked (truncate_prompt_tokens)."""
        params: PoolingParams = request.params
        if params.task is not None and params.task not in self.supported_tasks:
            raise InvalidRequest(f"{name}: this model does not support the pooling task {params.task!r}; it "
                                 f"supports {list(self.supported_tasks)}", "task")
        k = params.truncate_prompt_tokens
        if k is not None:
            request.prompt_token_ids = request.prompt_token_ids[-k:]
            request.token_type_ids = request.token_type_ids[-k:] if request.token_type_ids else None
        hidden = self.config.model.text_config.hidden_size
        if params.dimensions is not None and self.config.model.pooling_head == "embed" and params.dimensions > hidden:
            raise InvalidRequest(f"{name}: PoolingParams.dimensions={params.dimensions} exceeds the embedding size "
                                 f"{hidden}", "dimensions")

    # -- checks -------------------------------------------------------------------------------------

    def _check_runner(self, request: EngineRequest) -> None:
        if request.is_pooling != (self.config.model.runner == "pooling"):
            raise InvalidRequest(
                "This model runs with runner='pooling': use embed / classify / score / encode, not generate."
                if not request.is_pooling else
                "This model runs with runner='generate': pooling needs runner='pooling' (or convert='embed').")

    def _check_length(self, request: EngineRequest, name: str, strict_context: bool) -> None:
        ids, params = request.prompt_token_ids, request.params
        n, limit = len(ids), self.config.model.max_model_len
        if n == 0:
            raise InvalidRequest(f"{name} is empty: it needs at least one token")
        if request.is_pooling and n > limit:
            raise InvalidRequest(
                f"This model's maximum context length is {limit} tokens. However, you requested {n} tokens in "
                f"{name}. Please reduce the length of the input (or set truncate_prompt_tokens)." if strict_context
                else f"{name} has {n} tokens, longer than max_model_len={limit} (set "
                     "PoolingParams.truncate_prompt_tokens to keep only the last ones)")
        if not request.is_pooling and n >= limit:
            raise InvalidRequest(f"{name} has {n} tokens, which leaves no room to generate within "
                                 f"max_model_len={limit}")
        if strict_context and not request.is_pooling and params.max_tokens is not None \
                and n + params.max_tokens > limit:
            raise InvalidRequest(
                f"This model's maximum context length is {limit} tokens. However, you requested "
                f"{n + params.max_tokens} tokens ({n} in the prompt, {params.max_tokens} in the completion). "
                "Please reduce the length of the prompt or of max_tokens.", "max_tokens")
        vocab = self.config.model.text_config.vocab_size
        bad = [t for t in ids if not 0 <= t < vocab]
        if bad:
            raise InvalidRequest(f"{name} has token ids outside the vocabulary [0, {vocab}): {bad[:5]}")
        media, budget = request.multi_modal_inputs, self.config.scheduler.max_num_batched_tokens
        widest = max((hi - lo for lo, hi in media.bidirectional), default=0) if media is not None else 0
        if widest > budget:
            raise InvalidRequest(f"{name} holds {widest} tokens that attend to each other both ways (an image, "
                                 "PaliGemma's prefix, or Molmo2's images from the first to the last): they must "
                                 f"prefill in one step, and max_num_batched_tokens={budget} is fewer (raise it)")
        if not request.is_pooling:
            most = self.config.scheduler.max_num_seqs
            if params.n > most:
                raise InvalidRequest(f"SamplingParams.n={params.n} exceeds max_num_seqs={most}: a request's samples "
                                     "run side by side", "n")
            for field in ("logprobs", "prompt_logprobs"):
                value = getattr(params, field)
                if value is not None and value > vocab:
                    raise InvalidRequest(f"SamplingParams.{field}={value} asks for more alternatives than the "
                                         f"vocabulary has ({vocab})", field)

    def _check_lora(self, lora_request: LoRARequest, name: str) -> None:
        if not isinstance(lora_request, LoRARequest):
            raise TypeError(f"{name}: lora_request must be a LoRARequest, got {type(lora_request).__name__}")
        if self.lora_check is None:
            raise InvalidRequest(f"{name} asks for the LoRA adapter {lora_request.lora_name!r}, but this engine runs "
                                 "without LoRA: start it with enable_lora=True (--enable-lora)", "lora_request")
        try:
            self.lora_check(lora_request)
        except ValueError as e:
            raise InvalidRequest(f"{name}: {e}", "lora_request") from None

    def _check_kv_fit(self, request: EngineRequest, name: str) -> None:
        limit, block_size = self.config.model.max_model_len, self.config.cache.block_size
        worst_case = min(len(request.prompt_token_ids) + (request.params.max_tokens or limit), limit)
        blocks = -(-worst_case // block_size)
        if blocks > self.num_kv_blocks:
            raise InvalidRequest(
                f"{name} can never fit the KV cache: {worst_case} tokens (prompt + max_tokens) need {blocks} "
                f"blocks of {block_size} tokens, the cache has {self.num_kv_blocks}. Lower max_tokens or give "
                "the cache more memory (kv_cache_memory_bytes).", "max_tokens")


def _text_message(message: dict[str, Any], name: str) -> dict[str, Any]:
    """A chat message as templates expect it: content parts of type text joined into one string; any other part
    is refused by name (the engine would otherwise render its placeholder and generate without it)."""
    content = message.get("content")
    if not isinstance(content, list):
        return message
    kinds = sorted({str(part.get("type")) for part in content if isinstance(part, dict)} - {"text"})
    if kinds or not all(isinstance(part, dict) for part in content):
        raise InvalidRequest(f"{name} has content of type {kinds or ['non-object']}; chat messages take text, and "
                             "images (image_url, image_pil, image) and videos (video_url, video) for models that "
                             "take them", "messages")
    return {**message, "content": "\n".join(part.get("text", "") for part in content)}
