"""What the endpoints share: the served model and its tasks, sampling params, requests through the input
processor, stream deltas, logprobs, usage, and pooling many prompts at once."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import aclosing
from dataclasses import dataclass, field
from typing import TypeVar

from pydantic import BaseModel
from transformers import PreTrainedTokenizerBase

from pagedformers.engine.input_processor import EngineRequest, InputProcessor, PromptType
from pagedformers.entrypoints.async_engine import AsyncLLM
from pagedformers.entrypoints.openai.errors import OpenAIError
from pagedformers.entrypoints.openai.media import MediaPolicy
from pagedformers.entrypoints.openai.protocol import SamplingRequest, UsageInfo
from pagedformers.lora import LoRARequest
from pagedformers.outputs import CompletionOutput, Logprob, PoolingRequestOutput, RequestOutput
from pagedformers.pooling_params import PoolingParams
from pagedformers.sampling_params import SamplingParams, StructuredOutputsParams

T = TypeVar("T")
DONE = "data: [DONE]\n\n"
_MIN_LOGPROB = -9999.0  # JSON has no -inf; vLLM clamps the same way
_ENDPOINTS = {"generate": ("/v1/completions", "/v1/chat/completions"),
              "embed": ("/v1/embeddings", "/score", "/rerank"), "score": ("/score", "/rerank")}


@dataclass
class ServingContext:
    engine: AsyncLLM
    served_model_names: list[str]
    chat_template: str | None
    request_timeout_s: float | None = None  # a request running longer is aborted (504)
    tool_call_parser: str | None = None  # how "auto" tool choice finds calls in the output (tool_calls.py)
    enable_auto_tool_choice: bool = False
    lora_modules: dict[str, LoRARequest] = field(default_factory=dict)  # adapters served by name (serving_lora.py)
    media: MediaPolicy = MediaPolicy()  # where chat images may be fetched from (media.py)

    @property
    def processor(self) -> InputProcessor:
        """The engine client's input processor: the event loop's own (its tokenizer is not the engine thread's)."""
        return self.engine.processor

    @property
    def tokenizer(self) -> PreTrainedTokenizerBase:
        return self.processor.tokenizer

    def check_model(self, name: str | None) -> str:
        """The model name to answer with; 404 (as vLLM) for a model this server does not serve."""
        if name is None:
            return self.served_model_names[0]
        if name not in self.served_model_names and name not in self.lora_modules:
            raise OpenAIError(f"The model `{name}` does not exist. This server serves: "
                              f"{', '.join(self.served_model_names)}.", 404, "model")
        return name

    def check_task(self, model: str, tasks: tuple[str, ...], what: str) -> None:
        """400 (as vLLM) when the model serves none of `tasks`, naming the tasks and endpoints it does serve."""
        supported = self.processor.supported_tasks
        if set(tasks) & set(supported):
            return
        endpoints = list(dict.fromkeys(e for t in supported for e in _ENDPOINTS.get(t, ())))
        hint = f"Use {', '.join(endpoints)}." if endpoints else "This server has no endpoint for those yet."
        raise OpenAIError(f"The model `{model}` does not support {what}: it supports the tasks {list(supported)}. "
                          f"{hint}", 400, "model")

    def lora_for(self, model: str) -> LoRARequest | None:
        """The adapter a checked model name picks (None: the base), looked up once per request: an unload while
        the request is being prepared must not turn it into a base-model request under the adapter's name."""
        return self.lora_modules.get(model)

    def process(self, request_id: str, prompt: PromptType, params: SamplingParams | PoolingParams, name: str,
                param: str | None = None, lora_request: LoRARequest | None = None) -> EngineRequest:
        """The request shaped and checked by the input processor, with OpenAI's context-length rule (a prompt
        and max_tokens that do not fit max_model_len are refused); 400 naming `param` for one that can never run.
        Endpoints process every prompt of a call before queuing any."""
        try:
            return self.processor.process(request_id, prompt, params, name, strict_context=True,
                                          lora_request=lora_request)
        except ValueError as e:
            raise OpenAIError.from_value_error(e, param) from None


def to_sampling_params(request: SamplingRequest, max_tokens: int | None, logprobs: int | None,
                       structured: StructuredOutputsParams | None = None) -> SamplingParams:
    """`structured`: the endpoint's own constraint (a forced tool call), else the request's response_format or
    structured_outputs."""
    def value(v: T | None, default: T) -> T:
        return default if v is None else v

    try:
        return SamplingParams(
            structured_outputs=structured or _structured_outputs(request),
            n=request.n, temperature=value(request.temperature, 1.0), top_p=value(request.top_p, 1.0),
            top_k=value(request.top_k, 0), min_p=value(request.min_p, 0.0), seed=request.seed,
            max_tokens=max_tokens, min_tokens=request.min_tokens, stop=request.stop,
            stop_token_ids=request.stop_token_ids, ignore_eos=request.ignore_eos,
            include_stop_str_in_output=request.include_stop_str_in_output, logprobs=logprobs,
            presence_penalty=value(request.presence_penalty, 0.0),
            frequency_penalty=value(request.frequency_penalty, 0.0),
            repetition_penalty=value(request.repetition_penalty, 1.0),
            skip_special_tokens=request.skip_special_tokens,
        )
    except ValueError as e:
        raise OpenAIError.from_value_error(e) from None


def _structured_outputs(request: SamplingRequest) -> StructuredOutputsParams | None:
    fmt, spec = request.response_format, request.structured_outputs
    if fmt is not None and fmt.type != "text" and spec is not None:
        raise OpenAIError("Send one of response_format and structured_outputs, not both", 400, "response_format")
    if spec is not None:
        return StructuredOutputsParams(**spec.model_dump(by_alias=True, exclude_none=True))
    if fmt is None or fmt.type == "text":
        return None
    if fmt.type == "json_object":
        return StructuredOutputsParams(json_object=True)
    if fmt.json_schema is None or fmt.json_schema.json_schema is None:
        raise OpenAIError("response_format of type json_schema needs json_schema.schema", 400, "response_format")
    return StructuredOutputsParams(json=fmt.json_schema.json_schema)


class ChoiceStream:
    """What one choice has sent so far, so that each stream chunk carries only new text and tokens.

    Text is held back while it ends in U+FFFD (a character whose bytes are not all out yet) and,
    with stop strings, by the length of the longest one minus one, because the engine cuts a
    stop string out once it completes. The chunks then add up to the non-streamed text.
    """

    def __init__(self, params: SamplingParams) -> None:
        self.holdback = max((len(s) for s in params.stop), default=1) - 1
        self.sent_text = ""
        self.num_sent_tokens = 0
        self.text_offset = 0
        self.is_done = False

    def next_text(self, out: CompletionOutput) -> str:
        text = out.text
        if out.finish_reason is None:
            text = text[:len(text) - self.holdback]
            if text.endswith("\ufffd"):
                return ""
        delta = text[len(self.sent_text):]
        self.sent_text += delta
        return delta

    def next_tokens(self, out: CompletionOutput) -> tuple[int, int]:
        start, self.num_sent_tokens = self.num_sent_tokens, len(out.token_ids)
        return start, self.num_sent_tokens

    def advance(self, out: CompletionOutput, params: SamplingParams) -> tuple[str, int, int] | None:
        """(new text, first and end token index) for the next chunk, or None when there is nothing to send."""
        if self.is_done:
            return None  # a sibling choice is still running; this one has said all it had
        text = self.next_text(out)
        start, end = self.next_tokens(out)
        self.is_done = out.finish_reason is not None
        if not text and not self.is_done and (params.logprobs is None or start == end):
            return None
        return text, start, end


def check_output(out: RequestOutput | PoolingRequestOutput) -> None:
    if out.error:
        raise OpenAIError(f"The request failed in the engine: {out.error}", 500)


async def encode_all(ctx: ServingContext, requests: list[EngineRequest]) -> list[PoolingRequestOutput]:
    """Pool each prompt as its own request, all queued at once so the engine batches them. One failing,
    or the caller going away, aborts the others."""
    tasks = [asyncio.ensure_future(ctx.engine.encode(request, ctx.request_timeout_s)) for request in requests]
    try:
        outputs = await asyncio.gather(*tasks)
    finally:
        for task in tasks:
            task.cancel()  # a no-op for those done
    for out in outputs:
        check_output(out)
    return outputs


def pooling_usage(outputs: list[PoolingRequestOutput]) -> UsageInfo:
    num_prompt = sum(len(out.prompt_token_ids) for out in outputs)
    return UsageInfo(prompt_tokens=num_prompt, total_tokens=num_prompt)


def usage(prompt_lens: list[int], finals: dict[int, RequestOutput]) -> UsageInfo:
    num_prompt = sum(prompt_lens)
    num_completion = sum(len(o.token_ids) for out in finals.values() for o in out.outputs)
    return UsageInfo(prompt_tokens=num_prompt, completion_tokens=num_completion,
                     total_tokens=num_prompt + num_completion)


def sampled_logprobs(out: CompletionOutput, start: int, end: int) -> list[tuple[int, dict[int, Logprob]]]:
    """(token id, its logprob entries) for out's tokens [start, end).

    NOTE: the engine keeps appending to `out.logprobs` while we read it; slicing by token count
    (a snapshot taken with the output) reads only finished entries.
    """
    entries = out.logprobs or []
    return list(zip(out.token_ids[start:end], entries[start:end]))


def clamp(logprob: float) -> float:
    return max(logprob, _MIN_LOGPROB)


def token_text(entry: Logprob, token_id: int) -> str:
    return entry.decoded_token if entry.decoded_token is not None else f"<token {token_id}>"


def sse(chunk: BaseModel) -> str:
    return f"data: {chunk.model_dump_json(exclude_none=True)}\n\n"


def sse_error(error: OpenAIError) -> str:
    return f"data: {error.to_response().model_dump_json()}\n\n"


async def merge(iterators: list[AsyncIterator[T]]) -> AsyncIterator[tuple[int, T]]:
    """Items of several iterators as they come, each with its iterator's index. Closing this
    iterator cancels the others, which aborts their requests."""
    if len(iterators) == 1:
        async with aclosing(iterators[0]) as iterator:
            async for item in iterator:
                yield 0, item
        return
    queue: asyncio.Queue[tuple[int, T | BaseException | None]] = asyncio.Queue()

    async def drain(i: int, iterator: AsyncIterator[T]) -> None:
        try:
            async for item in iterator:
                queue.put_nowait((i, item))
            queue.put_nowait((i, None))
        except Exception as e:
            queue.put_nowait((i, e))

    tasks = [asyncio.create_task(drain(i, it)) for i, it in enumerate(iterators)]
    try:
        num_done = 0
        while num_done < len(tasks):
            i, item = await queue.get()
            if item is None:
                num_done += 1
            elif isinstance(item, BaseException):
                raise item
            else:
                yield i, item
    finally:
        for task in tasks:
            task.cancel()
