"""Rewrites of a traced decode graph (decode_graphs.py), which must compute bitwise what the traced ops did: a
graph is kept only if its replay equals the eager forward. Best effort: they use TorchScript internals, and a
graph they fail on stays as traced.

Shape folding (here): the tracer records every shape read as ops (size, NumToTensor, Int, floor_divide: a
third of the nodes of a Llama step). A graph serves one batch size, so every input's shape is fixed but the
block tables' (their width grows with the context): with the others declared, TorchScript's shape
propagation and peephole turn those reads into constants, and common subexpression elimination merges what
every layer recomputes (the slots' block and offset, the cos and sin views).

View chains (here): the layers reshape a tensor and back (heads out of the hidden dim, into transformers'
[B, H, T, D], out again for the kernels), each view one interpreted node costing more than the kernel calls
beside it at batch 1. A view whose sizes and strides equal those of a tensor it was derived from, through views
that keep the storage offset, is that tensor: its uses take it, and the chain is dropped.

Fusions, each beside the op it produces: the rotary embedding (rotary.py) and the residual add with the
RMSNorm after it (rms_norm.py).
"""

from __future__ import annotations

import torch

from pagedformers.logger import init_logger
from pagedformers.platforms.cpu.graph_ops import constant
from pagedformers.platforms.cpu.rms_norm import fuse_residual_norms
from pagedformers.platforms.cpu.rotary import fuse_rotary

logger = init_logger(__name__)

FUSIONS = (fuse_rotary, fuse_residual_norms)  # each (graph) -> number of nodes it fused, in this order


def rewrite(graph: torch.Graph, inputs: tuple[torch.Tensor, ...], growing: torch.Tensor | None) -> None:
    """Every rewrite, in place, on a graph traced from `inputs` (`growing`: the one whose shape may change)."""
    try:
        fold_shapes(graph, inputs, growing)
        for fuse in FUSIONS:
            fuse(graph)
        fold_view_chains(graph)
    except Exception as e:  # noqa: BLE001 (an optimisation only)
        logger.debug("Decode graph rewrites stopped: %s", e)


def fold_shapes(graph: torch.Graph, inputs: tuple[torch.Tensor, ...], growing: torch.Tensor | None) -> None:
    """Shape reads into constants, then common subexpressions merged (see the module docstring)."""
    for value, tensor in zip(graph.inputs(), inputs):
        if tensor is not growing:
            value.setType(torch._C.TensorType.create_from_tensor(tensor))
    for _ in range(2):  # the second round sees the sizes of views whose shapes the first made constant
        torch._C._jit_pass_propagate_shapes_on_graph(graph)
        torch._C._jit_pass_peephole(graph, False)
        torch._C._jit_pass_constant_propagation(graph)
    torch._C._jit_pass_cse(graph)
    torch._C._jit_pass_dce(graph)


# Views that keep the storage offset (and select and slice from index 0: _keeps_offset)
_VIEWS = frozenset({"aten::transpose", "aten::unsqueeze", "aten::view", "aten::flatten", "aten::squeeze",
                    "aten::permute"})


def fold_view_chains(graph: torch.Graph) -> int:
    """Replace each view equal to one of its own ancestors (see the module docstring) by it; returns how many."""
    folded = 0
    for node in list(graph.nodes()):
        if not _keeps_offset(node) or len(list(node.outputs())) != 1:
            continue
        out = node.output()
        layout = _layout(out)
        if layout is None:
            continue
        source = node.inputsAt(0)
        while True:
            if _layout(source) == layout:
                out.replaceAllUsesWith(source)
                folded += 1
                break
            if not _keeps_offset(source.node()):
                break
            source = source.node().inputsAt(0)
    if folded:
        torch._C._jit_pass_dce(graph)
    return folded


def _keeps_offset(node: torch.Node) -> bool:
    if node.kind() in _VIEWS:
        return True
    if node.kind() == "aten::select":
        return constant(node.inputsAt(2)) == 0
    if node.kind() == "aten::slice":
        return constant(node.inputsAt(2)) in (0, None) and constant(node.inputsAt(4)) == 1
    return False


def _layout(value: torch.Value) -> tuple[str, tuple[int, ...], tuple[int, ...]] | None:
    """(dtype, sizes, strides) where the value's type gives them all, else None."""
    kind = value.type()
    if not isinstance(kind, torch._C.TensorType) or kind.dim() is None:
        return None
    try:
        sizes, strides = kind.sizes(), kind.strides()
    except RuntimeError:  # a size or stride the trace left open
        return None
    if sizes is None or strides is None or None in sizes or None in strides:
        return None
    return str(kind.scalarType()), tuple(sizes), tuple(strides)
