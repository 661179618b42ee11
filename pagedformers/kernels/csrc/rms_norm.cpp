// RMSNorm of bf16 rows, rounded the way HF's Llama-style RMSNorm rounds: y = bf16(x * rsqrt(mean(x^2) + eps))
// in float, then out = bf16(weight * y). Eight ops and two float32 copies of the activations in PyTorch.

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <immintrin.h>

#include "vec.h"

#include <cmath>

namespace {

using namespace pagedformers;

void norm_row(const at::BFloat16* x, const at::BFloat16* w, int64_t h, float eps, at::BFloat16* out) {
  __m512 sq = _mm512_setzero_ps();
  for (int64_t i = 0; i < h; i += 16) {
    const __m512 v = load_bf16x16(x + i);
    sq = _mm512_fmadd_ps(v, v, sq);
  }
  const __m512 r = _mm512_set1_ps(1.f / std::sqrt(_mm512_reduce_add_ps(sq) / h + eps));
  for (int64_t i = 0; i < h; i += 16) {
    const __m512 y = _mm512_mul_ps(round_bf16(_mm512_mul_ps(load_bf16x16(x + i), r)), load_bf16x16(w + i));
    store_bf16x16(out + i, y);
  }
}

}  // namespace

// x, out [rows, h] contiguous bf16; weight [h] bf16; h % 16 == 0.
void rms_norm(const at::Tensor& x, const at::Tensor& weight, double eps, at::Tensor& out) {
  TORCH_CHECK(x.is_contiguous() && out.is_contiguous() && weight.is_contiguous() && x.dim() == 2 &&
                  x.scalar_type() == at::kBFloat16 && weight.scalar_type() == at::kBFloat16 &&
                  out.scalar_type() == at::kBFloat16 && x.size(1) % 16 == 0 && weight.numel() == x.size(1),
              "rms_norm: contiguous bf16 [rows, h] with h % 16 == 0 expected");
  const int64_t h = x.size(1);
  const auto* xp = x.data_ptr<at::BFloat16>();
  const auto* wp = weight.data_ptr<at::BFloat16>();
  auto* op = out.data_ptr<at::BFloat16>();
  // A few rows are not worth waking the second thread for.
  at::parallel_for(0, x.size(0), std::max<int64_t>(1, 65536 / h), [&](int64_t begin, int64_t end) {
    for (int64_t row = begin; row < end; ++row) norm_row(xp + row * h, wp, h, static_cast<float>(eps), op + row * h);
  });
}
