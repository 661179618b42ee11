"""Mixture-of-experts linears (native_overrides/moe.py's `GroupedLinear`: rows sorted by expert, every expert's
[N, K] weight stacked [E, N, K]) as one Triton grouped GEMM, in place of `torch._grouped_mm`.

The grid is (row tiles, column tiles) and each row tile belongs to one expert: expert e's rows make
ceil(rows_e / BLOCK_M) tiles, numbered after the tiles of the experts before it. Each program maps its tile to
its expert from `ends` itself (the experts' tile counts, their running sum, the experts whose tiles all come
before its own), so there is no host sync and no op before the launch: the grid is sized for the worst case,
ceil(M / BLOCK_M) + E row tiles, and programs past the last tile return at once. Inputs and weights as they are
(bf16 or float32), float32 accumulation. A module is swapped only where the kernel gives what its own forward
gives on a sample. No jit function of triton.language's standard library (see attention/triton_kernels.py).
"""

from __future__ import annotations

from collections.abc import Callable
from types import MethodType

import torch
import triton
import triton.language as tl
from torch import nn

from pagedformers.platforms.module_swap import swap_forward_if_same

# (rows, columns, depth) of a tile, vLLM's default fused-MoE choice (untuned here): 16 rows, tl.dot's smallest,
# where the experts hold a row or less each on average (decode steps); 64 beyond, so each weight tile read serves
# 4x the rows
DECODE_TILES, PREFILL_TILES = (16, 32, 64), (64, 64, 32)


# tl.sum's combine function: Triton's interpreter reduces with it in numpy, a function of ours element by element in
# Python (attention/triton_kernels.py)
_add = tl.standard._sum_combine


@triton.jit
def _pick(values, index, slots):
    """values[index] of a vector (a gather in registers)."""
    return tl.reduce(tl.where(slots == index, values, 0), 0, _add)


@triton.jit
def _grouped_matmul_kernel(x_ptr, w_ptr, out_ptr, ends_ptr, stride_x, stride_we, stride_wn, stride_out, n, k,
                           experts, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                           E_PAD: tl.constexpr):
    """Program (i, j): row tile i (of its expert e) times columns j * BLOCK_N... of expert e's weight."""
    i = tl.program_id(0)
    j = tl.program_id(1)
    es = tl.arange(0, E_PAD)
    ends = tl.load(ends_ptr + es, mask=es < experts, other=0)
    starts = tl.load(ends_ptr + es - 1, mask=(es > 0) & (es < experts), other=0)
    tile_ends = tl.associative_scan((ends - starts + BLOCK_M - 1) // BLOCK_M, 0, _add)  # padding: 0 tiles
    e = tl.reduce(((tile_ends <= i) & (es < experts)).to(tl.int32), 0, _add)  # experts all of whose tiles precede i
    if e < experts:
        first_tile = _pick(tile_ends, e - 1, es)  # 0 for the first expert
        start, end = _pick(starts, e, es), _pick(ends, e, es)
        rows = start + (i - first_tile) * BLOCK_M + tl.arange(0, BLOCK_M)
        cols = j * BLOCK_N + tl.arange(0, BLOCK_N)
        ks = tl.arange(0, BLOCK_K)
        row_ok, col_ok = rows < end, cols < n
        x_rows = x_ptr + rows[:, None].to(tl.int64) * stride_x
        w_cols = w_ptr + e.to(tl.int64) * stride_we + cols[None, :].to(tl.int64) * stride_wn  # [E, N, K] is GBs
        acc = tl.full([BLOCK_M, BLOCK_N], 0.0, tl.float32)
        for k0 in range(0, k, BLOCK_K):
            kk = k0 + ks
            a = tl.load(x_rows + kk[None, :], mask=row_ok[:, None] & (kk[None, :] < k), other=0.0)
            b = tl.load(w_cols + kk[:, None], mask=(kk[:, None] < k) & col_ok[None, :], other=0.0)  # [K, N]
            acc += tl.dot(a, b, input_precision="ieee")  # float32 inputs: not TF32
        tl.store(out_ptr + rows[:, None].to(tl.int64) * stride_out + cols[None, :],
                 acc.to(out_ptr.dtype.element_ty), mask=row_ok[:, None] & col_ok[None, :])


def grouped_matmul(x: torch.Tensor, weight: torch.Tensor, ends: torch.Tensor,
                   tiles: tuple[int, int, int] | None = None) -> torch.Tensor:
    """x [M, K] sorted by expert, expert e's rows ending at ends[e] (int32, cumulative), weight [E, N, K] ->
    [M, N], row r through its expert's weight; rows past the last end are left unwritten (as _grouped_mm's).
    `tiles`: (rows, columns, depth) of a program's tile, powers of two of at least 16; by M / E if None."""
    m, k = x.shape
    experts, n, _ = weight.shape
    block_m, block_n, block_k = tiles or (DECODE_TILES if m <= experts else PREFILL_TILES)
    out = torch.empty(m, n, dtype=x.dtype, device=x.device)
    grid = (triton.cdiv(m, block_m) + experts, triton.cdiv(n, block_n))
    _grouped_matmul_kernel[grid](x, weight, out, ends, x.stride(0), weight.stride(0), weight.stride(1),
                                 out.stride(0), n, k, experts, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k,
                                 E_PAD=triton.next_power_of_2(experts))
    return out


class TritonGroupedLinear:
    """A GroupedLinear's forward on the kernel; inputs it does not take go to the module's own forward."""

    def __init__(self, original: Callable[..., torch.Tensor], weight: torch.Tensor) -> None:
        self.original, self.weight = original, weight

    def __call__(self, x: torch.Tensor, ends: torch.Tensor) -> torch.Tensor:
        if x.dim() != 2 or x.shape[0] == 0 or x.dtype != self.weight.dtype or x.stride(-1) != 1 \
                or self.weight.stride(-1) != 1 or ends.dtype != torch.int32 or ends.shape != self.weight.shape[:1]:
            return self.original(x, ends)
        return grouped_matmul(x, self.weight, ends)


def swap_grouped_linears(model: nn.Module) -> int:
    """Swap the forward of every GroupedLinear the kernel matches on a sample; returns how many."""
    swapped = 0
    for module in model.modules():
        weight = getattr(module, "weight", None)
        if not (type(module).__name__ == "GroupedLinear" and isinstance(weight, nn.Parameter) and weight.dim() == 3
                and isinstance(module.forward, MethodType)):
            continue
        swapped += swap_forward_if_same(module, TritonGroupedLinear(module.forward, weight), *_sample(weight))
    return swapped


def _sample(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Two row tiles of the kernel's larger tiles for the first expert, no rows for the second, 1 for the third, 3
    for each other; the last end is the row count (rows past it would come out unspecified)."""
    experts, _, k = weight.shape
    counts = torch.tensor([PREFILL_TILES[0] + 1, 0, 1] + [3] * experts)[:experts]
    ends = counts.cumsum(0).to(device=weight.device, dtype=torch.int32)
    x = torch.randn(int(counts.sum()), k, generator=torch.Generator().manual_seed(0))
    return x.to(device=weight.device, dtype=weight.dtype), ends
