"""Tensor parallelism from the config's `base_model_tp_plan`: one function per module kind.

Every rank keeps its slice of each planned Linear (columns or rows of the weight) and
reads only that slice from the checkpoint (`shard_loader` on the meta parameter).
Unplanned Linears stay replicated. Attention needs no change: HF modules infer their
local head count from the sharded projection (`view(..., -1, head_dim)`).
"""

from __future__ import annotations

import re
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from pagedformers.logger import init_logger
from pagedformers.parallel_plans.state import ParallelState

logger = init_logger(__name__)

# Every style name transformers has used, normalised to what it means for inference.
_STYLES = {
    "colwise": "colwise", "colwise_rep": "colwise_gather", "colwise_gather_output": "colwise_gather",
    "colwise_allgather": "colwise_gather", "packed_colwise": "packed_colwise", "local_colwise": "colwise",
    "rowwise": "rowwise", "rowwise_allreduce": "rowwise", "local_rowwise": "rowwise",
    "rowwise_rep": "rowwise_split", "rowwise_split_input": "rowwise_split", "packed_rowwise": "packed_rowwise",
    "replicate": "replicate", "replicated_with_grad_allreduce": "replicate", "local": "replicate",
    "gather": "replicate", "sequence_parallel": "replicate", "embedding_rowwise": "vocab",
    "vocab_allreduce": "vocab",
    # MoE expert styles: experts stay whole on every rank (correct, not memory-saving yet).
    "grouped_gemm": "replicate", "moe_tp_experts": "replicate", "ep_router": "replicate",
    "ep_dispatch_experts": "replicate", "moe_tp_gate_up_colwise": "replicate", "moe_tp_down_rowwise": "replicate",
    "moe_experts_allreduce": "replicate",
}
NO_PLAN_HELP = (
    "tensor_parallel_size > 1 needs a tensor-parallel plan, and {model} has none. Add one to its config class, "
    "e.g. base_model_tp_plan = {{'layers.*.self_attn.q_proj': 'colwise', 'layers.*.self_attn.k_proj': 'colwise', "
    "'layers.*.self_attn.v_proj': 'colwise', 'layers.*.self_attn.o_proj': 'rowwise', 'layers.*.mlp.up_proj': "
    "'colwise', 'layers.*.mlp.down_proj': 'rowwise'}} (names relative to the base model)."
)


def apply_tp(base_model: nn.Module, plan: dict[str, str] | None, num_heads: int, num_kv_heads: int,
             head_dim: int, tp: ParallelState) -> None:
    if not plan:
        raise ValueError(NO_PLAN_HELP.format(model=type(base_model).__name__))
    if num_heads % tp.tp_size or (num_kv_heads % tp.tp_size and tp.tp_size % num_kv_heads):
        raise ValueError(f"tensor_parallel_size={tp.tp_size} must divide num_attention_heads={num_heads}, and "
                         f"num_key_value_heads={num_kv_heads} must divide it or be divisible by it")
    patterns = [(re.compile("^" + re.escape(k).replace(r"\*", r"[^.]+") + "$"), _normalise(v)) for k, v in plan.items()]
    kv_out = num_kv_heads * head_dim if num_kv_heads < tp.tp_size else None
    for name, module in list(base_model.named_modules()):
        style = next((s for p, s in patterns if p.match(name)), None)
        if style in (None, "replicate"):
            continue
        if isinstance(module, nn.Linear):
            replicate_kv = kv_out is not None and style == "colwise" and module.out_features == kv_out
            _replace(base_model, name, ParallelLinear(module, style, tp, head_dim if replicate_kv else None))
        elif isinstance(module, nn.Embedding) and style == "vocab" and type(module) is nn.Embedding:
            _replace(base_model, name, VocabParallelEmbedding(module, tp))


def _normalise(style: str) -> str:
    if style not in _STYLES:
        raise ValueError(f"Unknown tensor-parallel style {style!r}; known: {sorted(_STYLES)}")
    return _STYLES[style]


def _replace(root: nn.Module, name: str, new: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, child, new)


def _meta_param(shape: tuple[int, ...], loader: Callable) -> nn.Parameter:
    param = nn.Parameter(torch.empty(shape, device="meta"), requires_grad=False)
    param.shard_loader = loader
    return param


def read_rows(tensor, dim: int, ranges: list[tuple[int, int]]) -> torch.Tensor:
    """Concatenate [start, end) slices of `tensor` along dim; lazy checkpoint slices read only those."""
    parts = [tensor.narrow(dim, start, end - start) for start, end in ranges]
    return parts[0] if len(parts) == 1 else torch.cat(parts, dim=dim)


