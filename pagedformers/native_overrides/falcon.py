"""Falcon (`FalconForCausalLM`, and `RWForCausalLM` as early checkpoints name it): one fused query_key_value in one
of three layouts (multi-query; grouped as in the "new decoder architecture" of Falcon-40B/180B; per-head q, k, v),
attention and MLP in parallel off one or two LayerNorms, rotary. The checkpoint's fused rows are reordered at load
into [q | k | v] of this rank's heads. ALiBi variants (Falcon-RW) pass BLOOM's slopes to the paged attention.
transformers' Falcon computes attention by hand, so the shell refuses it."""

from __future__ import annotations

from typing import ClassVar, Literal

import torch
from torch import nn
from transformers import PretrainedConfig

from pagedformers.attention.interface import ALIBI_SLOPES
from pagedformers.config import EngineConfig
from pagedformers.native_overrides.base import NativeCausalLM
from pagedformers.native_overrides.layers import (
    AttentionLayer,
    Rotary,
    RotaryEmbedding,
    activation,
    alibi_slopes,
    column_linear,
    layer_norm,
    read_tensor,
    row_linear,
    split_part,
    with_loader,
)
from pagedformers.parallel_plans import SINGLE, ParallelState
from pagedformers.parallel_plans.pp import PPMissingLayer


def num_kv_heads(c: PretrainedConfig) -> int:
    return c.num_kv_heads if c.new_decoder_architecture or not c.multi_query else 1


