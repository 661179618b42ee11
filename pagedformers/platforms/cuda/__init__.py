"""CUDA devices: attention on the Triton kernels (attention/triton_backend.py) by default; RMSNorm, SwiGLU MLPs
(layers.py), and in the native models the residual add with its norm, the rotary embedding (rotary.py) and the
experts' grouped matmuls (moe.py) swapped for Triton kernels; greedy picks and draws on Triton kernels (sampling.py:
the logits stay on the GPU); the rest plain PyTorch; decode steps replayed from CUDA graphs (graphs.py). Never run
on a GPU in CI: the kernels are checked on CPU in Triton's interpreter (float32), and benchmarks/gpu_check.py checks
this path where a GPU is (benchmarks/cuda_kernels_check.py: the native models' op kernels in bf16)."""

from __future__ import annotations

import torch
from torch import nn

from pagedformers.attention import create_attention_backend
from pagedformers.config import EngineConfig
from pagedformers.model.interface import Model
from pagedformers.platforms.cuda import sampling
from pagedformers.platforms.cuda.graphs import Capture, CudaGraphs, capture_bucket_sizes, capture_cuda_graph
from pagedformers.platforms.cuda.layers import swap_gated_mlps, swap_residual_norms, swap_rms_norms
from pagedformers.platforms.cuda.moe import swap_grouped_linears
from pagedformers.platforms.cuda.rotary import swap_rotaries
from pagedformers.platforms.interface import EagerForward, StepForward, replays_decodes


class CudaPlatform:
    device_type = "cuda"
    draws_on_device = True

    def specialize(self, model: Model, config: EngineConfig) -> StepForward:
        backend = config.device.attention_backend
        if backend == "cpu":
            raise ValueError("attention_backend='cpu' is the CPU's kernels: on CUDA use auto, triton or torch")
        block = config.cache.block_size
        if backend in ("auto", "triton") and (block < 16 or block & (block - 1)):
            raise ValueError(f"block_size={block}: the Triton attention kernels need a power of two of at least 16 "
                             "(tl.dot's smallest tile); or use attention_backend='torch'")
        device = torch.device(config.device.device)
        if device.index is not None:  # Triton launches and graph captures go to the current device
            torch.cuda.set_device(device)
        swap_layers(model)
        attention = create_attention_backend("triton" if backend == "auto" else backend)
        # Padding rows of a captured batch write to slot -1, which only the Triton write kernel skips
        if attention.name == "triton" and replays_decodes(model, config):
            return CudaGraphs(model, attention, self.graph_capture(config),
                              capture_bucket_sizes(config.scheduler.max_num_seqs), config.model.max_model_len,
                              config.cache.block_size, device)
        return EagerForward(model, attention)

    def graph_capture(self, config: EngineConfig) -> Capture:
        """How decode graphs are captured: on the engine's device, every bucket's graph in one memory pool."""
        with torch.cuda.device(torch.device(config.device.device)):
            return capture_cuda_graph(torch.cuda.graph_pool_handle())

    def default_kv_cache_bytes(self, config: EngineConfig) -> int:
        free, total = torch.cuda.mem_get_info(torch.device(config.device.device))
        return kv_cache_budget(free, total, config.device.gpu_memory_utilization)

    def host_logits(self, logits: torch.Tensor) -> torch.Tensor:
        return logits.float().cpu()  # never asked: draws_on_device

    def argmax_rows(self, logits: torch.Tensor) -> torch.Tensor:
        return sampling.argmax_rows(logits)

    def draw_rows(self, logits: torch.Tensor, table: torch.Tensor, token_ids: torch.Tensor) -> None:
        sampling.draw_rows(logits, table, token_ids)

    def draws_plain_rows(self, logits: torch.Tensor) -> bool:
        return False  # never asked: the logits stay on the GPU, where draw_rows takes every row


def swap_layers(model: nn.Module) -> tuple[int, int, int, int, int]:
    """Every layer swap of the platform, each kept only where its kernel matches the module's own forward: how
    many RMSNorms, residual add + norms, SwiGLU MLPs, rotaries and grouped linears run on a kernel."""
    return (swap_rms_norms(model), swap_residual_norms(model), swap_gated_mlps(model), swap_rotaries(model),
            swap_grouped_linears(model))


def kv_cache_budget(free: int, total: int, utilization: float) -> int:
    """vLLM's rule: the engine may hold `utilization` of the device's memory; the KV cache gets what the weights
    and everything else in use (this process's and others') leave of it."""
    budget = int(total * utilization) - (total - free)
    if budget <= 0:
        raise ValueError(f"gpu_memory_utilization={utilization} leaves no room for the KV cache: {total - free} of "
                         f"{total} bytes are in use already (raise it, or free the device)")
    return budget


PLATFORM = CudaPlatform()
