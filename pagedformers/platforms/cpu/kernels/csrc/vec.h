// AVX-512 helpers shared by the kernels: bf16 <-> float and a vectorised exp.

#pragma once

#include <ATen/core/TensorBody.h>
#include <immintrin.h>

#include <cstdint>

namespace pagedformers {

inline __m512 load_bf16x16(const at::BFloat16* p) {  // 16 bf16 -> 16 float: bf16 is a float's high half
  const __m256i raw = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(raw), 16));
}

// To bf16 (nearest even) and back, as a bf16 tensor op does for all but subnormals, which vcvtneps2bf16 flushes.
inline __m512 round_bf16(__m512 x) {
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32((__m256i)_mm512_cvtneps_pbh(x)), 16));
}

inline void store_bf16x16(at::BFloat16* p, __m512 x) {  // rounded to nearest even
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), (__m256i)_mm512_cvtneps_pbh(x));
}

// To bf16 (nearest even) and back exactly as ATen rounds, subnormals included: for kernels that stand in for
// ATen ops in a decode graph, whose replay must equal the eager ops bitwise.
inline __m512 round_bf16_exact(__m512 x) {
  const __m512i bits = _mm512_castps_si512(x);
  const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(bits, 16), _mm512_set1_epi32(1));
  __m512i rounded = _mm512_add_epi32(bits, _mm512_add_epi32(lsb, _mm512_set1_epi32(0x7FFF)));
  rounded = _mm512_and_si512(rounded, _mm512_set1_epi32(static_cast<int32_t>(0xFFFF0000u)));
  const __mmask16 nan = _mm512_cmp_ps_mask(x, x, _CMP_UNORD_Q);
  return _mm512_castsi512_ps(_mm512_mask_mov_epi32(rounded, nan, _mm512_set1_epi32(0x7FC00000)));
}

inline void store_bf16x16_exact(at::BFloat16* p, __m512 x) {
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(p),
                      _mm512_cvtepi32_epi16(_mm512_srli_epi32(_mm512_castps_si512(round_bf16_exact(x)), 16)));
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
