// Rotary embedding in HF's rotate-half form (AVX2), bitwise as HF's bf16 ops round: see ../rotary.cpp.

#include <ATen/core/Tensor.h>
#include <immintrin.h>

#include "../rotary.h"
#include "vec.h"

namespace {

using namespace pagedformers::avx2;

inline __m256 mul_bf16(__m256 a, __m256 b) { return round_bf16(_mm256_mul_ps(a, b)); }

// One row of head_dim values; half % 8 == 0; c and s have unit stride.
void embed_row(const at::BFloat16* x, const at::BFloat16* c, const at::BFloat16* s, int64_t half, at::BFloat16* out) {
  const __m256 sign = _mm256_set1_ps(-0.f);
  for (int64_t i = 0; i < half; i += 8) {
    const __m256 x1 = load_bf16x8(x + i), x2 = load_bf16x8(x + half + i);
    const __m256 neg_x2 = _mm256_xor_ps(x2, sign);
    const __m256 lo = _mm256_add_ps(mul_bf16(x1, load_bf16x8(c + i)), mul_bf16(neg_x2, load_bf16x8(s + i)));
    const __m256 hi = _mm256_add_ps(mul_bf16(x2, load_bf16x8(c + half + i)), mul_bf16(x1, load_bf16x8(s + half + i)));
    store_bf16x8(out + i, lo);
    store_bf16x8(out + half + i, hi);
  }
}

}  // namespace

at::Tensor rotary_embed(const at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin) {
  return pagedformers::rotary_each_row(x, cos, sin, embed_row);
}
