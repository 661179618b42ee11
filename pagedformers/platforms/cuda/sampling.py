"""Sampling on the device: Triton kernels for greedy picks and for engine/sampler.py's filtered draw, one program
a row, so that only token ids leave the device.

The draw is the host's (engine/sampler.py) without its sort: weights exp(logits / temperature - max) in float32,
min-p zeroes those below it, and top-k / top-p become one threshold on the weights, found by a search over the
bit patterns of non-negative float32 values (ordered as the values are): each pass over the row counts the weights
at or above 16 candidates at once (top-k), or sums those above them (top-p), and narrows the interval 17-fold, so
8 passes do what bisection does in 31 (on a GPU each pass is a latency-bound walk over the row). The draw then
walks the row in vocab order for the first kept token whose cumulative weight exceeds u * total.

Precision: the weights are float32 as the host's (IEEE division; tl.exp may differ from torch's exp in the last
bits, exp2-based on GPUs, which moves a draw only where u * total falls within that of a token's boundary). Sums
are float64, as the host's cumsum (a float32 sum over a large vocabulary loses its rarest tokens' share): float64
sums of float32 weights in another order differ from the host's by ~1e-16 of the total, far below any weight that
matters. The top-p test rounds as the host's float32 one does (mass before a token = float32(double cumsum) -
weight, against float32(top_p * sum)), so that the two keep the same tokens unless one sits at the boundary to
within float32 rounding (the host's float32 sum has its own order). Ties at the top-k / top-p boundary keep every
tied token (the host keeps as many as its sort order reaches).

Portable Triton, checked on a CPU in Triton's interpreter (tests/platforms/cuda/test_sampling.py).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

_COLUMNS = tl.constexpr(6)  # of the draw table (platforms/interface.py, Platform.draw_rows)
_ONE_BITS = tl.constexpr(0x3F800000)  # 1.0's bit pattern: every weight is in [0, 1]


# Reductions and the scan take triton.language.standard's own combine functions: the interpreter recognises them
# and reduces in numpy, where it calls a combine function of ours element by element (~100x slower). They are
# only passed to tl.reduce, never called, so the late TRITON_INTERPRET=1 of attention/triton_kernels.py is no issue.
_sum = tl.standard._sum_combine
_max = tl.standard._elementwise_max
_min = tl.standard._elementwise_min


@triton.jit
def _argmax_kernel(logits_ptr, out_ptr, stride, vocab, BLOCK: tl.constexpr):
    """torch.argmax's answer: the first NaN if any, else the first of the largest values."""
    row = logits_ptr + tl.program_id(0).to(tl.int64) * stride
    cols = tl.arange(0, BLOCK)
    best = tl.full([], float("-inf"), tl.float32)
    best_col = tl.full([], 0, tl.int32)
    first_nan = tl.full([], 0, tl.int32) + vocab
    for start in range(0, vocab, BLOCK):
        c = start + cols
        x = tl.load(row + c, mask=c < vocab, other=float("-inf")).to(tl.float32)
        nan = x != x
        first_nan = tl.minimum(first_nan, tl.reduce(tl.where(nan, c, vocab), 0, _min))
        x = tl.where(nan, float("-inf"), x)
        top = tl.reduce(x, 0, _max)
        better = (top > best) | (start == 0)  # strictly: an equal value later is not the first
        best_col = tl.where(better, tl.reduce(tl.where(x == top, c, vocab), 0, _min), best_col)
        best = tl.maximum(best, top)
    tl.store(out_ptr + tl.program_id(0), tl.where(first_nan < vocab, first_nan, best_col).to(tl.int64))


@triton.jit
def _weights(row, c, vocab, temperature, top, min_p):
    """The row's float32 weights at columns c, as the host computes them (min-p applied); 0 past the vocab."""
    x = tl.load(row + c, mask=c < vocab, other=float("-inf")).to(tl.float32)
    w = tl.exp(tl.math.div_rn(x, temperature) - top)  # div_rn: IEEE division, as torch's (Triton's / is not)
    return tl.where(w < min_p, 0.0, w)


