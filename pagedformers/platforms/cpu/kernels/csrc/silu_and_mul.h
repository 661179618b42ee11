// The ISA-independent half of the silu_and_mul kernels (silu_and_mul.cpp, avx2/silu_and_mul.cpp).

#pragma once

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>

#include <algorithm>

#include "thread_pool.h"

namespace pagedformers {

// gate_up [rows, *] bf16 with unit stride in its last dim; gate and up are `width` columns from
// column gate_col and up_col; out [rows, width] contiguous bf16; width % 16 == 0.
// activate_row(gate, up, width, out) computes one row.
template <typename ActivateRow>
void for_each_gated_row(const at::Tensor& gate_up, int64_t gate_col, int64_t up_col, int64_t width, at::Tensor& out,
                        const ActivateRow& activate_row) {
  TORCH_CHECK(gate_up.dim() == 2 && gate_up.stride(1) == 1 && gate_up.scalar_type() == at::kBFloat16 &&
                  out.is_contiguous() && out.scalar_type() == at::kBFloat16 && width % 16 == 0 &&
                  out.size(0) == gate_up.size(0) && out.size(1) == width &&
                  std::max(gate_col, up_col) + width <= gate_up.size(1),
              "silu_and_mul: bf16 [rows, cols] input with unit column stride and width % 16 == 0 expected");
  const auto* in = gate_up.data_ptr<at::BFloat16>();
  auto* op = out.data_ptr<at::BFloat16>();
  const int64_t ld = gate_up.stride(0);
  rows_parallel_for(gate_up.size(0), std::max<int64_t>(1, 16384 / width), [&](int64_t begin, int64_t end) {
    for (int64_t row = begin; row < end; ++row)
      activate_row(in + row * ld + gate_col, in + row * ld + up_col, width, op + row * width);
  });
}

}  // namespace pagedformers
