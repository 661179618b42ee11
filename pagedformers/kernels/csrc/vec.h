// AVX-512 helpers shared by the kernels: bf16 <-> float and a vectorised exp.

#pragma once

#include <ATen/core/TensorBody.h>
#include <immintrin.h>

namespace pagedformers {

inline __m512 load_bf16x16(const at::BFloat16* p) {  // 16 bf16 -> 16 float: bf16 is a float's high half
  const __m256i raw = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(raw), 16));
}

inline __m512 round_bf16(__m512 x) {  // to bf16 (nearest even) and back, as a bf16 tensor op does
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32((__m256i)_mm512_cvtneps_pbh(x)), 16));
}

inline void store_bf16x16(at::BFloat16* p, __m512 x) {  // rounded to nearest even
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), (__m256i)_mm512_cvtneps_pbh(x));
}

// exp(x) for 16 floats: 2^n * 2^f with x * log2(e) = n + f, |f| <= 1/2, 2^f by its degree-7 Taylor
// polynomial (relative error < 1e-8); libm's scalar exp made the softmax most of the kernel's time.
inline __m512 exp16(__m512 x) {
  const __m512 t = _mm512_mul_ps(_mm512_max_ps(x, _mm512_set1_ps(-104.f)), _mm512_set1_ps(1.4426950408889634f));
  const __m512 n = _mm512_roundscale_ps(t, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  const __m512 f = _mm512_mul_ps(_mm512_sub_ps(t, n), _mm512_set1_ps(0.6931471805599453f));  // 2^(t-n) = e^f
  __m512 p = _mm512_set1_ps(1.f / 5040);
  for (const float c : {1.f / 720, 1.f / 120, 1.f / 24, 1.f / 6, 0.5f, 1.f, 1.f})
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(c));
  return _mm512_scalef_ps(p, n);
}

}  // namespace pagedformers
