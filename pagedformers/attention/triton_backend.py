"""The "triton" attention backend: the Triton kernels of triton_kernels.py (the KV write, the decodes) and
triton_prefill.py (the prefill spans, in query tiles) behind the AttentionBackend protocol.

What the kernels do not cover runs on the plain PyTorch reference, in the same step: the probe run (no cache),
bidirectional layers (encoders attend within the step and keep nothing), chunked attention (Llama 4), windows
that keep the prompt (R-SWA: the kernel's window is one range) and the prefill spans whose bidirectional ranges
hold runs (Molmo2); plain ranges (Gemma 3's images) are the tiled kernel's.
The decodes' launch (grid, splits) follows from shapes and host-side ints of the metadata alone, never a tensor's
value: a decode step can be captured in a CUDA graph.
Imported on first use (attention/backends.py): Triton decides at import whether its kernels are interpreted.
"""

from __future__ import annotations

import torch
import triton

from pagedformers.attention.backends import AttentionParams, register_attention_backend
from pagedformers.attention.kv_cache import LayerKVSpec
from pagedformers.attention.metadata import AttentionMetadata, PrefillTiles
from pagedformers.attention.torch_backend import TorchAttentionBackend, attend_prefills
from pagedformers.attention.triton_kernels import merge_splits_kernel, paged_attention_kernel, write_kv_kernel
from pagedformers.attention.triton_prefill import prefill_tiles_kernel

TARGET_PROGRAMS = 128  # about one program per SM of a large GPU (an H100 has 132)
MIN_SPLIT_TOKENS = 512  # shorter splits would cost more in the merge than they save


