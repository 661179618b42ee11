"""HF's rotate-half rotary embedding as one `rotary_embed` kernel call in decode graphs.

`q * cos + rotate_half(q) * sin` with `rotate_half(x) = cat(-x2, x1)` (Llama and the models copied from it)
is eight nodes a tensor, two tensors a layer; at decode sizes ([1, 16, 1, 64]) each costs more to dispatch
than to compute. The kernel (kernels/csrc/rotary.cpp) rounds bitwise as those eight bf16 ops do, so the
rewritten graph still equals the eager forward, which decode graphs check before keeping it.
"""

from __future__ import annotations

import torch

from pagedformers.platforms.cpu.graph_ops import bf16_sizes, constant, is_slice, replace_with_kernel
from pagedformers.platforms.cpu.kernels import cpu_kernels


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
        (out,) = replace_with_kernel(graph, "pagedformers::rotary_embed", list(matched), add, [add.output()])
        add.output().replaceAllUsesWith(out)
        fused += 1
    if fused:
        torch._C._jit_pass_dce(graph)
    return fused


def _match_rotary(add: torch.Node) -> tuple[torch.Value, torch.Value, torch.Value] | None:
    """(x, cos, sin) where `add` is `x * cos + cat([-x[..., h:], x[..., :h]], -1) * sin`, h = D / 2, on bf16
    tensors whose last dim D is a multiple of 32 (the kernel's vectors); else None."""
    if add.kind() != "aten::add" or constant(add.inputsAt(2)) != 1:
        return None
    first, second = add.inputsAt(0).node(), add.inputsAt(1).node()
    if first.kind() != "aten::mul" or second.kind() != "aten::mul":
        return None
    x, cos = first.inputsAt(0), first.inputsAt(1)
    cat, sin = second.inputsAt(0).node(), second.inputsAt(1)
    sizes = bf16_sizes(x)
    if sizes is None or bf16_sizes(cos) is None or bf16_sizes(sin) is None or not sizes or sizes[-1] is None:
        return None
    last, head_dim = len(sizes) - 1, sizes[-1]
    if head_dim % 32 or cat.kind() != "aten::cat" or constant(cat.inputsAt(1)) not in (-1, last):
        return None
    parts = cat.inputsAt(0).node()
    if parts.kind() != "prim::ListConstruct" or len(list(parts.inputs())) != 2:
        return None
    neg, x1 = parts.inputsAt(0).node(), parts.inputsAt(1).node()
    if neg.kind() != "aten::neg":
        return None
    x2, half = neg.inputsAt(0).node(), head_dim // 2
    if not (is_slice(x1, x, last, 0, half) and is_slice(x2, x, last, half, None)):
        return None
    return x, cos, sin
