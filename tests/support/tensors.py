"""Tensor comparisons the tests share."""

import torch


def assert_bf16_close(actual: torch.Tensor, expected: torch.Tensor) -> None:
    """Equal up to fp32 summation order before the bf16 rounding: at most a unit or two in the last place."""
    assert actual.dtype == expected.dtype == torch.bfloat16 and actual.shape == expected.shape
    torch.testing.assert_close(actual.float(), expected.float(), rtol=1.6e-2, atol=1e-3)
