// RMSNorm of bf16 rows (AVX2), rounded as HF's Llama-style RMSNorm rounds: see ../rms_norm.cpp.

#include <ATen/core/Tensor.h>
#include <immintrin.h>

#include "../rms_norm.h"
#include "vec.h"

#include <cmath>

namespace {

using namespace pagedformers::avx2;

void norm_row(const at::BFloat16* x, const at::BFloat16* w, int64_t h, float eps, at::BFloat16* out) {
  __m256 sq0 = _mm256_setzero_ps(), sq1 = _mm256_setzero_ps();
  for (int64_t i = 0; i < h; i += 16) {
    const __m256 a = load_bf16x8(x + i), b = load_bf16x8(x + i + 8);
    sq0 = _mm256_fmadd_ps(a, a, sq0);
    sq1 = _mm256_fmadd_ps(b, b, sq1);
  }
  const __m256 r = _mm256_set1_ps(1.f / std::sqrt(sum_lanes(_mm256_add_ps(sq0, sq1)) / h + eps));
  for (int64_t i = 0; i < h; i += 8)
    store_bf16x8(out + i, _mm256_mul_ps(round_bf16(_mm256_mul_ps(load_bf16x8(x + i), r)), load_bf16x8(w + i)));
}

}  // namespace

void rms_norm(const at::Tensor& x, const at::Tensor& weight, double eps, at::Tensor& out) {
  pagedformers::norm_rows(x, weight, eps, out, norm_row);
}

std::tuple<at::Tensor, at::Tensor> add_rms_norm(const at::Tensor& x, const at::Tensor& residual,
                                                const at::Tensor& weight, double eps) {
  return pagedformers::add_norm_rows(x, residual, weight, eps, norm_row);
}
