"""EngineConfig: the resolved, frozen configuration of one engine, in sub-configs by concern.

Stage three of three: every value is final ("auto" resolved, defaults applied). Built by
`resolve()` (config/resolve.py) from `EngineArgs` and the model's files; copied per rank with
`dataclasses.replace`, never edited.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from typing import Literal

import torch
from transformers import PretrainedConfig

from pagedformers.config.args import EngineArgs, ModelImpl
from pagedformers.config.pooler import PoolerConfig

PoolingHead = Literal["embed", "classify", "token_classify"]


@dataclass(frozen=True)
class ModelConfig:
    name: str  # what the user asked for (a directory, a .gguf file, a Hub id)
    path: str  # the local directory holding its config, weights and tokenizer files
    gguf_file: str | None  # a GGUF file inside `path`, when the weights come as GGUF
    tokenizer_path: str
    tokenizer_gguf_file: str | None  # the GGUF file holding the tokenizer (the model's, unless one was given)
    hf_config: PretrainedConfig = field(repr=False)  # NOTE: shared; a model that patches it patches a copy
    dtype: torch.dtype
    max_model_len: int
    runner: Literal["generate", "pooling"]
    pooling_head: PoolingHead | None  # runner "pooling": what its head computes
    pooler_config: PoolerConfig | None  # runner "pooling": the user's settings over the checkpoint's
    model_impl: ModelImpl
    trust_remote_code: bool
    seed: int
    check_hf_parity: bool = True  # the load-time guard (engine/parity_guard.py)
    quantization: Literal["gguf", "compressed-tensors"] | None = None  # the checkpoint's quantized linears stay so

    @property
    def text_config(self) -> PretrainedConfig:
        return self.hf_config.get_text_config()

    @property
    def architectures(self) -> list[str]:
        return list(getattr(self.hf_config, "architectures", None) or [])

    @property
    def is_multimodal(self) -> bool:
        return is_multimodal_config(self.hf_config)


# Families whose root config is the text model's and also holds an image encoder's, whose images the multimodal
# shell takes (adapter/multimodal.py's IMAGE_FAMILIES): Chameleon's VQ model, IDEFICS's vision tower and perceiver.
ROOT_TEXT_IMAGE_FAMILIES = frozenset({"chameleon", "idefics"})


def is_multimodal_config(hf_config: PretrainedConfig) -> bool:
    """A checkpoint whose text model has a config of its own (encoders beside it), or one of
    ROOT_TEXT_IMAGE_FAMILIES: the multimodal shell serves it."""
    return hf_config.get_text_config() is not hf_config or hf_config.model_type in ROOT_TEXT_IMAGE_FAMILIES


@dataclass(frozen=True)
class CacheConfig:
    block_size: int
    kv_cache_memory_bytes: int | None  # None: the platform's share of the free memory
    enable_prefix_caching: bool


@dataclass(frozen=True)
class SchedulerConfig:
    max_num_seqs: int
    max_num_batched_tokens: int


@dataclass(frozen=True)
class ParallelConfig:
    tensor_parallel_size: int = 1
    pipeline_parallel_size: int = 1
    data_parallel_size: int = 1
    distributed_timeout_s: float = 60.0
    distributed_executor_backend: str = "mp"  # how ranks start: processes here (mp) or Ray actors (ray)

    @property
    def world_size(self) -> int:
        """Processes of one engine replica (tensor x pipeline); data-parallel replicas are engines of their own."""
        return self.tensor_parallel_size * self.pipeline_parallel_size


@dataclass(frozen=True)
class DeviceConfig:
    device: str  # "cpu", "cuda" or "cuda:N"
    enforce_eager: bool  # no captured graphs: every step runs the model's own forward
    attention_backend: str = "auto"  # which kernels attend; "auto": the platform's choice
    gpu_memory_utilization: float = 0.9  # on a GPU: the share of its memory the engine may use
    linear_backend: str = "auto"  # on a CPU: the bf16 linears' matmul; "auto": measured at load

    @property
    def type(self) -> str:
        """"cpu" or "cuda": which platform runs the model."""
        return torch.device(self.device).type


@dataclass(frozen=True)
class LoRAConfig:
    enabled: bool = False
    max_loras: int = 1  # adapter slots: most distinct adapters among the running requests
    max_lora_rank: int = 16


@dataclass(frozen=True)
class EngineConfig:
    model: ModelConfig
    cache: CacheConfig
    scheduler: SchedulerConfig
    parallel: ParallelConfig
    device: DeviceConfig
    args: EngineArgs = field(repr=False)  # what the user gave: how another process rebuilds this config
    lora: LoRAConfig = LoRAConfig()

    def local_args(self) -> EngineArgs:
        """The arguments with every source already on this machine, for worker and replica processes: they
        rebuild the config themselves (remote-code config classes do not unpickle in a fresh process), without
        downloading anything again."""
        model = os.path.join(self.model.path, self.model.gguf_file) if self.model.gguf_file else self.model.path
        tokenizer = self.model.tokenizer_path if self.args.tokenizer is not None else None
        return dataclasses.replace(self.args, model=model, gguf_file=None, tokenizer=tokenizer)
