"""BLOOM (`BloomForCausalLM`): ALiBi instead of positional embeddings (each head adds slope * key position to its
scores, passed to the paged attention as `pagedformers_alibi_slopes`), a LayerNorm after the embeddings, a fused
query_key_value laid out per head, GELU by its tanh formula, and optionally the residual taken after the norm.
transformers' BLOOM computes attention by hand, so the shell refuses it."""

from __future__ import annotations

from typing import ClassVar, Literal

import torch
from torch import nn
from transformers import PretrainedConfig

from pagedformers.attention.interface import ALIBI_SLOPES
from pagedformers.config import EngineConfig
from pagedformers.native_overrides.base import NativeCausalLM
from pagedformers.native_overrides.falcon import interleaved_qkv_rows, rows_linear
from pagedformers.native_overrides.layers import (
    AttentionLayer,
    alibi_slopes,
    column_linear,
    layer_norm,
    row_linear,
    split_part,
)
from pagedformers.parallel_plans import SINGLE, ParallelState
from pagedformers.parallel_plans.pp import PPMissingLayer


def bloom_gelu(x: torch.Tensor) -> torch.Tensor:
    return x * 0.5 * (1.0 + torch.tanh(0.79788456 * x * (1 + 0.044715 * x * x)))


class BloomBlock(nn.Module):
    def __init__(self, c: PretrainedConfig, i: int, tp: ParallelState) -> None:
        super().__init__()
        self.tp, h, d = tp, c.hidden_size, c.hidden_size // c.n_head
        heads = split_part(c.n_head * d, tp, d)
        self.post_norm_residual = c.apply_residual_connection_post_layernorm
        self.input_layernorm = layer_norm(h, c.layer_norm_epsilon)
        self.self_attention = nn.Module()
        self.self_attention.query_key_value = rows_linear(h, interleaved_qkv_rows(c.n_head, d, tp), bias=True)
        self.self_attention.dense = row_linear(h, h, True, tp)
        self.attn = AttentionLayer(i, heads.local // d, heads.local // d, d, d ** -0.5)
        setattr(self.attn, ALIBI_SLOPES, alibi_slopes(c.n_head)[heads.start // d:(heads.start + heads.local) // d])
        self.post_attention_layernorm = layer_norm(h, c.layer_norm_epsilon)
        self.mlp = nn.Module()
        self.mlp.dense_h_to_4h = column_linear(h, {None: split_part(4 * h, tp)}, bias=True)
        self.mlp.dense_4h_to_h = row_linear(4 * h, h, True, tp)
        self.heads, self.head_dim = heads.local // d, d

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        ln = self.input_layernorm(x)
        residual = ln if self.post_norm_residual else x
        q, k, v = (t.view(-1, self.heads, self.head_dim)
                   for t in self.self_attention.query_key_value(ln).chunk(3, dim=-1))
        x = self.tp.all_reduce(self.self_attention.dense(self.attn(q, k, v))) + residual
        ln = self.post_attention_layernorm(x)
        residual = ln if self.post_norm_residual else x
        return self.tp.all_reduce(self.mlp.dense_4h_to_h(bloom_gelu(self.mlp.dense_h_to_4h(ln)))) + residual


class BloomForCausalLM(NativeCausalLM):
    supports_pp: ClassVar[Literal[True]] = True
    embedding_name, layers_name, last_stage_modules = "transformer.word_embeddings", "transformer.h", \
        ("transformer.ln_f",)

    def __init__(self, config: EngineConfig, parallel: ParallelState = SINGLE) -> None:
        super().__init__(config, parallel)
        c = self.hf_config
        embed, head = self.build_embedding()
        self.transformer = nn.Module()
        self.transformer.word_embeddings = embed or PPMissingLayer()
        self.transformer.word_embeddings_layernorm = layer_norm(c.hidden_size, c.layer_norm_epsilon) \
            if parallel.is_first_stage else PPMissingLayer()
        self.transformer.h = self.build_layers(lambda i: BloomBlock(c, i, parallel))
        self.transformer.ln_f = layer_norm(c.hidden_size, c.layer_norm_epsilon) if parallel.is_last_stage \
            else PPMissingLayer()
        self.lm_head = head or PPMissingLayer()

    @property
    def num_layers(self) -> int:
        return self.hf_config.n_layer

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.transformer.word_embeddings_layernorm(self.transformer.word_embeddings(input_ids))



MODELS = {"BloomForCausalLM": BloomForCausalLM}
