"""Command-line flags for every EngineConfig field, generated from the dataclass.

A field added to EngineConfig gets its `--kebab-case` flag without touching this file;
`_HELP` only adds the sentence that `--help` shows for it.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import types
import typing
from typing import Any, Literal, Union

from pagedformers.config import EngineConfig

_HELP = {
    "model": "Model to serve: a local directory, a Hugging Face Hub id or a .gguf file.",
    "tokenizer": "Tokenizer to use, if not the model's.",
    "model_impl": "Which implementation runs the model: 'transformers' wraps the Hugging Face model in our "
                  "shell, 'native' uses a hand-written one, 'auto' prefers native when there is one.",
    "trust_remote_code": "Allow running the model repository's own Python code (auto_map).",
    "revision": "Branch, tag or commit of the model on the Hub.",
    "tokenizer_revision": "Branch, tag or commit of the tokenizer on the Hub.",
    "gguf_file": "GGUF file inside the model repository to load.",
    "download_dir": "Where to download and cache Hub files.",
    "dtype": "Weights and activations dtype: auto, float32, bfloat16 or float16.",
    "seed": "Seed of the sampler for requests without their own seed.",
    "max_model_len": "Longest sequence (prompt + output) in tokens; by default the model's context length.",
    "max_num_seqs": "Most sequences running in one step.",
    "max_num_batched_tokens": "Most tokens processed in one step (decodes plus prefill chunks).",
    "block_size": "Tokens per KV-cache block.",
    "kv_cache_memory_bytes": "Bytes to give the KV cache; by default a share of free memory.",
    "enable_prefix_caching": "Reuse KV blocks of prompts that share a prefix.",
    "device": "auto, cpu, cuda or cuda:N.",
    "hf_overrides": "JSON object of config attributes to override, e.g. '{\"rope_theta\": 10000}'.",
    "enforce_eager": "Run every step eagerly (no traced decode graphs).",
    "runner": "generate or pooling; auto: from the model's architecture.",
    "convert": "Run a causal LM as a pooling model: embed, classify or reward; auto: as it is.",
    "pooler_config": "JSON object of pooler settings for pooling models.",
    "tensor_parallel_size": "Number of tensor-parallel workers.",
    "pipeline_parallel_size": "Number of pipeline stages.",
    "data_parallel_size": "Number of data-parallel engine replicas.",
    "distributed_timeout_s": "Seconds to wait for the other workers before giving up.",
}


def engine_fields() -> list[dataclasses.Field]:
    return [f for f in dataclasses.fields(EngineConfig) if f.init]


def add_engine_args(parser: argparse.ArgumentParser) -> None:
    """Add one flag per EngineConfig init field. Flags default to unset, so EngineConfig's defaults apply."""
    group = parser.add_argument_group("engine", "Options of the engine (EngineConfig fields).")
    hints = _type_hints()
    for f in engine_fields():
        kwargs = _flag_kwargs(hints.get(f.name, f.type))
        if kwargs is None:  # e.g. a field only Python code can set (a callable)
            continue
        default = "" if f.default in (dataclasses.MISSING, None) else f" (default: {f.default})"
        help_text = _HELP.get(f.name, f"EngineConfig.{f.name}.") + default
        group.add_argument(f"--{f.name.replace('_', '-')}", dest=f.name, default=argparse.SUPPRESS,
                           help=help_text.replace("%", "%%"), **kwargs)


def engine_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    """The EngineConfig keyword arguments that were given on the command line."""
    return {f.name: getattr(args, f.name) for f in engine_fields() if hasattr(args, f.name)}


def json_object(text: str) -> dict[str, Any]:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        raise argparse.ArgumentTypeError(f"not valid JSON ({e}): {text!r}") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"expected a JSON object like '{{\"key\": 1}}', got {text!r}")
    return value


def _type_hints() -> dict[str, Any]:
    try:
        return typing.get_type_hints(EngineConfig)
    except Exception:  # an annotation that cannot be resolved: fall back to the strings
        return {}


def _flag_kwargs(hint: Any) -> dict[str, Any] | None:
    if isinstance(hint, str):
        return _flag_kwargs_from_string(hint)
    options = [a for a in _union_members(hint) if a is not type(None)]
    if options == [bool]:
        return {"action": argparse.BooleanOptionalAction}
    for option in options:
        if typing.get_origin(option) is Literal:
            return {"choices": list(typing.get_args(option))}
    if any(option is dict or typing.get_origin(option) is dict for option in options):
        return {"type": json_object, "metavar": "JSON"}
    for t in (str, int, float):  # str first: a `str | X` field takes any text and resolves it itself
        if t in options:
            return {"type": t}
    return None


def _flag_kwargs_from_string(hint: str) -> dict[str, Any] | None:
    if hint == "bool":
        return {"action": argparse.BooleanOptionalAction}
    if "dict" in hint:
        return {"type": json_object, "metavar": "JSON"}
    for name, t in (("str", str), ("int", int), ("float", float)):
        if name in hint:
            return {"type": t}
    return None if "Callable" in hint else {"type": str}  # e.g. an alias of a Literal: the config checks it


def _union_members(hint: Any) -> list[Any]:
    if typing.get_origin(hint) in (Union, types.UnionType):
        return list(typing.get_args(hint))
    return [hint]
