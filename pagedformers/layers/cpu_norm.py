"""HF RMSNorm modules run by one compiled kernel on CPU (bf16).

HF's Llama-style RMSNorm is eight ops with two float32 copies of the activations: ~46 us at 32
tokens and ~1 ms at 2048 (hidden 1024, 2 cores), 25 calls per step of a 12-layer model. The kernel
reproduces its rounding (float math, bf16 before and after the weight). Norms are recognised by
class name (`*RMSNorm`) and kept only where the kernel matches the module's own forward on a random
input, so a variant (Gemma's 1 + weight, a norm without weight) keeps its own forward. The module
itself stays (apply_model sees the model's class, its weight and eps); only its forward is swapped.
"""

from __future__ import annotations

from types import MethodType
from typing import Any, Callable

import torch
from torch import nn

from pagedformers.kernels.cpu import bf16_cpu_kernels
from pagedformers.layers import swap_forward_if_same


class FusedRMSNorm:
    """A norm module's forward: the kernel for contiguous bf16 input, the module's own forward otherwise."""

    def __init__(self, original: Callable[..., torch.Tensor], weight: torch.Tensor, eps: float,
                 kernels: Any) -> None:
        self.original, self.weight, self.eps, self.kernels = original, weight, eps, kernels

    def __call__(self, hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        h = self.weight.shape[0]
        if args or kwargs or hidden_states.dtype != torch.bfloat16 or hidden_states.shape[-1] != h \
                or not hidden_states.is_contiguous():
            return self.original(hidden_states, *args, **kwargs)
        out = torch.empty_like(hidden_states)
        self.kernels.rms_norm(hidden_states.view(-1, h), self.weight, self.eps, out.view(-1, h))
        return out


def fuse_rms_norms(model: nn.Module, dtype: torch.dtype, device: str) -> int:
    """Swap the forward of every matching bf16 RMSNorm for the kernel; returns how many were swapped."""
    kernels = bf16_cpu_kernels(dtype, device)
    if kernels is None:
        return 0
    swapped = 0
    for module in model.modules():
        weight = getattr(module, "weight", None)
        eps = getattr(module, "variance_epsilon", getattr(module, "eps", None))
        if not (type(module).__name__.endswith("RMSNorm") and isinstance(weight, nn.Parameter) and weight.dim() == 1
                and weight.dtype == torch.bfloat16 and weight.shape[0] % 16 == 0 and isinstance(eps, float)
                and isinstance(module.forward, MethodType)):  # not swapped already
            continue
        x = (torch.randn(5, weight.shape[0], generator=torch.Generator().manual_seed(0)) * 3).to(torch.bfloat16)
        swapped += swap_forward_if_same(module, FusedRMSNorm(module.forward, weight, eps, kernels), x)
    return swapped
