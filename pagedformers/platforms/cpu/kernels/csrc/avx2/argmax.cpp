// Row-wise argmax of float32 logits (AVX2), torch.argmax's ties and NaNs: see ../argmax.cpp.

#include <ATen/core/Tensor.h>
#include <immintrin.h>

#include "../argmax.h"

namespace {

int64_t argmax_row(const float* x, int64_t n) {
  // 8 lanes each keep their best value and its first index; then the best lane, lowest index on ties.
  __m256 best = _mm256_set1_ps(-INFINITY), any_nan = _mm256_setzero_ps();
  __m256i best_at = _mm256_setzero_si256(), at = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
  const __m256i step = _mm256_set1_epi32(8);
  int64_t i = 0;
  for (; i + 8 <= n; i += 8, at = _mm256_add_epi32(at, step)) {
    const __m256 v = _mm256_loadu_ps(x + i);
    any_nan = _mm256_or_ps(any_nan, _mm256_cmp_ps(v, v, _CMP_UNORD_Q));
    const __m256 better = _mm256_cmp_ps(v, best, _CMP_GT_OQ);
    best = _mm256_blendv_ps(best, v, better);
    best_at = _mm256_castps_si256(_mm256_blendv_ps(_mm256_castsi256_ps(best_at), _mm256_castsi256_ps(at), better));
  }
  float values[8];
  int32_t indices[8];
  _mm256_storeu_ps(values, best);
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(indices), best_at);
  return pagedformers::finish_argmax(x, i, n, _mm256_movemask_ps(any_nan) != 0, values, indices, 8);
}

}  // namespace

at::Tensor argmax_rows(const at::Tensor& logits) { return pagedformers::argmax_each_row(logits, argmax_row); }