@triton.jit
def _row_max(row, vocab, temperature, BLOCK: tl.constexpr):
    """max(logits / temperature), NaN counted as +inf: a row whose max is not finite has no distribution."""
    cols = tl.arange(0, BLOCK)
    top = tl.full([], float("-inf"), tl.float32)
    for start in range(0, vocab, BLOCK):
        c = start + cols
        x = tl.load(row + c, mask=c < vocab, other=float("-inf")).to(tl.float32)
        y = tl.math.div_rn(x, temperature)
        top = tl.maximum(top, tl.reduce(tl.where(y == y, y, float("inf")), 0, _max))
    return top


@triton.jit
def _candidates(lo, hi, CANDIDATES: tl.constexpr):
    """CANDIDATES bit patterns spread over (lo, hi) (int64 scalars), and their float32 values."""
    bits = lo + (hi - lo) * (tl.arange(0, CANDIDATES).to(tl.int64) + 1) // (CANDIDATES + 1)
    return bits, bits.to(tl.int32).to(tl.float32, bitcast=True)


@triton.jit
def _kept_total(row, vocab, temperature, top, min_p, tau, BLOCK: tl.constexpr):
    """The float64 sum of the weights at or above tau."""
    cols = tl.arange(0, BLOCK)
    total = tl.full([], 0.0, tl.float64)
    for start in range(0, vocab, BLOCK):
        w = _weights(row, start + cols, vocab, temperature, top, min_p)
        total += tl.reduce(tl.where(w >= tau, w, 0.0).to(tl.float64), 0, _sum)
    return total


@triton.jit
def _top_k_threshold(row, vocab, temperature, top, min_p, k, BLOCK: tl.constexpr, CANDIDATES: tl.constexpr,
                     PASSES: tl.constexpr):
    """The k-th largest weight: the largest tau with at least k weights >= tau."""
    cols = tl.arange(0, BLOCK)
    lo = tl.full([], 0, tl.int64)  # count(w >= 0) = vocab >= k
    hi = tl.full([], _ONE_BITS + 1, tl.int64)  # no weight exceeds 1
    for _ in range(PASSES):
        bits, taus = _candidates(lo, hi, CANDIDATES)
        count = tl.full([CANDIDATES], 0, tl.int32)
        for start in range(0, vocab, BLOCK):
            w = _weights(row, start + cols, vocab, temperature, top, min_p)
            count += tl.reduce((w[:, None] >= taus[None, :]).to(tl.int32), 0, _sum)
        enough = count >= k
        lo = tl.maximum(lo, tl.reduce(tl.where(enough, bits, lo), 0, _max))
        hi = tl.minimum(hi, tl.reduce(tl.where(enough, hi, bits), 0, _min))
    return lo.to(tl.int32).to(tl.float32, bitcast=True)


@triton.jit
def _top_p_threshold(row, vocab, temperature, top, min_p, limit, BLOCK: tl.constexpr, CANDIDATES: tl.constexpr,
                     PASSES: tl.constexpr):
    """The smallest tau where a token of weight tau would be kept: float32(mass above + tau) - tau < limit, the
    host's float32 test of `mass_before < top_p * sum` (its cumsum accumulates in double and rounds to float32)."""
    cols = tl.arange(0, BLOCK)
    lo = tl.full([], 0, tl.int64)  # everything above: the whole sum, removed as top_p < 1
    hi = tl.full([], _ONE_BITS + 1, tl.int64)  # nothing above: kept
    for _ in range(PASSES):
        bits, taus = _candidates(lo, hi, CANDIDATES)
        above = tl.full([CANDIDATES], 0.0, tl.float64)
        for start in range(0, vocab, BLOCK):
            w = _weights(row, start + cols, vocab, temperature, top, min_p)[:, None]
            above += tl.reduce(tl.where(w > taus[None, :], w, 0.0).to(tl.float64), 0, _sum)
        kept = ((above + taus).to(tl.float32) - taus) < limit
        hi = tl.minimum(hi, tl.reduce(tl.where(kept, bits, hi), 0, _min))
        # The test is monotone in tau but for rounding: a kept candidate below a removed one must not cross the two
        lo = tl.minimum(tl.maximum(lo, tl.reduce(tl.where(kept, lo, bits), 0, _max)), hi - 1)
    return hi.to(tl.int32).to(tl.float32, bitcast=True)


