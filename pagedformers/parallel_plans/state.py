"""Where this process sits in the tensor x pipeline grid, and the collectives the plans use.

Rank r is pipeline stage r // tp, tensor-parallel rank r % tp. gloo cannot reduce
bfloat16 on every build, so collectives on it run in float32.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.distributed as dist


@dataclass
class ParallelState:
    tp_size: int = 1
    pp_size: int = 1
    rank: int = 0
    tp_group: object = field(default=None, repr=False)  # a torch.distributed group of this stage's TP ranks

    @property
    def tp_rank(self) -> int:
        return self.rank % self.tp_size

    @property
    def pp_rank(self) -> int:
        return self.rank // self.tp_size

    @property
    def is_first_stage(self) -> bool:
        return self.pp_rank == 0

    @property
    def is_last_stage(self) -> bool:
        return self.pp_rank == self.pp_size - 1

    @property
    def next_rank(self) -> int:
        return self.rank + self.tp_size

    @property
    def prev_rank(self) -> int:
        return self.rank - self.tp_size

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        if self.tp_size == 1:
            return x
        y = x.float() if x.dtype != torch.float32 else x.clone()
        dist.all_reduce(y, group=self.tp_group)
        return y.to(x.dtype)

    def all_gather_last_dim(self, x: torch.Tensor) -> torch.Tensor:
        if self.tp_size == 1:
            return x
        parts = [torch.empty_like(x, dtype=torch.float32) for _ in range(self.tp_size)]
        dist.all_gather(parts, x.float().contiguous(), group=self.tp_group)
        return torch.cat(parts, dim=-1).to(x.dtype)


SINGLE = ParallelState()


def create_parallel_state(tp_size: int, pp_size: int) -> ParallelState:
    """After init_process_group: every rank creates every TP group, in the same order."""
    rank = dist.get_rank()
    state = ParallelState(tp_size, pp_size, rank)
    for stage in range(pp_size):
        group = dist.new_group(list(range(stage * tp_size, (stage + 1) * tp_size)))
        if stage == state.pp_rank:
            state.tp_group = group
    return state
