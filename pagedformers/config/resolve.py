"""resolve(): EngineArgs + what the model's files say -> EngineConfig. Pure: the files are read (and
downloaded) by `loading.model_files`, which calls this; the same inputs always give the same config."""

from __future__ import annotations

from typing import Any, NamedTuple

import torch
from transformers import PretrainedConfig

from pagedformers.config.args import EngineArgs
from pagedformers.config.engine_config import (
    CacheConfig,
    DeviceConfig,
    EngineConfig,
    LoRAConfig,
    ModelConfig,
    ParallelConfig,
    PoolingHead,
    SchedulerConfig,
    is_multimodal_config,
)
from pagedformers.config.pooler import PoolerConfig
from pagedformers.config.quantization import packed_scheme

_DTYPES = {
    "float32": torch.float32, "float": torch.float32, "fp32": torch.float32,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
    "float16": torch.float16, "half": torch.float16, "fp16": torch.float16,
}
# Attributes that different model families use for their context length.
_MAX_LEN_KEYS = ("max_position_embeddings", "n_positions", "max_seq_len", "seq_length", "max_sequence_length")
_DEFAULT_MAX_MODEL_LEN = 2048
_GENERATE_SUFFIXES = ("ForCausalLM", "LMHeadModel", "ForConditionalGeneration", "ForVisionText2Text")  # IDEFICS


class ModelFiles(NamedTuple):
    """What `loading` read for a model: where it lives and what its files say."""
    path: str  # local directory
    gguf_file: str | None
    tokenizer_path: str
    hf_config: PretrainedConfig  # hf_overrides applied
    sentence_transformers: dict[str, Any]  # loading/sentence_transformers.py: {} when the files are absent


def resolve(args: EngineArgs, files: ModelFiles, cuda_available: bool) -> EngineConfig:
    device = _resolve_device(args.device, cuda_available)
    runner, head = _resolve_runner(args, files.hf_config)
    pooler = None
    max_model_len = args.max_model_len
    if runner == "pooling":
        st = files.sentence_transformers
        pooler = PoolerConfig.from_value(args.pooler_config).merged(st)
        if max_model_len is None and "max_seq_length" in st:
            max_model_len = st["max_seq_length"]
    dtype = _resolve_dtype(args.dtype, files.hf_config, device)
    model = ModelConfig(
        name=args.model, path=files.path, gguf_file=files.gguf_file, tokenizer_path=files.tokenizer_path,
        tokenizer_gguf_file=files.gguf_file if args.tokenizer is None else None,
        hf_config=files.hf_config, dtype=dtype,
        max_model_len=_resolve_max_model_len(max_model_len, files.hf_config), runner=runner, pooling_head=head,
        pooler_config=pooler, model_impl=args.model_impl, trust_remote_code=args.trust_remote_code, seed=args.seed,
        check_hf_parity=not args.skip_hf_parity_check, quantization=_resolve_quantization(args, files, device, dtype))
    return EngineConfig(
        model=model,
        cache=CacheConfig(args.block_size, args.kv_cache_memory_bytes, args.enable_prefix_caching),
        scheduler=SchedulerConfig(args.max_num_seqs, args.max_num_batched_tokens or _default_token_budget(device)),
        parallel=ParallelConfig(args.tensor_parallel_size, args.pipeline_parallel_size, args.data_parallel_size,
                                args.distributed_timeout_s, args.distributed_executor_backend),
        device=DeviceConfig(device, args.enforce_eager, args.attention_backend, args.gpu_memory_utilization,
                            args.linear_backend),
        args=args,
        lora=_resolve_lora(args, runner, files.hf_config),
    )


def _resolve_lora(args: EngineArgs, runner: str, hf_config: PretrainedConfig) -> LoRAConfig:
    if not args.enable_lora:
        return LoRAConfig()
    if runner == "pooling" or is_multimodal_config(hf_config):
        raise ValueError("enable_lora=True runs text generation models only (not pooling or multimodal ones) yet")
    if args.data_parallel_size > 1:
        raise ValueError("enable_lora=True with data_parallel_size > 1 is not supported yet")
    return LoRAConfig(True, args.max_loras, args.max_lora_rank)


