"""POST /v1/embeddings: one or several inputs (text or token ids), each embedding as floats or base64."""

from __future__ import annotations

import base64
import uuid

import torch
from fastapi.responses import JSONResponse

from pagedformers.entrypoints.openai.errors import OpenAIError
from pagedformers.entrypoints.openai.protocol import EmbeddingRequest, EmbeddingResponse, EmbeddingResponseData
from pagedformers.entrypoints.openai.serving import ServingContext, encode_all, pooling_usage
from pagedformers.pooling_params import PoolingParams

Input = str | list[str] | list[int] | list[list[int]]


async def create_embedding(ctx: ServingContext, request: EmbeddingRequest) -> JSONResponse:
    model = ctx.check_model(request.model)
    ctx.check_task(model, ("embed",), "embeddings")
    params = _pooling_params(request)
    inputs = _inputs(request.input)
    request_id = f"embd-{uuid.uuid4().hex}"
    requests = [ctx.process(f"{request_id}-{i}", x, params, f"input {i}" if len(inputs) > 1 else "the input", "input")
                for i, x in enumerate(inputs)]
    outputs = await encode_all(ctx, requests)
    data = [EmbeddingResponseData(index=i, embedding=_encode(out.outputs.data, request.encoding_format))
            for i, out in enumerate(outputs)]
    response = EmbeddingResponse(id=request_id, model=model, data=data, usage=pooling_usage(outputs))
    return JSONResponse(response.model_dump())


def _pooling_params(request: EmbeddingRequest) -> PoolingParams:
    try:
        return PoolingParams(dimensions=request.dimensions, truncate_prompt_tokens=request.truncate_prompt_tokens,
                             task="embed")
    except ValueError as e:
        raise OpenAIError.from_value_error(e) from None


def _inputs(value: Input) -> list[str | list[int]]:
    """The request's inputs, each a text or token ids."""
    if isinstance(value, str):
        return [value]
    if not value:
        raise OpenAIError("input is empty: pass a string, a list of strings or token ids", 400, "input")
    if isinstance(value[0], int):
        return [list(value)]
    return [x if isinstance(x, str) else list(x) for x in value]


def _encode(data: torch.Tensor, encoding_format: str) -> list[float] | str:
    if encoding_format == "base64":  # what OpenAI sends: the raw little-endian float32 bytes
        return base64.b64encode(data.float().numpy().astype("<f4", copy=False).tobytes()).decode()
    return data.tolist()
