"""Reading a traced TorchScript graph's nodes: what the decode-graph fusions (rotary.py, rms_norm.py) match on."""

from __future__ import annotations

import torch

INT64_MAX = 2**63 - 1


def constant(value: torch.Value) -> object:
    """A constant node's value; a sentinel that equals nothing otherwise."""
    return value.toIValue() if value.node().kind() == "prim::Constant" else object()


def bf16_sizes(value: torch.Value) -> list[int | None] | None:
    """The sizes (None where unknown) of a bf16 tensor value of known rank, else None."""
    kind = value.type()
    if not isinstance(kind, torch._C.TensorType) or kind.scalarType() != "BFloat16" or kind.dim() is None:
        return None
    return kind.varyingSizes()


def contiguous_bf16_sizes(value: torch.Value) -> list[int] | None:
    """The sizes of a bf16 tensor value whose type gives every size and a contiguous layout, else None."""
    sizes = bf16_sizes(value)
    if sizes is None or None in sizes:
        return None
    try:
        strides = value.type().strides()
    except RuntimeError:  # a stride the trace did not fix
        return None
    if strides is None or None in strides:
        return None
    expected = 1
    for size, stride in reversed(list(zip(sizes, strides))):
        if size != 1 and stride != expected:
            return None
        expected *= size
    return list(sizes)


def is_slice(node: torch.Node, of: torch.Value, last: int, start: int, end: int | None) -> bool:
    """Whether `node` is `of[..., start:end]` (end None: to the end) along the last dim, step 1."""
    if node.kind() != "aten::slice" or node.inputsAt(0).unique() != of.unique():
        return False
    dim, begin, stop, step = (constant(node.inputsAt(i)) for i in range(1, 5))
    starts = (0, None) if start == 0 else (start,)
    stops = (None, INT64_MAX) if end is None else (end,)
    return dim in (-1, last) and begin in starts and stop in stops and step == 1


def replace_with_kernel(graph: torch.Graph, op: str, inputs: list[torch.Value], before: torch.Node,
                        outputs_like: list[torch.Value]) -> list[torch.Value]:
    """A new `op` node before `before`, its outputs typed as `outputs_like`; returns its outputs."""
    node = graph.create(op, inputs, len(outputs_like))
    node.insertBefore(before)
    for out, like in zip(node.outputs(), outputs_like):
        out.setType(like.type())
    return list(node.outputs())
