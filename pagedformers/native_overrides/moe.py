"""Sparse mixture-of-experts blocks (Mixtral, Qwen3-MoE, Jamba): the router, then all experts' tokens in two
grouped matmuls (`GroupedLinear`: `torch._grouped_mm`, which a platform may swap for a kernel of its own), with no
loop over experts and no host sync, so a decode step still traces.

Experts are stacked as transformers keeps them in memory (`gate_up_proj` [E, 2I, H], `down_proj` [E, H, I]) and
split by expert over the tensor-parallel group (expert parallel): each rank runs the assignments to its own experts,
and the decoder layer's all-reduce sums the ranks' shares as it sums the row-split linears'.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch
from torch import nn
from transformers import PretrainedConfig

from pagedformers.native_overrides.layers import (
    ShardLoader,
    activation,
    narrow_tensor,
    read_tensor,
    replicated,
    with_loader,
)
from pagedformers.parallel_plans import ParallelState


def num_experts(c: PretrainedConfig) -> int:
    return getattr(c, "num_local_experts", None) or getattr(c, "num_experts", None) or 0


def is_moe_layer(c: PretrainedConfig, i: int) -> bool:
    if not num_experts(c):
        return False
    if c.model_type == "qwen3_moe":
        return i not in (c.mlp_only_layers or []) and (i + 1) % c.decoder_sparse_step == 0
    return True


class GroupedLinear(nn.Module):
    """Each expert's [N, K] weight, stacked [E, N, K]: x's rows come sorted by expert, expert e's ending at ends[e]
    (int32), and each goes through its expert's weight; rows past the last end come out unspecified."""

    def __init__(self, experts: int, n: int, k: int, loader: ShardLoader, shards: tuple) -> None:
        super().__init__()
        self.weight = with_loader(nn.Parameter(torch.empty(experts, n, k, device="meta"), requires_grad=False),
                                  loader, shards)

    def forward(self, x: torch.Tensor, ends: torch.Tensor) -> torch.Tensor:
        return torch._grouped_mm(x, self.weight.transpose(1, 2), offs=ends)


class Experts(nn.Module):
    """This rank's experts: [T, H] tokens, their top-k expert ids and weights -> the weighted sum of their
    experts' outputs that live here [T, H]."""

    def __init__(self, c: PretrainedConfig, intermediate: int, top_k: int, tp: ParallelState) -> None:
        super().__init__()
        total = num_experts(c)
        if total % tp.tp_size:
            raise ValueError(f"tensor_parallel_size={tp.tp_size} must divide the {total} experts (they are split "
                             "across ranks)")
        self.local, self.top_k, self.intermediate = total // tp.tp_size, top_k, intermediate
        self.start = tp.tp_rank * self.local
        local = range(self.start, self.start + self.local)
        self.gate_up_proj = GroupedLinear(self.local, 2 * intermediate, c.hidden_size, self._load,
                                          tuple((e, j) for e in local for j in (0, 1)))
        self.down_proj = GroupedLinear(self.local, c.hidden_size, intermediate, self._load,
                                       tuple((e, None) for e in local))
        self.act_fn = activation(c.hidden_act)

    def _load(self, dst: torch.Tensor, src: object, shard: tuple[int, int | None] | None) -> None:
        if shard is None:  # all experts stacked, as in memory: this rank's rows
            dst.copy_(narrow_tensor(src, 0, self.start, self.local))
            return
        expert, half = shard
        if not self.start <= expert < self.start + self.local:
            return  # another rank's expert
        rows = dst[expert - self.start]
        (rows if half is None else rows.narrow(0, half * self.intermediate, self.intermediate)).copy_(read_tensor(src))

    def forward(self, x: torch.Tensor, top_ids: torch.Tensor, top_weights: torch.Tensor) -> torch.Tensor:
        ids = top_ids - self.start
        elsewhere = (ids < 0) | (ids >= self.local)  # assignments to other ranks' experts sort last, weigh 0
        ids = ids.masked_fill(elsewhere, self.local).flatten()
        order = ids.argsort(stable=True)
        # Where each expert's rows end: a search in the sorted ids, not bincount, which reads the ids' range back to
        # the host on a GPU (a sync that a CUDA graph capture refuses)
        experts = torch.arange(1, self.local + 1, device=ids.device, dtype=ids.dtype)
        ends = torch.searchsorted(ids[order], experts).to(torch.int32)
        token = order // self.top_k
        gate, up = self.gate_up_proj(x[token], ends).chunk(2, dim=-1)
        out = self.down_proj(self.act_fn(gate) * up, ends)
        # Rows past the last expert's end are left unwritten (not zeroed) by the grouped matmul: drop, not weigh.
        weighted = (out * top_weights.flatten()[order, None]).masked_fill(elsewhere.flatten()[order, None], 0)
        return torch.zeros_like(x).index_add_(0, token, weighted.to(x.dtype))


