"""HF gated MLPs (SwiGLU: `down_proj(act_fn(gate_proj(x)) * up_proj(x))`) with one compiled activation on CPU.

Once pack_linears made gate_proj and up_proj one sibling matmul, HF's forward still copies each half
out (the siblings' slices), runs silu on one and multiplies by the other: four passes over [T, 2I]
bf16. The kernel reads the fused output once and rounds as those two bf16 ops do (bitwise equal on
random inputs). An MLP is taken only where its gate and up are one sibling group, its activation is
SiLU, and the fused forward matches the module's own on a random input; the module stays (apply_model
sees the model's class and its projections), only its forward is swapped.
"""

from __future__ import annotations

from collections.abc import Callable
from types import MethodType
from typing import Any

import torch
from torch import nn

from pagedformers.platforms.cpu.kernels import bf16_cpu_kernels
from pagedformers.platforms.cpu.linear import SiblingGroup, SiblingLinear
from pagedformers.platforms.cpu.module_swap import swap_forward_if_same


class FusedGatedMLP:
    """A gated MLP module's forward: the sibling matmul, the kernel, then the module's own down_proj."""

    def __init__(self, original: Callable[..., torch.Tensor], group: SiblingGroup, gate: int, up: int,
                 down: nn.Module, kernels: Any) -> None:
        self.original, self.group, self.down, self.kernels = original, group, down, kernels
        self.gate_col, self.up_col = group.bounds[gate], group.bounds[up]
        self.width = group.bounds[gate + 1] - group.bounds[gate]

    def __call__(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        if args or kwargs or x.dtype != torch.bfloat16:
            return self.original(x, *args, **kwargs)
        gate_up = self.group.linear(x)
        flat = gate_up.view(-1, gate_up.shape[-1])
        hidden = flat.new_empty(flat.shape[0], self.width)
        self.kernels.silu_and_mul(flat, self.gate_col, self.up_col, self.width, hidden)
        return self.down(hidden.view(*gate_up.shape[:-1], self.width))


def _is_silu(act: Any) -> bool:
    return isinstance(act, nn.SiLU) or type(act).__name__ == "SiLUActivation" or act is nn.functional.silu


def fuse_gated_mlps(model: nn.Module, dtype: torch.dtype, device: str) -> int:
    """Swap the forward of every matching bf16 SwiGLU MLP (after pack_linears); returns how many were swapped."""
    kernels = bf16_cpu_kernels(dtype, device)
    if kernels is None:
        return 0
    swapped = 0
    for module in model.modules():
        gate, up = getattr(module, "gate_proj", None), getattr(module, "up_proj", None)
        down = getattr(module, "down_proj", None)
        if not (isinstance(gate, SiblingLinear) and isinstance(up, SiblingLinear) and gate.group is up.group
                and isinstance(down, nn.Module) and _is_silu(getattr(module, "act_fn", None))
                and gate.out_features == up.out_features and gate.out_features % 16 == 0
                and isinstance(module.forward, MethodType)):  # not swapped already
            continue
        x = torch.randn(5, gate.in_features, generator=torch.Generator().manual_seed(0)).to(torch.bfloat16)
        fused = FusedGatedMLP(module.forward, gate.group, gate.member, up.member, down, kernels)
        swapped += swap_forward_if_same(module, fused, x)
    return swapped
