"""Linears on GGUF weights kept quantized (loading/gguf_quantized.py), on the CPU kernel `quantized_linear`.

A step of a few rows (decodes) runs the kernel: it reads the weight's 4.5-8.5 bits a value once and widens each
group in registers, where a dense bf16 step reads 16. A step of more rows (a prefill) is compute-bound: it
dequantizes the weight (`dequantize_weight`, a pass over N x K) and runs a dense matmul on it.

Swapped in after loading, where the loaded parameter is exactly the quantized weight's dequantization in the
model's dtype: a weight this cannot read, or that a model fused in a way it does not know, stays dense.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from pagedformers.loading.gguf_quantized import QuantizedWeight
from pagedformers.logger import init_logger

logger = init_logger(__name__)

# Rows up to which the kernel beats dequantize + dense matmul (benchmarks/quantized.py: 576 x 1536, Zen 5).
KERNEL_ROWS = 16


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
        return F.linear(x, self.dense_weight().to(x.dtype), self.bias)

    def dense_weight(self) -> torch.Tensor:
        return self.kernels.dequantize_weight(self.values, self.scales, self.mins, self.bits, self.group)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, {self.kind} ({self.bits}-bit)"


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
        if weight.shape != tuple(module.weight.shape) or \
                not torch.equal(weight.dequantize().to(module.weight.dtype), module.weight):
            dense.append(name)
            continue
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child, QuantizedLinear(module, weight, kernels))
        swapped += 1
    if dense:
        logger.warning("%d quantized GGUF weights run dequantized (their layer is laid out otherwise than the file), "
                       "e.g. %s", len(dense), dense[0])
    model.quantized_weights = {}  # held by the layers now
    return swapped
