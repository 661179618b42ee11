"""The building blocks of the native models, in the shapes the platforms recognise.

Linears are plain `nn.Linear` modules built at this rank's size (so the CPU platform packs them like any other);
what makes them parallel is the loader on each parameter, which copies this rank's slice of one checkpoint tensor
into its place in a fused layout (`q_proj`, `k_proj`, `v_proj` -> rows of `qkv_proj`), and the all-reduce their
caller runs after a row-split one. `RMSNorm` and `rotate_half_rotary` compute exactly what transformers' Llama does
(bitwise in float32), so their CPU kernels replace them as they replace the HF modules'. Attention goes through the
very function the transformers shells register, so paged KV, backends and graph capture are shared.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn
from transformers import PretrainedConfig
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

from pagedformers.attention.interface import paged_attention_forward
from pagedformers.parallel_plans import ParallelState

# (destination parameter's real tensor, checkpoint tensor or lazy slice, shard id) -> None
ShardLoader = Callable[[torch.Tensor, object, object], None]


def with_loader(param: nn.Parameter, loader: ShardLoader, shards: tuple = (None,)) -> nn.Parameter:
    """Tag a parameter with how checkpoint tensors fill it, and which shard ids it needs (None: the whole)."""
    param.native_loader, param.native_shards = loader, shards
    return param


def copy_whole(dst: torch.Tensor, src: object, shard: object) -> None:
    dst.copy_(read_tensor(src))


def read_tensor(src: object) -> torch.Tensor:
    return src.read() if hasattr(src, "read") else src  # loading/weights.py's LazyTensor reads on demand


def narrow_tensor(src: object, dim: int, start: int, length: int) -> torch.Tensor:
    if start == 0 and length == src.shape[dim]:
        return read_tensor(src)
    return src.narrow(dim, start, length)


@dataclass(frozen=True)
class Part:
    """One checkpoint tensor's share of a fused column-split weight: this rank keeps its rows [start, start + local)."""
    start: int
    local: int


def split_part(size: int, tp: ParallelState, unit: int = 1) -> Part:
    """This rank's rows of `size` split in `tp_size` equal pieces; with fewer units (KV heads of `unit` rows)
    than ranks, each rank keeps the whole unit its query heads use."""
    units = size // unit
    if units < tp.tp_size and tp.tp_size % units == 0:
        head = tp.tp_rank * units // tp.tp_size
        return Part(head * unit, unit)
    if size % (tp.tp_size * unit):
        raise ValueError(f"A dimension of {size} cannot be split over tensor_parallel_size={tp.tp_size}")
    local = size // tp.tp_size
    return Part(tp.tp_rank * local, local)


def column_linear(in_features: int, parts: dict[object, Part], bias: bool) -> nn.Linear:
    """A Linear whose output rows are the checkpoint tensors named by `parts` (shard id -> its rows), each cut to
    this rank's slice, stacked in order."""
    offsets, total = {}, 0
    for shard, part in parts.items():
        offsets[shard], total = total, total + part.local

    def load(dst: torch.Tensor, src: object, shard: object) -> None:
        part = parts[shard]
        dst.narrow(0, offsets[shard], part.local).copy_(narrow_tensor(src, 0, part.start, part.local))

    linear = nn.Linear(in_features, total, bias=bias, device="meta")
    with_loader(linear.weight, load, tuple(parts))
    if bias:
        with_loader(linear.bias, load, tuple(parts))
    return linear


def row_linear(in_features: int, out_features: int, bias: bool, tp: ParallelState) -> nn.Linear:
    """A Linear over this rank's slice of the input features; its caller all-reduces the output. The bias lives
    on rank 0 only (zeros elsewhere), so the reduced sum adds it once."""
    local = in_features // tp.tp_size
    if in_features % tp.tp_size:
        raise ValueError(f"A dimension of {in_features} cannot be split over tensor_parallel_size={tp.tp_size}")

    def load_weight(dst: torch.Tensor, src: object, shard: object) -> None:
        dst.copy_(narrow_tensor(src, 1, tp.tp_rank * local, local))

    def load_bias(dst: torch.Tensor, src: object, shard: object) -> None:
        dst.copy_(read_tensor(src) if tp.tp_rank == 0 else torch.zeros(dst.shape))

    linear = nn.Linear(local, out_features, bias=bias, device="meta")
    with_loader(linear.weight, load_weight)
    if bias:
        with_loader(linear.bias, load_bias)
    return linear


def replicated(module: nn.Module) -> nn.Module:
    """A module every rank holds whole (norms, routers): each parameter loads as it is."""
    for param in module.parameters(recurse=False):
        with_loader(param, copy_whole)
    return module


