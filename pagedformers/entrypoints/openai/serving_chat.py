"""POST /v1/chat/completions: a conversation through the chat template, n choices, streamed or not."""

from __future__ import annotations

import uuid
from contextlib import aclosing
from typing import Any, AsyncIterator

from fastapi.responses import JSONResponse, StreamingResponse

from pagedformers.entrypoints.async_engine import EngineError
from pagedformers.entrypoints.openai.errors import OpenAIError
from pagedformers.entrypoints.openai.protocol import (
    ChatCompletionLogProb,
    ChatCompletionLogProbs,
    ChatCompletionLogProbsContent,
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChatCompletionResponseChoice,
    ChatCompletionResponseStreamChoice,
    ChatCompletionStreamResponse,
    ChatMessage,
    ChatResponseMessage,
    DeltaMessage,
)
from pagedformers.entrypoints.openai.serving import (
    DONE,
    ChoiceStream,
    ServingContext,
    check_output,
    clamp,
    sampled_logprobs,
    sse,
    sse_error,
    to_sampling_params,
    token_text,
    usage,
)
from pagedformers.outputs import CompletionOutput, Logprob, RequestOutput
from pagedformers.sampling_params import SamplingParams


async def create_chat_completion(ctx: ServingContext,
                                 request: ChatCompletionRequest) -> JSONResponse | StreamingResponse:
    model = ctx.check_model(request.model)
    ctx.check_task(model, ("generate",), "chat completions")
    if request.top_logprobs and not request.logprobs:
        raise OpenAIError("top_logprobs needs logprobs=true", 400, "top_logprobs")
    logprobs = (request.top_logprobs or 0) if request.logprobs else None
    params = to_sampling_params(request, request.max_completion_tokens or request.max_tokens, logprobs)
    prompt, token_ids = _chat_prompt(ctx, request)
    ctx.check_prompt(token_ids, params, "The conversation")
    request_id = f"chatcmpl-{uuid.uuid4().hex}"
    outputs = ctx.engine.generate(token_ids, params, request_id, prompt)
    if request.stream:
        include_usage = bool(request.stream_options and request.stream_options.include_usage)
        return StreamingResponse(_stream(request_id, model, params, outputs, len(token_ids), include_usage),
                                 media_type="text/event-stream")
    final = None
    async with aclosing(outputs):
        async for out in outputs:
            check_output(out)
            final = out
    assert final is not None and final.finished, "the engine stopped yielding before the request finished"
    choices = [
        ChatCompletionResponseChoice(
            index=o.index, message=ChatResponseMessage(content=o.text),
            logprobs=_logprobs(o, 0, len(o.token_ids), params) if logprobs is not None else None,
            finish_reason=o.finish_reason, stop_reason=o.stop_reason,
        )
        for o in final.outputs
    ]
    response = ChatCompletionResponse(id=request_id, model=model, choices=choices,
                                      usage=usage([len(token_ids)], {0: final}))
    return JSONResponse(response.model_dump())


def _chat_prompt(ctx: ServingContext, request: ChatCompletionRequest) -> tuple[str, list[int]]:
    template = request.chat_template or ctx.chat_template
    if template is None and not getattr(ctx.tokenizer, "chat_template", None):
        raise OpenAIError("The model's tokenizer has no chat template: start the server with --chat-template "
                          "(a file or the template itself), or use /v1/completions.", 400)
    messages = [_message(m, i) for i, m in enumerate(request.messages)]
    try:
        text = ctx.tokenizer.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=request.add_generation_prompt, chat_template=template,
            **(request.chat_template_kwargs or {}),
        )
    except Exception as e:  # a template error is about this request's messages or template
        raise OpenAIError(f"Could not apply the chat template: {type(e).__name__}: {e}", 400, "messages") from None
    # The template already holds the special tokens (BOS etc.): do not add them twice.
    return text, ctx.tokenizer.encode(text, add_special_tokens=False)


def _message(message: ChatMessage, index: int) -> dict[str, Any]:
    """A message as chat templates expect it: content parts of type text joined into one string."""
    result = message.model_dump(exclude_none=True)
    if isinstance(message.content, list):
        kinds = {part.get("type") for part in message.content} - {"text"}
        if kinds:
            raise OpenAIError(f"messages[{index}] has content of type {sorted(map(str, kinds))}; only text "
                              "is supported yet", 400, "messages")
        result["content"] = "\n".join(part.get("text", "") for part in message.content)
    return result


async def _stream(request_id: str, model: str, params: SamplingParams, outputs: AsyncIterator[RequestOutput],
                  num_prompt_tokens: int, include_usage: bool) -> AsyncIterator[str]:
    def chunk(choices: list[ChatCompletionResponseStreamChoice]) -> str:
        return sse(ChatCompletionStreamResponse(id=request_id, model=model, choices=choices))

    for i in range(params.n):  # the role comes first, as OpenAI sends it
        yield chunk([ChatCompletionResponseStreamChoice(index=i, delta=DeltaMessage(role="assistant", content=""))])
    choices = [ChoiceStream(params) for _ in range(params.n)]
    final = None
    try:
        async with aclosing(outputs):
            async for out in outputs:
                check_output(out)
                final = out
                for o in out.outputs:
                    choice = _choice_chunk(o, choices[o.index], params)
                    if choice is not None:
                        yield chunk([choice])
        if include_usage and final is not None:
            yield sse(ChatCompletionStreamResponse(id=request_id, model=model, choices=[],
                                                   usage=usage([num_prompt_tokens], {0: final})))
    except OpenAIError as e:
        yield sse_error(e)
    except EngineError as e:
        yield sse_error(OpenAIError(str(e), 500))
    yield DONE


def _choice_chunk(out: CompletionOutput, choice: ChoiceStream,
                  params: SamplingParams) -> ChatCompletionResponseStreamChoice | None:
    step = choice.advance(out, params)
    if step is None:
        return None
    text, start, end = step
    return ChatCompletionResponseStreamChoice(
        index=out.index, delta=DeltaMessage(content=text),
        logprobs=_logprobs(out, start, end, params) if params.logprobs is not None else None,
        finish_reason=out.finish_reason if choice.is_done else None,
        stop_reason=out.stop_reason if choice.is_done else None,
    )


def _logprobs(out: CompletionOutput, start: int, end: int, params: SamplingParams) -> ChatCompletionLogProbs:
    content = []
    for token_id, entries in sampled_logprobs(out, start, end):
        top = sorted((lp.rank or 0, t, lp) for t, lp in entries.items() if (lp.rank or 0) <= params.logprobs)
        entry = _entry(token_id, entries[token_id])
        content.append(ChatCompletionLogProbsContent(**entry.model_dump(),
                                                     top_logprobs=[_entry(t, lp) for _, t, lp in top]))
    return ChatCompletionLogProbs(content=content)


def _entry(token_id: int, logprob: Logprob) -> ChatCompletionLogProb:
    token = token_text(logprob, token_id)
    return ChatCompletionLogProb(token=token, logprob=clamp(logprob.logprob), bytes=list(token.encode()))
