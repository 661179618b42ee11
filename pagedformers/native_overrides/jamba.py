"""Jamba (`JambaForCausalLM`), the attention + state-space hybrid: Mamba layers (mamba.py's mixer, with weighted
norms of dt, B and C) and, every `attn_layer_period` layers, attention without positional encoding on the paged KV
cache; a sparse MoE (moe.py) in place of the MLP every `expert_layer_period` layers. Each request carries its Mamba
states (`SupportsPerRequestState`) while its attention layers keep their K/V in the paged cache.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import PretrainedConfig

from pagedformers.config import EngineConfig
from pagedformers.native_overrides.layers import AttentionLayer, RMSNorm, column_linear, row_linear, split_part
from pagedformers.native_overrides.llama import GatedMLP, LlamaForCausalLM, Trunk
from pagedformers.native_overrides.mamba import MambaMixer, MambaState, StateSpaceModel
from pagedformers.native_overrides.moe import QWEN_EXPERTS, SparseMoe
from pagedformers.parallel_plans import SINGLE, ParallelState
from pagedformers.parallel_plans.pp import PPMissingLayer


class JambaAttention(nn.Module):
    def __init__(self, c: PretrainedConfig, i: int, tp: ParallelState) -> None:
        super().__init__()
        d = c.hidden_size // c.num_attention_heads
        q, kv = split_part(c.num_attention_heads * d, tp, d), split_part(c.num_key_value_heads * d, tp, d)
        self.sizes, self.head_dim = [q.local, kv.local, kv.local], d
        self.qkv_proj = column_linear(c.hidden_size, {"q": q, "k": kv, "v": kv}, bias=False)
        self.o_proj = row_linear(c.num_attention_heads * d, c.hidden_size, False, tp)
        self.attn = AttentionLayer(i, q.local // d, kv.local // d, d, d ** -0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = self.qkv_proj(x).split(self.sizes, dim=-1)
        q, k, v = (t.view(-1, n // self.head_dim, self.head_dim) for t, n in zip((q, k, v), self.sizes))
        return self.o_proj(self.attn(q, k, v))


class JambaDecoderLayer(nn.Module):
    def __init__(self, c: PretrainedConfig, i: int, tp: ParallelState) -> None:
        super().__init__()
        self.is_attention = i % c.attn_layer_period == c.attn_layer_offset
        if self.is_attention:
            self.self_attn = JambaAttention(c, i, tp)
        else:
            self.mamba = MambaMixer(c, i, c.mamba_expand * c.hidden_size, c.mamba_dt_rank, c.mamba_proj_bias,
                                    c.mamba_conv_bias, inner_norm="weighted")
        experts = c.layers_num_experts[i] if c.layers_num_experts else 1
        self.feed_forward = SparseMoe(c, tp) if experts > 1 else \
            GatedMLP(c.hidden_size, c.intermediate_size, c.hidden_act, False, tp)
        self.input_layernorm = RMSNorm(c.hidden_size, c.rms_norm_eps)
        self.pre_ff_layernorm = RMSNorm(c.hidden_size, c.rms_norm_eps)

    def forward(self, x: torch.Tensor, state: MambaState) -> torch.Tensor:
        h = self.input_layernorm(x)
        x = x + (self.self_attn(h) if self.is_attention else self.mamba(h, state))
        return x + self.feed_forward(self.pre_ff_layernorm(x))


class JambaForCausalLM(StateSpaceModel):
    fused = LlamaForCausalLM.fused
    last_stage_modules = ("model.final_layernorm",)

    def __init__(self, config: EngineConfig, parallel: ParallelState = SINGLE) -> None:
        super().__init__(config, parallel)
        c = self.hf_config
        embed, head = self.build_embedding()
        self.model = Trunk()
        self.model.embed_tokens = embed or PPMissingLayer()
        self.model.layers = self.build_layers(lambda i: JambaDecoderLayer(c, i, parallel))
        self.model.final_layernorm = RMSNorm(c.hidden_size, c.rms_norm_eps)
        self.lm_head = head or PPMissingLayer()

    def checkpoint_targets(self, name: str) -> list[tuple[str, object]]:
        target = QWEN_EXPERTS.target(name)
        return [target] if target is not None else super().checkpoint_targets(name)

    def checkpoint_name(self, param: str, shard: object) -> str:
        return QWEN_EXPERTS.checkpoint_name(param, shard) or super().checkpoint_name(param, shard)


MODELS = {"JambaForCausalLM": JambaForCausalLM}