class RMSNorm(nn.Module):
    """transformers' Llama RMSNorm (float32 statistics, the weight applied in the input's dtype)."""

    def __init__(self, size: int, eps: float) -> None:
        super().__init__()
        self.weight = with_loader(nn.Parameter(torch.empty(size, device="meta"), requires_grad=False), copy_whole)
        self.variance_epsilon = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x = x.to(torch.float32)
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.variance_epsilon)
        return self.weight * x.to(dtype)

    def add_norm(self, x: torch.Tensor, residual: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(norm(residual + x), residual + x): the residual add and this norm, one call a platform may fuse
        (vLLM's fused_add_rms_norm); eagerly the very ops of the two, so traced graphs keep their add -> norm."""
        summed = residual + x
        return self(summed), summed


def layer_norm(size: int, eps: float, bias: bool = True) -> nn.LayerNorm:
    return replicated(nn.LayerNorm(size, eps=eps, bias=bias, device="meta"))


class RotaryEmbedding(nn.Module):
    """cos and sin of each token's position, computed as transformers computes them (float32 angles, scaled,
    then cast), once a step for every layer."""

    def __init__(self, config: PretrainedConfig, rotary_dim: int) -> None:
        super().__init__()
        inv_freq, self.scale = rope_inv_freq(config, rotary_dim)
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    def forward(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """positions [T] -> cos, sin [T, 1, rotary_dim] in `dtype`, broadcast over heads."""
        angles = positions[:, None].float() * self.inv_freq
        emb = torch.cat((angles, angles), dim=-1)[:, None]
        return (emb.cos() * self.scale).to(dtype), (emb.sin() * self.scale).to(dtype)


def rope_inv_freq(config: PretrainedConfig, rotary_dim: int) -> tuple[torch.Tensor, float]:
    """Inverse frequencies and attention scaling of the config's RoPE type, through transformers' own functions
    (types that change with the sequence length are refused before: base.py's UNSUPPORTED_ROPE)."""
    params = getattr(config, "rope_parameters", None) or {}
    rope_type = params.get("rope_type", "default")
    if rope_type == "default":
        base = params.get("rope_theta", getattr(config, "rope_theta", 10000.0))
        return 1.0 / (base ** (torch.arange(0, rotary_dim, 2, dtype=torch.float) / rotary_dim)), 1.0
    return ROPE_INIT_FUNCTIONS[rope_type](config)


def rotate_half_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """transformers' apply_rotary_pos_emb for one tensor (the platform fuses exactly this pattern)."""
    half = x.shape[-1] // 2
    return x * cos + torch.cat((-x[..., half:], x[..., :half]), dim=-1) * sin


def interleaved_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """GPT-J's rotary: pairs (x0, x1), (x2, x3)... rotate; cos and sin hold each angle once, repeated per pair."""
    x1, x2 = x[..., ::2], x[..., 1::2]
    rotated = torch.stack((-x2, x1), dim=-1).flatten(-2)
    return x * cos + rotated * sin


class Rotary(nn.Module):
    """q and k's rotary embedding on each head's first `rotary_dim` features (the rest pass through): rotate-half
    (Llama) or interleaved pairs (GPT-J). A module of its own so a platform can swap its forward for a kernel."""

    def __init__(self, head_dim: int, rotary_dim: int | None = None, interleaved: bool = False) -> None:
        super().__init__()
        self.head_dim, self.rotary_dim, self.interleaved = head_dim, rotary_dim or head_dim, interleaved

    def forward(self, q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor,
                sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """q [T, H, D], k [T, H_kv, D], cos and sin [T, 1, rotary_dim] -> rotated q and k."""
        return self._rotate(q, cos, sin), self._rotate(k, cos, sin)

    def _rotate(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        rotary = interleaved_rotary if self.interleaved else rotate_half_rotary
        r = self.rotary_dim
        if r == self.head_dim:
            return rotary(x, cos, sin)
        return torch.cat((rotary(x[..., :r], cos, sin), x[..., r:]), dim=-1)


def alibi_slopes(heads: int) -> torch.Tensor:
    """The ALiBi paper's per-head slopes (geometric from 2^-8/n; interleaved extras when n is not a power of
    two), computed in float32 as transformers' build_alibi_tensor does."""
    closest = 2 ** math.floor(math.log2(heads))
    base = torch.tensor(2 ** (-(2 ** -(math.log2(closest) - 3))), dtype=torch.float32)
    slopes = torch.pow(base, torch.arange(1, 1 + closest, dtype=torch.int32))
    if closest != heads:
        extra_base = torch.tensor(2 ** (-(2 ** -(math.log2(2 * closest) - 3))), dtype=torch.float32)
        extra = torch.arange(1, 1 + 2 * min(closest, heads - closest), 2, dtype=torch.int32)
        slopes = torch.cat([slopes, torch.pow(extra_base, extra)])
    return slopes


class AttentionLayer(nn.Module):
    """Paged attention over this rank's heads, through the function the transformers shells register."""

    def __init__(self, layer_idx: int, num_heads: int, num_kv_heads: int, head_dim: int, scaling: float,
                 sliding_window: int | None = None) -> None:
        super().__init__()
        self.layer_idx, self.is_causal = layer_idx, True
        self.num_heads, self.num_kv_heads, self.head_dim = num_heads, num_kv_heads, head_dim
        self.scaling, self.sliding_window = scaling, sliding_window

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """q [T, H, D], k and v [T, H_kv, D] -> [T, H * D]."""
        out, _ = paged_attention_forward(self, q.transpose(0, 1)[None], k.transpose(0, 1)[None],
                                         v.transpose(0, 1)[None], None, scaling=self.scaling,
                                         sliding_window=self.sliding_window)
        return out[0].flatten(1)


def embedding(vocab_size: int, hidden_size: int, tp: ParallelState) -> nn.Module:
    """The input embedding: whole on one rank, split by vocabulary rows under TP."""
    from pagedformers.parallel_plans.tp import VocabParallelEmbedding

    table = nn.Embedding(vocab_size, hidden_size, device="meta")
    if tp.tp_size == 1:
        return replicated(table)
    return VocabParallelEmbedding(table, tp)


def lm_head(hidden_size: int, vocab_size: int, bias: bool, tp: ParallelState) -> nn.Module:
    """The LM head: a plain Linear on one rank, split by vocabulary rows (logits gathered) under TP."""
    from pagedformers.parallel_plans.tp import VocabParallelHead

    head = nn.Linear(hidden_size, vocab_size, bias=bias, device="meta")
    if tp.tp_size == 1 or bias:
        return replicated(head)
    return VocabParallelHead(head, tp)


def activation(name: str) -> Callable[[torch.Tensor], torch.Tensor]:
    """transformers' activation of that name (gelu_new, silu...), the one the HF model applies."""
    from transformers.activations import ACT2FN

    return ACT2FN[name]
