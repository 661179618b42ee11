"""Where a model lives: a local directory, a single GGUF file, or a hub repo id."""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any, NamedTuple

from transformers import AutoConfig, PretrainedConfig

from pagedformers.logger import init_logger

logger = init_logger(__name__)


class ModelSource(NamedTuple):
    path: str  # a local directory holding config / weights / tokenizer files
    gguf_file: str | None  # a GGUF file inside `path`, when the weights come as GGUF


def resolve_model_source(
    model: str, revision: str | None, gguf_file: str | None, download_dir: str | None
) -> ModelSource:
    """Turn what the user passed as `model` into a local directory (downloading if needed)."""
    if model.endswith(".gguf") and os.path.isfile(model):
        if gguf_file is not None:
            raise ValueError(f"model={model!r} is a GGUF file already; do not also pass gguf_file={gguf_file!r}")
        return ModelSource(os.path.dirname(os.path.abspath(model)), os.path.basename(model))
    if os.path.isdir(model):
        if gguf_file is not None and not os.path.isfile(os.path.join(model, gguf_file)):
            raise ValueError(f"gguf_file={gguf_file!r} was not found in {model!r}")
        return ModelSource(os.path.abspath(model), gguf_file)
    if os.path.exists(model) or model.startswith((".", "/", "~")):
        raise ValueError(f"model={model!r} is neither a model directory nor a .gguf file")
    from pagedformers.loading.hub import download_model

    return ModelSource(download_model(model, revision, download_dir, gguf_file), gguf_file)


def resolve_tokenizer_source(tokenizer: str, revision: str | None, download_dir: str | None) -> str:
    """A separate `tokenizer=`: a local directory, or a hub repo id (only tokenizer files are fetched)."""
    if os.path.isdir(tokenizer):
        return os.path.abspath(tokenizer)
    from pagedformers.loading.hub import download_model

    return download_model(tokenizer, revision, download_dir, None, weights=False)


def load_hf_config(
    source: ModelSource,
    trust_remote_code: bool,
    revision: str | None,
    hf_overrides: dict[str, Any] | Callable[[PretrainedConfig], PretrainedConfig] | None,
) -> PretrainedConfig:
    try:
        config = AutoConfig.from_pretrained(
            source.path, trust_remote_code=trust_remote_code, gguf_file=source.gguf_file
        )
    except ValueError as e:
        if "trust_remote_code" in str(e) and not trust_remote_code:
            raise ValueError(
                f"The model at {source.path!r} ships its own code (auto_map in config.json). "
                "Read it, then pass trust_remote_code=True (--trust-remote-code on the CLI) to run it."
            ) from e
        raise
    except OSError as e:
        raise ValueError(f"Could not read a model config from {source.path!r}: {e}") from e
    return apply_hf_overrides(config, hf_overrides)


def apply_hf_overrides(
    config: PretrainedConfig,
    overrides: dict[str, Any] | Callable[[PretrainedConfig], PretrainedConfig] | None,
) -> PretrainedConfig:
    if overrides is None:
        return config
    if callable(overrides):
        return overrides(config)
    for key, value in overrides.items():
        current = getattr(config, key, None)
        if isinstance(current, PretrainedConfig) and isinstance(value, dict):
            apply_hf_overrides(current, value)
        else:
            setattr(config, key, value)
    return config
