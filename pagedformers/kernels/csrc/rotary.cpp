// Rotary embedding in HF's rotate-half form, x * cos + rotate_half(x) * sin, rotate_half(x) = cat(-x2, x1),
// rounded as its bf16 tensor ops round: each product to bf16, then their sum. Traced, HF's form is eight
// ops a tensor (two muls, two slices, a neg, a cat, an add and the cat's list); a decode graph replaces them
// with this one call (engine/graph_rewrites.py), and the result is bitwise the same.

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty_like.h>
#include <immintrin.h>

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

at::Tensor as_4d(at::Tensor t) {
  while (t.dim() < 4) t = t.unsqueeze(0);
  return t;
}

}  // namespace

// x [..., D] bf16 with at most 4 dims and D % 32 == 0; cos and sin bf16, broadcastable to x. Returns a tensor
// laid out as x (empty_like), as the eager ops' result is for the decode shapes.
at::Tensor rotary_embed(const at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin) {
  TORCH_CHECK(x.dim() >= 1 && x.dim() <= 4 && x.size(-1) % 32 == 0 && x.scalar_type() == at::kBFloat16 &&
                  cos.scalar_type() == at::kBFloat16 && sin.scalar_type() == at::kBFloat16,
              "rotary_embed: bf16 x [..., D] (<= 4 dims, D % 32 == 0) and bf16 cos, sin expected");
  at::Tensor out = at::empty_like(x);
  at::Tensor x4 = as_4d(x), c4 = as_4d(cos.expand(x.sizes())), s4 = as_4d(sin.expand(x.sizes())), o4 = as_4d(out);
  if (x4.stride(3) != 1) x4 = x4.contiguous();
  if (c4.stride(3) != 1) c4 = c4.contiguous();
  if (s4.stride(3) != 1) s4 = s4.contiguous();
  TORCH_CHECK(o4.stride(3) == 1, "rotary_embed: x with a unit last stride expected");
  const auto* xp = x4.data_ptr<at::BFloat16>();
  const auto* cp = c4.data_ptr<at::BFloat16>();
  const auto* sp = s4.data_ptr<at::BFloat16>();
  auto* op = o4.data_ptr<at::BFloat16>();
  const int64_t half = x4.size(3) / 2;
  for (int64_t a = 0; a < x4.size(0); ++a)
    for (int64_t b = 0; b < x4.size(1); ++b)
      for (int64_t t = 0; t < x4.size(2); ++t) {
        const auto offset = [&](const at::Tensor& u) { return a * u.stride(0) + b * u.stride(1) + t * u.stride(2); };
        embed_row(xp + offset(x4), cp + offset(c4), sp + offset(s4), half, op + offset(o4));
      }
  return out;
}
