// Sampling draws on the host (AVX-512): see draw.h.

#include <ATen/core/Tensor.h>
#include <immintrin.h>

#include "draw.h"
#include "vec.h"

#include <cmath>
#include <limits>

namespace {

inline __mmask16 tail(int64_t i, int64_t n) {
  return n - i >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << (n - i)) - 1);
}

// w = exp(x / temperature - max), 0 below min_p; false where the maximum is not finite (a NaN or an infinity in the
// row, or every logit -inf): the row has no distribution. x / temperature as the torch code divides.
bool row_weights(const float* x, int64_t n, float temperature, float min_p, float* w) {
  const __m512 t = _mm512_set1_ps(temperature);
  __m512 vmax = _mm512_set1_ps(-std::numeric_limits<float>::infinity());
  bool nan = false;
  for (int64_t i = 0; i < n; i += 16) {
    const __mmask16 k = tail(i, n);
    const __m512 v = _mm512_div_ps(_mm512_maskz_loadu_ps(k, x + i), t);
    nan |= _mm512_mask_cmp_ps_mask(k, v, v, _CMP_UNORD_Q) != 0;
    vmax = _mm512_mask_max_ps(vmax, k, vmax, v);
  }
  const float m = _mm512_reduce_max_ps(vmax);
  if (nan || !std::isfinite(m)) return false;
  const __m512 vm = _mm512_set1_ps(m), floor = _mm512_set1_ps(min_p);
  for (int64_t i = 0; i < n; i += 16) {
    const __mmask16 k = tail(i, n);
    const __m512 e = pagedformers::exp16(_mm512_sub_ps(_mm512_div_ps(_mm512_maskz_loadu_ps(k, x + i), t), vm));
    _mm512_mask_storeu_ps(w + i, k, _mm512_maskz_mov_ps(_mm512_cmp_ps_mask(e, floor, _CMP_GE_OQ), e));
  }
  return true;
}

}  // namespace

void draw_rows(const at::Tensor& logits, const at::Tensor& table, at::Tensor& token_ids) {
  pagedformers::draw_each_row(logits, table, token_ids, row_weights);
}
