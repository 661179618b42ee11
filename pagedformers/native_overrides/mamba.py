"""Mamba (`MambaForCausalLM`), Falcon-Mamba (`FalconMambaForCausalLM`) and Mamba-2 (`Mamba2ForCausalLM`): selective
state-space layers, no
attention, so no KV cache. Each request keeps its layers' state (the last conv inputs and the SSM state) in a
`MambaState` that the worker carries from chunk to chunk (`SupportsPerRequestState`); unlike transformers' torch
path, whose full-sequence scan starts from zero, the scan here starts from the carried state, so a later prompt
chunk runs whole. transformers' Mamba base class does not declare `_supports_attention_backend`, so the shell
refuses it. The mixer is also Jamba's (jamba.py).
"""

from __future__ import annotations

from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PretrainedConfig

from pagedformers.config import EngineConfig
from pagedformers.native_overrides.base import NativeCausalLM
from pagedformers.native_overrides.layers import RMSNorm, activation, copy_whole, replicated, with_loader
from pagedformers.parallel_plans import SINGLE, ParallelState
from pagedformers.parallel_plans.pp import PPMissingLayer


class MambaState:
    """One request's Mamba layer states, by layer index: `conv` [I, K - 1] (the last inputs of the causal conv),
    `ssm` [I, N] float32."""

    def __init__(self) -> None:
        self.conv: dict[int, torch.Tensor] = {}
        self.ssm: dict[int, torch.Tensor] = {}
        self.num_seen_tokens = 0


def weightless_rms_norm(x: torch.Tensor, eps: float) -> torch.Tensor:
    """Falcon-Mamba's norm of dt, B and C (float32 statistics, no weight)."""
    f = x.float()
    return (f * torch.rsqrt(f.pow(2).mean(-1, keepdim=True) + eps)).type_as(x)


class MambaMixer(nn.Module):
    """in_proj -> causal depthwise conv -> selective scan gated by silu(z) -> out_proj, for one request's chunk."""

    def __init__(self, c: PretrainedConfig, i: int, intermediate: int, dt_rank: int, use_bias: bool,
                 use_conv_bias: bool, inner_norm: str | None = None) -> None:
        super().__init__()
        n = getattr(c, "state_size", None) or c.mamba_d_state  # Mamba's name, Jamba's
        k = getattr(c, "conv_kernel", None) or c.mamba_d_conv
        self.layer_idx, self.state_size, self.kernel, self.dt_rank, self.intermediate = i, n, k, dt_rank, intermediate
        meta = dict(device="meta")
        self.in_proj = replicated(nn.Linear(c.hidden_size, 2 * intermediate, bias=use_bias, **meta))
        self.conv1d = replicated(nn.Conv1d(intermediate, intermediate, k, groups=intermediate, bias=use_conv_bias,
                                           padding=k - 1, **meta))
        self.x_proj = replicated(nn.Linear(intermediate, dt_rank + 2 * n, bias=False, **meta))
        # Its weight is read directly, as transformers does (the bias joins in float32 later): not a Linear,
        # which a platform could swap for a packed one
        self.dt_proj = replicated(nn.Module())
        self.dt_proj.weight = with_loader(nn.Parameter(torch.empty(intermediate, dt_rank, **meta), requires_grad=False),
                                          copy_whole)
        self.dt_proj.bias = with_loader(nn.Parameter(torch.empty(intermediate, **meta), requires_grad=False),
                                        copy_whole)
        self.A_log = with_loader(nn.Parameter(torch.empty(intermediate, n, **meta), requires_grad=False), copy_whole)
        self.D = with_loader(nn.Parameter(torch.empty(intermediate, **meta), requires_grad=False), copy_whole)
        self.out_proj = replicated(nn.Linear(intermediate, c.hidden_size, bias=use_bias, **meta))
        self.act = activation(getattr(c, "hidden_act", "silu"))
        # Falcon-Mamba: weightless norms of dt, B, C; Jamba: weighted ones (modules dt/b/c_layernorm)
        self.inner_norm, self.eps = inner_norm, getattr(c, "mixer_rms_eps", 1e-6)
        if inner_norm == "weighted":
            self.dt_layernorm = RMSNorm(dt_rank, c.rms_norm_eps)
            self.b_layernorm = RMSNorm(n, c.rms_norm_eps)
            self.c_layernorm = RMSNorm(n, c.rms_norm_eps)

    def forward(self, x: torch.Tensor, state: MambaState) -> torch.Tensor:
        """x [T, hidden], one request's consecutive tokens -> [T, hidden]; advances `state`."""
        u, z = self.in_proj(x).chunk(2, dim=-1)  # [T, I]
        past = state.conv.get(self.layer_idx)
        if past is None:
            past = u.new_zeros(self.intermediate, self.kernel - 1)
        inputs = torch.cat((past, u.t()), dim=1)  # [I, K - 1 + T]
        state.conv[self.layer_idx] = inputs[:, 1 - self.kernel:]
        u = self.act(F.conv1d(inputs[None], self.conv1d.weight, self.conv1d.bias, groups=self.intermediate)[0]).t()
        dt, b, c = self.x_proj(u).split([self.dt_rank, self.state_size, self.state_size], dim=-1)
        if self.inner_norm == "weightless":
            dt, b, c = (weightless_rms_norm(t, self.eps) for t in (dt, b, c))
        elif self.inner_norm == "weighted":
            dt, b, c = self.dt_layernorm(dt), self.b_layernorm(b), self.c_layernorm(c)
        # transformers' dtypes throughout: dt in the activations' dtype, the states and their sums in float32
        dt = F.softplus(dt @ self.dt_proj.weight.t() + self.dt_proj.bias.to(dt.dtype))  # [T, I]
        y = self.scan(u, dt, b, c, state)
        return self.out_proj((y * F.silu(z)).to(x.dtype))

    def scan(self, u: torch.Tensor, dt: torch.Tensor, b: torch.Tensor, c: torch.Tensor,
             state: MambaState) -> torch.Tensor:
        """h_t = exp(A dt_t) h_(t-1) + dt_t B_t u_t;  y_t = h_t C_t + D u_t, from the request's carried h."""
        a = -torch.exp(self.A_log.float())
        decay = torch.exp(a[None] * dt[..., None])  # [T, I, N]
        inflow = dt[..., None] * b[:, None, :].float() * u[..., None].float()
        h = state.ssm.get(self.layer_idx)
        if h is None:
            h = torch.zeros(self.intermediate, self.state_size, dtype=torch.float32, device=u.device)
        ys = []
        for t in range(len(u)):
            h = decay[t] * h + inflow[t]
            ys.append(h.to(u.dtype) @ c[t])
        state.ssm[self.layer_idx] = h
        return torch.stack(ys) + u * self.D.float()


