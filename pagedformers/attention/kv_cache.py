"""KV cache tensors: one (K, V) pair per attention layer, [num_blocks, num_kv_heads, block_size, head_dim].

Head-major inside a block so that gathering a sequence's blocks for one head copies whole
block_size x head_dim runs and yields [B, H_kv, L, D] with no transpose: on 2 cores the decode
attention of a 200M Llama step went from 2.6 to 0.6 ms per layer against the token-major layout."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class LayerKVSpec:
    """The shape of one attention layer's K/V per token."""
    num_kv_heads: int
    head_dim: int
    v_head_dim: int

    def bytes_per_token(self, dtype: torch.dtype) -> int:
        return self.num_kv_heads * (self.head_dim + self.v_head_dim) * dtype.itemsize


KVCaches = dict[int, tuple[torch.Tensor, torch.Tensor]]  # attention call index -> (k_cache, v_cache)


def allocate_kv_caches(
    specs: dict[int, LayerKVSpec], num_blocks: int, block_size: int, dtype: torch.dtype, device: str
) -> KVCaches:
    # Uninitialised, so start-up does not pay for touching gigabytes. A backend that reads whole blocks, the
    # unwritten tail included (masked), needs them finite (a masked NaN still poisons the probabilities @ V
    # product): there each block is zeroed on its first use (zero_blocks, AttentionBackend.reads_unwritten_rows).
    return {
        layer: (
            torch.empty(num_blocks, s.num_kv_heads, block_size, s.head_dim, dtype=dtype, device=device),
            torch.empty(num_blocks, s.num_kv_heads, block_size, s.v_head_dim, dtype=dtype, device=device),
        )
        for layer, s in specs.items()
    }


def block_rows(block_tables: torch.Tensor, num_kv_heads: int) -> torch.Tensor:
    """[B * H_kv * num_blocks]: the rows of a cache viewed as [num_blocks * H_kv, block_size, D] that
    hold the [B, num_blocks] tables' blocks, in (sequence, head, block) order."""
    heads = torch.arange(num_kv_heads, device=block_tables.device)
    return (block_tables[:, None, :] * num_kv_heads + heads[None, :, None]).view(-1)


def gather_blocks(cache: torch.Tensor, rows: torch.Tensor, batch: int) -> torch.Tensor:
    """[batch, H_kv, L, D]: the blocks at `rows` (see block_rows), one contiguous copy per block and head."""
    num_blocks, num_heads, block_size, dim = cache.shape
    return cache.view(num_blocks * num_heads, block_size, dim).index_select(0, rows).view(batch, num_heads, -1, dim)


def zero_blocks(kv_caches: KVCaches, blocks: list[int]) -> None:
    index = torch.tensor(blocks, dtype=torch.long, device=next(iter(kv_caches.values()))[0].device)
    for k_cache, v_cache in kv_caches.values():
        k_cache.index_fill_(0, index, 0)
        v_cache.index_fill_(0, index, 0)