class ParallelLinear(nn.Module):
    """A Linear split over the TP group.

    colwise: output features split (each rank's rows of the weight); `_gather` all-gathers them.
    rowwise: input features split, partial outputs all-reduced, bias added once after.
    packed_*: the weight is several projections stacked (gate_up): each part is split.
    replicate_kv_head_dim: k/v projections with fewer KV heads than ranks keep one whole head each.
    """

    def __init__(self, linear: nn.Linear, style: str, tp: ParallelState, replicate_kv_head_dim: int | None = None):
        super().__init__()
        self.tp, self.style = tp, style
        self.is_column = style.startswith(("colwise", "packed_colwise"))
        dim = 0 if self.is_column else 1
        full = linear.out_features if self.is_column else linear.in_features
        parts = 2 if style.startswith("packed") else 1
        self.ranges = _shard_ranges(full, parts, tp, replicate_kv_head_dim)
        shape = list(linear.weight.shape)
        shape[dim] = sum(e - s for s, e in self.ranges)
        self.weight = _meta_param(tuple(shape), lambda t: read_rows(t, dim, self.ranges))
        self.bias = None
        if linear.bias is not None:
            bias_ranges = self.ranges if self.is_column else [(0, linear.out_features)]
            self.bias = _meta_param((sum(e - s for s, e in bias_ranges),), lambda t: read_rows(t, 0, bias_ranges))

    takes_update = True  # LoRA layers add their update to this rank's output before the collective

    def forward(self, x: torch.Tensor, update: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None
                ) -> torch.Tensor:
        """`update(x, y)`: this rank's input and output before any gather or all-reduce -> the output to use."""
        if self.is_column:
            y = F.linear(x, self.weight, self.bias)
            y = update(x, y) if update is not None else y
            return self.tp.all_gather_last_dim(y) if self.style == "colwise_gather" else y
        if self.style == "rowwise_split":
            x = read_rows(x, x.dim() - 1, self.ranges)
        y = F.linear(x, self.weight)
        y = self.tp.all_reduce(update(x, y) if update is not None else y)
        return y + self.bias if self.bias is not None else y


def _shard_ranges(full: int, parts: int, tp: ParallelState, kv_head_dim: int | None) -> list[tuple[int, int]]:
    if kv_head_dim is not None:  # fewer KV heads than ranks: rank r keeps the head its query heads use
        num_kv = full // kv_head_dim
        head = tp.tp_rank * num_kv // tp.tp_size
        return [(head * kv_head_dim, (head + 1) * kv_head_dim)]
    part = full // parts
    if part % tp.tp_size:
        raise ValueError(f"A dimension of {part} cannot be split over tensor_parallel_size={tp.tp_size}")
    size = part // tp.tp_size
    return [(p * part + tp.tp_rank * size, p * part + (tp.tp_rank + 1) * size) for p in range(parts)]


class VocabParallelEmbedding(nn.Module):
    """Each rank holds a contiguous slice of the vocabulary's rows; lookups are all-reduced."""

    def __init__(self, embedding: nn.Embedding, tp: ParallelState):
        super().__init__()
        self.tp = tp
        self.num_embeddings = embedding.num_embeddings
        self.embedding_dim = embedding.embedding_dim
        self.per_rank = -(-self.num_embeddings // tp.tp_size)
        self.start = tp.tp_rank * self.per_rank
        self.weight = _meta_param((self.per_rank, self.embedding_dim), self._load)

    def _load(self, tensor) -> torch.Tensor:
        end = min(self.start + self.per_rank, self.num_embeddings)
        rows = read_rows(tensor, 0, [(self.start, end)])
        return F.pad(rows, (0, 0, 0, self.per_rank - rows.shape[0]))  # the last shard may be short

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        local = ids - self.start
        outside = (local < 0) | (local >= self.per_rank)
        out = F.embedding(local.clamp(0, self.per_rank - 1), self.weight)
        return self.tp.all_reduce(out.masked_fill(outside[..., None], 0.0))

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """The tied LM head: this rank's vocab slice of the logits, gathered."""
        return self.tp.all_gather_last_dim(F.linear(hidden, self.weight))[..., : self.num_embeddings]


class VocabParallelHead(nn.Module):
    """The LM head split by vocabulary rows; logits are gathered (padding rows cut off)."""

    def __init__(self, head: nn.Linear, tp: ParallelState):
        super().__init__()
        self.tp = tp
        self.num_embeddings = head.out_features
        self.per_rank = -(-head.out_features // tp.tp_size)
        self.start = tp.tp_rank * self.per_rank
        self.weight = _meta_param((self.per_rank, head.in_features), self._load)

    _load = VocabParallelEmbedding._load

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.tp.all_gather_last_dim(F.linear(hidden, self.weight))[..., : self.num_embeddings]


def apply_tp_to_vocab(base_model: nn.Module, head: nn.Module | None, tied: bool,
                      tp: ParallelState) -> nn.Module | None:
    """Vocab-parallel input embedding (a plain nn.Embedding; subclasses such as Gemma's scaled
    embedding stay replicated) and LM head (tied only when the embedding is split the same way).
    Returns the head to keep."""
    embedding = base_model.get_input_embeddings()
    if type(embedding) is nn.Embedding:
        base_model.set_input_embeddings(VocabParallelEmbedding(embedding, tp))
    split_embedding = isinstance(base_model.get_input_embeddings(), VocabParallelEmbedding)
    if isinstance(head, nn.Linear) and head.bias is None and (split_embedding or not tied):
        return VocabParallelHead(head, tp)
    return head
