"""Rewrites of a traced decode graph (engine/decode_graphs.py), which must compute bitwise what the traced ops
did: a graph is kept only if its replay equals the eager forward. Best effort: they use TorchScript internals,
and a graph they fail on stays as traced.

- Shape folding (fold_shapes): the tracer records every shape read as ops (size, NumToTensor, Int,
  floor_divide: a third of the ~3400 nodes of a 12-layer Llama step). A graph serves one batch size, so
  every input's shape is fixed but the block tables' (their width grows with the context): with the others
  declared, TorchScript's shape propagation and peephole turn those reads into constants (batch 1, 200M
  Llama: 10.8 -> 10.5 ms a replay), and common subexpression elimination merges what every layer
  recomputes (the slots' block and offset, the cos and sin views): 3378 -> 581 nodes with the next rewrite.
- Rotary embedding (fuse_rotary): `q * cos + rotate_half(q) * sin` with `rotate_half(x) = cat(-x2, x1)`
  (Llama and the models copied from it) is eight nodes a tensor, two tensors a layer, ~25 us a layer at
  batch 1 (ops on [1, 16, 1, 64] tensors cost more to dispatch than to run), against ~3 us for the
  `rotary_embed` kernel. With the CSE above, 200M Llama: 10.50 -> 10.08 ms a batch-1 step (median of 30
  alternated rounds in one process), ~2% at 32 decodes.
- Residual add and norm (fuse_residual_norms): `s = a + b` followed by our RMSNorm of `s` (layers/cpu_norm.py:
  empty_like, two views, `rms_norm`) become one `add_rms_norm` node that returns both. Between weight reads
  that leave the caches cold, ATen's add costs ~13 us at batch 1 (~3.5 us warm): TensorIterator's code and
  data are evicted by every linear (a step's non-linear nodes take ~2.3 ms between the linears, ~1.0 ms with
  the linears skipped). 200M Llama, batch 1, with the attention path's slices and copies that were no-ops
  (attention/torch_backend.py): 563 -> 431 nodes, 2.33 -> 2.14 ms of non-linear replay (median of 8
  alternated rounds in one process; the linears' time varies more than that between rounds).
"""

from __future__ import annotations

import torch

from pagedformers.kernels.cpu import cpu_kernels
from pagedformers.logger import init_logger

logger = init_logger(__name__)

_INT64_MAX = 2**63 - 1


def rewrite(graph: torch.Graph, inputs: tuple[torch.Tensor, ...], growing: torch.Tensor | None) -> None:
    """Every rewrite, in place, on a graph traced from `inputs` (`growing`: the one whose shape may change)."""
    try:
        fold_shapes(graph, inputs, growing)
        fuse_rotary(graph)
        fuse_residual_norms(graph)
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


def fuse_rotary(graph: torch.Graph) -> int:
    """Replace each bf16 rotate-half rotary embedding in `graph` with one `rotary_embed` kernel node; returns
    how many. Only graph shapes it matches exactly are rewritten: a model whose rotary differs keeps its ops."""
    fused = 0
    for add in list(graph.nodes()):
        matched = _match_rotary(add)
        if matched is None:
            continue
        if cpu_kernels() is None:  # a match is bf16, whose layers loaded the kernels already where they exist
            return 0
        node = graph.create("pagedformers::rotary_embed", list(matched), 1)
        node.insertBefore(add)
        node.output().setType(add.output().type())
        add.output().replaceAllUsesWith(node.output())
        fused += 1
    if fused:
        torch._C._jit_pass_dce(graph)
    return fused


def fuse_residual_norms(graph: torch.Graph) -> int:
    """Replace each bf16 `aten::add` whose sum only our `rms_norm` reads before later nodes with one
    `add_rms_norm` node; returns how many."""
    fused = 0
    for norm in list(graph.nodes()):
        matched = _match_residual_norm(norm)
        if matched is None:
            continue
        add, normed = matched
        node = graph.create("pagedformers::add_rms_norm", [add.inputsAt(0), add.inputsAt(1), norm.inputsAt(1),
                                                           norm.inputsAt(2)], 2)
        node.insertBefore(norm)
        node.outputsAt(0).setType(add.output().type())
        node.outputsAt(1).setType(normed.type())
        normed.replaceAllUsesWith(node.outputsAt(1))
        norm.destroy()
        add.output().replaceAllUsesWith(node.outputsAt(0))
        fused += 1
    if fused:
        torch._C._jit_pass_dce(graph)
    return fused


