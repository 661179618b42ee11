"""Checkpoints in `compressed-tensors`' pack-quantized format (what llm-compressor writes for W4A16 / W8A16, and vLLM
loads): weight-only, symmetric int4 or int8, in groups along the input or one scale a row.

A quantized linear `X` is stored as `X.weight_packed` (int32 [N, K * bits / 32]: element j of a row at bit j * bits
of its word j * bits // 32, least significant first, stored as q + 2^(bits - 1)), `X.weight_scale` ([N, K / group]
in the model's dtype) and `X.weight_shape` ([N, K]); dequantized, W = float32(q) * scale, cast to the scale's dtype
(compressed-tensors' own rule, which transformers applies). The stream below turns each triple into that dense
`X.weight`, so every loader, device and parallel layout runs it, and, where asked, also into the CPU kernel's form
(loading/gguf_quantized.py: 32-wide groups, the scale repeated).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch

from pagedformers.config.quantization import PackedScheme
from pagedformers.loading.gguf_quantized import QuantizedWeight, pack_nibbles

_PARTS = ("weight_packed", "weight_scale", "weight_shape")
_IGNORED = ("weight_zero_point", "weight_g_idx")  # absent from symmetric checkpoints; refused below if present


def unpack(packed: torch.Tensor, shape: tuple[int, int], bits: int) -> torch.Tensor:
    """int32 [N, K * bits / 32] -> the signed integers [N, K] (int8)."""
    words = packed.to(torch.int64) & 0xFFFFFFFF  # the word as unsigned
    shifts = torch.arange(0, 32, bits, dtype=torch.int64)
    fields = (words[..., None] >> shifts) & ((1 << bits) - 1)  # [N, words, 32 / bits], least significant first
    return (fields.reshape(packed.shape[0], -1)[:, : shape[1]] - (1 << (bits - 1))).to(torch.int8)


def dense_weights(weights: Iterator[tuple[str, Any]], scheme: PackedScheme,
                  quantized: dict[str, QuantizedWeight] | None) -> Iterator[tuple[str, Any]]:
    """The stream with each quantized linear's triple replaced by its dense `weight`; into `quantized`, where given,
    each also in the kernel's form, by weight name."""
    from pagedformers.loading.weights import materialize  # the weight streams' module imports this one

    pending: dict[str, dict[str, torch.Tensor]] = {}
    for name, tensor in weights:
        prefix, _, part = name.rpartition(".")
        if part in _IGNORED:
            raise ValueError(f"compressed-tensors: {name} (zero points or a group index): not supported")
        if part not in _PARTS:
            yield name, tensor
            continue
        parts = pending.setdefault(prefix, {})
        parts[part] = materialize(tensor)
        if len(parts) < len(_PARTS):
            continue
        del pending[prefix]
        n, k = (int(d) for d in parts["weight_shape"])
        q, scale = unpack(parts["weight_packed"], (n, k), scheme.bits), parts["weight_scale"]
        group = k if scheme.group is None else scheme.group
        if k % group or tuple(scale.shape) != (n, k // group):
            raise ValueError(f"compressed-tensors: {prefix} has {k} columns and scales {tuple(scale.shape)}: groups of "
                             f"{group} do not tile it")
        yield f"{prefix}.weight", (q.view(n, -1, group).float() * scale.float()[..., None]).view(n, k).to(scale.dtype)
        if quantized is not None:
            kernel_form = _kernel_form(q, scale.float(), group, scheme.bits, scale.dtype)
            if kernel_form is not None:
                quantized[f"{prefix}.weight"] = kernel_form
    if pending:
        raise ValueError(f"compressed-tensors: incomplete quantized weights {sorted(pending)[:5]} (each needs "
                         f"{', '.join(_PARTS)})")


def _kernel_form(q: torch.Tensor, scale: torch.Tensor, group: int, bits: int,
                 scale_dtype: torch.dtype) -> QuantizedWeight | None:
    """The kernel's 32-wide groups (a wider group's scale repeated), or None where groups do not split so."""
    n, k = q.shape
    if group % 32 or k % 32:
        return None
    scales = scale.repeat_interleave(group // 32, dim=1).contiguous()
    kind, rounded_to = f"W{bits}A16", scale_dtype
    if bits == 8:
        return QuantizedWeight(q.contiguous(), scales, None, 8, 32, kind, rounded_to)
    return QuantizedWeight(pack_nibbles((q + 8).to(torch.uint8)), scales, -8 * scales, 4, 32, kind, rounded_to)
