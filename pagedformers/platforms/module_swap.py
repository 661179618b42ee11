"""Swapping a module's forward (or another of its methods) for a faster one, kept only where both agree on a
sample input (any platform)."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn


def swap_forward_if_same(module: nn.Module, fused: Callable[..., torch.Tensor], *inputs: torch.Tensor) -> bool:
    """Make `fused` the module's forward if, on `inputs`, it returns what the module's own forward returns
    (bf16 tolerance); returns whether it did."""
    return swap_method_if_same(module, "forward", fused, *inputs)


def swap_method_if_same(module: nn.Module, name: str, fused: Callable[..., object], *inputs: torch.Tensor) -> bool:
    """As swap_forward_if_same for the module's method `name`, whose result is a tensor or a tuple of them."""
    with torch.inference_mode():
        expected, ours = getattr(module, name)(*inputs), fused(*inputs)
    if isinstance(expected, torch.Tensor):
        expected, ours = (expected,), (ours,)
    if len(ours) != len(expected) or not all(_close(a, b) for a, b in zip(ours, expected)):
        return False
    setattr(module, name, fused)
    return True


def _close(ours: torch.Tensor, expected: torch.Tensor) -> bool:
    return ours.dtype == expected.dtype and ours.shape == expected.shape \
        and torch.allclose(ours.float(), expected.float(), rtol=1e-2, atol=1e-2)
