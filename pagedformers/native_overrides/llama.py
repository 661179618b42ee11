"""The Llama family, written once and driven by the config: Llama, Mistral, Qwen2, Qwen3 (QK norm), SmolLM3 (layers
without RoPE), and the MoE members Mixtral and Qwen3-MoE (moe.py's experts in place of the MLP).

Q, K and V load into one `qkv_proj`, gate and up into one `gate_up_proj`; the residual add and the next norm stay
adjacent, as in transformers, so the CPU platform fuses them in decode graphs; they are one `add_norm` call (vLLM's
layers pass (hidden, residual) pairs likewise), which the CUDA platform runs on one kernel.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import ClassVar, Literal

import torch
from torch import nn
from transformers import PretrainedConfig

from pagedformers.config import EngineConfig
from pagedformers.native_overrides.base import Fused, NativeCausalLM
from pagedformers.native_overrides.layers import (
    AttentionLayer,
    RMSNorm,
    Rotary,
    RotaryEmbedding,
    activation,
    column_linear,
    row_linear,
    split_part,
)
from pagedformers.native_overrides.moe import MIXTRAL_EXPERTS, QWEN_EXPERTS, SparseMoe, is_moe_layer
from pagedformers.parallel_plans import SINGLE, ParallelState
from pagedformers.parallel_plans.pp import PPMissingLayer


@dataclass(frozen=True)
class Variant:
    """What tells the family's members apart, read from the config."""
    qkv_bias: bool
    o_bias: bool
    mlp_bias: bool
    qk_norm: bool

    @classmethod
    def of(cls, c: PretrainedConfig) -> Variant:
        attention_bias = bool(getattr(c, "attention_bias", False))
        qwen2 = c.model_type == "qwen2"  # biases on q, k and v only, whatever the config says
        return cls(qkv_bias=attention_bias or qwen2, o_bias=attention_bias and not qwen2,
                   mlp_bias=bool(getattr(c, "mlp_bias", False)), qk_norm=c.model_type in ("qwen3", "qwen3_moe"))


def head_dim(c: PretrainedConfig) -> int:
    return getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads


def sliding_window(c: PretrainedConfig, i: int) -> int | None:
    layer_types = getattr(c, "layer_types", None)
    if layer_types:
        return c.sliding_window if layer_types[i] == "sliding_attention" else None
    return getattr(c, "sliding_window", None)


