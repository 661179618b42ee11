"""POST /v1/completions: one or several prompts (text or token ids), n choices each, streamed or not."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from contextlib import aclosing

from fastapi.responses import JSONResponse, StreamingResponse

from pagedformers.entrypoints.async_engine import EngineError
from pagedformers.entrypoints.openai.errors import OpenAIError
from pagedformers.entrypoints.openai.protocol import (
    CompletionLogProbs,
    CompletionRequest,
    CompletionResponse,
    CompletionResponseChoice,
    CompletionStreamResponse,
)
from pagedformers.entrypoints.openai.serving import (
    DONE,
    ChoiceStream,
    ServingContext,
    check_output,
    clamp,
    merge,
    sampled_logprobs,
    sse,
    sse_error,
    to_sampling_params,
    token_text,
    usage,
)
from pagedformers.outputs import CompletionOutput, RequestOutput
from pagedformers.sampling_params import SamplingParams


async def create_completion(ctx: ServingContext, request: CompletionRequest) -> JSONResponse | StreamingResponse:
    model = ctx.check_model(request.model)
    ctx.check_task(model, ("generate",), "completions")
    if request.echo:
        raise OpenAIError("echo is not supported yet", 400, "echo")
    params = to_sampling_params(request, request.max_tokens, request.logprobs)
    prompts = _prompts(request.prompt)
    request_id = f"cmpl-{uuid.uuid4().hex}"
    lora_request = ctx.lora_for(model)
    requests = [ctx.process(f"{request_id}-{i}", prompt, params, f"Prompt {i}" if len(prompts) > 1 else "The prompt",
                            lora_request=lora_request)
                for i, prompt in enumerate(prompts)]  # every prompt checked before any is queued
    generators = [ctx.engine.generate(r, ctx.request_timeout_s) for r in requests]
    prompt_lens = [len(r.prompt_token_ids) for r in requests]
    if request.stream:
        include_usage = bool(request.stream_options and request.stream_options.include_usage)
        stream = _stream(request_id, model, params, merge(generators), prompt_lens, include_usage)
        return StreamingResponse(stream, media_type="text/event-stream")
    finals: dict[int, RequestOutput] = {}
    async with aclosing(merge(generators)) as outputs:  # an error closes (aborts) the other prompts at once
        async for i, out in outputs:
            check_output(out)
            finals[i] = out
    choices = [
        _choice(i * params.n + o.index, o.text, o, 0, len(o.token_ids), 0, params)
        for i in sorted(finals) for o in finals[i].outputs
    ]
    response = CompletionResponse(id=request_id, model=model, choices=choices, usage=usage(prompt_lens, finals))
    return JSONResponse(response.model_dump())


def _prompts(prompt: str | list[str] | list[int] | list[list[int]]) -> list[str | list[int]]:
    """The request's prompts, each a text or token ids."""
    if isinstance(prompt, str):
        return [prompt]
    if not prompt:
        raise OpenAIError("prompt is empty: pass a string, a list of strings or token ids", 400, "prompt")
    if isinstance(prompt[0], int):
        return [list(prompt)]
    return [p if isinstance(p, str) else list(p) for p in prompt]


async def _stream(request_id: str, model: str, params: SamplingParams,
                  outputs: AsyncIterator[tuple[int, RequestOutput]], prompt_lens: list[int],
                  include_usage: bool) -> AsyncIterator[str]:
    choices: dict[tuple[int, int], ChoiceStream] = {}
    finals: dict[int, RequestOutput] = {}
    try:
        async with aclosing(outputs):
            async for i, out in outputs:
                check_output(out)
                finals[i] = out
                for o in out.outputs:
                    choice = choices.setdefault((i, o.index), ChoiceStream(params))
                    chunk = _chunk(i * params.n + o.index, o, choice, params)
                    if chunk is not None:
                        yield sse(CompletionStreamResponse(id=request_id, model=model, choices=[chunk]))
        if include_usage:
            yield sse(CompletionStreamResponse(id=request_id, model=model, choices=[],
                                               usage=usage(prompt_lens, finals)))
    except OpenAIError as e:
        yield sse_error(e)
    except EngineError as e:
        yield sse_error(OpenAIError(str(e), e.status))
    yield DONE


def _chunk(index: int, out: CompletionOutput, choice: ChoiceStream,
           params: SamplingParams) -> CompletionResponseChoice | None:
    step = choice.advance(out, params)
    if step is None:
        return None
    text, start, end = step
    result = _choice(index, text, out, start, end, choice.text_offset, params)
    if result.logprobs is not None:
        choice.text_offset += sum(len(t) for t in result.logprobs.tokens)
    if not choice.is_done:
        result.finish_reason = result.stop_reason = None
    return result


def _choice(index: int, text: str, out: CompletionOutput, start: int, end: int, text_offset: int,
            params: SamplingParams) -> CompletionResponseChoice:
    logprobs = _logprobs(out, start, end, text_offset) if params.logprobs is not None else None
    return CompletionResponseChoice(index=index, text=text, logprobs=logprobs, finish_reason=out.finish_reason,
                                    stop_reason=out.stop_reason)


def _logprobs(out: CompletionOutput, start: int, end: int, text_offset: int) -> CompletionLogProbs:
    result = CompletionLogProbs()
    for token_id, entries in sampled_logprobs(out, start, end):
        token = token_text(entries[token_id], token_id)
        result.tokens.append(token)
        result.token_logprobs.append(clamp(entries[token_id].logprob))
        result.top_logprobs.append({token_text(lp, t): clamp(lp.logprob) for t, lp in entries.items()})
        result.text_offset.append(text_offset)
        text_offset += len(token)
    return result
