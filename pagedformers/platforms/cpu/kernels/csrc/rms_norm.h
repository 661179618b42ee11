// The ISA-independent half of the rms_norm kernels (rms_norm.cpp, avx2/rms_norm.cpp): checks, the row loop and
// both ops around one ISA's row kernel.

#pragma once

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>

#include <ATen/ops/empty_like.h>

#include <algorithm>
#include <tuple>

#include "thread_pool.h"

namespace pagedformers {

// One ISA's RMSNorm of one row of h values: out = bf16(weight * bf16(x * rsqrt(mean(x^2) + eps))).
using NormRow = void (*)(const at::BFloat16* x, const at::BFloat16* weight, int64_t h, float eps, at::BFloat16* out);

// x, out [rows, h] contiguous bf16; weight [h] bf16; h % 16 == 0. row(x_row, weight, out_row) runs once per row.
template <typename Row>
void for_each_norm_row(const at::Tensor& x, const at::Tensor& weight, at::Tensor& out, const Row& row) {
  TORCH_CHECK(x.is_contiguous() && out.is_contiguous() && weight.is_contiguous() && x.dim() == 2 &&
                  x.scalar_type() == at::kBFloat16 && weight.scalar_type() == at::kBFloat16 &&
                  out.scalar_type() == at::kBFloat16 && x.size(1) % 16 == 0 && weight.numel() == x.size(1),
              "rms_norm: contiguous bf16 [rows, h] with h % 16 == 0 expected");
  const int64_t h = x.size(1);
  const auto* xp = x.data_ptr<at::BFloat16>();
  const auto* wp = weight.data_ptr<at::BFloat16>();
  auto* op = out.data_ptr<at::BFloat16>();
  // A few rows are not worth waking the second thread for.
  rows_parallel_for(x.size(0), std::max<int64_t>(1, 65536 / h), [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) row(xp + r * h, wp, op + r * h);
  });
}

// The rms_norm op on one ISA's row kernel.
inline void norm_rows(const at::Tensor& x, const at::Tensor& weight, double eps, at::Tensor& out, NormRow norm_row) {
  const float e = static_cast<float>(eps);
  for_each_norm_row(x, weight, out, [&](const at::BFloat16* xr, const at::BFloat16* w, at::BFloat16* o) {
    norm_row(xr, w, x.size(1), e, o);
  });
}

// HF's residual add and the norm after it, in one call (the decode graphs fuse them, platforms/cpu/graph_rewrites.py):
// sum = bf16(x + residual) as ATen's add rounds (the float sum, to nearest even), out = rms_norm(sum), row by
// row. x and residual [..., h] contiguous bf16. Returns (sum, out).
inline std::tuple<at::Tensor, at::Tensor> add_norm_rows(const at::Tensor& x, const at::Tensor& residual,
                                                        const at::Tensor& weight, double eps, NormRow norm_row) {
  TORCH_CHECK(x.dim() >= 1 && x.sizes() == residual.sizes() && residual.is_contiguous() &&
                  residual.scalar_type() == at::kBFloat16,
              "add_rms_norm: two bf16 tensors of one shape expected");
  at::Tensor sum = at::empty_like(x, at::MemoryFormat::Contiguous), out = at::empty_like(sum);
  const int64_t h = x.size(-1);
  at::Tensor x_rows = x.view({-1, h}), out_rows = out.view({-1, h});  // view: x must be contiguous
  const auto* xp = x.data_ptr<at::BFloat16>();
  const auto* rp = residual.data_ptr<at::BFloat16>();
  auto* sp = sum.data_ptr<at::BFloat16>();
  const float e = static_cast<float>(eps);
  for_each_norm_row(x_rows, weight, out_rows, [&](const at::BFloat16* xr, const at::BFloat16* w, at::BFloat16* o) {
    const int64_t first = xr - xp;
    for (int64_t i = first; i < first + h; ++i) sp[i] = static_cast<float>(xp[i]) + static_cast<float>(rp[i]);
    norm_row(sp + first, w, h, e, o);
  });
  return {sum, out};
}

}  // namespace pagedformers