def _match_residual_norm(norm: torch.Node) -> tuple[torch.Node, torch.Value] | None:
    """(the add, the norm's output tensor) where `norm` is `rms_norm(view(s), w, eps, view(empty_like(s)))`
    with `s = aten::add(a, b, 1)` of contiguous bf16 tensors of one shape, and nothing before `norm` reads
    `s` or the output but those views and empty_like; else None."""
    if norm.kind() != "pagedformers::rms_norm":
        return None
    x_view, out_view = norm.inputsAt(0).node(), norm.inputsAt(3).node()
    if x_view.kind() != "aten::view" or out_view.kind() != "aten::view":
        return None
    add, empty = x_view.inputsAt(0).node(), out_view.inputsAt(0).node()
    if add.kind() != "aten::add" or _constant(add.inputsAt(2)) != 1 or empty.kind() != "aten::empty_like":
        return None
    total, normed = add.output(), empty.output()
    if empty.inputsAt(0).unique() != total.unique():
        return None
    sizes = [_contiguous_bf16_sizes(v) for v in (add.inputsAt(0), add.inputsAt(1), total, normed)]
    if sizes[0] is None or any(s != sizes[0] for s in sizes):
        return None
    helpers = {x_view, out_view, empty, norm}
    for value in (total, normed):
        if any(use.user not in helpers and not use.user.isAfter(norm) for use in value.uses()):
            return None
    return add, normed


def _contiguous_bf16_sizes(value: torch.Value) -> list[int] | None:
    """The sizes of a bf16 tensor value whose type gives every size and a contiguous layout, else None."""
    sizes = _bf16_sizes(value)
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


def _match_rotary(add: torch.Node) -> tuple[torch.Value, torch.Value, torch.Value] | None:
    """(x, cos, sin) where `add` is `x * cos + cat([-x[..., h:], x[..., :h]], -1) * sin`, h = D / 2, on bf16
    tensors whose last dim D is a multiple of 32 (the kernel's vectors); else None."""
    if add.kind() != "aten::add" or _constant(add.inputsAt(2)) != 1:
        return None
    first, second = add.inputsAt(0).node(), add.inputsAt(1).node()
    if first.kind() != "aten::mul" or second.kind() != "aten::mul":
        return None
    x, cos = first.inputsAt(0), first.inputsAt(1)
    cat, sin = second.inputsAt(0).node(), second.inputsAt(1)
    sizes = _bf16_sizes(x)
    if sizes is None or _bf16_sizes(cos) is None or _bf16_sizes(sin) is None or not sizes or sizes[-1] is None:
        return None
    last, head_dim = len(sizes) - 1, sizes[-1]
    if head_dim % 32 or cat.kind() != "aten::cat" or _constant(cat.inputsAt(1)) not in (-1, last):
        return None
    parts = cat.inputsAt(0).node()
    if parts.kind() != "prim::ListConstruct" or len(list(parts.inputs())) != 2:
        return None
    neg, x1 = parts.inputsAt(0).node(), parts.inputsAt(1).node()
    if neg.kind() != "aten::neg":
        return None
    x2, half = neg.inputsAt(0).node(), head_dim // 2
    if not (_is_slice(x1, x, last, 0, half) and _is_slice(x2, x, last, half, None)):
        return None
    return x, cos, sin


def _is_slice(node: torch.Node, of: torch.Value, last: int, start: int, end: int | None) -> bool:
    """Whether `node` is `of[..., start:end]` (end None: to the end) along the last dim, step 1."""
    if node.kind() != "aten::slice" or node.inputsAt(0).unique() != of.unique():
        return False
    dim, begin, stop, step = (_constant(node.inputsAt(i)) for i in range(1, 5))
    starts = (0, None) if start == 0 else (start,)
    stops = (None, _INT64_MAX) if end is None else (end,)
    return dim in (-1, last) and begin in starts and stop in stops and step == 1


def _constant(value: torch.Value) -> object:
    """A constant node's value; a sentinel that equals nothing otherwise."""
    return value.toIValue() if value.node().kind() == "prim::Constant" else object()


def _bf16_sizes(value: torch.Value) -> list[int | None] | None:
    """The sizes (None where unknown) of a bf16 tensor value of known rank, else None."""
    kind = value.type()
    if not isinstance(kind, torch._C.TensorType) or kind.scalarType() != "BFloat16" or kind.dim() is None:
        return None
    return kind.varyingSizes()
