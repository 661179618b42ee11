"""POST /score and /rerank: how relevant texts are to each other (as vLLM). A cross-encoder reads each
pair in one forward pass; an embedding model gives the cosine similarity of the two embeddings."""

from __future__ import annotations

import uuid

import torch
from fastapi.responses import JSONResponse

from pagedformers.entrypoints.openai.errors import OpenAIError
from pagedformers.entrypoints.openai.protocol import (
    RerankDocument,
    RerankRequest,
    RerankResponse,
    RerankResult,
    RerankUsage,
    ScoreRequest,
    ScoreResponse,
    ScoreResponseData,
    UsageInfo,
)
from pagedformers.entrypoints.openai.serving import ServingContext, encode_all, pooling_usage
from pagedformers.entrypoints.scoring import cross_encoder_inputs, cross_encoder_score, pair_up
from pagedformers.pooling_params import PoolingParams

_SCORE_TASKS = ("score", "embed")


async def create_score(ctx: ServingContext, request: ScoreRequest) -> JSONResponse:
    model = ctx.check_model(request.model)
    ctx.check_task(model, _SCORE_TASKS, "scoring")
    firsts, seconds = _pairs(request.text_1, request.text_2)
    request_id = f"score-{uuid.uuid4().hex}"
    scores, usage = await _score(ctx, firsts, seconds, request_id, "text_2")
    data = [ScoreResponseData(index=i, score=score) for i, score in enumerate(scores)]
    return JSONResponse(ScoreResponse(id=request_id, model=model, data=data, usage=usage).model_dump())


async def create_rerank(ctx: ServingContext, request: RerankRequest) -> JSONResponse:
    model = ctx.check_model(request.model)
    ctx.check_task(model, _SCORE_TASKS, "reranking")
    if request.query is None:
        raise OpenAIError("query is missing: pass the text to rank the documents against", 400, "query")
    docs = request.documents
    if not docs:
        raise OpenAIError("documents is empty: pass at least one", 400, "documents")
    request_id = f"rerank-{uuid.uuid4().hex}"
    scores, usage = await _score(ctx, [request.query] * len(docs), docs, request_id, "documents")
    order = sorted(range(len(docs)), key=lambda i: scores[i], reverse=True)
    top_n = request.top_n if request.top_n and request.top_n > 0 else len(docs)  # vLLM: 0 or less means all
    results = [RerankResult(index=i, document=RerankDocument(text=docs[i]), relevance_score=scores[i])
               for i in order[:top_n]]
    response = RerankResponse(id=request_id, model=model, results=results,
                              usage=RerankUsage(prompt_tokens=usage.prompt_tokens, total_tokens=usage.total_tokens))
    return JSONResponse(response.model_dump())


def _pairs(text_1: str | list[str] | None, text_2: str | list[str] | None) -> tuple[list[str], list[str]]:
    for name, value in (("text_1", text_1), ("text_2", text_2)):
        if value is None or (isinstance(value, list) and not value):
            raise OpenAIError(f"{name} is missing or empty: pass a string or a list of strings", 400, name)
    try:
        return pair_up(text_1, text_2)
    except ValueError as e:
        raise OpenAIError(str(e), 400, "text_2") from None


async def _score(ctx: ServingContext, firsts: list[str], seconds: list[str], request_id: str,
                 param: str) -> tuple[list[float], UsageInfo]:
    if "score" in ctx.processor.supported_tasks:
        return await _cross_encode(ctx, firsts, seconds, request_id, param)
    return await _cosine(ctx, firsts, seconds, request_id, param)


async def _cross_encode(ctx: ServingContext, firsts: list[str], seconds: list[str], request_id: str,
                        param: str) -> tuple[list[float], UsageInfo]:
    inputs = [cross_encoder_inputs(ctx.tokenizer, a, b) for a, b in zip(firsts, seconds)]
    params = PoolingParams(task="score")
    requests = [ctx.process(f"{request_id}-{i}", {"prompt_token_ids": ids, "token_type_ids": types}, params,
                            f"pair {i}", param) for i, (ids, types) in enumerate(inputs)]
    outputs = await encode_all(ctx, requests)
    return [cross_encoder_score(out.outputs.data) for out in outputs], pooling_usage(outputs)


async def _cosine(ctx: ServingContext, firsts: list[str], seconds: list[str], request_id: str,
                  param: str) -> tuple[list[float], UsageInfo]:
    texts = list(dict.fromkeys(firsts + seconds))  # each text embedded once (a rerank's query too)
    params = PoolingParams(task="embed", normalize=True)
    requests = [ctx.process(f"{request_id}-{i}", text, params, f"text {i}", param) for i, text in enumerate(texts)]
    outputs = await encode_all(ctx, requests)
    embeddings = {text: out.outputs.data for text, out in zip(texts, outputs)}
    scores = [float(torch.dot(embeddings[a], embeddings[b])) for a, b in zip(firsts, seconds)]
    return scores, pooling_usage(outputs)
