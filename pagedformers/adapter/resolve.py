"""Which implementation runs a model: a native override or the transformers shell."""

from __future__ import annotations

from typing import TYPE_CHECKING

from transformers import AutoModel

from pagedformers.adapter.compat import is_backend_compatible
from pagedformers.config import EngineConfig
from pagedformers.logger import init_logger
from pagedformers.native_overrides import NATIVE_MODELS

if TYPE_CHECKING:
    from torch import nn

logger = init_logger(__name__)


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
    try:
        return AutoModel._model_mapping[type(hf_config)]
    except KeyError:
        raise ValueError(
            f"transformers has no base model (AutoModel) for config type {type(hf_config).__name__} "
            f"(model_type={getattr(hf_config, 'model_type', None)!r}); it cannot be served."
        ) from None


def resolve_model_cls(config: EngineConfig) -> type[nn.Module]:
    architectures = getattr(config.model.hf_config, "architectures", None) or []
    native = next((NATIVE_MODELS[a] for a in architectures if a in NATIVE_MODELS), None)
    is_remote = bool(getattr(config.model.hf_config, "auto_map", None)) and config.model.trust_remote_code
    if config.model.model_impl == "native" or (config.model.model_impl == "auto" and native and not is_remote):
        if native is None:
            raise ValueError(
                f"model_impl='native' was asked for, but no native implementation is registered for "
                f"{architectures or 'this config'} (native: {sorted(NATIVE_MODELS) or 'none yet'}). "
                "Use model_impl='auto' or 'transformers' to run it through the transformers shell."
            )
        logger.info("Using the native implementation %s for %s.", native.__name__, architectures)
        return native
    from pagedformers.adapter.causal import TransformersForCausalLM
    from pagedformers.adapter.multimodal import TransformersForMultimodalLM
    from pagedformers.adapter.pooling import TransformersForPooling

    is_multimodal = config.model.hf_config.get_text_config() is not config.model.hf_config
    if is_multimodal and config.model.runner == "pooling":
        raise ValueError(
            f"{architectures or config.model.hf_config.model_type} is a multimodal model: the transformers shell serves "
            "it with runner='generate' only (TransformersForMultimodalLM); pooling needs a text-only checkpoint.")
    report = is_backend_compatible(base_model_class(config), config.model.hf_config, config.model.trust_remote_code)
    report.raise_if_broken()
    for warning in report.warnings:
        logger.warning("%s: %s", report.model_name, warning)
    if report.is_encoder_only and config.model.runner == "generate":
        raise ValueError(f"{report.model_name} is an encoder-only model (bidirectional attention): it cannot "
                         "generate text. Use runner='pooling' (embed / classify / score).")
    shell = TransformersForPooling if config.model.runner == "pooling" else \
        TransformersForMultimodalLM if is_multimodal else TransformersForCausalLM
    reason = "as asked" if config.model.model_impl == "transformers" else "no native implementation is registered"
    name = architectures or config.model.hf_config.model_type
    logger.info("Using %s for %s (%s).", shell.__name__, name, reason)
    return shell
