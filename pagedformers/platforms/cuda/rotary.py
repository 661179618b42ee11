"""The native models' rotary embedding (native_overrides/layers.py's `Rotary`) as one Triton launch for q and k:
rotate-half (Llama) or interleaved pairs (GPT-J), on each head's first `rotary_dim` features, the rest copied.

Eagerly that is eight small ops a tensor (two more and a copy each where the rotary is partial). The kernel rounds
as they do in the activations' dtype (each product, then their sum), and a module's forward is swapped only where
the kernel gives what it gives on a random sample. As the other kernels here, it uses no jit function of
triton.language's standard library (see attention/triton_kernels.py).
"""

from __future__ import annotations

from collections.abc import Callable
from types import MethodType

import torch
import triton
import triton.language as tl
from torch import nn

from pagedformers.platforms.module_swap import swap_forward_if_same


@triton.jit
def _rotate_head(x_ptr, out_ptr, cos_ptr, sin_ptr, HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr,
                 ROTARY_DIM: tl.constexpr, INTERLEAVED: tl.constexpr):
    d = tl.arange(0, D_PAD)
    rotated = d < ROTARY_DIM
    if INTERLEAVED:  # pairs (x0, x1) -> (-x1, x0)
        first = d % 2 == 0
        partner = tl.where(first, d + 1, d - 1)
    else:  # halves (a, b) -> (-b, a)
        first = d < ROTARY_DIM // 2
        partner = tl.where(first, d + ROTARY_DIM // 2, d - ROTARY_DIM // 2)
    x = tl.load(x_ptr + d, mask=d < HEAD_DIM, other=0.0)
    other = tl.load(x_ptr + partner, mask=rotated, other=0.0).to(tl.float32)
    cos = tl.load(cos_ptr + d, mask=rotated, other=0.0).to(tl.float32)
    sin = tl.load(sin_ptr + d, mask=rotated, other=0.0).to(tl.float32)
    turned = tl.where(first, -other, other)
    # x * cos and turned * sin each rounded to x's dtype before their sum, as torch's ops round them
    y = (x.to(tl.float32) * cos).to(x.dtype).to(tl.float32) + (turned * sin).to(x.dtype).to(tl.float32)
    tl.store(out_ptr + d, tl.where(rotated, y.to(x.dtype), x), mask=d < HEAD_DIM)


@triton.jit
def _rotary_kernel(q_ptr, k_ptr, cos_ptr, sin_ptr, q_out_ptr, k_out_ptr, stride_qt, stride_qh, stride_kt, stride_kh,
                   stride_cos, stride_sin, q_heads, k_heads, HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr,
                   ROTARY_DIM: tl.constexpr, INTERLEAVED: tl.constexpr):
    """Program (token t, head h): q's head h for h < q_heads, else k's head h - q_heads."""
    t = tl.program_id(0).to(tl.int64)
    h = tl.program_id(1)
    cos_ptr += t * stride_cos
    sin_ptr += t * stride_sin
    if h < q_heads:
        _rotate_head(q_ptr + t * stride_qt + h * stride_qh, q_out_ptr + (t * q_heads + h) * HEAD_DIM,
                     cos_ptr, sin_ptr, HEAD_DIM, D_PAD, ROTARY_DIM, INTERLEAVED)
    else:
        h -= q_heads
        _rotate_head(k_ptr + t * stride_kt + h * stride_kh, k_out_ptr + (t * k_heads + h) * HEAD_DIM,
                     cos_ptr, sin_ptr, HEAD_DIM, D_PAD, ROTARY_DIM, INTERLEAVED)


def rotary_embed(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, rotary_dim: int,
                 interleaved: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """q [T, H, D] and k [T, H_kv, D] (rows and heads may be strided: views of a fused qkv output), cos and sin
    [T, 1, rotary_dim] -> rotated copies of q and k, contiguous."""
    tokens, q_heads, head_dim = q.shape
    k_heads = k.shape[1]
    q_out, k_out = (torch.empty(t.shape, dtype=t.dtype, device=t.device) for t in (q, k))
    _rotary_kernel[(tokens, q_heads + k_heads)](
        q, k, cos, sin, q_out, k_out, q.stride(0), q.stride(1), k.stride(0), k.stride(1), cos.stride(0), sin.stride(0),
        q_heads, k_heads, HEAD_DIM=head_dim, D_PAD=triton.next_power_of_2(head_dim), ROTARY_DIM=rotary_dim,
        INTERLEAVED=interleaved)
    return q_out, k_out


class TritonRotary:
    """A Rotary module's forward on the kernel; inputs it does not take (mixed dtypes, other layouts) go to the
    module's own forward."""

    def __init__(self, original: Callable[..., tuple[torch.Tensor, torch.Tensor]], module: nn.Module) -> None:
        self.original, self.module = original, module

    def __call__(self, q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor,
                 sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        r = self.module.rotary_dim
        table = (q.shape[0], 1, r)
        if q.dim() != 3 or k.dim() != 3 or q.shape[0] == 0 or k.shape[0] != q.shape[0] \
                or k.shape[2] != q.shape[2] or tuple(cos.shape) != table or tuple(sin.shape) != table \
                or len({q.dtype, k.dtype, cos.dtype, sin.dtype}) != 1 \
                or any(t.stride(-1) != 1 for t in (q, k, cos, sin)):
            return self.original(q, k, cos, sin)
        return rotary_embed(q, k, cos, sin, r, self.module.interleaved)


def swap_rotaries(model: nn.Module) -> int:
    """Swap the forward of every native Rotary module the kernel matches on a sample; returns how many."""
    like = next(model.parameters(), None)  # a Rotary holds no tensor: the sample takes the model's dtype and device
    swapped = 0
    for module in model.modules():
        if not (type(module).__name__ == "Rotary" and isinstance(module.forward, MethodType)):
            continue
        swapped += swap_forward_if_same(module, TritonRotary(module.forward, module), *_sample(module, like))
    return swapped


def _sample(module: nn.Module, like: torch.Tensor) -> list[torch.Tensor]:
    """q, k, cos and sin of 5 tokens (3 query heads, 2 KV heads)."""
    generator = torch.Generator().manual_seed(0)
    shapes = ((5, 3, module.head_dim), (5, 2, module.head_dim), (5, 1, module.rotary_dim), (5, 1, module.rotary_dim))
    return [torch.randn(shape, generator=generator).to(device=like.device, dtype=like.dtype) for shape in shapes]
