// The ISA-independent half of the argmax kernels (argmax.cpp, avx2/argmax.cpp): checks, the row loop, and the
// last step of a row's search.

#pragma once

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>

#include <algorithm>
#include <cmath>

#include "thread_pool.h"

namespace pagedformers {

// The row's argmax, given the best value and its first index in each of `lanes` lanes that searched x[0, i):
// the best lane (lowest index on ties), then the scalar tail x[i, n). has_nan: a NaN was seen before i.
inline int64_t finish_argmax(const float* x, int64_t i, int64_t n, bool has_nan, const float* values,
                             const int32_t* indices, int lanes) {
  if (has_nan)
    for (int64_t j = 0; j < i; ++j)
      if (std::isnan(x[j])) return j;
  float top = values[0];
  int64_t top_at = indices[0];
  for (int j = 1; j < lanes; ++j)
    if (values[j] > top || (values[j] == top && indices[j] < top_at)) top = values[j], top_at = indices[j];
  for (; i < n; ++i) {
    if (std::isnan(x[i])) return i;
    if (x[i] > top) top = x[i], top_at = i;
  }
  return top_at;
}

// logits [rows, n] float32 with a unit last stride, n < 2^31 -> [rows] int64; argmax_row(x, n) per row.
template <typename ArgmaxRow>
at::Tensor argmax_each_row(const at::Tensor& logits, const ArgmaxRow& argmax_row) {
  TORCH_CHECK(logits.dim() == 2 && logits.stride(1) == 1 && logits.scalar_type() == at::kFloat &&
                  logits.size(1) > 0 && logits.size(1) < (int64_t(1) << 31),
              "argmax_rows: float32 [rows, n] with n > 0 and a unit last stride expected");
  auto out = at::empty({logits.size(0)}, logits.options().dtype(at::kLong));
  const float* x = logits.data_ptr<float>();
  auto* op = out.data_ptr<int64_t>();
  const int64_t n = logits.size(1), ld = logits.stride(0);
  rows_parallel_for(logits.size(0), std::max<int64_t>(1, 65536 / n), [&](int64_t begin, int64_t end) {
    for (int64_t row = begin; row < end; ++row) op[row] = argmax_row(x + row * ld, n);
  });
  return out;
}

}  // namespace pagedformers
