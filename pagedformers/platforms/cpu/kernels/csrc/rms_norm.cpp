// RMSNorm of bf16 rows, rounded the way HF's Llama-style RMSNorm rounds: y = bf16(x * rsqrt(mean(x^2) + eps))
// in float, then out = bf16(weight * y). Eight ops and two float32 copies of the activations in PyTorch.

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <immintrin.h>

#include "rms_norm.h"
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

void rms_norm(const at::Tensor& x, const at::Tensor& weight, double eps, at::Tensor& out) {
  pagedformers::norm_rows(x, weight, eps, out, norm_row);
}

std::tuple<at::Tensor, at::Tensor> add_rms_norm(const at::Tensor& x, const at::Tensor& residual,
                                                const at::Tensor& weight, double eps) {
  return pagedformers::add_norm_rows(x, residual, weight, eps, norm_row);
}