def qkv_rows(c: PretrainedConfig, tp: ParallelState) -> torch.Tensor:
    """Indices of the checkpoint's query_key_value rows that make this rank's [q | k | v] (heads in order)."""
    heads, kv_heads, d = c.num_attention_heads, num_kv_heads(c), c.hidden_size // c.num_attention_heads
    if c.new_decoder_architecture:  # [kv group, its q heads + k + v, d]
        per = heads // kv_heads + 2
        q_row = [(h // (per - 2) * per + h % (per - 2)) for h in range(heads)]
        k_row, v_row = [g * per + per - 2 for g in range(kv_heads)], [g * per + per - 1 for g in range(kv_heads)]
    elif c.multi_query:  # [q heads, k, v]
        q_row, k_row, v_row = list(range(heads)), [heads], [heads + 1]
    else:  # [head, (q, k, v), d]
        return interleaved_qkv_rows(heads, d, tp)
    return head_rows(q_row, k_row, v_row, d, tp)


def interleaved_qkv_rows(heads: int, d: int, tp: ParallelState) -> torch.Tensor:
    """The rows of this rank's [q | k | v] in a fused weight laid out [head, (q, k, v), d] (also Bloom's)."""
    return head_rows([3 * h for h in range(heads)], [3 * h + 1 for h in range(heads)],
                     [3 * h + 2 for h in range(heads)], d, tp)


def head_rows(q_row: list[int], k_row: list[int], v_row: list[int], d: int, tp: ParallelState) -> torch.Tensor:
    """Row indices of this rank's q heads, then its k and v heads, given where each head starts (in units of d)."""
    q, kv = split_part(len(q_row) * d, tp, d), split_part(len(k_row) * d, tp, d)
    mine = (q_row[q.start // d:(q.start + q.local) // d] + k_row[kv.start // d:(kv.start + kv.local) // d]
            + v_row[kv.start // d:(kv.start + kv.local) // d])
    return (torch.tensor(mine)[:, None] * d + torch.arange(d)).flatten()


def rows_linear(in_features: int, rows: torch.Tensor, bias: bool) -> nn.Linear:
    """A Linear made of these rows of the checkpoint's weight (and bias), in this order."""
    linear = nn.Linear(in_features, len(rows), bias=bias, device="meta")
    for param in linear.parameters():
        with_loader(param, lambda dst, src, shard: dst.copy_(read_tensor(src)[rows]))
    return linear


class FalconAttention(nn.Module):
    def __init__(self, c: PretrainedConfig, i: int, tp: ParallelState) -> None:
        super().__init__()
        d = c.hidden_size // c.num_attention_heads
        q, kv = split_part(c.num_attention_heads * d, tp, d), split_part(num_kv_heads(c) * d, tp, d)
        self.sizes, self.head_dim = [q.local, kv.local, kv.local], d
        self.query_key_value = rows_linear(c.hidden_size, qkv_rows(c, tp), c.bias)
        self.dense = row_linear(c.hidden_size, c.hidden_size, c.bias, tp)
        self.attn = AttentionLayer(i, q.local // d, kv.local // d, d, d ** -0.5)
        self.rotary = None if c.alibi else Rotary(d)
        if c.alibi:  # transformers scales (q.k + alibi) as a whole: the slopes too
            slopes = alibi_slopes(c.num_attention_heads)[q.start // d:(q.start + q.local) // d] * d ** -0.5
            setattr(self.attn, ALIBI_SLOPES, slopes)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        q, k, v = self.query_key_value(x).split(self.sizes, dim=-1)
        q, k, v = (t.view(-1, n // self.head_dim, self.head_dim) for t, n in zip((q, k, v), self.sizes))
        if self.rotary is not None:
            q, k = self.rotary(q, k, cos, sin)
        return self.dense(self.attn(q, k, v))


class FalconDecoderLayer(nn.Module):
    """transformers' FalconDecoderLayer.forward, branch for branch."""

    def __init__(self, c: PretrainedConfig, i: int, tp: ParallelState) -> None:
        super().__init__()
        self.tp, eps = tp, c.layer_norm_epsilon
        self.new_arch, self.parallel_attn = c.new_decoder_architecture, c.parallel_attn
        self.two_norms = c.parallel_attn and c.new_decoder_architecture and (c.num_ln_in_parallel_attn or 2) == 2
        if self.two_norms:
            self.ln_attn, self.ln_mlp = layer_norm(c.hidden_size, eps), layer_norm(c.hidden_size, eps)
        else:
            self.input_layernorm = layer_norm(c.hidden_size, eps)
        if not self.parallel_attn:
            self.post_attention_layernorm = layer_norm(c.hidden_size, eps)
        self.self_attention = FalconAttention(c, i, tp)
        self.mlp = nn.Module()
        ffn = c.ffn_hidden_size or 4 * c.hidden_size
        self.mlp.dense_h_to_4h = column_linear(c.hidden_size, {None: split_part(ffn, tp)}, c.bias)
        self.mlp.dense_4h_to_h = row_linear(ffn, c.hidden_size, c.bias, tp)
        self.act = activation(c.activation)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        residual = x
        attn_in = self.ln_attn(x) if self.two_norms else self.input_layernorm(x)
        attn = self.self_attention(attn_in, cos, sin)
        mlp_in = self.ln_mlp(x) if self.two_norms else attn_in
        if not self.new_arch and not self.parallel_attn:
            residual = residual + self.tp.all_reduce(attn)
            mlp_in = self.post_attention_layernorm(residual)
        out = self.mlp.dense_4h_to_h(self.act(self.mlp.dense_h_to_4h(mlp_in)))
        if self.new_arch or self.parallel_attn:
            out = out + attn
        return self.tp.all_reduce(out) + residual


class FalconForCausalLM(NativeCausalLM):
    supports_pp: ClassVar[Literal[True]] = True
    embedding_name, layers_name = "transformer.word_embeddings", "transformer.h"
    last_stage_modules = ("transformer.ln_f",)

    def __init__(self, config: EngineConfig, parallel: ParallelState = SINGLE) -> None:
        super().__init__(config, parallel)
        c = self.hf_config
        embed, head = self.build_embedding()
        self.transformer = nn.Module()
        self.transformer.word_embeddings = embed or PPMissingLayer()
        self.transformer.rotary_emb = RotaryEmbedding(c, c.hidden_size // c.num_attention_heads)
        self.transformer.h = self.build_layers(lambda i: FalconDecoderLayer(c, i, parallel))
        self.transformer.ln_f = layer_norm(c.hidden_size, c.layer_norm_epsilon) if parallel.is_last_stage \
            else PPMissingLayer()
        self.lm_head = head or PPMissingLayer()

    def layer_inputs(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, ...]:
        return self.transformer.rotary_emb(positions, dtype)


MODELS = {"FalconForCausalLM": FalconForCausalLM,
          "RWForCausalLM": type("RWForCausalLM", (FalconForCausalLM,), {"__module__": __name__})}
