"""KV cache tensors: one (K, V) pair per attention layer, [num_blocks, block_size, num_kv_heads, head_dim]."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class LayerKVSpec:
    num_kv_heads: int
    head_dim: int
    v_head_dim: int

    def bytes_per_token(self, dtype: torch.dtype) -> int:
        return self.num_kv_heads * (self.head_dim + self.v_head_dim) * dtype.itemsize


def allocate_kv_caches(
    specs: dict[int, LayerKVSpec], num_blocks: int, block_size: int, dtype: torch.dtype, device: str
) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
    # Zeros: decodes read whole blocks, so the unwritten tail of a block is read (and masked);
    # it must be finite, since a masked NaN still poisons the probabilities @ V product.
    return {
        layer: (
            torch.zeros(num_blocks, block_size, s.num_kv_heads, s.head_dim, dtype=dtype, device=device),
            torch.zeros(num_blocks, block_size, s.num_kv_heads, s.v_head_dim, dtype=dtype, device=device),
        )
        for layer, s in specs.items()
    }


def write_kv(k_cache: torch.Tensor, v_cache: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
             slot_mapping: torch.Tensor) -> None:
    """key/value: [T, H_kv, D]; slot_mapping: [T] flat slot = block_id * block_size + offset."""
    k_cache.view(-1, *k_cache.shape[2:]).index_copy_(0, slot_mapping, key.to(k_cache.dtype))
    v_cache.view(-1, *v_cache.shape[2:]).index_copy_(0, slot_mapping, value.to(v_cache.dtype))
