"""The CUDA platform's layer swaps: HF RMSNorm and SwiGLU MLP modules run on the Triton kernels of kernels.py,
and the native RMSNorm's `add_norm` (the residual add and the norm after it) on the fused one.

As on the CPU platform, a module is recognised by its shape (a `*RMSNorm` with a 1-d weight and an eps; an MLP
with gate_proj / up_proj / down_proj, or a packed gate_up_proj, and a SiLU activation) and its forward is swapped
only where the kernel returns what the module's own forward returns on a random input: a variant keeps its own.
The module stays (apply_model sees the model's class and weights). Device-agnostic: on a CPU, in Triton's
interpreter, the tests run exactly this code.
"""

from __future__ import annotations

from collections.abc import Callable
from types import MethodType
from typing import Any

import torch
from torch import nn

from pagedformers.platforms.cuda.kernels import add_rms_norm, rms_norm, silu_and_mul
from pagedformers.platforms.module_swap import swap_forward_if_same, swap_method_if_same


class TritonRMSNorm:
    def __init__(self, original: Callable[..., torch.Tensor], weight: torch.Tensor, eps: float,
                 offset: float) -> None:
        self.original, self.weight, self.eps, self.offset = original, weight, eps, offset

    def __call__(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        if args or kwargs or x.dtype != self.weight.dtype or x.shape[-1] != self.weight.shape[0] \
                or x.stride(-1) != 1:
            return self.original(x, *args, **kwargs)
        return rms_norm(x, self.weight, self.eps, self.offset)


class TritonAddRMSNorm:
    """A native RMSNorm's add_norm on the fused kernel; inputs it does not take go to the module's own."""

    def __init__(self, original: Callable[..., tuple[torch.Tensor, torch.Tensor]], weight: torch.Tensor,
                 eps: float) -> None:
        self.original, self.weight, self.eps = original, weight, eps

    def __call__(self, x: torch.Tensor, residual: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if x.shape != residual.shape or not x.dtype == residual.dtype == self.weight.dtype \
                or x.shape[-1] != self.weight.shape[0] or x.stride(-1) != 1 or residual.stride(-1) != 1:
            return self.original(x, residual)
        return add_rms_norm(x, residual, self.weight, self.eps)


class TritonGatedMLP:
    """down_proj(silu(gate) * up), gate and up from their own linears or from one packed gate_up_proj."""

    def __init__(self, original: Callable[..., torch.Tensor], module: nn.Module) -> None:
        self.original, self.module = original, module
        self.packed = getattr(module, "gate_up_proj", None)

    def __call__(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        if args or kwargs:
            return self.original(x, *args, **kwargs)
        if self.packed is not None:
            gate_up = self.packed(x)
            gate, up = gate_up.chunk(2, dim=-1)
        else:
            gate, up = self.module.gate_proj(x), self.module.up_proj(x)
        return self.module.down_proj(silu_and_mul(gate, up))


def swap_rms_norms(model: nn.Module) -> int:
    swapped = 0
    for module in model.modules():
        weight = getattr(module, "weight", None)
        eps = getattr(module, "variance_epsilon", getattr(module, "eps", None))
        if not (type(module).__name__.endswith("RMSNorm") and isinstance(weight, nn.Parameter) and weight.dim() == 1
                and isinstance(eps, float) and isinstance(module.forward, MethodType)):
            continue
        x = _sample(weight.shape[0], weight)
        original = module.forward
        swapped += any(swap_forward_if_same(module, TritonRMSNorm(original, weight, eps, offset), x)
                       for offset in (0.0, 1.0))  # Llama's weight, Gemma's 1 + weight
    return swapped


def swap_residual_norms(model: nn.Module) -> int:
    """Swap the `add_norm` of every native RMSNorm (Llama's rounding) the fused kernel matches on a sample."""
    swapped = 0
    for module in model.modules():
        weight, eps = getattr(module, "weight", None), getattr(module, "variance_epsilon", None)
        add_norm = getattr(module, "add_norm", None)
        if not (isinstance(add_norm, MethodType) and isinstance(weight, nn.Parameter) and weight.dim() == 1
                and isinstance(eps, float)):
            continue
        x, residual = _sample(weight.shape[0], weight), _sample(weight.shape[0], weight, seed=1)
        swapped += swap_method_if_same(module, "add_norm", TritonAddRMSNorm(add_norm, weight, eps), x, residual)
    return swapped


def swap_gated_mlps(model: nn.Module) -> int:
    swapped = 0
    for module in model.modules():
        linears = [getattr(module, n, None) for n in ("gate_proj", "up_proj")]
        packed = getattr(module, "gate_up_proj", None)
        down = getattr(module, "down_proj", None)
        inputs = packed if packed is not None else linears[0]
        if not (isinstance(down, nn.Module) and _is_silu(getattr(module, "act_fn", None))
                and (packed is not None or all(isinstance(m, nn.Module) for m in linears))
                and isinstance(getattr(inputs, "weight", None), torch.Tensor) and inputs.weight.dim() == 2
                and isinstance(module.forward, MethodType)):
            continue  # not a SwiGLU MLP (a MoE's experts: stacked [E, N, K] weights), or swapped already
        swapped += swap_forward_if_same(module, TritonGatedMLP(module.forward, module),
                                        _sample(inputs.weight.shape[1], inputs.weight))
    return swapped


def _is_silu(act: Any) -> bool:
    return isinstance(act, nn.SiLU) or type(act).__name__ == "SiLUActivation" or act is nn.functional.silu


def _sample(width: int, like: torch.Tensor, seed: int = 0) -> torch.Tensor:
    x = torch.randn(5, width, generator=torch.Generator().manual_seed(seed)) * 3
    return x.to(device=like.device, dtype=like.dtype)
