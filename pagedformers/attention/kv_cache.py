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
    # Uninitialised, so start-up does not pay for touching gigabytes: each block is zeroed on its
    # first use (zero_blocks). Decodes read whole blocks, the unwritten tail included (masked), and
    # it must be finite: a masked NaN still poisons the probabilities @ V product.
    return {
        layer: (
            torch.empty(num_blocks, block_size, s.num_kv_heads, s.head_dim, dtype=dtype, device=device),
            torch.empty(num_blocks, block_size, s.num_kv_heads, s.v_head_dim, dtype=dtype, device=device),
        )
        for layer, s in specs.items()
    }


def write_kv(k_cache: torch.Tensor, v_cache: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
             slot_mapping: torch.Tensor) -> None:
    """key/value: [T, H_kv, D]; slot_mapping: [T] flat slot = block_id * block_size + offset."""
    k_cache.view(-1, *k_cache.shape[2:]).index_copy_(0, slot_mapping, key.to(k_cache.dtype))
    v_cache.view(-1, *v_cache.shape[2:]).index_copy_(0, slot_mapping, value.to(v_cache.dtype))


def zero_blocks(kv_caches: dict[int, tuple[torch.Tensor, torch.Tensor]], blocks: list[int]) -> None:
    index = torch.tensor(blocks, dtype=torch.long, device=next(iter(kv_caches.values()))[0].device)
    for k_cache, v_cache in kv_caches.values():
        k_cache.index_fill_(0, index, 0)
        v_cache.index_fill_(0, index, 0)
