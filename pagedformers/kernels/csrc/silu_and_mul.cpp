// SwiGLU's activation: out = bf16(bf16(silu(gate)) * up), rounded as HF's `act_fn(gate) * up` rounds in
// bf16, read straight from the fused gate/up projection's output (no slice copies, one pass).

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <immintrin.h>

#include "vec.h"

using namespace pagedformers;

// gate_up [rows, *] bf16 with unit stride in its last dim; gate and up are `width` columns from
// column gate_col and up_col; out [rows, width] contiguous bf16; width % 16 == 0.
void silu_and_mul(const at::Tensor& gate_up, int64_t gate_col, int64_t up_col, int64_t width,
                  at::Tensor& out) {
  TORCH_CHECK(gate_up.dim() == 2 && gate_up.stride(1) == 1 && gate_up.scalar_type() == at::kBFloat16 &&
                  out.is_contiguous() && out.scalar_type() == at::kBFloat16 && width % 16 == 0 &&
                  out.size(0) == gate_up.size(0) && out.size(1) == width &&
                  std::max(gate_col, up_col) + width <= gate_up.size(1),
              "silu_and_mul: bf16 [rows, cols] input with unit column stride and width % 16 == 0 expected");
  const auto* in = gate_up.data_ptr<at::BFloat16>();
  auto* op = out.data_ptr<at::BFloat16>();
  const int64_t ld = gate_up.stride(0);
  const __m512 one = _mm512_set1_ps(1.f);
  at::parallel_for(0, gate_up.size(0), std::max<int64_t>(1, 16384 / width), [&](int64_t begin, int64_t end) {
    for (int64_t row = begin; row < end; ++row) {
      const at::BFloat16* gate = in + row * ld + gate_col;
      const at::BFloat16* up = in + row * ld + up_col;
      for (int64_t i = 0; i < width; i += 16) {
        const __m512 g = load_bf16x16(gate + i);
        const __m512 exp_minus_g = exp16(_mm512_sub_ps(_mm512_setzero_ps(), g));
        const __m512 silu = round_bf16(_mm512_div_ps(g, _mm512_add_ps(one, exp_minus_g)));
        store_bf16x16(op + row * width + i, _mm512_mul_ps(silu, load_bf16x16(up + i)));
      }
    }
  });
}
