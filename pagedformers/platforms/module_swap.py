"""Swapping a module's forward for a faster one, kept only where both agree on a sample input (any platform)."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn


def swap_forward_if_same(module: nn.Module, fused: Callable[..., torch.Tensor], x: torch.Tensor) -> bool:
    """Make `fused` the module's forward if, on `x`, it returns what the module's own forward returns
    (bf16 tolerance); returns whether it did."""
    with torch.inference_mode():
        expected, ours = module.forward(x), fused(x)
    if expected.dtype != ours.dtype or not torch.allclose(ours.float(), expected.float(), rtol=1e-2, atol=1e-2):
        return False
    module.forward = fused
    return True
