// The ISA-independent half of the draw kernels (draw.cpp, avx2/draw.cpp): checks, the row loop and the search
// of a row's cumulative weights.
//
// engine/sampler.py's `draw` for the rows with neither top-k nor top-p: each row's weights
// exp(logits / temperature - max), min-p's removed at 0, inverted at the row's uniform number u: the first token
// whose cumulative weight exceeds u * total. The torch code makes three [rows, vocab] temporaries (one float64)
// and a sequential float64 cumsum; here a row's weights stay in a thread's scratch and the cumulative weight is
// summed 64 tokens at a time, then token by token inside the one group where it crosses (engine/sampler.py has
// the measurements). Its exp and its sums round otherwise than torch's: the same distribution, and the same
// tokens but where a uniform number falls within rounding (~1e-7 of the total) of a token's cumulative weight.

#pragma once

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>

#include <algorithm>
#include <cmath>
#include <vector>

#include "thread_pool.h"

namespace pagedformers {

constexpr int64_t kDrawGroup = 64;  // tokens a partial sum

// The table's columns, as engine/sampler.py's draw_table writes them.
enum DrawColumn { kRow, kTemperature, kMinP, kTopK, kTopP, kUniform, kDrawColumns };

// The token at u in a row of weights w[0, n) whose group sums are sums[0, ceil(n / kDrawGroup)); -1 if the row has
// no distribution (a total that is 0 or not finite).
inline int64_t invert_cdf(const float* w, const double* sums, int64_t n, double u) {
  const int64_t groups = (n + kDrawGroup - 1) / kDrawGroup;
  double total = 0;
  for (int64_t g = 0; g < groups; ++g) total += sums[g];
  if (!std::isfinite(total) || total <= 0) return -1;
  // Strictly below the total, as the torch code: rounding cannot carry a draw past the last kept token.
  const double target = std::min(u * total, std::nextafter(total, 0.0));
  double below = 0;  // the cumulative weight before group g
  for (int64_t g = 0; g < groups; ++g) {
    if (below + sums[g] <= target) {
      below += sums[g];
      continue;
    }
    // The draw is in this group (its sum > 0): the first token past the target, or, if summing token by token
    // rounds below the group's sum, its last kept token.
    const int64_t end = std::min(n, (g + 1) * kDrawGroup);
    int64_t last_kept = -1;
    for (int64_t i = g * kDrawGroup; i < end; ++i) {
      if (w[i] <= 0) continue;
      below += w[i];
      if (below > target) return i;
      last_kept = i;
    }
    return last_kept;
  }
  return -1;  // unreachable: target < total
}

// The group sums of w[0, n) in float64, 8 lanes a group (independent adds the compiler vectorises).
inline void group_sums(const float* w, int64_t n, double* sums) {
  for (int64_t start = 0, g = 0; start < n; start += kDrawGroup, ++g) {
    const int64_t end = std::min(n, start + kDrawGroup);
    double lanes[8] = {0, 0, 0, 0, 0, 0, 0, 0};
    int64_t i = start;
    for (; i + 8 <= end; i += 8)
      for (int l = 0; l < 8; ++l) lanes[l] += w[i + l];
    for (; i < end; ++i) lanes[0] += w[i];
    sums[g] = ((lanes[0] + lanes[1]) + (lanes[2] + lanes[3])) + ((lanes[4] + lanes[5]) + (lanes[6] + lanes[7]));
  }
}

// logits [rows, n] float32 (unit last stride); table [draws, kDrawColumns] float64; token_ids [rows] int64, each
// drawn row's overwritten with its draw where the row has a distribution (else it keeps what it held: the argmax).
// row_weights(x, n, temperature, min_p, w) writes the row's weights and returns false where the row has no finite
// maximum.
template <typename RowWeights>
void draw_each_row(const at::Tensor& logits, const at::Tensor& table, at::Tensor& token_ids,
                   const RowWeights& row_weights) {
  TORCH_CHECK(logits.dim() == 2 && logits.stride(1) == 1 && logits.scalar_type() == at::kFloat && logits.size(1) > 0,
              "draw_rows: float32 [rows, n] logits with n > 0 and a unit last stride expected");
  TORCH_CHECK(table.dim() == 2 && table.size(1) == kDrawColumns && table.scalar_type() == at::kDouble &&
                  table.is_contiguous(), "draw_rows: a contiguous float64 [draws, 6] table expected");
  TORCH_CHECK(token_ids.dim() == 1 && token_ids.size(0) == logits.size(0) && token_ids.scalar_type() == at::kLong &&
                  token_ids.is_contiguous(), "draw_rows: contiguous int64 token ids, one a row, expected");
  const int64_t n = logits.size(1), ld = logits.stride(0), draws = table.size(0);
  const double* tab = table.data_ptr<double>();
  for (int64_t j = 0; j < draws; ++j) {  // checked here: an exception must not leave a parallel region
    const double* d = tab + j * kDrawColumns;
    TORCH_CHECK(d[kRow] >= 0 && d[kRow] < logits.size(0), "draw_rows: a row out of range");
    TORCH_CHECK((d[kTopK] == 0 || d[kTopK] >= n) && d[kTopP] >= 1.0,
                "draw_rows: top-k and top-p rows are drawn by the torch code");
    TORCH_CHECK(d[kTemperature] > 0, "draw_rows: a drawn row needs a temperature > 0");
  }
  const float* x = logits.data_ptr<float>();
  int64_t* out = token_ids.data_ptr<int64_t>();
  step_claims(logits.size(0), draws, 1, [&](int64_t begin, int64_t end) {
    thread_local std::vector<float> w;
    thread_local std::vector<double> sums;
    w.resize(n);
    sums.resize((n + kDrawGroup - 1) / kDrawGroup);
    for (int64_t j = begin; j < end; ++j) {
      const double* d = tab + j * kDrawColumns;
      const int64_t row = static_cast<int64_t>(d[kRow]);
      if (!row_weights(x + row * ld, n, static_cast<float>(d[kTemperature]), static_cast<float>(d[kMinP]), w.data()))
        continue;
      group_sums(w.data(), n, sums.data());
      const int64_t token = invert_cdf(w.data(), sums.data(), n, d[kUniform]);
      if (token >= 0) out[row] = token;
    }
  });
}

}  // namespace pagedformers
