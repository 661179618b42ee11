"""GPT-J (`GPTJForCausalLM`): attention and MLP side by side on one LayerNorm's output (parallel residual), rotary
on the first `rotary_dim` features of each head with pairs interleaved, a biased LM head. transformers' GPT-J
computes attention by hand (not through ALL_ATTENTION_FUNCTIONS), so the shell refuses it."""

from __future__ import annotations

from typing import ClassVar, Literal

import torch
from torch import nn
from transformers import PretrainedConfig

from pagedformers.config import EngineConfig
from pagedformers.native_overrides.base import Fused, NativeCausalLM
from pagedformers.native_overrides.layers import (
    AttentionLayer,
    Rotary,
    activation,
    column_linear,
    layer_norm,
    rope_inv_freq,
    row_linear,
    split_part,
)
from pagedformers.parallel_plans import SINGLE, ParallelState
from pagedformers.parallel_plans.pp import PPMissingLayer


class GPTJBlock(nn.Module):
    def __init__(self, c: PretrainedConfig, i: int, tp: ParallelState) -> None:
        super().__init__()
        self.tp, d = tp, c.n_embd // c.n_head
        heads = split_part(c.n_head * d, tp, d)
        self.ln_1 = layer_norm(c.n_embd, c.layer_norm_epsilon)
        self.attn = nn.Module()
        self.attn.qkv_proj = column_linear(c.n_embd, {"q": heads, "k": heads, "v": heads}, bias=False)
        self.attn.out_proj = row_linear(c.n_embd, c.n_embd, False, tp)
        self.attn.paged = AttentionLayer(i, heads.local // d, heads.local // d, d, d ** -0.5)
        self.mlp = nn.Module()
        inner = c.n_inner or 4 * c.n_embd
        self.mlp.fc_in = column_linear(c.n_embd, {None: split_part(inner, tp)}, bias=True)
        self.mlp.fc_out = row_linear(inner, c.n_embd, True, tp)
        self.act = activation(c.activation_function)
        self.heads, self.head_dim = heads.local // d, d
        self.rotary = Rotary(d, c.rotary_dim or d, interleaved=True)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        h = self.ln_1(x)
        q, k, v = (t.view(-1, self.heads, self.head_dim) for t in self.attn.qkv_proj(h).chunk(3, dim=-1))
        q, k = self.rotary(q, k, cos, sin)
        attn = self.attn.out_proj(self.attn.paged(q, k, v))
        mlp = self.mlp.fc_out(self.act(self.mlp.fc_in(h)))
        return self.tp.all_reduce(attn + mlp) + x


class GPTJForCausalLM(NativeCausalLM):
    supports_pp: ClassVar[Literal[True]] = True
    fused = (Fused(".attn.q_proj.", ".attn.qkv_proj.", "q"), Fused(".attn.k_proj.", ".attn.qkv_proj.", "k"),
             Fused(".attn.v_proj.", ".attn.qkv_proj.", "v"))
    embedding_name, layers_name, last_stage_modules = "transformer.wte", "transformer.h", ("transformer.ln_f",)

    def __init__(self, config: EngineConfig, parallel: ParallelState = SINGLE) -> None:
        super().__init__(config, parallel)
        c = self.hf_config
        embed, head = self.build_embedding(bias=True)
        self.transformer = nn.Module()
        self.transformer.wte = embed or PPMissingLayer()
        self.transformer.h = self.build_layers(lambda i: GPTJBlock(c, i, parallel))
        self.transformer.ln_f = layer_norm(c.n_embd, c.layer_norm_epsilon) if parallel.is_last_stage \
            else PPMissingLayer()
        self.lm_head = head or PPMissingLayer()
        rotary_dim = c.rotary_dim or c.n_embd // c.n_head
        self.register_buffer("inv_freq", rope_inv_freq(c, rotary_dim)[0], persistent=False)

    @property
    def num_layers(self) -> int:
        return self.hf_config.n_layer

    def layer_inputs(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, ...]:
        # transformers' table: float32 angles, sin and cos cast to the activations' dtype, then each repeated for
        # the pair it rotates
        angles = positions[:, None].float() * self.inv_freq
        return tuple(f(angles).to(dtype).repeat_interleave(2, dim=-1)[:, None] for f in (torch.cos, torch.sin))


MODELS = {"GPTJForCausalLM": GPTJForCausalLM}
