"""Triton kernels of the CUDA platform's layer swaps: RMSNorm (alone, or after the residual add it follows) and
SwiGLU's SiLU-and-mul, one pass each over the activations where HF's forwards make several. Portable Triton:
checked on a CPU in Triton's interpreter (tests/platforms/cuda), as the attention kernels are. As there, no jit
function of triton.language's standard library is called (see attention/triton_kernels.py): reductions pass
tl.sum's combine function to tl.reduce, which never calls it in the interpreter.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

# tl.sum's combine function: Triton's interpreter reduces with it in numpy, a function of ours element by element in
# Python (attention/triton_kernels.py)
_add = tl.standard._sum_combine


@triton.jit
def _rms_norm_kernel(x_ptr, w_ptr, out_ptr, stride_x, stride_out, n, eps, OFFSET: tl.constexpr,
                     BLOCK: tl.constexpr):
    """Row r: x * rsqrt(mean(x^2) + eps) in float32, cast to x's dtype, times (OFFSET + w), as HF's Llama norm
    rounds (OFFSET 1.0: Gemma's `1 + weight`, computed in float32 as Gemma does)."""
    r = tl.program_id(0).to(tl.int64)  # r * stride passes 2^31 in long prefills of wide models
    cols = tl.arange(0, BLOCK)
    x = tl.load(x_ptr + r * stride_x + cols, mask=cols < n, other=0.0).to(tl.float32)
    inv = _inverse_rms(x, n, eps)
    w = tl.load(w_ptr + cols, mask=cols < n, other=0.0)
    if OFFSET == 0.0:  # the weight has x's dtype (layers.py checks)
        y = (x * inv).to(w.dtype) * w
    else:
        y = x * inv * (OFFSET + w.to(tl.float32))
    tl.store(out_ptr + r * stride_out + cols, y.to(out_ptr.dtype.element_ty), mask=cols < n)


@triton.jit
def _inverse_rms(x, n, eps):
    return tl.rsqrt(tl.reduce(x * x, 0, _add) / n + eps)


@triton.jit
def _add_rms_norm_kernel(x_ptr, res_ptr, w_ptr, out_ptr, sum_ptr, stride_x, stride_res, n, eps, BLOCK: tl.constexpr):
    """Row r: s = residual + x rounded to x's dtype (stored: the next residual), then Llama's norm of s."""
    r = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    x = tl.load(x_ptr + r * stride_x + cols, mask=cols < n, other=0.0)
    s = (tl.load(res_ptr + r * stride_res + cols, mask=cols < n, other=0.0).to(tl.float32)
         + x.to(tl.float32)).to(x.dtype)
    tl.store(sum_ptr + r * n + cols, s, mask=cols < n)
    s = s.to(tl.float32)
    w = tl.load(w_ptr + cols, mask=cols < n, other=0.0)
    y = (s * _inverse_rms(s, n, eps)).to(w.dtype) * w
    tl.store(out_ptr + r * n + cols, y.to(out_ptr.dtype.element_ty), mask=cols < n)


@triton.jit
def _silu_and_mul_kernel(gate_ptr, up_ptr, out_ptr, stride_gate, stride_up, stride_out, n, BLOCK: tl.constexpr):
    """Row r, columns of block c: silu(gate) * up, each op rounded to the output dtype as torch's two ops are."""
    r = tl.program_id(0).to(tl.int64)  # r * stride passes 2^31 in long prefills of wide models (70B: ~37k rows)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    gate = tl.load(gate_ptr + r * stride_gate + cols, mask=cols < n, other=0.0)
    up = tl.load(up_ptr + r * stride_up + cols, mask=cols < n, other=0.0)
    g = gate.to(tl.float32)
    act = (g / (1.0 + tl.exp(-g))).to(gate.dtype)
    tl.store(out_ptr + r * stride_out + cols, (act * up).to(out_ptr.dtype.element_ty), mask=cols < n)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, offset: float = 0.0) -> torch.Tensor:
    """x [..., n] (last dim contiguous) -> the norm, in x's dtype."""
    flat = x.reshape(-1, x.shape[-1])
    out = torch.empty_like(flat)
    n = flat.shape[1]
    _rms_norm_kernel[(flat.shape[0],)](flat, weight, out, flat.stride(0), out.stride(0), n, eps, OFFSET=offset,
                                       BLOCK=triton.next_power_of_2(n))
    return out.view(x.shape)


def add_rms_norm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor,
                 eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """x and residual [..., n] (rows may be strided) -> (norm(residual + x), residual + x), both in x's dtype."""
    n = x.shape[-1]
    flat, res = x.reshape(-1, n), residual.reshape(-1, n)
    out, summed = (torch.empty(flat.shape, dtype=x.dtype, device=x.device) for _ in range(2))
    _add_rms_norm_kernel[(flat.shape[0],)](flat, res, weight, out, summed, flat.stride(0), res.stride(0), n, eps,
                                           BLOCK=triton.next_power_of_2(n))
    return out.view(x.shape), summed.view(x.shape)


def silu_and_mul(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up for [..., n] halves (views of one fused output are fine: rows may be strided)."""
    g, u = gate.reshape(-1, gate.shape[-1]), up.reshape(-1, up.shape[-1])
    out = torch.empty(g.shape, dtype=gate.dtype, device=gate.device)
    n, block = g.shape[1], 1024
    _silu_and_mul_kernel[(g.shape[0], triton.cdiv(n, block))](g, u, out, g.stride(0), u.stride(0), out.stride(0),
                                                              n, BLOCK=block)
    return out.view(*gate.shape[:-1], n)