class SparseMoe(nn.Module):
    """transformers' top-k router (softmax in float32, then top-k, renormalised where the family does) and the
    experts. The router is `gate` in the checkpoint, `router` in Jamba's."""

    def __init__(self, c: PretrainedConfig, tp: ParallelState) -> None:
        super().__init__()
        self.top_k = c.num_experts_per_tok
        self.router_name = "router" if c.model_type == "jamba" else "gate"
        self.add_module(self.router_name, replicated(nn.Linear(c.hidden_size, num_experts(c), bias=False,
                                                               device="meta")))
        intermediate = getattr(c, "moe_intermediate_size", None) or c.intermediate_size
        self.experts = Experts(c, intermediate, self.top_k, tp)
        mixtral = c.model_type == "mixtral"
        self.normalise = mixtral or bool(getattr(c, "norm_topk_prob", False))
        self.weights_in_input_dtype = not mixtral  # Mixtral weighs its experts' outputs in float32

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits = self._modules[self.router_name](x)
        weights, ids = torch.topk(torch.softmax(logits, dim=-1, dtype=torch.float), self.top_k, dim=-1)
        if self.normalise:
            weights = weights / weights.sum(dim=-1, keepdim=True)
        if self.weights_in_input_dtype:
            weights = weights.to(logits.dtype)
        return self.experts(x, ids, weights)


@dataclass(frozen=True)
class ExpertNames:
    """How a checkpoint names one expert's projections (`<block>.experts.<e>.<gate|up|down>.weight`)."""
    gate: str
    up: str
    down: str

    def target(self, name: str) -> tuple[str, tuple[int, int | None] | None] | None:
        """(stacked parameter, (expert, half)) for a per-expert checkpoint tensor, (stacked parameter, None) for
        all experts stacked as in memory, else None."""
        stacked = re.fullmatch(r"(.*\.experts\.(?:gate_up_proj|down_proj))", name)
        if stacked is not None:
            return f"{stacked[1]}.weight", None
        m = re.fullmatch(r"(.*)\.experts\.(\d+)\.(\w+)\.weight", name)
        if m is None or m[3] not in (self.gate, self.up, self.down):
            return None
        if m[3] == self.down:
            return f"{m[1]}.experts.down_proj.weight", (int(m[2]), None)
        return f"{m[1]}.experts.gate_up_proj.weight", (int(m[2]), 0 if m[3] == self.gate else 1)

    def checkpoint_name(self, param: str, shard: object) -> str | None:
        block, _, kind = param.rpartition(".experts.")
        if not block or not isinstance(shard, tuple):
            return None
        expert, half = shard
        proj = self.down if half is None else (self.gate, self.up)[half]
        return f"{block}.experts.{expert}.{proj}.weight"


MIXTRAL_EXPERTS = ExpertNames("w1", "w3", "w2")
QWEN_EXPERTS = ExpertNames("gate_proj", "up_proj", "down_proj")
