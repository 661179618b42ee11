"""The CPU attention backend: the compiled kernels for bf16 decodes and short prefills, plain PyTorch else (and
for ALiBi, which the kernel does not add, and for windows that keep the prompt, which it does not cut).

bf16 decodes run the `decode_attention` kernel (kernels/csrc/decode_attention.cpp) where this machine has
one: it reads the KV blocks in place instead of gathering each context into a padded copy. The tokens of
short causal prefills go through it too, each as a query of its own; longer prefills go through SDPA, whose
blocked flash kernel reuses keys across queries. New keys and values are written by the `write_kv` kernel.
"""

from __future__ import annotations

import torch

from pagedformers.attention import AttentionMetadata, AttentionParams, LayerKVSpec, register_attention_backend
from pagedformers.attention.torch_backend import TorchAttentionBackend, attend_prefills
from pagedformers.platforms.cpu.kernels import bf16_cpu_kernels, cpu_kernel_isa, cpu_kernels

# Decode graphs replay every op of a step, and each costs a few microseconds, more between weight reads that
# leave the caches cold: where a call needs no slice or no sinks, none is recorded.
_NO_SINKS = torch.empty(0, dtype=torch.float32)


def default_max_kernel_context() -> int:
    """Prefill tokens whose context is at most this long go through the decode kernel (docs/performance.md:
    where the kernel and SDPA cross over on 2 cores, 16 query / 4 KV heads of 64)."""
    return 512 if cpu_kernel_isa() == "avx2" else 1024


class CpuAttentionBackend(TorchAttentionBackend):
    name = "cpu"

    def __init__(self, max_kernel_context: int | None = None) -> None:
        self.max_kernel_context = default_max_kernel_context() if max_kernel_context is None else max_kernel_context

    def write_kv(self, k_cache: torch.Tensor, v_cache: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                 meta: AttentionMetadata) -> None:
        kernels = cpu_kernels() if k_cache.device.type == "cpu" else None
        if (kernels is None or key.dtype != k_cache.dtype or value.dtype != v_cache.dtype
                or key.stride(-1) != 1 or value.stride(-1) != 1):
            super().write_kv(k_cache, v_cache, key, value, meta)
            return
        kernels.write_kv(k_cache, v_cache, key, value, *meta.cache_slots(k_cache.shape[2]))

    def forward(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, k_cache: torch.Tensor | None,
                v_cache: torch.Tensor | None, meta: AttentionMetadata, params: AttentionParams) -> torch.Tensor:
        if not (_kernel_params(params) and kernel_fits(query, k_cache, v_cache)):
            return super().forward(query, key, value, k_cache, v_cache, meta, params)
        out = query.new_empty(query.shape[0], query.shape[1], value.shape[-1])
        runs, covered = meta.single_token_queries(k_cache.shape[2], self.max_kernel_context)
        for start, end, tables, lens in runs:
            cpu_kernels().decode_attention(
                _rows(query, start, end, contiguous=True), k_cache, v_cache, tables, lens,
                _NO_SINKS if params.sinks is None else params.sinks, _rows(out, start, end), params.scale,
                params.window or 0, params.chunk or 0, params.softcap or 0.0)
        attend_prefills(query, key, value, k_cache, v_cache, meta, params, out, skip=covered)
        return out

    def is_shape_static(self, query: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                        meta: AttentionMetadata, params: AttentionParams) -> bool:
        """A decode-only step on the kernel: write_kv and decode_attention, fed the step's metadata tensors."""
        return _kernel_params(params) and meta.num_decodes == meta.num_tokens and kernel_fits(query, k_cache, v_cache)

    def reads_unwritten_rows(self, spec: LayerKVSpec, dtype: torch.dtype) -> bool:
        """The kernel reads written rows only; layers it cannot take run the plain path."""
        return not kernel_attends(spec, dtype)


register_attention_backend("cpu", CpuAttentionBackend)


def _kernel_params(params: AttentionParams) -> bool:
    """Whether the kernel computes what these params ask: it is causal, adds no ALiBi and its window is one range
    (windows that keep the prompt, R-SWA, take the masked plain path)."""
    return params.causal and params.alibi is None and not params.keep_prompt


def kernel_attends(spec: LayerKVSpec, dtype: torch.dtype) -> bool:
    """Whether every decode of a layer with this KV shape runs the `decode_attention` kernel (see kernel_fits)."""
    return spec.head_dim % 32 == 0 and spec.v_head_dim % 16 == 0 and bf16_cpu_kernels(dtype, "cpu") is not None


def kernel_fits(query: torch.Tensor, k_cache: torch.Tensor | None, v_cache: torch.Tensor | None) -> bool:
    """Whether this machine has the `decode_attention` kernel and it handles these shapes and dtypes (bf16 on
    CPU, D % 32, Dv % 16)."""
    return (k_cache is not None and v_cache is not None and query.device.type == "cpu"
            and query.dtype == k_cache.dtype == torch.bfloat16 and query.shape[-1] % 32 == 0
            and v_cache.shape[-1] % 16 == 0 and k_cache.is_contiguous() and v_cache.is_contiguous()
            and cpu_kernels() is not None)


def _rows(t: torch.Tensor, start: int, end: int, contiguous: bool = False) -> torch.Tensor:
    rows = t if start == 0 and end == t.shape[0] else t[start:end]
    return rows.contiguous() if contiguous and not rows.is_contiguous() else rows
