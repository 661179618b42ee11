"""The OpenAI-compatible HTTP server: `build_app` wires the routes, `run_server` serves them with uvicorn."""

from __future__ import annotations

import argparse
import asyncio
import os
import secrets
import signal
import threading
import time
from collections.abc import Awaitable
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Receive, Scope, Send

from pagedformers import __version__
from pagedformers.entrypoints.async_engine import AsyncLLM, EngineError
from pagedformers.entrypoints.openai import DEFAULT_MAX_BODY_BYTES, DEFAULT_MAX_WAITING_REQUESTS
from pagedformers.entrypoints.openai.errors import OpenAIError, error_json
from pagedformers.entrypoints.openai.media import MediaPolicy
from pagedformers.entrypoints.openai.protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    EmbeddingRequest,
    ModelCard,
    ModelList,
    RerankRequest,
    ScoreRequest,
)
from pagedformers.entrypoints.openai.serving import ServingContext
from pagedformers.entrypoints.openai.serving_chat import create_chat_completion
from pagedformers.entrypoints.openai.serving_completion import create_completion
from pagedformers.entrypoints.openai.serving_embedding import create_embedding
from pagedformers.entrypoints.openai.serving_lora import LoRAModules, add_lora_update_routes, parse_lora_modules
from pagedformers.entrypoints.openai.serving_score import create_rerank, create_score
from pagedformers.entrypoints.openai.tool_calls import TOOL_PARSERS
from pagedformers.logger import init_logger

logger = init_logger(__name__)


def build_app(engine: AsyncLLM, served_model_name: str | list[str], api_key: str | None = None,
              chat_template: str | None = None, max_waiting_requests: int = DEFAULT_MAX_WAITING_REQUESTS,
              max_body_bytes: int = DEFAULT_MAX_BODY_BYTES, request_timeout_s: float | None = None,
              tool_call_parser: str | None = None, enable_auto_tool_choice: bool = False,
              lora_modules: list[tuple[str, str]] | None = None, enable_lora_runtime_updates: bool = False,
              media: MediaPolicy | None = None) -> FastAPI:
    """The FastAPI app serving `engine` under the given model name(s) (the first one is the default).

    Args:
        api_key: when set, every /v1/* request needs `Authorization: Bearer <api_key>`.
        chat_template: Jinja template used instead of the tokenizer's (the text, not a path).
        max_waiting_requests: requests in flight beyond the engine's max_num_seqs; past them a request is answered
            503 with Retry-After, never queued without bound.
        max_body_bytes: larger request bodies are answered 413.
        request_timeout_s: a request running longer is aborted and answered 504 (None: no limit).
        tool_call_parser, enable_auto_tool_choice: tool_choice "auto" parses calls in this format (tool_calls.py).
        lora_modules: (name, path) adapters a request's `model` picks (the engine needs enable_lora).
        enable_lora_runtime_updates: serve POST /v1/load_lora_adapter and /v1/unload_lora_adapter.
        media: where chat images may be fetched from (default: http(s) from any host, no local files).
    """
    names = [served_model_name] if isinstance(served_model_name, str) else list(served_model_name)
    if not names:
        raise ValueError("served_model_name needs at least one name")
    config = engine.config
    if enable_auto_tool_choice and tool_call_parser not in TOOL_PARSERS:
        raise ValueError(f"enable_auto_tool_choice needs a tool_call_parser, one of {sorted(TOOL_PARSERS)}; got "
                         f"{tool_call_parser!r}")
    ctx = ServingContext(engine, names, chat_template, request_timeout_s, tool_call_parser, enable_auto_tool_choice,
                         media=media or MediaPolicy())
    adapters = LoRAModules(ctx)
    for name, path in lora_modules or []:
        try:
            adapters.add(name, path)
        except OpenAIError as e:
            raise ValueError(f"--lora-modules {name}={path}: {e.message}") from None
    app = FastAPI(title="pagedformers OpenAI-compatible server", version=__version__)
    _add_error_handlers(app)
    app.add_middleware(_AdmissionMiddleware, max_in_flight=config.scheduler.max_num_seqs + max_waiting_requests,
                       max_body_bytes=max_body_bytes)
    if api_key:
        app.add_middleware(_ApiKeyMiddleware, api_key=api_key)

    @app.get("/health")
    async def health() -> Response:
        if not engine.is_running:
            return error_json("The engine thread has stopped", 503)
        return Response(status_code=200)

    @app.get("/metrics")
    async def metrics() -> Response:
        return Response(engine.metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")

    @app.get("/version")
    async def version() -> dict[str, str]:
        return {"version": __version__}

    @app.get("/v1/models")
    async def models() -> ModelList:
        cards = [ModelCard(id=n, root=config.model.name, max_model_len=config.model.max_model_len) for n in names]
        return ModelList(data=cards + adapters.cards(config.model.max_model_len))

    @app.post("/v1/completions")
    async def completions(request: CompletionRequest, raw: Request) -> Response:
        return await _unless_disconnected(raw, create_completion(ctx, request))

    @app.post("/v1/chat/completions")
    async def chat_completions(request: ChatCompletionRequest, raw: Request) -> Response:
        return await _unless_disconnected(raw, create_chat_completion(ctx, request))

    _add_pooling_routes(app, ctx)
    if enable_lora_runtime_updates:
        add_lora_update_routes(app, adapters)
    return app


def _add_pooling_routes(app: FastAPI, ctx: ServingContext) -> None:
    # Registered for every model, so that a generation model answers with the tasks it does serve.
    @app.post("/v1/embeddings")
    async def embeddings(request: EmbeddingRequest, raw: Request) -> Response:
        return await _unless_disconnected(raw, create_embedding(ctx, request))

    async def score(request: ScoreRequest, raw: Request) -> Response:
        return await _unless_disconnected(raw, create_score(ctx, request))

    async def rerank(request: RerankRequest, raw: Request) -> Response:
        return await _unless_disconnected(raw, create_rerank(ctx, request))

    for path in ("/score", "/v1/score"):
        app.add_api_route(path, score, methods=["POST"])
    for path in ("/rerank", "/v1/rerank", "/v2/rerank"):
        app.add_api_route(path, rerank, methods=["POST"])


def _add_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(OpenAIError)
    async def openai_error(_: Request, e: OpenAIError) -> JSONResponse:
        return JSONResponse(e.to_response().model_dump(), status_code=e.status)

    @app.exception_handler(EngineError)
    async def engine_error(_: Request, e: EngineError) -> JSONResponse:
        return error_json(str(e), e.status)

    @app.exception_handler(RequestValidationError)
    async def invalid_request(_: Request, e: RequestValidationError) -> JSONResponse:
        # OpenAI answers 400 where FastAPI would say 422.
        return error_json(_describe_validation_error(e.errors()), 400, _first_param(e.errors()))

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_: Request, e: StarletteHTTPException) -> JSONResponse:
        return error_json(str(e.detail), e.status_code)

    @app.exception_handler(Exception)
    async def internal_error(_: Request, e: Exception) -> JSONResponse:
        logger.exception("Unhandled error in a request")
        return error_json(f"Internal server error: {type(e).__name__}: {e}", 500)