def _resolve_runner(args: EngineArgs, hf_config: PretrainedConfig) -> tuple[str, PoolingHead | None]:
    arch = (getattr(hf_config, "architectures", None) or [""])[0]
    converting = args.convert not in ("auto", "none")
    runner = args.runner
    if runner == "auto":
        runner = "pooling" if converting or (arch and not _is_generative(arch)) else "generate"
    if runner != "pooling":
        return runner, None
    if arch.endswith("ForTokenClassification"):
        return runner, "token_classify"
    if arch.endswith("ForSequenceClassification") or args.convert in ("classify", "reward"):
        return runner, "classify"
    return runner, "embed"


def _is_generative(architecture: str) -> bool:
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    return architecture.endswith(_GENERATE_SUFFIXES) or architecture in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values()


def _default_token_budget(device: str) -> int:
    # On CPU a smaller budget wins: with 32 prompts of 128 tokens, 2048 lets the second half prefill
    # while the first half already decodes (docs/performance.md).
    return 2048 if device == "cpu" else 4096


def _resolve_device(device: str, cuda_available: bool) -> str:
    if device == "auto":
        return "cuda" if cuda_available else "cpu"
    if device.startswith("cuda") and not cuda_available:
        raise ValueError(f"device={device!r} was asked for, but torch sees no CUDA device")
    return device


def _resolve_dtype(dtype: str | torch.dtype, hf_config: PretrainedConfig, device: str) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype != "auto":
        if dtype not in _DTYPES:
            raise ValueError(f"dtype={dtype!r} is not one of {['auto', *_DTYPES]}")
        return _DTYPES[dtype]
    config_dtype = getattr(hf_config.get_text_config(), "dtype", None) or getattr(hf_config, "dtype", None)
    if isinstance(config_dtype, str):
        config_dtype = _DTYPES.get(config_dtype, None)
    if config_dtype not in (torch.float32, torch.bfloat16, torch.float16):
        return torch.float32
    if config_dtype == torch.float16 and device == "cpu":
        return torch.bfloat16  # CPUs have bf16 kernels (AVX-512/AMX) but slow fp16 ones.
    return config_dtype


def _resolve_quantization(args: EngineArgs, files: ModelFiles, device: str, dtype: torch.dtype) -> str | None:
    """The checkpoint's quantization format ("gguf", "compressed-tensors") where its linears can stay quantized: one
    rank on a CPU without LoRA (the kernel's home; a tensor-parallel rank would need its shard of every group); else
    None, and the weights are dequantized at load. A format this cannot read is refused by name."""
    stored = _stored_quantization(files)
    if args.quantization == "none" or (args.quantization is None and stored is None):
        return None
    why_not = ("the checkpoint is not quantized" if stored is None
               else f"the checkpoint is {stored}" if args.quantization not in (None, stored)
               else f"device {device!r} has no quantized kernels (CPU only)" if device != "cpu"
               else "tensor_parallel_size > 1 (a rank's shard of quantized groups)" if args.tensor_parallel_size > 1
               else "enable_lora (LoRA layers wrap every linear)" if args.enable_lora
               else f"dtype {dtype} (the kernel takes float32 or bfloat16 activations)"
               if dtype not in (torch.float32, torch.bfloat16)
               else None)
    if why_not is None:
        return stored
    if args.quantization is not None:
        advice = " Use quantization='none' to dequantize it." if stored else ""
        raise ValueError(f"quantization={args.quantization!r} cannot run here: {why_not}.{advice}")
    return None


def _stored_quantization(files: ModelFiles) -> str | None:
    if files.gguf_file is not None:
        return "gguf"
    config = getattr(files.hf_config, "quantization_config", None)
    if not config:
        return None
    method = config.get("quant_method") if isinstance(config, dict) else getattr(config, "quant_method", config)
    if method == "compressed-tensors":
        packed_scheme(config)  # raises, naming what it cannot run
        return "compressed-tensors"
    raise ValueError(f"The checkpoint is quantized with {str(method)!r} (config.json's quantization_config): "
                     "pagedformers runs GGUF files and compressed-tensors W4A16 / W8A16 checkpoints; use the "
                     "model's unquantized checkpoint or one of those.")


def _resolve_max_model_len(requested: int | None, hf_config: PretrainedConfig) -> int:
    text_config = hf_config.get_text_config()
    limits = [getattr(text_config, key) for key in _MAX_LEN_KEYS if isinstance(getattr(text_config, key, None), int)]
    derived = min(limits) if limits else None
    if requested is None:
        return derived or _DEFAULT_MAX_MODEL_LEN
    if derived is not None and requested > derived:
        raise ValueError(
            f"max_model_len={requested} is larger than the model's context length {derived} "
            f"(from its config). Pass max_model_len <= {derived}."
        )
    return requested
