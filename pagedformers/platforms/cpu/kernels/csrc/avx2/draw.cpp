// Sampling draws on the host (AVX2): see draw.h.

#include <ATen/core/Tensor.h>
#include <immintrin.h>

#include "../draw.h"
#include "vec.h"

#include <algorithm>
#include <cmath>
#include <limits>

namespace {

// w = exp(x / temperature - max), 0 below min_p; false where the maximum is not finite (see draw.h). The vocabulary's
// last n % 8 tokens are done one by one.
bool row_weights(const float* x, int64_t n, float temperature, float min_p, float* w) {
  const __m256 t = _mm256_set1_ps(temperature);
  __m256 vmax = _mm256_set1_ps(-std::numeric_limits<float>::infinity());
  __m256 unordered = _mm256_setzero_ps();
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    const __m256 v = _mm256_div_ps(_mm256_loadu_ps(x + i), t);
    unordered = _mm256_or_ps(unordered, _mm256_cmp_ps(v, v, _CMP_UNORD_Q));
    vmax = _mm256_max_ps(vmax, v);
  }
  float lanes[8];
  _mm256_storeu_ps(lanes, vmax);
  float m = *std::max_element(lanes, lanes + 8);
  bool nan = _mm256_movemask_ps(unordered) != 0;
  for (int64_t j = i; j < n; ++j) {
    const float v = x[j] / temperature;
    nan |= std::isnan(v);
    m = std::max(m, v);
  }
  if (nan || !std::isfinite(m)) return false;
  const __m256 vm = _mm256_set1_ps(m), floor = _mm256_set1_ps(min_p);
  for (i = 0; i + 8 <= n; i += 8) {
    const __m256 e = pagedformers::avx2::exp8(_mm256_sub_ps(_mm256_div_ps(_mm256_loadu_ps(x + i), t), vm));
    _mm256_storeu_ps(w + i, _mm256_and_ps(e, _mm256_cmp_ps(e, floor, _CMP_GE_OQ)));
  }
  for (; i < n; ++i) {
    const float e = std::exp(x[i] / temperature - m);
    w[i] = e >= min_p ? e : 0.f;
  }
  return true;
}

}  // namespace

void draw_rows(const at::Tensor& logits, const at::Tensor& table, at::Tensor& token_ids) {
  pagedformers::draw_each_row(logits, table, token_ids, row_weights);
}
