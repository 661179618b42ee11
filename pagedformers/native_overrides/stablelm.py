"""StableLM (`StableLmForCausalLM`): Llama's layout with LayerNorms (biased), rotary on the first
`partial_rotary_factor` of each head, optional q/k/v biases, optional per-head LayerNorms on q and k, and an
optional parallel residual. transformers' StableLM base class does not declare `_supports_attention_backend`, so the
shell refuses it."""

from __future__ import annotations

import re
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PretrainedConfig

from pagedformers.config import EngineConfig
from pagedformers.native_overrides.base import NativeCausalLM
from pagedformers.native_overrides.layers import (
    AttentionLayer,
    Rotary,
    column_linear,
    layer_norm,
    read_tensor,
    row_linear,
    split_part,
    with_loader,
)
from pagedformers.native_overrides.llama import GatedMLP, LlamaForCausalLM
from pagedformers.parallel_plans import SINGLE, ParallelState

_PER_HEAD_NORM = re.compile(r"(.*_layernorm)\.norms\.(\d+)\.weight")


class PerHeadLayerNorm(nn.Module):
    """One bias-free LayerNorm per head (transformers keeps a ModuleList of them), as one [heads, D] weight of this
    rank's heads; checkpoint `...norms.<h>.weight` loads into row h."""

    def __init__(self, head_dim: int, heads: int, first_head: int, eps: float) -> None:
        super().__init__()
        self.eps, self.first = eps, first_head
        self.weight = with_loader(nn.Parameter(torch.empty(heads, head_dim, device="meta"), requires_grad=False),
                                  self._load, tuple(range(first_head, first_head + heads)))

    def _load(self, dst: torch.Tensor, src: object, head: int) -> None:
        if self.first <= head < self.first + dst.shape[0]:
            dst[head - self.first].copy_(read_tensor(src))

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [T, heads, D]
        return F.layer_norm(x, self.weight.shape[-1:], eps=self.eps) * self.weight


class StableLmAttention(nn.Module):
    def __init__(self, c: PretrainedConfig, i: int, tp: ParallelState) -> None:
        super().__init__()
        d = c.hidden_size // c.num_attention_heads
        q = split_part(c.num_attention_heads * d, tp, d)
        kv = split_part(c.num_key_value_heads * d, tp, d)
        self.sizes, self.head_dim = [q.local, kv.local, kv.local], d
        self.rotary = Rotary(d, int(d * c.rope_parameters.get("partial_rotary_factor", 1.0)))
        self.qkv_proj = column_linear(c.hidden_size, {"q": q, "k": kv, "v": kv}, c.use_qkv_bias)
        self.o_proj = row_linear(c.hidden_size, c.hidden_size, False, tp)
        self.q_layernorm = self.k_layernorm = None
        if c.qk_layernorm:
            self.q_layernorm = PerHeadLayerNorm(d, q.local // d, q.start // d, c.layer_norm_eps)
            self.k_layernorm = PerHeadLayerNorm(d, kv.local // d, kv.start // d, c.layer_norm_eps)
        self.attn = AttentionLayer(i, q.local // d, kv.local // d, d, d ** -0.5)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        q, k, v = self.qkv_proj(x).split(self.sizes, dim=-1)
        q, k, v = (t.view(-1, n // self.head_dim, self.head_dim) for t, n in zip((q, k, v), self.sizes))
        if self.q_layernorm is not None:
            q, k = self.q_layernorm(q), self.k_layernorm(k)
        q, k = self.rotary(q, k, cos, sin)
        return self.o_proj(self.attn(q, k, v))


class StableLmDecoderLayer(nn.Module):
    def __init__(self, c: PretrainedConfig, i: int, tp: ParallelState) -> None:
        super().__init__()
        self.tp, self.parallel_residual = tp, c.use_parallel_residual
        self.input_layernorm = layer_norm(c.hidden_size, c.layer_norm_eps)
        self.self_attn = StableLmAttention(c, i, tp)
        self.post_attention_layernorm = None if self.parallel_residual else layer_norm(c.hidden_size, c.layer_norm_eps)
        self.mlp = GatedMLP(c.hidden_size, c.intermediate_size, c.hidden_act, False, tp)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        h = self.input_layernorm(x)
        attn = self.self_attn(h, cos, sin)
        if self.parallel_residual:  # x + attn(ln(x)) + mlp(ln(x))
            return x + self.tp.all_reduce(attn + self.mlp(h))
        x = x + self.tp.all_reduce(attn)
        return x + self.tp.all_reduce(self.mlp(self.post_attention_layernorm(x)))


class StableLmForCausalLM(LlamaForCausalLM):
    layers_pass_residuals: ClassVar[bool] = False  # LayerNorms: each layer adds its own

    def __init__(self, config: EngineConfig, parallel: ParallelState = SINGLE) -> None:
        NativeCausalLM.__init__(self, config, parallel)
        c = self.hf_config
        rotary_dim = int(c.hidden_size // c.num_attention_heads * c.rope_parameters.get("partial_rotary_factor", 1.0))
        self.build_trunk(lambda i: StableLmDecoderLayer(c, i, parallel),
                         lambda: layer_norm(c.hidden_size, c.layer_norm_eps), rotary_dim)

    def checkpoint_targets(self, name: str) -> list[tuple[str, object]]:
        m = _PER_HEAD_NORM.fullmatch(name)
        return [(f"{m[1]}.weight", int(m[2]))] if m else super().checkpoint_targets(name)

    def checkpoint_name(self, param: str, shard: object) -> str:
        if param.endswith("_layernorm.weight") and isinstance(shard, int):
            return f"{param.removesuffix('.weight')}.norms.{shard}.weight"
        return super().checkpoint_name(param, shard)


MODELS = {"StableLmForCausalLM": StableLmForCausalLM}
