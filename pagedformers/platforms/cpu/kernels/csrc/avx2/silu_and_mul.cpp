// SwiGLU's activation (AVX2), rounded as HF's `act_fn(gate) * up` rounds in bf16: see ../silu_and_mul.cpp.

#include <ATen/core/Tensor.h>
#include <immintrin.h>

#include "../silu_and_mul.h"
#include "vec.h"

using namespace pagedformers::avx2;

void silu_and_mul(const at::Tensor& gate_up, int64_t gate_col, int64_t up_col, int64_t width,
                  at::Tensor& out) {
  const __m256 one = _mm256_set1_ps(1.f);
  pagedformers::for_each_gated_row(gate_up, gate_col, up_col, width, out, [&](const at::BFloat16* gate,
                                                                              const at::BFloat16* up, int64_t n,
                                                                              at::BFloat16* o) {
    for (int64_t i = 0; i < n; i += 8) {
      const __m256 g = load_bf16x8(gate + i);
      const __m256 exp_minus_g = exp8(_mm256_sub_ps(_mm256_setzero_ps(), g));
      const __m256 silu = round_bf16(_mm256_div_ps(g, _mm256_add_ps(one, exp_minus_g)));
      store_bf16x8(o + i, _mm256_mul_ps(silu, load_bf16x8(up + i)));
    }
  });
}
