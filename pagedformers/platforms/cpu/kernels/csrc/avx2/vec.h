// AVX2 helpers shared by the AVX2 kernels: bf16 <-> float and a vectorised exp, 8 lanes.
//
// Without AVX512-BF16 there is no bf16 arithmetic: a bf16 is a float's high half, so widening is a shift,
// and every product of two bf16 values is exact in float. Rounding back is done with integer ops, exactly
// as ATen rounds (nearest even, subnormals kept, NaN -> 0x7FC0).

#pragma once

#include <ATen/core/TensorBody.h>
#include <immintrin.h>

#include <cstdint>

namespace pagedformers::avx2 {

inline __m256 load_bf16x8(const at::BFloat16* p) {
  const __m128i raw = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(raw), 16));
}

// 16 bf16 as two vectors: the even positions (0, 2, .., 14) and the odd ones. Dot products that only need a
// sum take them in this order: one load and two ops for 16 values.
inline void load_bf16x16_split(const at::BFloat16* p, __m256& even, __m256& odd) {
  const __m256i raw = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  even = _mm256_castsi256_ps(_mm256_slli_epi32(raw, 16));
  odd = _mm256_castsi256_ps(_mm256_and_si256(raw, _mm256_set1_epi32(static_cast<int32_t>(0xFFFF0000u))));
}

// The bf16 bits of each lane (in its low half), rounded as ATen rounds.
inline __m256i bf16_bits(__m256 x) {
  const __m256i bits = _mm256_castps_si256(x);
  const __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(bits, 16), _mm256_set1_epi32(1));
  const __m256i bias = _mm256_add_epi32(lsb, _mm256_set1_epi32(0x7FFF));
  const __m256i rounded = _mm256_srli_epi32(_mm256_add_epi32(bits, bias), 16);
  const __m256i nan = _mm256_castps_si256(_mm256_cmp_ps(x, x, _CMP_UNORD_Q));
  return _mm256_blendv_epi8(rounded, _mm256_set1_epi32(0x7FC0), nan);
}

// To bf16 and back, rounded as ATen rounds.
inline __m256 round_bf16(__m256 x) { return _mm256_castsi256_ps(_mm256_slli_epi32(bf16_bits(x), 16)); }

inline __m128i pack_bf16x8(__m256 x) {  // 8 rounded bf16 in one 128-bit vector
  const __m256i bits = bf16_bits(x);
  return _mm_packus_epi32(_mm256_castsi256_si128(bits), _mm256_extracti128_si256(bits, 1));
}

inline void store_bf16x8(at::BFloat16* p, __m256 x) {
  _mm_storeu_si128(reinterpret_cast<__m128i*>(p), pack_bf16x8(x));
}

inline float sum_lanes(__m256 v) {
  const __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  const __m128 t = _mm_add_ps(s, _mm_movehl_ps(s, s));
  return _mm_cvtss_f32(_mm_add_ss(t, _mm_movehdup_ps(t)));
}

inline float max_lanes(__m256 v) {
  const __m128 s = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  const __m128 t = _mm_max_ps(s, _mm_movehl_ps(s, s));
  return _mm_cvtss_f32(_mm_max_ss(t, _mm_movehdup_ps(t)));
}

// exp(x) for 8 floats, as the AVX-512 kernels compute it: 2^n * 2^f with x * log2(e) = n + f, |f| <= 1/2,
// 2^f by its degree-7 Taylor polynomial (relative error < 1e-8). 2^n is applied in two halves so that
// results below FLT_MIN round to subnormals and large ones overflow to inf, as vscalefps does.
inline __m256 exp8(__m256 x) {
  const __m256 t = _mm256_mul_ps(_mm256_max_ps(x, _mm256_set1_ps(-104.f)), _mm256_set1_ps(1.4426950408889634f));
  const __m256 n =
      _mm256_round_ps(_mm256_min_ps(t, _mm256_set1_ps(160.f)), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  const __m256 f = _mm256_mul_ps(_mm256_sub_ps(t, n), _mm256_set1_ps(0.6931471805599453f));  // 2^(t-n) = e^f
  __m256 p = _mm256_set1_ps(1.f / 5040);
  for (const float c : {1.f / 720, 1.f / 120, 1.f / 24, 1.f / 6, 0.5f, 1.f, 1.f})
    p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(c));
  const __m256i ni = _mm256_cvtps_epi32(n);
  const __m256i half = _mm256_srai_epi32(ni, 1);
  const auto pow2 = [](__m256i e) {
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_add_epi32(e, _mm256_set1_epi32(127)), 23));
  };
  return _mm256_mul_ps(_mm256_mul_ps(p, pow2(half)), pow2(_mm256_sub_epi32(ni, half)));
}

}  // namespace pagedformers::avx2