class Mamba2Mixer(nn.Module):
    """Mamba-2: in_proj -> (gate, conv'd x B C, dt per head) -> a scalar decay per head, B and C shared by groups of
    heads -> transformers' gated group RMSNorm -> out_proj."""

    def __init__(self, c: PretrainedConfig, i: int) -> None:
        super().__init__()
        self.layer_idx, self.heads, self.head_dim, self.groups = i, c.num_heads, c.head_dim, c.n_groups
        self.intermediate, self.state_size, self.kernel = int(c.expand * c.hidden_size), c.state_size, c.conv_kernel
        self.conv_dim = self.intermediate + 2 * self.groups * self.state_size
        self.dt_min, self.dt_max = c.time_step_limit
        self.eps = c.layer_norm_epsilon
        meta = dict(device="meta")
        self.in_proj = replicated(nn.Linear(c.hidden_size, self.intermediate + self.conv_dim + self.heads,
                                            bias=c.use_bias, **meta))
        self.conv1d = replicated(nn.Conv1d(self.conv_dim, self.conv_dim, self.kernel, groups=self.conv_dim,
                                           bias=c.use_conv_bias, padding=self.kernel - 1, **meta))
        self.dt_bias, self.A_log, self.D = (
            with_loader(nn.Parameter(torch.empty(self.heads, **meta), requires_grad=False), copy_whole)
            for _ in range(3))
        self.norm = nn.Module()
        self.norm.weight = with_loader(nn.Parameter(torch.empty(self.intermediate, **meta), requires_grad=False),
                                       copy_whole)
        self.out_proj = replicated(nn.Linear(self.intermediate, c.hidden_size, bias=c.use_bias, **meta))
        self.act = activation(c.hidden_act)

    def forward(self, x: torch.Tensor, state: MambaState) -> torch.Tensor:
        gate, xbc, dt = self.in_proj(x).split([self.intermediate, self.conv_dim, self.heads], dim=-1)
        past = state.conv.get(self.layer_idx)
        if past is None:
            past = xbc.new_zeros(self.conv_dim, self.kernel - 1)
        inputs = torch.cat((past, xbc.t()), dim=1)
        state.conv[self.layer_idx] = inputs[:, 1 - self.kernel:]
        xbc = self.act(F.conv1d(inputs[None], self.conv1d.weight, self.conv1d.bias, groups=self.conv_dim)[0]).t()
        u, b, c = xbc.split([self.intermediate, self.groups * self.state_size, self.groups * self.state_size], dim=-1)
        dt = F.softplus(dt.float() + self.dt_bias.float()).clamp(self.dt_min, self.dt_max)  # [T, heads]
        y = self.scan(u.view(-1, self.heads, self.head_dim), dt, b, c, state).view(-1, self.intermediate)
        return self.out_proj(self.gated_norm(y, gate).to(x.dtype))

    def scan(self, u: torch.Tensor, dt: torch.Tensor, b: torch.Tensor, c: torch.Tensor,
             state: MambaState) -> torch.Tensor:
        """h_t = exp(A_h dt_t) h_(t-1) + dt_t u_t B_t^T;  y_t = h_t C_t + D_h u_t, per head h, from the carried h."""
        per_group = self.heads // self.groups
        b, c = (t.float().view(-1, self.groups, 1, self.state_size).repeat_interleave(per_group, dim=1) for t in (b, c))
        decay = torch.exp(dt * -torch.exp(self.A_log.float()))  # [T, heads]
        inflow = (dt[..., None] * u.float())[..., None] * b  # [T, heads, P, N]
        h = state.ssm.get(self.layer_idx)
        if h is None:
            h = torch.zeros(self.heads, self.head_dim, self.state_size, dtype=torch.float32, device=u.device)
        ys = []
        for t in range(len(u)):
            h = decay[t, :, None, None] * h + inflow[t]
            ys.append((h * c[t]).sum(-1))
        state.ssm[self.layer_idx] = h
        return torch.stack(ys) + u.float() * self.D.float()[:, None]

    def gated_norm(self, y: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
        """transformers' MambaRMSNormGated: RMS over each group of the gated output, then the weight."""
        y = (y.float() * F.silu(gate.float())).view(-1, self.groups, self.intermediate // self.groups)
        y = y * torch.rsqrt(y.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.norm.weight * y.view(-1, self.intermediate).to(gate.dtype)


class MambaBlock(nn.Module):
    def __init__(self, c: PretrainedConfig, i: int, inner_norm: str | None) -> None:
        super().__init__()
        self.residual_in_fp32 = c.residual_in_fp32
        self.norm = RMSNorm(c.hidden_size, c.layer_norm_epsilon)
        self.mixer = Mamba2Mixer(c, i) if c.model_type == "mamba2" else \
            MambaMixer(c, i, c.intermediate_size, c.time_step_rank, c.use_bias, c.use_conv_bias, inner_norm)

    def forward(self, x: torch.Tensor, state: MambaState) -> torch.Tensor:
        residual = x.float() if self.residual_in_fp32 else x
        return residual + self.mixer(self.norm(x.to(self.norm.weight.dtype)), state)


class StateSpaceModel(NativeCausalLM):
    """A native model with Mamba layers: `SupportsPerRequestState`, on one rank."""

    resumes_prefill: ClassVar[bool] = True  # the scan starts from the carried state

    @classmethod
    def unsupported(cls, config: EngineConfig) -> str | None:
        if config.parallel.world_size > 1:
            return "its state-space layers do not split over ranks (tensor or pipeline parallel)"
        return super().unsupported(config)

    def create_state(self) -> MambaState:
        return MambaState()

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, state: MambaState | None = None,
                stage_input: torch.Tensor | None = None) -> torch.Tensor:
        """One request's chunk (or the probe's prompt, with a state of its own); positions are implied by the
        state: no layer of these models reads them."""
        state = MambaState() if state is None else state
        hidden = self.embed(input_ids)
        layers = self.get_submodule(self.layers_name)
        for i in self.own_layers:
            hidden = layers[i](hidden, state)
        return self.get_submodule(self.last_stage_modules[0])(hidden).to(self.config.model.dtype)


class MambaForCausalLM(StateSpaceModel):
    embedding_name, layers_name, last_stage_modules = "backbone.embeddings", "backbone.layers", ("backbone.norm_f",)
    inner_norm: ClassVar[str | None] = None

    def __init__(self, config: EngineConfig, parallel: ParallelState = SINGLE) -> None:
        super().__init__(config, parallel)
        c = self.hf_config
        embed, head = self.build_embedding()
        self.backbone = nn.Module()
        self.backbone.embeddings = embed or PPMissingLayer()
        self.backbone.layers = self.build_layers(lambda i: MambaBlock(c, i, self.inner_norm))
        self.backbone.norm_f = RMSNorm(c.hidden_size, c.layer_norm_epsilon)
        self.lm_head = head or PPMissingLayer()


class FalconMambaForCausalLM(MambaForCausalLM):
    inner_norm = "weightless"


class Mamba2ForCausalLM(MambaForCausalLM):
    pass


MODELS = {"MambaForCausalLM": MambaForCausalLM, "FalconMambaForCausalLM": FalconMambaForCausalLM,
          "Mamba2ForCausalLM": Mamba2ForCausalLM}
