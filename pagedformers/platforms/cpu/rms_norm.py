"""HF RMSNorm modules run by one compiled kernel on CPU (bf16), and in decode graphs with the residual add
before them.

HF's Llama-style RMSNorm is eight ops with two float32 copies of the activations, twice a layer. The kernel
(kernels/csrc/rms_norm.cpp) reproduces its rounding (float math, bf16 before and after the weight). Norms are
recognised by class name (`*RMSNorm`) and kept only where the kernel matches the module's own forward on a
random input, so a variant (Gemma's 1 + weight, a norm without weight) keeps its own forward. The module
itself stays (apply_model sees the model's class, its weight and eps); only its forward is swapped.

In a decode graph, HF's residual add `s = a + b` followed by this norm of `s` becomes one `add_rms_norm`
node that returns both (fuse_residual_norms): between weight reads that leave the caches cold, a lone add
costs several times its warm time. The pattern is exactly what FusedRMSNorm.__call__ records (empty_like,
two views, rms_norm): change one, change the other (tests/platforms/cpu/test_fusions.py counts the matches
on a Llama decode graph).
"""

from __future__ import annotations

from collections.abc import Callable
from types import MethodType
from typing import Any

import torch
from torch import nn

from pagedformers.platforms.cpu.graph_ops import constant, contiguous_bf16_sizes, replace_with_kernel
from pagedformers.platforms.cpu.kernels import bf16_cpu_kernels
from pagedformers.platforms.module_swap import swap_forward_if_same


class FusedRMSNorm:
    """A norm module's forward: the kernel for contiguous bf16 input, the module's own forward otherwise."""

    def __init__(self, original: Callable[..., torch.Tensor], weight: torch.Tensor, eps: float,
                 kernels: Any) -> None:
        self.original, self.weight, self.eps, self.kernels = original, weight, eps, kernels

    def __call__(self, hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        h = self.weight.shape[0]
        if args or kwargs or hidden_states.dtype != torch.bfloat16 or hidden_states.shape[-1] != h \
                or not hidden_states.is_contiguous():
            return self.original(hidden_states, *args, **kwargs)
        out = torch.empty_like(hidden_states)
        self.kernels.rms_norm(hidden_states.view(-1, h), self.weight, self.eps, out.view(-1, h))
        return out


def fuse_rms_norms(model: nn.Module, dtype: torch.dtype, device: str = "cpu") -> int:
    """Swap the forward of every matching bf16 RMSNorm for the kernel; returns how many were swapped."""
    kernels = bf16_cpu_kernels(dtype, device)
    if kernels is None:
        return 0
    swapped = 0
    for module in model.modules():
        weight = getattr(module, "weight", None)
        eps = getattr(module, "variance_epsilon", getattr(module, "eps", None))
        if not (type(module).__name__.endswith("RMSNorm") and isinstance(weight, nn.Parameter) and weight.dim() == 1
                and weight.dtype == torch.bfloat16 and weight.shape[0] % 16 == 0 and isinstance(eps, float)
                and isinstance(module.forward, MethodType)):  # not swapped already
            continue
        x = (torch.randn(5, weight.shape[0], generator=torch.Generator().manual_seed(0)) * 3).to(torch.bfloat16)
        swapped += swap_forward_if_same(module, FusedRMSNorm(module.forward, weight, eps, kernels), x)
    return swapped


def fuse_residual_norms(graph: torch.Graph) -> int:
    """Replace each bf16 `aten::add` whose sum only our `rms_norm` reads before later nodes with one
    `add_rms_norm` node; returns how many."""
    fused = 0
    for norm in list(graph.nodes()):
        matched = _match_residual_norm(norm)
        if matched is None:
            continue
        add, normed = matched
        inputs = [add.inputsAt(0), add.inputsAt(1), norm.inputsAt(1), norm.inputsAt(2)]
        total, new_normed = replace_with_kernel(graph, "pagedformers::add_rms_norm", inputs, norm,
                                                [add.output(), normed])
        normed.replaceAllUsesWith(new_normed)
        norm.destroy()
        add.output().replaceAllUsesWith(total)
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
    if add.kind() != "aten::add" or constant(add.inputsAt(2)) != 1 or empty.kind() != "aten::empty_like":
        return None
    total, normed = add.output(), empty.output()
    if empty.inputsAt(0).unique() != total.unique():
        return None
    sizes = [contiguous_bf16_sizes(v) for v in (add.inputsAt(0), add.inputsAt(1), total, normed)]
    if sizes[0] is None or any(s != sizes[0] for s in sizes):
        return None
    helpers = {x_view, out_view, empty, norm}
    for value in (total, normed):
        if any(use.user not in helpers and not use.user.isAfter(norm) for use in value.uses()):
            return None
    return add, normed