@triton.jit
def _draw_kernel(logits_ptr, table_ptr, out_ptr, stride, vocab, BLOCK: tl.constexpr, CANDIDATES: tl.constexpr,
                 PASSES: tl.constexpr):
    """Program j: table row j draws logits row `row` into out[row] where the row has a distribution (a finite
    max); elsewhere out keeps what it holds, the argmax."""
    params = table_ptr + tl.program_id(0) * _COLUMNS
    r = tl.load(params).to(tl.int64)
    temperature = tl.load(params + 1).to(tl.float32)
    min_p = tl.load(params + 2).to(tl.float32)
    k = tl.load(params + 3).to(tl.int32)
    top_p = tl.load(params + 4).to(tl.float32)
    u = tl.load(params + 5)
    row = logits_ptr + r * stride
    cols = tl.arange(0, BLOCK)
    top = _row_max(row, vocab, temperature, BLOCK)
    tau = tl.full([], 0.0, tl.float32)
    if (k > 0) & (k < vocab):
        tau = _top_k_threshold(row, vocab, temperature, top, min_p, k, BLOCK, CANDIDATES, PASSES)
    if top_p < 1.0:
        limit = _kept_total(row, vocab, temperature, top, min_p, 0.0, BLOCK).to(tl.float32) * top_p
        tau = tl.maximum(tau, _top_p_threshold(row, vocab, temperature, top, min_p, limit, BLOCK, CANDIDATES,
                                               PASSES))
    target = u * _kept_total(row, vocab, temperature, top, min_p, tau, BLOCK)
    running = tl.full([], 0.0, tl.float64)
    first = tl.full([], 0, tl.int32) + vocab
    last = tl.full([], -1, tl.int32)
    for start in range(0, vocab, BLOCK):
        c = start + cols
        w = _weights(row, c, vocab, temperature, top, min_p)
        w = tl.where(w >= tau, w, 0.0).to(tl.float64)
        # the first kept token past the target (kept: so that rounding can never pick a removed one)
        crossed = (running + tl.associative_scan(w, 0, _sum) > target) & (w > 0)
        first = tl.minimum(first, tl.reduce(tl.where(crossed, c, vocab), 0, _min))
        last = tl.maximum(last, tl.reduce(tl.where(w > 0, c, -1), 0, _max))
        running += tl.reduce(w, 0, _sum)
    token = tl.where(first < vocab, first, last)  # none past the target: u * total rounded up to total
    tl.store(out_ptr + r, token.to(tl.int64), mask=(top > float("-inf")) & (top < float("inf")))


_CANDIDATES = 16  # thresholds a search pass tests at once


def _search_passes(candidates: int) -> int:
    """Passes until the search's interval, every bit pattern of [0, 1] at first, is one pattern wide at worst."""
    width, passes = _ONE_BITS.value + 1, 0
    while width > 1:
        cuts = [0] + [width * (j + 1) // (candidates + 1) for j in range(candidates)] + [width]
        width, passes = max(b - a for a, b in zip(cuts, cuts[1:])), passes + 1
    return passes


_PASSES = _search_passes(_CANDIDATES)


def argmax_rows(logits: torch.Tensor, block: int = 1024) -> torch.Tensor:
    """`logits.argmax(dim=-1)` of [rows, vocab] logits (last dim contiguous): same ties, same NaNs."""
    logits = logits if logits.stride(-1) == 1 else logits.contiguous()
    out = torch.empty(logits.shape[0], dtype=torch.long, device=logits.device)
    if logits.shape[0]:
        _argmax_kernel[(logits.shape[0],)](logits, out, logits.stride(0), logits.shape[1], BLOCK=block)
    return out


def draw_rows(logits: torch.Tensor, table: torch.Tensor, token_ids: torch.Tensor, block: int = 256) -> None:
    """Each table row's draw (platforms/interface.py, Platform.draw_rows) into token_ids, in place. The search's
    [block, 16] float64 tiles keep the block smaller than the argmax's."""
    logits = logits if logits.stride(-1) == 1 else logits.contiguous()
    if table.shape[0]:
        _draw_kernel[(table.shape[0],)](logits, table, token_ids, logits.stride(0), logits.shape[1], BLOCK=block,
                                        CANDIDATES=_CANDIDATES, PASSES=_PASSES)
