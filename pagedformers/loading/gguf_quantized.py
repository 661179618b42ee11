"""GGUF linear weights kept quantized: each block type regrouped into one form the CPU kernel reads.

Every GGUF type this covers dequantizes, group by group along a weight row, as w = scale * q + min with q a
small integer: Q8_0 and Q4_0 (min 0, or -8 scale), Q4_1, Q5_0 / Q5_1, and the K-quants Q4_K / Q5_K (8 groups of
32 a 256-block, 6-bit scales and mins under fp16 ones) and Q6_K (16 groups of 16, int8 scales). Only the scales
and mins are parsed from the blocks; q is recovered from transformers' own dequantized tensor (which has been
through the architecture's row permutations, e.g. Llama's q/k), and the result must give that tensor back
bitwise, or the weight stays dense. So a layout this module misreads can cost speed, never correctness.

Storage: 4-bit values two a byte (Q4_*: 6 bits a weight with the float32 scales and mins), the others int8
(Q8_0: 9 bits a weight with its float32 scales; Q5_* and Q6_K: 9-10).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch


@dataclass
class QuantizedWeight:
    """A [N, K] linear weight: w[n, k] = scales[n, k // group] * q[n, k] + mins[n, k // group]."""
    values: torch.Tensor  # int8 [N, K]; or, 4 bits: uint8 [N, K // 2], a group's element l in byte l's low nibble,
    #                       element l + 16 in its high one
    scales: torch.Tensor  # float32 [N, K // group]
    mins: torch.Tensor | None  # float32 [N, K // group], or None where every min is 0
    bits: int
    group: int
    kind: str  # the GGUF type's name, or W4A16 / W8A16
    rounded_to: torch.dtype = torch.float32  # the dtype the checkpoint's own dequantization rounds to

    @property
    def shape(self) -> tuple[int, int]:
        return self.values.shape[0], self.values.shape[1] * 8 // self.bits

    def nbytes(self) -> int:
        return sum(t.nbytes for t in (self.values, self.scales, self.mins) if t is not None)

    def dequantize(self) -> torch.Tensor:
        """float32 [N, K], rounded as gguf's numpy dequantization rounds (scale * q, then + min)."""
        n, k = self.shape
        if self.bits == 4:
            v = self.values.view(n, k // 32, 16)
            q = torch.cat([v & 0x0F, v >> 4], dim=-1).view(n, k)
        else:
            q = self.values
        w = (q.view(n, -1, self.group).float() * self.scales[..., None])
        if self.mins is not None:
            w = w + self.mins[..., None]
        return w.view(n, k)


# GGUF type name -> (group, storage bits, the blocks' parser: [blocks, bytes] uint8 -> scales, mins [blocks, groups])
_Groups = Callable[[np.ndarray], tuple[np.ndarray, np.ndarray | None]]


def _fp16(blocks: np.ndarray, at: int) -> np.ndarray:
    return blocks[:, at:at + 2].copy().view(np.float16).astype(np.float32)  # [blocks, 1]


def _k_quant(blocks: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Q4_K / Q5_K: d, dmin (fp16), then 12 bytes of eight 6-bit scales and mins."""
    from gguf.quants import Q4_K

    sc, m = Q4_K.get_scale_min(blocks[:, 4:16].copy())
    return _fp16(blocks, 0) * sc.astype(np.float32), -(_fp16(blocks, 2) * m.astype(np.float32))


_TYPES: dict[str, tuple[int, int, _Groups]] = {
    "Q8_0": (32, 8, lambda b: (_fp16(b, 0), None)),
    "Q4_0": (32, 4, lambda b: (_fp16(b, 0), -8 * _fp16(b, 0))),
    "Q4_1": (32, 4, lambda b: (_fp16(b, 0), _fp16(b, 2))),
    "Q5_0": (32, 8, lambda b: (_fp16(b, 0), -16 * _fp16(b, 0))),
    "Q5_1": (32, 8, lambda b: (_fp16(b, 0), _fp16(b, 2))),
    "Q4_K": (32, 4, _k_quant),
    "Q5_K": (32, 8, _k_quant),
    "Q6_K": (16, 8, lambda b: (_fp16(b, 208) * b[:, 192:208].copy().view(np.int8).astype(np.float32), None)),
}
SUPPORTED_TYPES = tuple(_TYPES)


def quantized_groups(kind: str, raw: np.ndarray) -> tuple[np.ndarray, np.ndarray | None, int, int] | None:
    """(scales, mins, group, bits) of a 2-d GGUF tensor's raw blocks [N, row bytes], scales and mins [N, groups],
    in the file's row order; None for a type this does not keep quantized."""
    if kind not in _TYPES or raw.ndim != 2:
        return None
    import gguf

    group, bits, parse = _TYPES[kind]
    block_size, type_size = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType[kind]]
    n = raw.shape[0]
    scales, mins = parse(raw.reshape(-1, type_size))
    scales = np.broadcast_to(scales, (scales.shape[0], block_size // group)).reshape(n, -1)
    mins = None if mins is None else np.broadcast_to(mins, (mins.shape[0], block_size // group)).reshape(n, -1)
    return scales, mins, group, bits


def regroup(kind: str, dense: torch.Tensor, scales: np.ndarray, mins: np.ndarray | None, group: int,
            bits: int) -> QuantizedWeight | None:
    """The weight whose dequantization is `dense` (float32 [N, K], rows in the model's order, as are the scales
    and mins), or None if the groups do not give `dense` back bitwise."""
    n, k = dense.shape
    if scales.shape != (n, k // group) or k % group:
        return None
    s = torch.from_numpy(np.array(scales, dtype=np.float32))
    m = None if mins is None else torch.from_numpy(np.array(mins, dtype=np.float32))
    shifted = dense.view(n, -1, group) - (0 if m is None else m[..., None])
    q = torch.where(s[..., None] != 0, shifted / s[..., None], 0).round_().view(n, k)
    low, high = (0, 15) if bits == 4 else (-128, 127)
    if q.min() < low or q.max() > high:
        return None
    if bits == 8 and m is not None:  # a min that is -c * scale everywhere (Q5_0: c = 16) folds into q
        m, q = _fold_constant_min(s, m, q.view(n, -1, group))
        q = q.view(n, k)
    if bits == 4:
        values = pack_nibbles(q.to(torch.uint8))
    else:
        values = q.to(torch.int8)
    weight = QuantizedWeight(values.contiguous(), s, m, bits, group, kind)
    return weight if torch.equal(weight.dequantize(), dense.float()) else None


def quantized_linears(file: str, meta_model: torch.nn.Module, config: dict,
                      dense: dict[str, torch.Tensor]) -> dict[str, QuantizedWeight]:
    """{HF weight name: its quantized form} for the 2-d quantized tensors of a GGUF file that regroup exactly;
    `dense` is transformers' dequantized load of the same file (its names and row order are the reference)."""
    import gguf
    from transformers.modeling_gguf_pytorch_utils import (
        TENSOR_PROCESSORS,
        TensorProcessor,
        get_gguf_hf_weights_map,
        read_field,
    )

    reader = gguf.GGUFReader(file)  # the load's own parse, within gguf_parsed_once
    processor = TENSOR_PROCESSORS.get(read_field(reader, "general.architecture")[0], TensorProcessor)(config=config)
    hf_names = get_gguf_hf_weights_map(meta_model, processor)
    kept = {}
    for tensor in reader.tensors:
        kind = tensor.tensor_type.name
        groups = quantized_groups(kind, np.asarray(tensor.data))
        if groups is None:
            continue
        scales, mins, group, bits = groups
        try:  # the architecture's row permutation, as transformers applies it to the dense tensor
            permuted = _rows_as_transformers_orders_them(processor, scales, mins, tensor.name)
        except Exception:  # noqa: BLE001 (a processor that reshapes or splits more than rows: stays dense)
            continue
        name = hf_names.get(permuted[0].name)
        if name is None or not _runs_as_a_linear(meta_model, name) or name not in dense or dense[name].dim() != 2:
            continue
        weight = regroup(kind, dense[name], permuted[0].weights, permuted[1], group, bits)
        if weight is not None:
            kept[name] = weight
    return kept


def _rows_as_transformers_orders_them(processor: Any, scales: np.ndarray, mins: np.ndarray | None,
                                      name: str) -> tuple[Any, np.ndarray | None]:
    """The processed scales (with the name transformers gives the tensor) and mins. Processors that store split
    tensors aside (MoE experts, GPT-2's head) get a scratch dict to write into; any that cannot take [N, groups]
    arrays raise, and the weight stays dense."""
    def process(array: np.ndarray) -> Any:
        return processor.process(weights=array, name=name, parsed_parameters={"tensors": {}})
    scaled = process(scales)
    return scaled, None if mins is None else process(mins).weights


def _runs_as_a_linear(meta_model: torch.nn.Module | None, name: str) -> bool:
    """Whether the weight is a linear's, or an input embedding the head is tied to (an untied embedding table is
    only looked up: regrouping it would cost memory and time for nothing)."""
    if meta_model is None or not name.endswith(".weight"):
        return name.endswith(".weight")
    try:
        module = meta_model.get_submodule(name.rpartition(".")[0])
    except AttributeError:
        return False
    tied = getattr(meta_model.config.get_text_config(), "tie_word_embeddings", False)
    return isinstance(module, torch.nn.Linear) or (isinstance(module, torch.nn.Embedding) and tied)


def pack_nibbles(u: torch.Tensor) -> torch.Tensor:
    """uint8 [N, K] of values 0-15 -> [N, K // 2]: in each group of 32, byte l holds element l (low nibble) and
    element l + 16 (high)."""
    n, k = u.shape
    halves = u.view(n, -1, 2, 16)
    return (halves[:, :, 0] | (halves[:, :, 1] << 4)).reshape(n, k // 2).contiguous()


def _fold_constant_min(scales: torch.Tensor, mins: torch.Tensor,
                       q: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor]:
    """(None, q - c) where every min is -c * its scale for one integer c, else (mins, q) as they were: int8 groups
    then carry no mins (4 bytes a group fewer, and no second dot product)."""
    c = -mins[0, 0] / scales[0, 0] if scales[0, 0] != 0 else torch.tensor(0.0)
    if c != c.round() or not torch.equal(mins, -c * scales) or (q - c).min() < -128 or (q - c).max() > 127:
        return mins, q
    return None, q - c


def stack_rows(parts: list[QuantizedWeight]) -> QuantizedWeight | None:
    """The weights one under the other (a fused q/k/v or gate/up parameter), or None where their groups differ."""
    first = parts[0]
    if any((p.bits, p.group, p.shape[1]) != (first.bits, first.group, first.shape[1]) for p in parts):
        return None
    mins = None
    if any(p.mins is not None for p in parts):
        mins = torch.cat([p.mins if p.mins is not None else torch.zeros_like(p.scales) for p in parts])
    kinds = "+".join(dict.fromkeys(p.kind for p in parts))
    rounded_to = first.rounded_to if all(p.rounded_to == first.rounded_to for p in parts) else torch.float32
    return QuantizedWeight(torch.cat([p.values for p in parts]), torch.cat([p.scales for p in parts]), mins,
                           first.bits, first.group, kinds, rounded_to)
