"""The CPU platform: compiled kernels (kernels/), layers swapped for them after loading (quantized_linear.py,
linear.py, rms_norm.py, gated_mlp.py, experts.py), their weights on huge pages (huge_pages.py), an attention backend
on the kernels (attention.py), and decode steps replayed from traced graphs (decode_graphs.py, graph_rewrites.py)."""

from __future__ import annotations

import torch

from pagedformers import envs
from pagedformers.attention import create_attention_backend
from pagedformers.config import EngineConfig
from pagedformers.logger import init_logger
from pagedformers.model.interface import Model
from pagedformers.platforms.cpu import attention as _attention  # noqa: F401 (registers the "cpu" backend)
from pagedformers.platforms.cpu.decode_graphs import DecodeGraphs
from pagedformers.platforms.cpu.experts import pack_grouped_linears
from pagedformers.platforms.cpu.gated_mlp import fuse_gated_mlps
from pagedformers.platforms.cpu.kernels import (
    argmax_rows,
    bf16_cpu_kernels,
    cpu_kernels,
    draw_rows,
    draws_rows,
    host_float,
)
from pagedformers.platforms.cpu.linear import pack_linears, record_siblings, set_linear_factories
from pagedformers.platforms.cpu.quantized_linear import swap_quantized_linears
from pagedformers.platforms.cpu.rms_norm import fuse_rms_norms
from pagedformers.platforms.interface import EagerForward, StepForward, replays_decodes

logger = init_logger(__name__)

_GiB = 1 << 30
KV_CACHE_SHARE, KV_CACHE_MAX = 0.3, 4 * _GiB  # of the memory available once the weights are loaded


class CpuPlatform:
    device_type = "cpu"
    draws_on_device = False  # the logits are on the host already: the sampler draws there

    def specialize(self, model: Model, config: EngineConfig) -> StepForward:
        """Norms, then linears (packed once, siblings that a probe saw take one input sharing one matmul), then
        SwiGLU MLPs on the kernels; decode steps on traced graphs where they can be."""
        dtype = config.model.dtype
        kernels = cpu_kernels()  # built (once, ~1 min) or loaded now, at load, rather than within the first step
        _swap_quantized_linears(model, kernels)
        fuse_rms_norms(model, dtype)
        with record_siblings(model) as siblings:
            model.kv_cache_specs()
        if config.device.linear_backend == "pagedformers" and bf16_cpu_kernels(dtype, "cpu") is None:
            logger.warning("linear_backend='pagedformers': the kernel runs bf16 on x86 CPUs with AVX2 or AVX-512 "
                           "only; this model's %s linears run on oneDNN.", dtype)
        set_linear_factories(model, dtype, "cpu", config.device.linear_backend)
        pack_linears(model, dtype, "cpu", siblings, config.device.linear_backend)
        pack_grouped_linears(model, dtype, "cpu")
        fuse_gated_mlps(model, dtype, "cpu")
        backend = _attention_backend(config)
        attention = create_attention_backend(backend)
        if backend == "cpu" and replays_decodes(model, config):
            return DecodeGraphs(model, attention)
        return EagerForward(model, attention)

    def default_kv_cache_bytes(self, config: EngineConfig) -> int:
        with open("/proc/meminfo") as f:
            available = next(int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable"))
        return min(int(available * KV_CACHE_SHARE), KV_CACHE_MAX)

    def host_logits(self, logits: torch.Tensor) -> torch.Tensor:
        return host_float(logits)

    def argmax_rows(self, logits: torch.Tensor) -> torch.Tensor:
        return argmax_rows(logits)

    def draw_rows(self, logits: torch.Tensor, table: torch.Tensor, token_ids: torch.Tensor) -> None:
        draw_rows(logits, table, token_ids)

    def draws_plain_rows(self, logits: torch.Tensor) -> bool:
        return draws_rows(logits)


def _swap_quantized_linears(model: Model, kernels: object | None) -> None:
    if not getattr(model, "quantized_weights", None):
        return
    if kernels is None:
        logger.warning("The checkpoint's quantized weights run dequantized: this CPU has no kernels for them "
                       "(x86-64 with AVX2 or AVX-512 needed).")
        model.quantized_weights = {}
        return
    logger.info("%d linears run on their weights kept quantized.", swap_quantized_linears(model, kernels))


def _attention_backend(config: EngineConfig) -> str:
    backend = config.device.attention_backend
    if backend == "triton":
        if not envs.triton_interpret():
            raise ValueError("attention_backend='triton' on a CPU runs the Triton kernels in Triton's interpreter: set "
                             "TRITON_INTERPRET=1 before starting (slow: for checking the kernels, not for speed)")
        if config.model.dtype != torch.float32:
            raise ValueError("attention_backend='triton' on a CPU needs dtype='float32': Triton's interpreter "
                             "computes bfloat16 dots wrongly")
    return "cpu" if backend == "auto" else backend


PLATFORM = CpuPlatform()
