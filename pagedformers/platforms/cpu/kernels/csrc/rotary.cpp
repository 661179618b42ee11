// Rotary embedding in HF's rotate-half form, x * cos + rotate_half(x) * sin, rotate_half(x) = cat(-x2, x1),
// rounded as its bf16 tensor ops round: each product to bf16, then their sum. Traced, HF's form is eight
// ops a tensor (two muls, two slices, a neg, a cat, an add and the cat's list); a decode graph replaces them
// with this one call (platforms/cpu/graph_rewrites.py), and the result is bitwise the same.

#include <ATen/core/Tensor.h>
#include <immintrin.h>

#include "rotary.h"
#include "vec.h"

namespace {

using namespace pagedformers;

// One row of head_dim values; half % 16 == 0; c and s have unit stride.
void embed_row(const at::BFloat16* x, const at::BFloat16* c, const at::BFloat16* s, int64_t half, at::BFloat16* out) {
  for (int64_t i = 0; i < half; i += 16) {
    const __m512 x1 = load_bf16x16(x + i), x2 = load_bf16x16(x + half + i);
    const __m512 neg_x2 = _mm512_castsi512_ps(_mm512_xor_si512(_mm512_castps_si512(x2), _mm512_set1_epi32(INT32_MIN)));
    const __m512 lo = _mm512_add_ps(round_bf16_exact(_mm512_mul_ps(x1, load_bf16x16(c + i))),
                                    round_bf16_exact(_mm512_mul_ps(neg_x2, load_bf16x16(s + i))));
    const __m512 hi = _mm512_add_ps(round_bf16_exact(_mm512_mul_ps(x2, load_bf16x16(c + half + i))),
                                    round_bf16_exact(_mm512_mul_ps(x1, load_bf16x16(s + half + i))));
    store_bf16x16_exact(out + i, lo);
    store_bf16x16_exact(out + half + i, hi);
  }
}

}  // namespace

at::Tensor rotary_embed(const at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin) {
  return pagedformers::rotary_each_row(x, cos, sin, embed_row);
}
