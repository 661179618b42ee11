"""CUDA devices: the plain PyTorch paths for now (the GPU backend issue adds Triton kernels and CUDA graphs)."""

from __future__ import annotations

import torch

from pagedformers.attention import create_attention_backend
from pagedformers.config import EngineConfig
from pagedformers.model.interface import Model
from pagedformers.platforms.interface import EagerForward, StepForward

KV_CACHE_SHARE = 0.8  # of the memory free once the weights are loaded


class CudaPlatform:
    device_type = "cuda"

    def specialize(self, model: Model, config: EngineConfig) -> StepForward:
        return EagerForward(model, create_attention_backend("torch"))

    def default_kv_cache_bytes(self, config: EngineConfig) -> int:
        free, _ = torch.cuda.mem_get_info(torch.device(config.device.device))
        return int(free * KV_CACHE_SHARE)

    def argmax_rows(self, logits: torch.Tensor) -> torch.Tensor:
        return logits.argmax(dim=-1)


PLATFORM = CudaPlatform()
