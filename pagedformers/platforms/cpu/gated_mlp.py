"""HF gated MLPs (SwiGLU: `down_proj(act_fn(gate_proj(x)) * up_proj(x))`) with one compiled activation on CPU.

Once pack_linears made gate_proj and up_proj one sibling matmul, HF's forward still copies each half
out (the siblings' slices), runs silu on one and multiplies by the other: four passes over [T, 2I]
bf16. The kernel reads the fused output once and rounds as those two bf16 ops do (bitwise equal on
random inputs). An MLP is taken only where its gate and up are one sibling group (or one packed
`gate_up_proj`, as native models load them), its activation is SiLU, and the fused forward matches the
module's own on a random input; the module stays (apply_model sees the model's class and its
projections), only its forward is swapped.
"""

from __future__ import annotations

from collections.abc import Callable
from types import MethodType
from typing import Any

import torch
from torch import nn

from pagedformers.platforms.cpu.kernels import bf16_cpu_kernels
from pagedformers.platforms.cpu.linear import PackedLinear, SiblingGroup, SiblingLinear
from pagedformers.platforms.module_swap import swap_forward_if_same


class FusedGatedMLP:
    """A gated MLP module's forward: the one matmul of gate and up, the kernel, then the module's own down_proj."""

    def __init__(self, original: Callable[..., torch.Tensor], gate_up: nn.Module, gate_col: int, up_col: int,
                 width: int, down: nn.Module, kernels: Any) -> None:
        self.original, self.gate_up, self.down, self.kernels = original, gate_up, down, kernels
        self.gate_col, self.up_col, self.width = gate_col, up_col, width

    @classmethod
    def of_siblings(cls, original: Callable[..., torch.Tensor], group: SiblingGroup, gate: int, up: int,
                    down: nn.Module, kernels: Any) -> FusedGatedMLP:
        width = group.bounds[gate + 1] - group.bounds[gate]
        return cls(original, group.linear, group.bounds[gate], group.bounds[up], width, down, kernels)

    def __call__(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        if args or kwargs or x.dtype != torch.bfloat16:
            return self.original(x, *args, **kwargs)
        gate_up = self.gate_up(x)
        flat = gate_up.view(-1, gate_up.shape[-1])
        hidden = flat.new_empty(flat.shape[0], self.width)
        self.kernels.silu_and_mul(flat, self.gate_col, self.up_col, self.width, hidden)
        return self.down(hidden.view(*gate_up.shape[:-1], self.width))


def _is_silu(act: Any) -> bool:
    return isinstance(act, nn.SiLU) or type(act).__name__ == "SiLUActivation" or act is nn.functional.silu


def fuse_gated_mlps(model: nn.Module, dtype: torch.dtype, device: str) -> int:
    """Swap the forward of every matching bf16 SwiGLU MLP (after pack_linears); returns how many were swapped.
    Gate and up are either one sibling group (`gate_proj`, `up_proj`) or one packed linear whose output is gate
    then up (`gate_up_proj`, the native models')."""
    kernels = bf16_cpu_kernels(dtype, device)
    if kernels is None:
        return 0
    swapped = 0
    for module in model.modules():
        down = getattr(module, "down_proj", None)
        fused = _fused_forward(module, kernels)
        if fused is None or not (isinstance(down, nn.Module) and _is_silu(getattr(module, "act_fn", None))
                                 and fused.width % 16 == 0 and isinstance(module.forward, MethodType)):
            continue  # not a SwiGLU MLP, or swapped already
        x = torch.randn(5, fused.gate_up.in_features, generator=torch.Generator().manual_seed(0)).to(torch.bfloat16)
        swapped += swap_forward_if_same(module, fused, x)
    return swapped


def _fused_forward(module: nn.Module, kernels: Any) -> FusedGatedMLP | None:
    gate, up, down = (getattr(module, n, None) for n in ("gate_proj", "up_proj", "down_proj"))
    if isinstance(gate, SiblingLinear) and isinstance(up, SiblingLinear) and gate.group is up.group \
            and gate.out_features == up.out_features:
        return FusedGatedMLP.of_siblings(module.forward, gate.group, gate.member, up.member, down, kernels)
    gate_up = getattr(module, "gate_up_proj", None)
    if isinstance(gate_up, PackedLinear) and gate_up.out_features % 2 == 0:
        half = gate_up.out_features // 2
        return FusedGatedMLP(module.forward, gate_up, 0, half, half, down, kernels)
    return None
