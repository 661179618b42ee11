"""The "triton" attention backend: the Triton kernels of triton_kernels.py behind the AttentionBackend protocol.

What the kernels do not cover runs on the plain PyTorch reference, in the same step: the probe run (no cache),
bidirectional layers (encoders attend within the step and keep nothing), chunked attention (Llama 4), windows
that keep the prompt (R-SWA: the kernel's window is one range) and the
prefill spans with bidirectional ranges (Gemma 3's images: their masks are built per span).
Imported on first use (attention/backends.py): Triton decides at import whether its kernels are interpreted.
"""

from __future__ import annotations

import sys

import torch
import triton

from pagedformers.attention.backends import AttentionParams, register_attention_backend
from pagedformers.attention.kv_cache import LayerKVSpec
from pagedformers.attention.metadata import AttentionMetadata
from pagedformers.attention.torch_backend import TorchAttentionBackend, attend_prefills
from pagedformers.attention.triton_kernels import paged_attention_kernel, write_kv_kernel


class TritonAttentionBackend:
    name = "triton"

    def __init__(self) -> None:
        self.reference = TorchAttentionBackend()

    def write_kv(self, k_cache: torch.Tensor, v_cache: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                 meta: AttentionMetadata) -> None:
        key, value = _last_dim_contiguous(key.to(k_cache.dtype)), _last_dim_contiguous(value.to(v_cache.dtype))
        num_tokens, num_kv_heads, head_dim = key.shape
        write_kv_kernel[(num_tokens, num_kv_heads)](
            key, value, k_cache, v_cache, meta.slot_mapping, key.stride(0), key.stride(1), value.stride(0),
            value.stride(1), *k_cache.stride()[:3], *v_cache.stride()[:3], BLOCK_SIZE=k_cache.shape[2],
            HEAD_DIM=head_dim, D_PAD=_pad(head_dim), V_DIM=value.shape[2], DV_PAD=_pad(value.shape[2]))

    def forward(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, k_cache: torch.Tensor | None,
                v_cache: torch.Tensor | None, meta: AttentionMetadata, params: AttentionParams) -> torch.Tensor:
        if k_cache is None or not params.causal or params.chunk is not None or params.keep_prompt:
            return self.reference.forward(query, key, value, k_cache, v_cache, meta, params)
        query = _last_dim_contiguous(query.to(k_cache.dtype))
        num_heads, num_kv_heads = query.shape[1], k_cache.shape[1]
        group = num_heads // num_kv_heads
        out = query.new_empty(query.shape[0], num_heads, v_cache.shape[-1])
        # Every row but those of bidirectional spans: prefill keys are written before attention.
        runs, covered = meta.single_token_queries(k_cache.shape[2], sys.maxsize)
        dummy = query.new_zeros(1)
        for first, end, tables, lens in runs:
            tables = tables.contiguous()
            paged_attention_kernel[(end - first, num_kv_heads)](
                out, query, k_cache, v_cache, tables, lens,
                params.sinks if params.sinks is not None else dummy,
                params.alibi if params.alibi is not None else dummy,
                first, query.stride(0), query.stride(1), out.stride(0), out.stride(1), *k_cache.stride()[:3],
                *v_cache.stride()[:3], tables.stride(0), params.scale, params.softcap or 1.0, params.window or 0,
                GROUP=group, GROUP_PAD=max(16, triton.next_power_of_2(group)), HEAD_DIM=query.shape[2],
                D_PAD=_pad(query.shape[2]), V_DIM=v_cache.shape[-1], DV_PAD=_pad(v_cache.shape[-1]),
                BLOCK_SIZE=k_cache.shape[2], USE_SOFTCAP=params.softcap is not None,
                USE_WINDOW=params.window is not None, USE_SINKS=params.sinks is not None,
                USE_ALIBI=params.alibi is not None)
        attend_prefills(query, key, value, k_cache, v_cache, meta, params, out, skip=covered)
        return out

    def is_shape_static(self, query: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                        meta: AttentionMetadata, params: AttentionParams) -> bool:
        # Decodes alone on the kernels read the metadata's tensors, launched on grids of their shapes (a CUDA graph
        # records the launches); prefill spans and the reference path are planned in Python per step
        return (meta.num_decodes == meta.num_tokens and params.causal and params.chunk is None
                and not params.keep_prompt)

    def reads_unwritten_rows(self, spec: LayerKVSpec, dtype: torch.dtype) -> bool:
        return False  # loads past a sequence's length are masked to zero, never read


register_attention_backend("triton", TritonAttentionBackend)


def _pad(dim: int) -> int:
    return max(16, triton.next_power_of_2(dim))  # tl.dot wants 16 or more on GPUs


def _last_dim_contiguous(x: torch.Tensor) -> torch.Tensor:
    return x if x.stride(-1) == 1 else x.contiguous()
