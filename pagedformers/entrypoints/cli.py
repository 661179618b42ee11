"""The `pagedformers` command (also `python -m pagedformers`).

    pagedformers serve MODEL [flags]       an OpenAI-compatible server, like `vllm serve`
    pagedformers generate MODEL --prompt P one prompt, completion printed to stdout
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from pagedformers import __version__
from pagedformers.entrypoints.engine_args import add_engine_args, engine_kwargs
from pagedformers.entrypoints.openai import DEFAULT_MAX_BODY_BYTES, DEFAULT_MAX_WAITING_REQUESTS, TOOL_CALL_PARSERS

_UVICORN_LOG_LEVELS = ("critical", "error", "warning", "info", "debug", "trace")


def make_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pagedformers", description="Serve and run Hugging Face transformers "
                                     "models with a paged KV cache and continuous batching.")
    parser.add_argument("--version", action="version", version=f"pagedformers {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _add_serve(commands)
    _add_generate(commands)
    return parser


def _add_model_arg(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model_tag", nargs="?", metavar="MODEL",
                        help="Model: a local directory, a Hugging Face Hub id or a .gguf file (or pass --model).")


def _add_serve(commands: argparse._SubParsersAction) -> None:
    serve = commands.add_parser(
        "serve", help="Serve a model with an OpenAI-compatible API.",
        description="Serve a model with an OpenAI-compatible API: /v1/completions, /v1/chat/completions, "
                    "/v1/models, /health, /metrics.",
    )
    _add_model_arg(serve)
    server = serve.add_argument_group("server")
    server.add_argument("--host", default="0.0.0.0", help="Address to listen on (default: 0.0.0.0, all).")
    server.add_argument("--port", type=int, default=8000, help="Port to listen on (default: 8000).")
    server.add_argument("--api-key", default=None,
                        help="Require `Authorization: Bearer <key>` on /v1/* requests (default: open).")
    server.add_argument("--served-model-name", nargs="+", default=None, metavar="NAME",
                        help="Name(s) clients use for the model; the first is the default (default: MODEL).")
    server.add_argument("--chat-template", default=None, metavar="FILE_OR_TEMPLATE",
                        help="Jinja chat template, as a file path or inline; by default the tokenizer's.")
    server.add_argument("--uvicorn-log-level", default="info", choices=_UVICORN_LOG_LEVELS,
                        help="Log level of uvicorn (default: info).")
    server.add_argument("--max-waiting-requests", type=int, default=DEFAULT_MAX_WAITING_REQUESTS, metavar="N",
                        help="Requests in flight beyond --max-num-seqs; past them a request gets 503 with "
                             f"Retry-After (default: {DEFAULT_MAX_WAITING_REQUESTS}).")
    server.add_argument("--shutdown-timeout", type=float, default=30.0, metavar="S",
                        help="On SIGTERM or SIGINT: stop accepting, let requests in flight finish for up to this "
                             "many seconds, then abort the rest and exit 0 (default: 30).")
    server.add_argument("--request-timeout", type=float, default=None, metavar="S",
                        help="Abort a request that runs longer than this many seconds and answer 504 (default: none).")
    server.add_argument("--max-request-body-bytes", type=int, default=DEFAULT_MAX_BODY_BYTES, metavar="BYTES",
                        help=f"Larger request bodies get 413 (default: {DEFAULT_MAX_BODY_BYTES}).")
    server.add_argument("--enable-auto-tool-choice", action="store_true",
                        help='Let chat requests with tools use tool_choice "auto" (the default): the model may '
                             "answer or call, and --tool-call-parser finds its calls.")
    server.add_argument("--tool-call-parser", choices=TOOL_CALL_PARSERS, default=None,
                        help="The model family's tool-call format, for tool_choice \"auto\": hermes (Qwen, "
                             "Hermes), llama3_json (Llama 3.x), mistral.")
    server.add_argument("--allowed-media-domains", nargs="+", default=None, metavar="HOST",
                        help="Hosts whose http(s) image URLs chat requests may name (default: any).")
    server.add_argument("--allowed-local-media-path", default=None, metavar="DIR",
                        help="Directory whose files chat requests may name as file:// image URLs (default: none).")
    server.add_argument("--media-fetch-timeout", type=float, default=5.0, metavar="S",
                        help="Seconds to fetch one image URL before answering 400 (default: 5).")
    server.add_argument("--lora-modules", nargs="+", default=None, metavar="NAME=PATH",
                        help="LoRA adapters to serve (with --enable-lora): a request's model field picks one by name. "
                             "NAME=PATH or vLLM's JSON form '{\"name\": ..., \"path\": ...}'.")
    server.add_argument("--enable-lora-runtime-updates", action="store_true",
                        help="Serve POST /v1/load_lora_adapter and /v1/unload_lora_adapter (off by default: anyone "
                             "who can reach the server could then load files from its disk).")
    add_engine_args(serve)


def _add_generate(commands: argparse._SubParsersAction) -> None:
    generate = commands.add_parser(
        "generate", help="Generate a completion for one prompt and print it.",
        description="Generate a completion for one prompt and print it to stdout.",
    )
    _add_model_arg(generate)
    sampling = generate.add_argument_group("sampling")
    sampling.add_argument("--prompt", required=True, help="The prompt text.")
    sampling.add_argument("--chat", action="store_true",
                          help="Send the prompt as a user message through the chat template.")
    sampling.add_argument("--max-tokens", type=int, default=16, help="Most tokens to generate (default: 16).")
    sampling.add_argument("--temperature", type=float, default=1.0,
                          help="Sampling temperature; 0 is greedy (default: 1.0).")
    sampling.add_argument("--top-p", type=float, default=1.0, help="Nucleus sampling threshold (default: 1.0).")
    sampling.add_argument("--top-k", type=int, default=0, help="Sample from the k most likely tokens; 0: all.")
    sampling.add_argument("--ignore-eos", action="store_true", help="Keep generating past end-of-sequence.")
    add_engine_args(generate)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = make_parser()
    args = parser.parse_args(argv)
    tag, model = args.model_tag, getattr(args, "model", None)
    if tag and model and tag != model:
        parser.error(f"the model is given twice: MODEL={tag!r} and --model={model!r}")
    if not (tag or model):
        parser.error(f"{args.command} needs a MODEL (a directory, a Hub id or a .gguf file)")
    args.model = tag or model
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        if args.command == "serve":
            from pagedformers.entrypoints.openai.server import run_server

            run_server(args)
        else:
            _generate(args)
    except ValueError as e:  # a bad flag value that only the config could judge
        print(f"pagedformers {args.command}: error: {e}", file=sys.stderr)
        return 2
    return 0


def _generate(args: argparse.Namespace) -> None:
    from pagedformers.entrypoints.llm import LLM
    from pagedformers.sampling_params import SamplingParams

    kwargs = engine_kwargs(args)
    llm = LLM(kwargs.pop("model"), **kwargs)
    params = SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p,
                            top_k=args.top_k, ignore_eos=args.ignore_eos)
    if args.chat:
        outputs = llm.chat([{"role": "user", "content": args.prompt}], params, use_tqdm=False)
    else:
        outputs = llm.generate(args.prompt, params, use_tqdm=False)
    print(outputs[0].outputs[0].text)
