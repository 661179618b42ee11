"""load_model: the build sequence of a model, once per rank, and the choice of implementation before it.

    select_model_class   a native override (native_overrides/) or a transformers shell (adapter/)
    cls(config, parallel) the model on the meta device, split for this rank (tensor shards, pipeline stage)
    load_weights         this rank's tensors from the checkpoint (with enable_lora: then linears wrapped in LoRA layers)
    platform.specialize  the device's fast path: layer swaps, kernels, graph capture (platforms/)
    kv_cache_specs       every attention layer's K/V shape, from a probe forward
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from pagedformers.adapter.resolve import check_shell_parallelism, shell_class
from pagedformers.config import EngineConfig
from pagedformers.loading.source import ModelSource
from pagedformers.logger import init_logger
from pagedformers.lora.model import LoRAModel, record_loaders
from pagedformers.model.interface import KVCacheSpecs, Model, SupportsPP
from pagedformers.native_overrides import NATIVE_MODELS, native_model_class
from pagedformers.parallel_plans import SINGLE, ParallelState, check_parallel_config
from pagedformers.platforms import Platform, StepForward, get_platform

logger = init_logger(__name__)


class LoadedModel(NamedTuple):
    model: Model  # what apply_model sees
    forward: StepForward  # how a worker runs it (the platform's fast path)
    kv_specs: KVCacheSpecs
    platform: Platform
    lora: LoRAModel | None  # the adapter slots, with enable_lora


def load_model(config: EngineConfig, parallel: ParallelState = SINGLE) -> LoadedModel:
    torch.manual_seed(config.model.seed)  # anything initialised rather than loaded comes out the same on every rank
    model = select_model_class(config)(config, parallel)
    if not isinstance(model, Model):
        raise TypeError(f"{type(model).__name__} does not implement the model contract (model/interface.py's Model)")
    if parallel.pp_size > 1 and not isinstance(model, SupportsPP):
        raise ValueError(f"{type(model).__name__} does not split into pipeline stages: use pipeline_parallel_size=1.")
    loaders = record_loaders(model) if config.lora.enabled else None
    model.load_weights(ModelSource(config.model.path, config.model.gguf_file))
    lora = None
    if loaders is not None:  # before the platform: it then packs the base linears inside the LoRA layers
        lora = LoRAModel(model, loaders, config.lora.max_loras, config.lora.max_lora_rank,
                         tuple(getattr(model, "skipped_prefixes", ())))
    platform = get_platform(config.device.type)
    forward = platform.specialize(model, config)
    return LoadedModel(model, forward, model.kv_cache_specs(), platform, lora)


def select_model_class(config: EngineConfig) -> type[Model]:
    """The native override when one is registered (model_impl "auto" or "native"), else the transformers shell."""
    model = config.model
    name = model.architectures or model.hf_config.model_type
    native = native_model_class(model.architectures, model.hf_config.model_type)
    if uses_native(config):
        logger.info("Using the native implementation %s for %s (%s).", native.__name__, name,
                    "as asked" if model.model_impl == "native" else "registered for it, and preferred by 'auto'")
        return native
    try:
        shell = shell_class(config)
    except ValueError as e:
        if native is None:
            raise
        reason = native.unsupported(config)
        advice = f"The native {native.__name__} cannot run it either: {reason}." if reason else \
            f"A native implementation is registered for {name}: use model_impl='auto' or 'native'."
        raise ValueError(f"{e}\n{advice}") from None
    reason = "as asked" if model.model_impl == "transformers" else "no native implementation is registered"
    if native is not None and model.model_impl == "auto":
        reason = native.unsupported(config) or "remote code: the checkpoint's own modeling code runs"
        reason = f"not the native {native.__name__}: {reason}"
    logger.info("Using %s for %s (%s).", shell.__name__, name, reason)
    return shell


def uses_native(config: EngineConfig) -> bool:
    """model_impl "native", or "auto" where a native implementation is registered, can run this config, and no
    remote code would run instead.

    Raises:
        ValueError: "native" was asked for and cannot be (none registered, naming those that are; or why the one
            registered cannot run this config).
    """
    model = config.model
    native = native_model_class(model.architectures, model.hf_config.model_type)
    reason = native.unsupported(config) if native is not None else None
    if model.model_impl == "native":
        name = model.architectures or model.hf_config.model_type
        if native is None:
            raise ValueError(
                f"model_impl='native' was asked for, but no native implementation is registered for {name} "
                f"(registered: {', '.join(sorted(NATIVE_MODELS))}). Use model_impl='auto' or 'transformers' to run "
                "it through the transformers shell.")
        if reason:
            raise ValueError(f"The native {native.__name__} cannot run this model: {reason}. Use model_impl='auto' "
                             "or 'transformers' to run it through the transformers shell.")
        return True
    is_remote = bool(getattr(model.hf_config, "auto_map", None)) and model.trust_remote_code
    return model.model_impl == "auto" and native is not None and not reason and not is_remote


def check_parallel(config: EngineConfig) -> None:
    """The parallel setups that cannot work, raised before any worker process starts."""
    parallel = config.parallel
    if not uses_native(config):
        select_model_class(config)  # the shell's refusal, or why neither implementation can run it
        check_shell_parallelism(config)
        check_parallel_config(config.model.text_config, parallel.tensor_parallel_size,
                              parallel.pipeline_parallel_size)
