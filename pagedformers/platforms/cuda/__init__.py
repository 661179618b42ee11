"""CUDA devices: attention on the Triton kernels (attention/triton_backend.py) by default, the rest plain PyTorch;
CUDA graphs and more kernels are still to come. Never run on a GPU in CI: the kernels are checked on CPU in
Triton's interpreter, and benchmarks/gpu_check.py checks this path where a GPU is."""

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
        backend = config.device.attention_backend
        if backend == "cpu":
            raise ValueError("attention_backend='cpu' is the CPU's kernels: on CUDA use auto, triton or torch")
        return EagerForward(model, create_attention_backend("triton" if backend == "auto" else backend))

    def default_kv_cache_bytes(self, config: EngineConfig) -> int:
        free, _ = torch.cuda.mem_get_info(torch.device(config.device.device))
        return int(free * KV_CACHE_SHARE)

    def argmax_rows(self, logits: torch.Tensor) -> torch.Tensor:
        return logits.argmax(dim=-1)


PLATFORM = CudaPlatform()
