// bf16 logits [rows, n] as float32, for the host sampler: `logits.float()`, split over threads where the step runs
// (step_claims). ATen's copy takes an OpenMP region for more than 32K values (any 2-4 row step's logits), which
// slowed the linears of the steps that run on the kernels' pool (thread_pool.h). A widening is a shift: no vector
// code by hand, one source for both builds.

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>

#include <algorithm>
#include <cstdint>
#include <cstring>

#include "thread_pool.h"

namespace {

constexpr int64_t kValuesPerClaim = 16384;

void widen(const uint16_t* x, int64_t n, float* out) {
  for (int64_t i = 0; i < n; ++i) {
    const uint32_t bits = uint32_t{x[i]} << 16;
    std::memcpy(out + i, &bits, sizeof bits);
  }
}

}  // namespace

at::Tensor float_rows(const at::Tensor& logits) {
  TORCH_CHECK(logits.dim() == 2 && logits.stride(1) == 1 && logits.scalar_type() == at::kBFloat16,
              "float_rows: bf16 [rows, n] with a unit last stride expected");
  const int64_t rows = logits.size(0), n = logits.size(1), ld = logits.stride(0);
  auto out = at::empty({rows, n}, logits.options().dtype(at::kFloat));
  const int64_t per_row = (n + kValuesPerClaim - 1) / kValuesPerClaim;
  const auto* x = reinterpret_cast<const uint16_t*>(logits.data_ptr<at::BFloat16>());
  float* o = out.data_ptr<float>();
  pagedformers::step_claims(rows, rows * per_row, 1, [&](int64_t begin, int64_t end) {
    for (int64_t item = begin; item < end; ++item) {
      const int64_t row = item / per_row, start = item % per_row * kValuesPerClaim;
      widen(x + row * ld + start, std::min(kValuesPerClaim, n - start), o + row * n + start);
    }
  });
  return out;
}