class LlamaAttention(nn.Module):
    def __init__(self, c: PretrainedConfig, i: int, variant: Variant, tp: ParallelState) -> None:
        super().__init__()
        d = head_dim(c)
        q = split_part(c.num_attention_heads * d, tp, d)
        kv = split_part(c.num_key_value_heads * d, tp, d)
        self.sizes = [q.local, kv.local, kv.local]
        self.qkv_proj = column_linear(c.hidden_size, {"q": q, "k": kv, "v": kv}, variant.qkv_bias)
        self.o_proj = row_linear(c.num_attention_heads * d, c.hidden_size, variant.o_bias, tp)
        self.q_norm = RMSNorm(d, c.rms_norm_eps) if variant.qk_norm else None
        self.k_norm = RMSNorm(d, c.rms_norm_eps) if variant.qk_norm else None
        no_rope = getattr(c, "no_rope_layers", None)  # SmolLM3: 1 where a layer uses RoPE
        self.rotary = Rotary(d) if not no_rope or bool(no_rope[i]) else None
        self.head_dim = d
        self.attn = AttentionLayer(i, q.local // d, kv.local // d, d, d ** -0.5, sliding_window(c, i))

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        q, k, v = self.qkv_proj(x).split(self.sizes, dim=-1)
        q, k, v = (t.view(-1, n // self.head_dim, self.head_dim) for t, n in zip((q, k, v), self.sizes))
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        if self.rotary is not None:
            q, k = self.rotary(q, k, cos, sin)
        return self.o_proj(self.attn(q, k, v))  # this rank's partial sum


class GatedMLP(nn.Module):
    def __init__(self, hidden: int, intermediate: int, act: str, bias: bool, tp: ParallelState) -> None:
        super().__init__()
        part = split_part(intermediate, tp)
        self.gate_up_proj = column_linear(hidden, {0: part, 1: part}, bias)
        self.down_proj = row_linear(intermediate, hidden, bias, tp)
        self.act_fn = activation(act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up_proj(x).chunk(2, dim=-1)
        return self.down_proj(self.act_fn(gate) * up)  # this rank's partial sum


class LlamaDecoderLayer(nn.Module):
    def __init__(self, c: PretrainedConfig, i: int, variant: Variant, tp: ParallelState) -> None:
        super().__init__()
        self.tp = tp
        self.input_layernorm = RMSNorm(c.hidden_size, c.rms_norm_eps)
        self.self_attn = LlamaAttention(c, i, variant, tp)
        self.post_attention_layernorm = RMSNorm(c.hidden_size, c.rms_norm_eps)
        mlp = SparseMoe(c, tp) if is_moe_layer(c, i) else \
            GatedMLP(c.hidden_size, c.intermediate_size, c.hidden_act, variant.mlp_bias, tp)
        self.mlp_name = "block_sparse_moe" if c.model_type == "mixtral" else "mlp"  # as the checkpoint names it
        self.add_module(self.mlp_name, mlp)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                residual: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(x, residual) -> the MLP's output and the residual it is still to be added to (by the next norm's
        add_norm); residual None: x is the hidden states themselves (a stage's first layer)."""
        if residual is None:
            residual, x = x, self.input_layernorm(x)
        else:
            x, residual = self.input_layernorm.add_norm(x, residual)
        x, residual = self.post_attention_layernorm.add_norm(self.tp.all_reduce(self.self_attn(x, cos, sin)), residual)
        return self.tp.all_reduce(self._modules[self.mlp_name](x)), residual


class Trunk(nn.Module):
    """What transformers calls the base model (`model.`): embeddings, layers, final norm."""


class LlamaForCausalLM(NativeCausalLM):
    supports_pp: ClassVar[Literal[True]] = True
    layers_pass_residuals: ClassVar[bool] = True  # LlamaDecoderLayer's (output, residual); a subclass's may not
    fused = (Fused(".q_proj.", ".qkv_proj.", "q"), Fused(".k_proj.", ".qkv_proj.", "k"),
             Fused(".v_proj.", ".qkv_proj.", "v"), Fused(".gate_proj.", ".gate_up_proj.", 0),
             Fused(".up_proj.", ".gate_up_proj.", 1))

    def __init__(self, config: EngineConfig, parallel: ParallelState = SINGLE) -> None:
        super().__init__(config, parallel)
        c, variant = self.hf_config, Variant.of(self.hf_config)
        self.build_trunk(lambda i: LlamaDecoderLayer(c, i, variant, parallel),
                         lambda: RMSNorm(c.hidden_size, c.rms_norm_eps), head_dim(c))

    def build_trunk(self, make_layer: Callable[[int], nn.Module], make_norm: Callable[[], nn.Module],
                    rotary_dim: int) -> None:
        """`model.` (embeddings, rotary, this stage's layers, final norm on the last stage) and `lm_head`."""
        embed, head = self.build_embedding()
        self.model = Trunk()
        self.model.embed_tokens = embed or PPMissingLayer()
        self.model.rotary_emb = RotaryEmbedding(self.hf_config, rotary_dim)
        self.model.layers = self.build_layers(make_layer)
        self.model.norm = make_norm() if self.parallel.is_last_stage else PPMissingLayer()
        self.lm_head = head or PPMissingLayer()

    def layer_inputs(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, ...]:
        return self.model.rotary_emb(positions, dtype)

    def run_layers(self, hidden: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """NativeCausalLM's, each layer's last residual add left to the norm after it (the next layer's, the final
        one) as one add_norm call; a stage before the last adds it itself."""
        if not self.layers_pass_residuals:
            return super().run_layers(hidden, positions)
        cos, sin = self.layer_inputs(positions, hidden.dtype)
        residual = None
        for i in self.own_layers:
            hidden, residual = self.model.layers[i](hidden, cos, sin, residual)
        if not self.parallel.is_last_stage:
            return residual + hidden
        return self.model.norm.add_norm(hidden, residual)[0]

    def checkpoint_targets(self, name: str) -> list[tuple[str, object]]:
        target = self.expert_names.target(name)
        return [target] if target is not None else super().checkpoint_targets(name)

    def checkpoint_name(self, param: str, shard: object) -> str:
        return self.expert_names.checkpoint_name(param, shard) or super().checkpoint_name(param, shard)

    @property
    def expert_names(self):
        return MIXTRAL_EXPERTS if self.hf_config.model_type == "mixtral" else QWEN_EXPERTS


# One class per architecture, named as transformers names it (what apply_model shows); the config drives the rest.
MODELS: dict[str, type[LlamaForCausalLM]] = {
    name: type(name, (LlamaForCausalLM,), {"__module__": __name__, "__doc__": f"Native {name}."})
    for name in ("MistralForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM", "SmolLM3ForCausalLM",
                 "MixtralForCausalLM", "Qwen3MoeForCausalLM")
} | {"LlamaForCausalLM": LlamaForCausalLM}
