// Row-wise argmax of float32 logits, the first index of the maximum as torch.argmax returns it (NaN
// counts as the maximum). ATen's argmax along the last dim is a scalar loop: ~460 us for 32 x 32000.

#include <ATen/core/Tensor.h>
#include <immintrin.h>

#include "argmax.h"

namespace {

int64_t argmax_row(const float* x, int64_t n) {
  // 16 lanes each keep their best value and its first index; then the best lane, lowest index on ties.
  __m512 best = _mm512_set1_ps(-INFINITY);
  __m512i best_at = _mm512_set1_epi32(0);
  __m512i at = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
  const __m512i step = _mm512_set1_epi32(16);
  int64_t i = 0;
  bool has_nan = false;
  for (; i + 16 <= n; i += 16, at = _mm512_add_epi32(at, step)) {
    const __m512 v = _mm512_loadu_ps(x + i);
    has_nan |= _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q) != 0;
    const __mmask16 better = _mm512_cmp_ps_mask(v, best, _CMP_GT_OQ);
    best = _mm512_mask_mov_ps(best, better, v);
    best_at = _mm512_mask_mov_epi32(best_at, better, at);
  }
  float values[16];
  int32_t indices[16];
  _mm512_storeu_ps(values, best);
  _mm512_storeu_si512(indices, best_at);
  return pagedformers::finish_argmax(x, i, n, has_nan, values, indices, 16);
}

}  // namespace

at::Tensor argmax_rows(const at::Tensor& logits) { return pagedformers::argmax_each_row(logits, argmax_row); }
