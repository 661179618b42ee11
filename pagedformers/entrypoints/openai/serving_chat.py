"""POST /v1/chat/completions: a conversation through the chat template, n choices, streamed or not."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from contextlib import aclosing
from typing import Any

from fastapi.responses import JSONResponse, StreamingResponse

from pagedformers.entrypoints.async_engine import EngineError
from pagedformers.entrypoints.openai.errors import OpenAIError
from pagedformers.entrypoints.openai.media import fetch_media
from pagedformers.entrypoints.openai.protocol import (
    ChatCompletionLogProb,
    ChatCompletionLogProbs,
    ChatCompletionLogProbsContent,
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChatCompletionResponseChoice,
    ChatCompletionResponseStreamChoice,
    ChatCompletionStreamResponse,
    ChatResponseMessage,
    DeltaMessage,
    DeltaToolCall,
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
from pagedformers.entrypoints.openai.tool_calls import ToolPlan, plan_tools
from pagedformers.outputs import CompletionOutput, Logprob, RequestOutput
from pagedformers.sampling_params import SamplingParams


async def create_chat_completion(ctx: ServingContext,
                                 request: ChatCompletionRequest) -> JSONResponse | StreamingResponse:
    model = ctx.check_model(request.model)
    lora_request = ctx.lora_for(model)
    ctx.check_task(model, ("generate",), "chat completions")
    if request.top_logprobs and not request.logprobs:
        raise OpenAIError("top_logprobs needs logprobs=true", 400, "top_logprobs")
    logprobs = (request.top_logprobs or 0) if request.logprobs else None
    tools = plan_tools(request, ctx.tool_call_parser, ctx.enable_auto_tool_choice)
    if tools.structured is not None:
        if (request.response_format and request.response_format.type != "text") or request.structured_outputs:
            raise OpenAIError("A forced tool call constrains the output itself: send no response_format or "
                              "structured_outputs with it", 400, "tool_choice")
        try:
            ctx.processor.structured.compile(tools.structured)
        except ValueError as e:
            raise OpenAIError(f"A tool's parameters are not a usable JSON schema: {e}", 400, "tools") from None
    params = to_sampling_params(request, request.max_completion_tokens or request.max_tokens, logprobs,
                                tools.structured)
    request_id = f"chatcmpl-{uuid.uuid4().hex}"
    messages = await fetch_media([m.model_dump(exclude_none=True) for m in request.messages], ctx.media)
    engine_request = ctx.process(request_id, _chat_prompt(ctx, request, tools, messages), params, "The conversation",
                                 lora_request=lora_request)
    num_prompt_tokens = len(engine_request.prompt_token_ids)
    outputs = ctx.engine.generate(engine_request, ctx.request_timeout_s)
    if request.stream:
        include_usage = bool(request.stream_options and request.stream_options.include_usage)
        return StreamingResponse(_stream(request_id, model, params, outputs, num_prompt_tokens, include_usage,
                                         tools), media_type="text/event-stream")
    final = None
    async with aclosing(outputs):
        async for out in outputs:
            check_output(out)
            final = out
    assert final is not None and final.finished, "the engine stopped yielding before the request finished"
    choices = [_choice(o, params, tools) for o in final.outputs]
    response = ChatCompletionResponse(id=request_id, model=model, choices=choices,
                                      usage=usage([num_prompt_tokens], {0: final}))
    return JSONResponse(response.model_dump())


def _choice(out: CompletionOutput, params: SamplingParams, tools: ToolPlan) -> ChatCompletionResponseChoice:
    logprobs = _logprobs(out, 0, len(out.token_ids), params) if params.logprobs is not None else None
    message = ChatResponseMessage(content=out.text)
    if tools.parses:
        parsed = tools.parse(out.text)
        message = ChatResponseMessage(content=parsed.content, tool_calls=parsed.calls)
    return ChatCompletionResponseChoice(index=out.index, message=message, logprobs=logprobs,
                                        finish_reason=_finish_reason(out, tools, bool(message.tool_calls)),
                                        stop_reason=out.stop_reason)


def _finish_reason(out: CompletionOutput, tools: ToolPlan, called: bool) -> str | None:
    # OpenAI's: "tool_calls" when the model chose to call; a call forced by name ends with "stop".
    return "tool_calls" if called and tools.named is None and out.finish_reason == "stop" else out.finish_reason


def _chat_prompt(ctx: ServingContext, request: ChatCompletionRequest, tools: ToolPlan,
                 messages: list[dict[str, Any]]) -> dict[str, Any]:
    """The conversation (remote images fetched) through the chat template: the request's, the server's, else the
    tokenizer's."""
    try:
        return ctx.processor.chat_prompt(messages, request.chat_template or ctx.chat_template,
                                         request.add_generation_prompt, request.chat_template_kwargs,
                                         tools=tools.tools)
    except ValueError as e:
        raise OpenAIError.from_value_error(e, "messages") from None


async def _stream(request_id: str, model: str, params: SamplingParams, outputs: AsyncIterator[RequestOutput],
                  num_prompt_tokens: int, include_usage: bool, tools: ToolPlan) -> AsyncIterator[str]:
    def chunk(choices: list[ChatCompletionResponseStreamChoice]) -> str:
        return sse(ChatCompletionStreamResponse(id=request_id, model=model, choices=choices))

    for i in range(params.n):  # the role comes first, as OpenAI sends it
        yield chunk([ChatCompletionResponseStreamChoice(index=i, delta=DeltaMessage(role="assistant", content=""))])
    choices = [_ToolChoiceStream(params, tools) if tools.parses else ChoiceStream(params) for _ in range(params.n)]
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
        yield sse_error(OpenAIError(str(e), e.status))
    yield DONE


def _choice_chunk(out: CompletionOutput, choice: ChoiceStream,
                  params: SamplingParams) -> ChatCompletionResponseStreamChoice | None:
    step = choice.advance(out, params)
    if step is None:
        return None
    text, start, end = step
    delta = DeltaMessage(content=text)
    finish_reason = out.finish_reason if choice.is_done else None
    if isinstance(choice, _ToolChoiceStream) and choice.is_done:
        parsed = choice.tools.parse(out.text)
        calls = [DeltaToolCall(index=k, **call.model_dump()) for k, call in enumerate(parsed.calls)]
        rest = ((parsed.content or "") if parsed.calls else out.text)[len(choice.sent_content):]
        delta = DeltaMessage(content=rest or None, tool_calls=calls or None)
        finish_reason = _finish_reason(out, choice.tools, bool(calls))
    return ChatCompletionResponseStreamChoice(
        index=out.index, delta=delta,
        logprobs=_logprobs(out, start, end, params) if params.logprobs is not None else None,
        finish_reason=finish_reason, stop_reason=out.stop_reason if choice.is_done else None,
    )


class _ToolChoiceStream(ChoiceStream):
    """A choice whose output may hold tool calls: text streams as content up to where a call starts (a forced
    call: nowhere); from there it is held, and the finished output's calls go out whole in the last chunk."""

    def __init__(self, params: SamplingParams, tools: ToolPlan) -> None:
        super().__init__(params)
        self.tools = tools
        self.sent_content = ""

    def next_text(self, out: CompletionOutput) -> str:
        super().next_text(out)  # sent_text: the text safe to show so far (stop strings, split characters)
        if out.finish_reason is not None or self.tools.parser is None:
            return ""  # the last chunk is built from the parsed output
        start = self.tools.parser.call_start(self.sent_text)
        content = self.sent_text if start is None else self.sent_text[:start]
        delta = content[len(self.sent_content):]
        self.sent_content += delta
        return delta


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