def _describe_validation_error(errors: list[dict[str, Any]]) -> str:
    if any(err.get("type") == "json_invalid" for err in errors):
        detail = next(err for err in errors if err.get("type") == "json_invalid").get("ctx", {}).get("error", "")
        return f"The request body is not valid JSON: {detail}".rstrip(": ")
    parts = [f"{'.'.join(str(x) for x in err.get('loc', ())[1:]) or 'body'}: {err.get('msg')}" for err in errors]
    return "Invalid request: " + "; ".join(parts)


def _first_param(errors: list[dict[str, Any]]) -> str | None:
    for err in errors:
        loc = [str(x) for x in err.get("loc", ())[1:]]
        if loc:
            return loc[0]
    return None


async def _unless_disconnected(raw: Request, handler: Awaitable[Response]) -> Response:
    """Run a handler, cancelling it (and so aborting its requests) if the client hangs up first.

    Streaming handlers return at once; Starlette then watches the stream itself.
    """
    task = asyncio.ensure_future(handler)
    watcher = asyncio.ensure_future(_wait_for_disconnect(raw))
    done, _ = await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    if task in done:
        watcher.cancel()
        try:
            return task.result()
        except (OpenAIError, EngineError, StarletteHTTPException):
            raise
        except Exception as e:  # a bug: answer a clean 500 here, where the connection is still ours
            logger.exception("Unhandled error in a request")
            raise OpenAIError(f"Internal server error: {type(e).__name__}: {e}", 500) from e
    task.cancel()
    return Response(status_code=499)  # nobody is left to read it


async def _wait_for_disconnect(raw: Request) -> None:
    while (await raw.receive())["type"] != "http.disconnect":
        pass


class _ApiKeyMiddleware:
    """401 for /v1/* requests without `Authorization: Bearer <key>`; /health and /metrics stay open.

    Plain ASGI (not BaseHTTPMiddleware), so streamed responses and disconnects pass through untouched.
    """

    def __init__(self, app: ASGIApp, api_key: str) -> None:
        self.app = app
        self.expected = f"Bearer {api_key}".encode()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["path"].startswith("/v1") and scope["method"] != "OPTIONS":
            given = dict(scope["headers"]).get(b"authorization", b"")
            if not secrets.compare_digest(given, self.expected):
                response = error_json("Invalid or missing API key: send `Authorization: Bearer <key>`", 401)
                await response(scope, receive, send)
                return
        await self.app(scope, receive, send)


