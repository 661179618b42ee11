"""The I/O of configuration: a model's files found (or downloaded) and read, then handed to the pure resolve()."""

from __future__ import annotations

import torch

from pagedformers.config import EngineArgs, EngineConfig, ModelFiles, resolve
from pagedformers.loading.sentence_transformers import read_sentence_transformers_config
from pagedformers.loading.source import load_hf_config, resolve_model_source, resolve_tokenizer_source


def read_model_files(args: EngineArgs) -> ModelFiles:
    source = resolve_model_source(args.model, args.revision, args.gguf_file, args.download_dir)
    tokenizer_path = source.path if args.tokenizer is None else \
        resolve_tokenizer_source(args.tokenizer, args.tokenizer_revision, args.download_dir)
    hf_config = load_hf_config(source, args.trust_remote_code, args.revision, args.hf_overrides)
    return ModelFiles(source.path, source.gguf_file, tokenizer_path, hf_config,
                      read_sentence_transformers_config(source.path))


def create_engine_config(args: EngineArgs) -> EngineConfig:
    """Read the model's files (downloading them if needed), then resolve the arguments against them."""
    return resolve(args, read_model_files(args), torch.cuda.is_available())
