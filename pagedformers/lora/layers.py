"""LoRALinear: a base linear plus each row's low-rank update, for a batch that mixes adapters and the base.

The base matmul runs once for the whole batch; then, for each adapter present, its rows get (x A^T) B^T (B
pre-scaled): a segmented computation over the step's few adapters, never a forward per adapter. Each layer
holds `num_slots` adapters' matrices, zero where a slot is empty or an adapter does not target it.

A fused linear (q/k/v, gate/up as one weight) holds one A and one B column block per part: A stacks the
parts' A matrices, B places each part's rows in its own columns, so one pair of matmuls serves all parts. Under
tensor parallelism a layer keeps its rank's slice, cut by the base weight's own loader: B's rows where the base
splits its output, A's columns where it splits its input (then the update is a partial sum, added before the
base's all-reduce).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

# How a checkpoint tensor becomes this rank's slice of a base weight: a native parameter's loader
# (dst, src, shard), or a tensor-parallel shard loader (src) -> slice, or None (the weight is whole).
NativeLoader = Callable[[torch.Tensor, torch.Tensor, object], None]
ShardLoader = Callable[[torch.Tensor], torch.Tensor]


@dataclass
class LoRABatch:
    """Which rows of the step's flat batch run which slot: shared by every LoRA layer of a model."""
    groups: list[tuple[int, torch.Tensor | slice]] = field(default_factory=list)  # (slot, row indices)


@dataclass(frozen=True)
class WeightLoader:
    """What a base weight's loading recorded: how to cut checkpoint tensors to this rank (before the weight was
    loaded, as loaders do not outlive it)."""
    native: NativeLoader | None = None
    shards: tuple[object, ...] = (None,)  # a fused weight's parts, in order
    shard: ShardLoader | None = None


class LoRALinear(nn.Module):
    def __init__(self, base: nn.Module, weight: torch.Tensor, loader: WeightLoader, num_slots: int, max_rank: int,
                 batch: LoRABatch) -> None:
        super().__init__()
        self.base, self.loader, self.batch, self.max_rank = base, loader, batch, max_rank
        out_local, in_local = weight.shape
        parts = len(loader.shards)
        self.register_buffer("lora_a", torch.zeros(num_slots, parts * max_rank, in_local, dtype=weight.dtype,
                                                   device=weight.device))
        self.register_buffer("lora_b", torch.zeros(num_slots, out_local, parts * max_rank, dtype=weight.dtype,
                                                   device=weight.device))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.batch.groups:
            return self.base(x)
        if getattr(self.base, "takes_update", False):  # a tensor-parallel linear: add before its collective
            return self.base(x, update=self._add_updates)
        return self._add_updates(x, self.base(x))

    def _add_updates(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """y + each row's adapter update (x, y: [..., T, features]; the shell's carry a batch dim of 1). Out of
        place: y may be a view of a sibling group's shared output."""
        flat_x, flat_y = x.reshape(-1, x.shape[-1]), y.reshape(-1, y.shape[-1])
        for slot, rows in self.batch.groups:
            if isinstance(rows, slice):
                flat_y = flat_y + (flat_x @ self.lora_a[slot].T) @ self.lora_b[slot].T
            else:
                update = (flat_x.index_select(0, rows) @ self.lora_a[slot].T) @ self.lora_b[slot].T
                flat_y = flat_y.index_add(0, rows, update)
        return flat_y.view(y.shape)

    def place(self, a: torch.Tensor, b: torch.Tensor, shard: object) -> tuple[torch.Tensor, torch.Tensor]:
        """This rank's (A rows, B columns) of one part, at full slot size, from an adapter's A [r, in] and scaled
        B [out, r]. Raises ValueError when they do not fit this layer (an adapter for another base model)."""
        part = self.loader.shards.index(shard)
        r, cols = a.shape[0], slice(part * self.max_rank, part * self.max_rank + a.shape[0])
        full_a = torch.zeros_like(self.lora_a[0])
        full_b = torch.zeros_like(self.lora_b[0])
        in_local = full_a.shape[1]
        try:
            if a.shape[1] == in_local:  # the base splits its output, or nothing: B's rows are cut where needed
                full_a[cols] = a
                whole = len(self.loader.shards) == 1 and b.shape[0] == full_b.shape[0]
                full_b[:, cols] = b if whole else self._cut(b, full_b.shape[0], r, shard)
            else:  # the base splits its input: A's columns are cut, the update is a partial sum
                full_a[cols] = self._cut(a, r, in_local, shard)
                full_b[:, cols] = b
        except (RuntimeError, IndexError) as e:  # torch's shape errors; a loader's narrow out of range
            raise ValueError(f"A {tuple(a.shape)} and B {tuple(b.shape)} do not fit a layer of {in_local} inputs "
                             f"and {full_b.shape[0]} outputs on this rank ({e})") from None
        return full_a, full_b

    def _cut(self, src: torch.Tensor, rows: int, cols: int, shard: object) -> torch.Tensor:
        if self.loader.native is not None:
            dst = torch.zeros(rows, cols, dtype=src.dtype)
            self.loader.native(dst, src, shard)
            return dst
        return self.loader.shard(src) if self.loader.shard is not None else src

    def set_slot(self, slot: int, parts: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
        """Slot `slot` holds the sum of the parts' placed matrices (zero for parts the adapter skips)."""
        self.lora_a[slot].zero_()
        self.lora_b[slot].zero_()
        for a, b in parts:
            self.lora_a[slot] += a.to(self.lora_a.dtype)
            self.lora_b[slot] += b.to(self.lora_b.dtype)
