// SwiGLU's activation: out = bf16(bf16(silu(gate)) * up), rounded as HF's `act_fn(gate) * up` rounds in
// bf16, read straight from the fused gate/up projection's output (no slice copies, one pass).

#include <ATen/core/Tensor.h>
#include <immintrin.h>

#include "silu_and_mul.h"
#include "vec.h"

using namespace pagedformers;

void silu_and_mul(const at::Tensor& gate_up, int64_t gate_col, int64_t up_col, int64_t width,
                  at::Tensor& out) {
  const __m512 one = _mm512_set1_ps(1.f);
  for_each_gated_row(gate_up, gate_col, up_col, width, out, [&](const at::BFloat16* gate, const at::BFloat16* up,
                                                                int64_t n, at::BFloat16* o) {
    for (int64_t i = 0; i < n; i += 16) {
      const __m512 g = load_bf16x16(gate + i);
      const __m512 exp_minus_g = exp16(_mm512_sub_ps(_mm512_setzero_ps(), g));
      const __m512 silu = round_bf16(_mm512_div_ps(g, _mm512_add_ps(one, exp_minus_g)));
      store_bf16x16(o + i, _mm512_mul_ps(silu, load_bf16x16(up + i)));
    }
  });
}