class _AdmissionMiddleware:
    """Bounds what the server holds: a POST body larger than `max_body_bytes` (by its Content-Length) is answered
    413; a POST to /v1/* beyond `max_in_flight` requests in flight (the engine's max_num_seqs plus the waiting
    bound) is answered 503 with `Retry-After`. A request counts until its response is fully sent, streams included.

    Plain ASGI, like _ApiKeyMiddleware: it runs on the event loop's one thread, so the count needs no lock.
    """

    def __init__(self, app: ASGIApp, max_in_flight: int, max_body_bytes: int) -> None:
        self.app, self.max_in_flight, self.max_body_bytes = app, max_in_flight, max_body_bytes
        self.in_flight = 0

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] != "POST":
            await self.app(scope, receive, send)
            return
        length = dict(scope["headers"]).get(b"content-length", b"0")
        if not length.isdigit() or int(length) > self.max_body_bytes:
            await error_json(f"The request body is larger than the server's limit of {self.max_body_bytes} bytes",
                             413)(scope, receive, send)
            return
        if scope["path"].startswith("/v1") and self.in_flight >= self.max_in_flight:
            response = error_json(f"The server is at capacity ({self.in_flight} requests in flight): retry later",
                                  503)
            response.headers["Retry-After"] = "1"
            await response(scope, receive, send)
            return
        self.in_flight += 1
        try:
            await self.app(scope, receive, send)
        finally:
            self.in_flight -= 1


def load_chat_template(value: str | None) -> str | None:
    """--chat-template: a file's path or the template itself."""
    if value is None:
        return None
    if os.path.isfile(value):
        with open(value, encoding="utf-8") as f:
            return f.read()
    if "{" not in value:  # a mistyped path would otherwise become a template that prints the path
        raise ValueError(f"--chat-template {value!r} is neither a file nor a Jinja template (no '{{' in it)")
    return value


def run_server(args: argparse.Namespace) -> None:
    """Build the engine from the parsed `pagedformers serve` flags and serve until interrupted."""
    import prometheus_client
    import uvicorn

    from pagedformers.config import EngineArgs
    from pagedformers.entrypoints.engine_args import engine_kwargs
    from pagedformers.loading.gguf_once import gguf_parsed_once
    from pagedformers.loading.model_files import create_engine_config
    from pagedformers.platforms.openmp import stay_off_openmp

    stay_off_openmp()  # this thread runs the event loop; the engine thread alone steps (and loads) the model
    prometheus_client.disable_created_metrics()  # process-wide: this process is the server
    kwargs = engine_kwargs(args)
    with gguf_parsed_once(kwargs["model"], kwargs.get("gguf_file")):
        config = create_engine_config(EngineArgs.from_kwargs(**kwargs))
        engine = AsyncLLM(config)
    names = args.served_model_name or [args.model]
    app = build_app(engine, names, args.api_key, load_chat_template(args.chat_template), args.max_waiting_requests,
                    args.max_request_body_bytes, args.request_timeout, args.tool_call_parser,
                    args.enable_auto_tool_choice, parse_lora_modules(args.lora_modules or []),
                    args.enable_lora_runtime_updates,
                    MediaPolicy(tuple(d.lower() for d in args.allowed_media_domains) if args.allowed_media_domains
                                else None, args.allowed_local_media_path, args.media_fetch_timeout))
    logger.info("Serving %s as %s on http://%s:%d/v1", config.model.name, ", ".join(names), args.host, args.port)
    server = uvicorn.Server(uvicorn.Config(app, host=args.host, port=args.port, log_level=args.uvicorn_log_level,
                                           timeout_graceful_shutdown=args.shutdown_timeout))
    watchdog = EngineWatchdog(engine, server, drain_s=args.shutdown_timeout)
    try:
        # uvicorn's graceful shutdown on SIGTERM / SIGINT: no new connections, requests in flight finish within the
        # timeout. Just before it ends, the watchdog fails the requests still running (503: a stream gets a last
        # error event and [DONE]); then uvicorn cancels what is left, which aborts it and frees its blocks.
        # uvicorn re-raises the signal once done: a SIGTERM handled that way is a clean exit (0), not a kill.
        signal.signal(signal.SIGTERM, lambda *_: None)
        watchdog.start()
        server.run()
    finally:
        engine.shutdown()
    if watchdog.engine_died:
        raise SystemExit(1)  # a supervisor restarts the server


class EngineWatchdog(threading.Thread):
    """Stops the server when the engine thread has died (/health already answers 503 then), so that the process
    exits non-zero and its supervisor restarts it, instead of serving 500s forever. Once the server is stopping,
    fails the requests still in flight shortly before its `drain_s` grace period ends, so that their clients get
    an answer (a 503, a stream's last error event) rather than a cut connection."""

    def __init__(self, engine: AsyncLLM, server: Any, interval_s: float = 0.1, drain_s: float | None = None) -> None:
        super().__init__(name="pagedformers-watchdog", daemon=True)
        self.engine, self.server, self.interval_s, self.drain_s = engine, server, interval_s, drain_s
        self.engine_died = False

    def run(self) -> None:
        while not self.server.should_exit:
            if not self.engine.is_running:
                logger.error("The engine thread has died: stopping the server (exit code 1).")
                self.engine_died, self.server.should_exit = True, True
                return
            time.sleep(self.interval_s)
        if self.drain_s is not None:
            # The grace period started about now; leave the last quarter of it (at most 1 s) to send the answers.
            time.sleep(max(0.0, self.drain_s - min(1.0, self.drain_s / 4)))
            self.engine.fail_in_flight(f"The server is shutting down: the request ran past its {self.drain_s:g} s "
                                       "grace period (--shutdown-timeout) and was aborted")

