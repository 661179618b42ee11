"""Rewrites of a traced decode graph (decode_graphs.py), which must compute bitwise what the traced ops did: a
graph is kept only if its replay equals the eager forward. Best effort: they use TorchScript internals, and a
graph they fail on stays as traced.

Shape folding (here): the tracer records every shape read as ops (size, NumToTensor, Int, floor_divide: a
third of the nodes of a Llama step). A graph serves one batch size, so every input's shape is fixed but the
block tables' (their width grows with the context): with the others declared, TorchScript's shape
propagation and peephole turn those reads into constants, and common subexpression elimination merges what
every layer recomputes (the slots' block and offset, the cos and sin views).

Fusions, each beside the op it produces: the rotary embedding (rotary.py) and the residual add with the
RMSNorm after it (rms_norm.py).
"""

from __future__ import annotations

import torch

from pagedformers.logger import init_logger
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
