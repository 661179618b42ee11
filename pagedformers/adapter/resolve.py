"""Which transformers shell runs a model, and what the shells cannot run."""

from __future__ import annotations

from typing import TYPE_CHECKING

from transformers import AutoModel, AutoModelForCausalLM, AutoModelForImageTextToText

from pagedformers.adapter.compat import RULE_FLAG, is_backend_compatible, state_layers
from pagedformers.config import EngineConfig
from pagedformers.logger import init_logger

if TYPE_CHECKING:
    from pagedformers.adapter.base import TransformersBase

logger = init_logger(__name__)

# Hybrid language models whose class withholds `_supports_attention_backend` while their attention layers go through
# ALL_ATTENTION_FUNCTIONS with the kwargs (rules 1-2, which the dry run checks). The flag admits a model to vLLM's
# Transformers backend, which packs a batch's requests into one row and serves softmax attention only; their
# gated-DeltaNet layers keep one recurrent state a row. The hybrid shells never pack: each request runs as its own
# row with its own state cache (hybrid.py), so rule 3 is read on what uses the paged cache, the attention layers.
# Multimodal checkpoints only: the image check runs them against HF; their text-only classes are not checked yet.
PER_REQUEST_ONLY_RULE3 = frozenset({"qwen3_5_text", "qwen3_5_moe_text", "qwen4_exp_text"})


def base_model_class(config: EngineConfig) -> type:
    """The class `AutoModel.from_config` would build for this config (remote code included)."""
    hf_config = config.model.hf_config
    auto_map = getattr(hf_config, "auto_map", None) or {}
    if config.model.trust_remote_code and "AutoModel" in auto_map:
        from transformers.dynamic_module_utils import get_class_from_dynamic_module

        return get_class_from_dynamic_module(auto_map["AutoModel"], config.model.path)
    if auto_map and "AutoModel" not in auto_map and type(hf_config) not in AutoModel._model_mapping:
        raise ValueError(
            f"The model at {config.model.path!r} is remote code without an `AutoModel` entry in its config's "
            f"auto_map (it has {sorted(auto_map)}). The transformers shell builds the base model with AutoModel: "
            "add `\"AutoModel\": \"modeling_x.XModel\"` to auto_map."
        )
    base = auto_base_model(type(hf_config))
    if base is None:
        raise ValueError(
            f"transformers has no base model (AutoModel) for config type {type(hf_config).__name__} "
            f"(model_type={getattr(hf_config, 'model_type', None)!r}); it cannot be served."
        )
    return base


def auto_base_model(config_type: type) -> type | None:
    """AutoModel's class for a config type; for one AutoModel does not map, the base model of the class that
    transformers builds for it: a family reusing another's model under a config of its own (PP-Chart2Table:
    GotOcr2ForConditionalGeneration, whose own config class AutoModel maps to GotOcr2Model)."""
    if config_type in AutoModel._model_mapping:
        return AutoModel._model_mapping[config_type]
    head = next((auto._model_mapping[config_type] for auto in (AutoModelForImageTextToText, AutoModelForCausalLM)
                 if config_type in auto._model_mapping), None)
    own = getattr(head, "config_class", None)
    return AutoModel._model_mapping[own] if own is not None and own in AutoModel._model_mapping else None


def shell_class(config: EngineConfig) -> type[TransformersBase]:
    """The transformers shell for this checkpoint, once the compatibility check passed (it raises naming every
    broken rule)."""
    from pagedformers.adapter.causal import TransformersForCausalLM
    from pagedformers.adapter.hybrid import (
        TransformersHybridForCausalLM,
        TransformersHybridForMultimodalLM,
        TransformersHybridForPooling,
    )
    from pagedformers.adapter.multimodal import TransformersForMultimodalLM
    from pagedformers.adapter.multimodal_families import is_prefix_lm
    from pagedformers.adapter.pooling import TransformersForPooling

    model = config.model
    if model.is_multimodal and model.runner == "pooling":
        raise ValueError(
            f"{model.architectures or model.hf_config.model_type} is a multimodal model: the transformers shell "
            "serves it with runner='generate' only (TransformersForMultimodalLM); pooling needs a text-only "
            "checkpoint.")
    report = is_backend_compatible(base_model_class(config), model.hf_config, model.trust_remote_code)
    language_model = AutoModel._model_mapping.get(type(model.text_config), None) if model.is_multimodal else None
    if getattr(language_model, "_supports_attention_backend", False) or \
            (model.is_multimodal and model.text_config.model_type in PER_REQUEST_ONLY_RULE3):
        # Only the language model attends through the paged cache (JanusModel, DeepseekVLModel lack the flag)
        report.broken = [b for b in report.broken if not b.startswith(RULE_FLAG)]
    report.raise_if_broken()
    for warning in report.warnings:
        logger.warning("%s: %s", report.model_name, warning)
    if report.is_encoder_only and model.runner == "generate" and not is_prefix_lm(model.hf_config):
        raise ValueError(f"{report.model_name} is an encoder-only model (bidirectional attention): it cannot "
                         "generate text. Use runner='pooling' (embed / classify / score).")
    hybrid = bool(state_layers(model.hf_config))
    if model.runner == "pooling":
        return TransformersHybridForPooling if hybrid else TransformersForPooling
    if model.is_multimodal:
        return TransformersHybridForMultimodalLM if hybrid else TransformersForMultimodalLM
    return TransformersHybridForCausalLM if hybrid else TransformersForCausalLM


def check_shell_parallelism(config: EngineConfig) -> None:
    """What the transformers shells cannot split across processes, raised before any worker starts."""
    model, parallel = config.model, config.parallel
    name = type(model.text_config).__name__.replace("Config", "")
    if parallel.world_size > 1 and state_layers(model.hf_config):
        raise ValueError(f"{name} has {', '.join(state_layers(model.hf_config))} layers, whose per-request state the "
                         "transformers shell keeps in a single process: run it with tensor_parallel_size=1 and "
                         "pipeline_parallel_size=1.")
    if parallel.pipeline_parallel_size > 1 and model.is_multimodal:
        raise ValueError(f"{model.hf_config.model_type} is multimodal: the transformers shell runs multimodal models "
                         "with pipeline_parallel_size=1 for now (the encoders' features enter at the first layer); "
                         "tensor parallel works.")
    if parallel.pipeline_parallel_size > 1 and model.runner == "pooling":
        raise ValueError("Pooling models run with pipeline_parallel_size=1 (tensor parallel works).")
