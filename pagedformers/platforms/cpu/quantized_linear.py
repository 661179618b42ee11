"""Linears on weights kept quantized (GGUF: loading/gguf_quantized.py; compressed-tensors:
loading/compressed_tensors.py), on the CPU kernel `quantized_linear`.

A step of a few rows (decodes) runs the kernel: it reads the weight's 6 (4-bit types) or 9-10 bits a value once
and widens each group in registers, where a dense bf16 step reads 16. A step of more rows (a prefill, a large batch
of decodes) is compute-bound: it dequantizes the weight into the activations' dtype (`dequantize_weight`, one
vectorised pass over N x K) and runs a dense matmul on it.

Swapped in after loading, where the loaded parameter is the quantized weight's dequantization in the model's dtype
(to its rounding): a weight this cannot read, or that a model fused in a way it does not know, stays dense.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from pagedformers.loading.gguf_quantized import QuantizedWeight
from pagedformers.logger import init_logger

logger = init_logger(__name__)

# Rows up to which the kernel beats dequantizing to bf16 + a dense matmul: 2 Zen 5 cores, 576x1536 and 1536x576
# Q4_1, Q8_0, Q6_K weights, kernel / dense us: 4 rows 45-58 / 105-113, 8 rows 85-93 / 115-120, 12 rows 124-195 /
# 131-134 (the kernel's time grows with the rows, the dense path's mostly with the weight).
KERNEL_ROWS = 8


class QuantizedLinear(nn.Linear):
    """An nn.Linear whose `weight` is a meta tensor (shape and dtype kept for code that reads them) and whose
    forward runs on the quantized weight."""

    def __init__(self, linear: nn.Linear, weight: QuantizedWeight, kernels: Any) -> None:
        nn.Module.__init__(self)
        self.out_features, self.in_features = weight.shape
        self.kernels, self.bits, self.group, self.kind = kernels, weight.bits, weight.group, weight.kind
        self.register_buffer("values", weight.values, persistent=False)
        self.register_buffer("scales", weight.scales, persistent=False)
        self.register_buffer("mins", weight.mins if weight.mins is not None else torch.empty(0), persistent=False)
        self.weight = nn.Parameter(torch.empty_like(linear.weight, device="meta"), requires_grad=False)
        self.bias = linear.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.numel() // x.shape[-1]
        if rows <= KERNEL_ROWS:
            out = self.kernels.quantized_linear(x, self.values, self.scales, self.mins, self.bits, self.group)
            return out if self.bias is None else out + self.bias
        return F.linear(x, self.dense_weight(x.dtype), self.bias)

    def dense_weight(self, dtype: torch.dtype) -> torch.Tensor:
        return self.kernels.dequantize_weight(self.values, self.scales, self.mins, self.bits, self.group, dtype)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, {self.kind} ({self.bits}-bit)"


def _same_weight(weight: QuantizedWeight, loaded: torch.Tensor) -> bool:
    """Whether the loaded parameter is the quantized weight: bitwise once rounded as the checkpoint's own
    dequantization rounds (GGUF, bf16 / fp16 scales), else element by element within two roundings of the loaded
    dtype (float32 scales times 4-bit values sum differently with a min than scaled once). A row or group out of
    place differs by the weights themselves."""
    exact = weight.dequantize()
    if torch.equal(exact.to(weight.rounded_to).to(loaded.dtype), loaded):
        return True
    eps = torch.finfo(loaded.dtype).eps
    scale = weight.scales.abs().repeat_interleave(weight.group, dim=1)
    return bool(((exact - loaded.float()).abs() <= 2 * eps * (loaded.float().abs() + scale)).all())


def swap_quantized_linears(model: nn.Module, kernels: Any) -> int:
    """Every nn.Linear whose weight the model kept quantized at load (`quantized_weights`, by parameter name; a
    tied head by its embedding's) becomes a QuantizedLinear; returns how many did."""
    quantized: dict[str, QuantizedWeight] = getattr(model, "quantized_weights", None) or {}
    if not quantized:
        return 0
    by_tensor = {id(p): quantized[name] for name, p in model.named_parameters(remove_duplicate=False)
                 if name in quantized}
    swapped, dense = 0, []
    for name, module in list(model.named_modules(remove_duplicate=False)):
        weight = by_tensor.get(id(getattr(module, "weight", None)))
        if type(module) is not nn.Linear or weight is None:
            continue
        if weight.shape != tuple(module.weight.shape) or not _same_weight(weight, module.weight):
            dense.append(name)
            continue
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child, QuantizedLinear(module, weight, kernels))
        swapped += 1
    if dense:
        logger.warning("%d quantized weights run dequantized (their layer is laid out otherwise than the file), "
                       "e.g. %s", len(dense), dense[0])
    model.quantized_weights = {}  # held by the layers now
    return swapped