def decode_splits(rows: int, kv_heads: int, context_len: int) -> int:
    """How many splits the decodes' contexts are cut into: enough that rows * kv_heads * splits programs fill
    TARGET_PROGRAMS, none shorter than MIN_SPLIT_TOKENS of the longest context (`context_len`)."""
    programs = rows * kv_heads
    if programs >= TARGET_PROGRAMS:
        return 1
    return max(1, min(triton.cdiv(TARGET_PROGRAMS, programs), context_len // MIN_SPLIT_TOKENS))


class TritonAttentionBackend:
    name = "triton"

    def __init__(self, tile_rows: int = 64, tile_keys: int = 32, splits: int | None = None) -> None:
        self.reference = TorchAttentionBackend()
        self.tile_rows = tile_rows  # BLOCK_M of the prefill tiles: query tokens times the heads of a KV head
        self.tile_keys = tile_keys  # TILE_N: the keys a prefill tile's step takes (vLLM's prefill tile: 32)
        self.splits = splits  # the decodes' splits; None: decode_splits' rule

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
        out = query.new_empty(query.shape[0], query.shape[1], v_cache.shape[-1])
        if meta.num_decodes:
            self._attend_decodes(out, query, k_cache, v_cache, meta, params)
        group = query.shape[1] // k_cache.shape[1]
        tiles = meta.prefill_tiles(k_cache.shape[2], self._tile_rows(group) // group, params.window is not None)
        if tiles is not None:
            self._attend_prefill_tiles(out, query, k_cache, v_cache, tiles, params)
        # The spans whose ranges hold runs (Molmo2): prefill keys are written before attention, the others are done
        attend_prefills(query, key, value, k_cache, v_cache, meta, params, out, skip=tiles.covered if tiles else set())
        return out

    def _attend_decodes(self, out: torch.Tensor, query: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                        meta: AttentionMetadata, params: AttentionParams) -> None:
        rows, (heads, kv_heads) = meta.num_decodes, (query.shape[1], k_cache.shape[1])
        tables = meta.decode_block_tables
        width = tables.shape[1]  # blocks of the longest context
        splits = self.splits or decode_splits(rows, kv_heads, meta.decode_context_len)
        splits = min(splits, width)  # never more than the longest context's blocks
        part, part_acc = query, query  # dummies, unused without splits
        if splits > 1:  # each split's max and sum, and its unnormalised output
            part = query.new_empty(rows, heads, splits, 2, dtype=torch.float32)
            part_acc = query.new_empty(rows, heads, splits, _pad(v_cache.shape[-1]), dtype=torch.float32)
        group = heads // kv_heads
        paged_attention_kernel[(rows, kv_heads, splits)](
            out, query, k_cache, v_cache, tables, meta.decode_seq_lens, *_optional(params, query), part, part_acc,
            query.stride(0), query.stride(1), out.stride(0), out.stride(1), *_cache_strides(k_cache, v_cache),
            tables.stride(0), params.scale, params.softcap or 1.0, params.window or 0,
            GROUP=group, GROUP_PAD=max(16, triton.next_power_of_2(group)), SPLIT=splits > 1,
            **_constants(query, k_cache, v_cache, params))
        if splits > 1:
            merge_splits_kernel[(rows, heads)](
                out, part, part_acc, _optional(params, query)[0], out.stride(0), out.stride(1), splits,
                V_DIM=v_cache.shape[-1], DV_PAD=_pad(v_cache.shape[-1]),
                SPLITS_PAD=triton.next_power_of_2(splits), USE_SINKS=params.sinks is not None)

    def _attend_prefill_tiles(self, out: torch.Tensor, query: torch.Tensor, k_cache: torch.Tensor,
                              v_cache: torch.Tensor, tiles: PrefillTiles, params: AttentionParams) -> None:
        group = query.shape[1] // k_cache.shape[1]
        bounds = tiles.bounds if tiles.bounds is not None else tiles.tiles  # a dummy where no range applies
        prefill_tiles_kernel[(tiles.tiles.shape[0], k_cache.shape[1])](
            out, query, k_cache, v_cache, tiles.tiles, tiles.tables, bounds, *_optional(params, query),
            query.stride(0), query.stride(1), out.stride(0), out.stride(1), *_cache_strides(k_cache, v_cache),
            tiles.tables.stride(0), params.scale, params.softcap or 1.0, params.window or 0,
            GROUP=group, BLOCK_M=self._tile_rows(group), TILE_N=self.tile_keys, USE_RANGES=tiles.bounds is not None,
            **_constants(query, k_cache, v_cache, params))

    def _tile_rows(self, group: int) -> int:
        return max(self.tile_rows, triton.next_power_of_2(group))  # a tile holds one token's heads at least

    def is_shape_static(self, query: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                        meta: AttentionMetadata, params: AttentionParams) -> bool:
        # Decodes alone on the kernels read the metadata's tensors, launched on grids of their shapes (a CUDA graph
        # records the launches); prefill spans and the reference path are planned in Python per step
        return (meta.num_decodes == meta.num_tokens and params.causal and params.chunk is None
                and not params.keep_prompt)

    def reads_unwritten_rows(self, spec: LayerKVSpec, dtype: torch.dtype) -> bool:
        return False  # loads past a sequence's length are masked to zero, never read


register_attention_backend("triton", TritonAttentionBackend)


def _optional(params: AttentionParams, query: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The sinks and ALiBi slopes, a dummy pointer for each absent one (its loads are compiled out)."""
    dummy = query.new_zeros(1)
    return (params.sinks if params.sinks is not None else dummy, params.alibi if params.alibi is not None else dummy)


def _cache_strides(k_cache: torch.Tensor, v_cache: torch.Tensor) -> tuple[int, ...]:
    return *k_cache.stride()[:3], *v_cache.stride()[:3]


def _constants(query: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, params: AttentionParams) -> dict:
    """The constexprs both attention kernels share."""
    return dict(HEAD_DIM=query.shape[2], D_PAD=_pad(query.shape[2]), V_DIM=v_cache.shape[-1],
                DV_PAD=_pad(v_cache.shape[-1]), BLOCK_SIZE=k_cache.shape[2], USE_SOFTCAP=params.softcap is not None,
                USE_WINDOW=params.window is not None, USE_SINKS=params.sinks is not None,
                USE_ALIBI=params.alibi is not None)


def _pad(dim: int) -> int:
    return max(16, triton.next_power_of_2(dim))  # tl.dot wants 16 or more on GPUs


def _last_dim_contiguous(x: torch.Tensor) -> torch.Tensor:
    return x if x.stride(-1) == 1 else x.contiguous()
