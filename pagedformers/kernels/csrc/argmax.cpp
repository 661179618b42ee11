// Row-wise argmax of float32 logits, the first index of the maximum as torch.argmax returns it (NaN
// counts as the maximum). ATen's argmax along the last dim is a scalar loop: ~460 us for 32 x 32000.

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <immintrin.h>

#include <cmath>

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
  if (has_nan)
    for (int64_t j = 0; j < i; ++j)
      if (std::isnan(x[j])) return j;
  float top = values[0];
  int64_t top_at = indices[0];
  for (int j = 1; j < 16; ++j)
    if (values[j] > top || (values[j] == top && indices[j] < top_at)) top = values[j], top_at = indices[j];
  for (; i < n; ++i) {
    if (std::isnan(x[i])) return i;
    if (x[i] > top) top = x[i], top_at = i;
  }
  return top_at;
}

}  // namespace

// logits [rows, n] float32 with a unit last stride, n < 2^31 -> [rows] int64.
at::Tensor argmax_rows(const at::Tensor& logits) {
  TORCH_CHECK(logits.dim() == 2 && logits.stride(1) == 1 && logits.scalar_type() == at::kFloat &&
                  logits.size(1) > 0 && logits.size(1) < (int64_t(1) << 31),
              "argmax_rows: float32 [rows, n] with n > 0 and a unit last stride expected");
  auto out = at::empty({logits.size(0)}, logits.options().dtype(at::kLong));
  const float* x = logits.data_ptr<float>();
  auto* op = out.data_ptr<int64_t>();
  const int64_t n = logits.size(1), ld = logits.stride(0);
  at::parallel_for(0, logits.size(0), std::max<int64_t>(1, 65536 / n), [&](int64_t begin, int64_t end) {
    for (int64_t row = begin; row < end; ++row) op[row] = argmax_row(x + row * ld, n);
  });
  return out;
}
