"""Mixture-of-experts linears (a model's `GroupedLinear` modules: every expert's weight stacked [E, N, K], rows
sorted by expert) on the `grouped_linear` kernel, each expert's weight packed once as `linear` takes it.

`torch._grouped_mm` runs oneDNN per expert, on the weight as it lies: at a decode step's few rows an expert, 2 to
2.5x slower than the packed kernel (an [8, 512] x [2048, 512] bf16 matmul: 84 against 41 us on 2 Zen 5 cores). A
module is swapped only where, on random rows spread over its experts, the kernel gives what its own forward gives
(bf16 tolerance); its `weight` then becomes a meta tensor of the same shape (apply_model still reads its shape),
as PackedLinear's does, so the experts are not held twice.
"""

from __future__ import annotations

from types import MethodType
from typing import Any

import torch
from torch import nn

from pagedformers.platforms.cpu.huge_pages import empty_on_huge_pages
from pagedformers.platforms.cpu.kernels import bf16_cpu_kernels
from pagedformers.platforms.cpu.linear import pack_pairs


class PackedGroupedLinear:
    """A GroupedLinear's forward on the kernel."""

    def __init__(self, weight: torch.Tensor, kernels: Any) -> None:
        experts, self.n, _ = weight.shape
        first = pack_pairs(weight[0])
        self.packed = empty_on_huge_pages((experts, *first.shape), weight.dtype)
        self.packed[0].copy_(first)
        for e in range(1, experts):
            self.packed[e].copy_(pack_pairs(weight[e]))
        self.kernels = kernels

    def __call__(self, x: torch.Tensor, ends: torch.Tensor) -> torch.Tensor:
        return self.kernels.grouped_linear(x, self.packed, ends, self.n)


def pack_grouped_linears(model: nn.Module, dtype: torch.dtype, device: str) -> int:
    """Swap every matching bf16 GroupedLinear's forward for the kernel; returns how many were swapped."""
    kernels = bf16_cpu_kernels(dtype, device)
    if kernels is None:
        return 0
    swapped = 0
    for module in model.modules():
        weight = getattr(module, "weight", None)
        if not (type(module).__name__ == "GroupedLinear" and isinstance(weight, nn.Parameter) and weight.dim() == 3
                and weight.dtype == torch.bfloat16 and not weight.is_meta and isinstance(module.forward, MethodType)):
            continue
        fused = PackedGroupedLinear(weight.detach(), kernels)
        if _same_on_sample(module, fused, weight.shape):
            module.forward = fused
            module.weight = nn.Parameter(torch.empty_like(weight, device="meta"), requires_grad=False)
            swapped += 1
    return swapped


def _same_on_sample(module: nn.Module, fused: PackedGroupedLinear, shape: torch.Size) -> bool:
    experts, _, k = shape
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(3 * experts, k, generator=generator).to(torch.bfloat16)
    ends = torch.arange(1, experts + 1, dtype=torch.int32) * 3 - 1  # each expert 2-3 rows; the last row past all
    with torch.inference_mode():
        expected, ours = module.forward(x, ends)[: ends[-1]], fused(x, ends)[: ends[-1]]
    return ours.dtype == expected.dtype and torch.allclose(ours.float(), expected.float(), rtol=1e-2, atol=1e-2)
