// The ISA-independent half of the rotary kernels (rotary.cpp, avx2/rotary.cpp): checks and the row loop.

#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty_like.h>

namespace pagedformers {

inline at::Tensor as_4d(at::Tensor t) {
  while (t.dim() < 4) t = t.unsqueeze(0);
  return t;
}

// x [..., D] bf16 with at most 4 dims and D % 32 == 0; cos and sin bf16, broadcastable to x. Returns a tensor
// laid out as x (empty_like), as the eager ops' result is for the decode shapes. embed_row(x, cos, sin, half,
// out) embeds one row of D values, each with a unit stride.
template <typename EmbedRow>
at::Tensor rotary_each_row(const at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin,
                           const EmbedRow& embed_row) {
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

}  // namespace pagedformers
