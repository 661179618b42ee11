// bf16 decode attention over the paged KV cache, reading each sequence's blocks in place (AVX-512).
//
// One task per (sequence, KV head): its G query heads are scored against the visible keys with
// AVX512-BF16 dot products (float accumulation) and softmaxed in float; the probabilities, rounded to
// bf16, weight the values in AVX512-BF16 dot products too (two positions a product), where the value
// width is a multiple of 32, else in float FMAs. No gathered copy of the context and no batched small
// matmuls. On 2 cores, 32 decodes x 192 context of a 4-KV-head, 64-dim layer take ~0.18 ms with the
// cache warm and ~0.35 ms cold (as in a decode step: the layer's cache was last read a step ago), where
// only reading the same rows takes ~0.3 ms: cold, memory bounds it.

#include <ATen/core/Tensor.h>
#include <immintrin.h>

#include "decode_attention.h"
#include "vec.h"

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

namespace {

using namespace pagedformers;

inline __mmask16 tail(int64_t i, int64_t len) {
  return len - i >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << (len - i)) - 1);
}

// The lane sums of 16 vectors, as one vector (lane i: the sum of v[i]'s lanes), in 15 add+shuffle pairs
// instead of 16 full horizontal reductions: each step halves the vector count and the lanes per source.
inline __m512 sum_lanes16(__m512* v) {
  for (int i = 0; i < 8; ++i)  // -> 8 vectors: v[2i] in lanes 0-7, v[2i+1] in 8-15
    v[i] = _mm512_add_ps(_mm512_shuffle_f32x4(v[2 * i], v[2 * i + 1], _MM_SHUFFLE(1, 0, 1, 0)),
                         _mm512_shuffle_f32x4(v[2 * i], v[2 * i + 1], _MM_SHUFFLE(3, 2, 3, 2)));
  for (int i = 0; i < 4; ++i)  // -> 4 vectors: 4 sources x 4 lanes
    v[i] = _mm512_add_ps(_mm512_shuffle_f32x4(v[2 * i], v[2 * i + 1], _MM_SHUFFLE(2, 0, 2, 0)),
                         _mm512_shuffle_f32x4(v[2 * i], v[2 * i + 1], _MM_SHUFFLE(3, 1, 3, 1)));
  for (int i = 0; i < 2; ++i)  // -> 2 vectors: per 128-bit block k, sources 8i+k and 8i+4+k, 2 lanes each
    v[i] = _mm512_add_ps(_mm512_shuffle_ps(v[2 * i], v[2 * i + 1], _MM_SHUFFLE(1, 0, 1, 0)),
                         _mm512_shuffle_ps(v[2 * i], v[2 * i + 1], _MM_SHUFFLE(3, 2, 3, 2)));
  const __m512 r = _mm512_add_ps(_mm512_shuffle_ps(v[0], v[1], _MM_SHUFFLE(2, 0, 2, 0)),
                                 _mm512_shuffle_ps(v[0], v[1], _MM_SHUFFLE(3, 1, 3, 1)));
  // lane 4k + j now holds source 4j + k
  const __m512i order = _mm512_set_epi32(15, 11, 7, 3, 14, 10, 6, 2, 13, 9, 5, 1, 12, 8, 4, 0);
  return _mm512_permutexvar_ps(order, r);
}

// 16 positions at a time, with their values and the next keys prefetched (key_rows).
void scores_of(const at::BFloat16* q, const at::BFloat16* k_cache, const at::BFloat16* v_cache, const int64_t* row_of,
               int64_t len, const Shape& s, float scale, float* scores) {
  const int64_t chunks = s.d / 32;
  const at::BFloat16* rows[16];
  for (int64_t i = 0; i < len; i += 16) {  // 16 positions at a time (any blocks)
    const int64_t n = key_rows<16>(k_cache, v_cache, row_of, i, len, s, rows);
    for (int64_t g = 0; g < s.groups; ++g) {
      __m512 acc[16];
      for (int t = 0; t < 16; ++t) acc[t] = _mm512_setzero_ps();
      for (int64_t c = 0; c < chunks; ++c) {
        const __m512bh qv = (__m512bh)_mm512_loadu_si512(q + g * s.d + c * 32);
        for (int t = 0; t < 16; ++t)
          acc[t] = _mm512_dpbf16_ps(acc[t], qv, (__m512bh)_mm512_loadu_si512(rows[t] + c * 32));
      }
      const __m512 sums = _mm512_mul_ps(sum_lanes16(acc), _mm512_set1_ps(scale));
      _mm512_mask_storeu_ps(scores + g * len + i, tail(0, n), sums);
    }
  }
}

// In place: scores -> exp(score - max); returns the softmax denominators (the sink's share included).
void softmax_of(float* scores, int64_t len, const float* sinks, int64_t first_head, const Options& o,
                int64_t groups, float* denom) {
  const __m512 minus_inf = _mm512_set1_ps(-std::numeric_limits<float>::infinity());
  for (int64_t g = 0; g < groups; ++g) {
    float* x = scores + g * len;
    if (o.softcap > 0)
      for (int64_t i = 0; i < len; ++i) x[i] = std::tanh(x[i] / o.softcap) * o.softcap;
    __m512 vmax = sinks ? _mm512_set1_ps(sinks[first_head + g]) : minus_inf;
    for (int64_t i = 0; i < len; i += 16) vmax = _mm512_max_ps(vmax, _mm512_mask_loadu_ps(minus_inf, tail(i, len), x + i));
    const float m = _mm512_reduce_max_ps(vmax);
    __m512 vsum = _mm512_setzero_ps();
    for (int64_t i = 0; i < len; i += 16) {
      const __mmask16 k = tail(i, len);
      const __m512 e = exp16(_mm512_sub_ps(_mm512_maskz_loadu_ps(k, x + i), _mm512_set1_ps(m)));
      _mm512_mask_storeu_ps(x + i, k, e);
      vsum = _mm512_mask_add_ps(vsum, k, vsum, e);
    }
    denom[g] = _mm512_reduce_add_ps(vsum) + (sinks ? std::exp(sinks[first_head + g] - m) : 0.f);
  }
}

// probs @ V for query heads [g0, g0 + NG) and value lanes [16 * c0, 16 * (c0 + NC)): NG x NC float accumulators
// stay in registers while each value row is read once.
template <int NG, int NC>
void weighted_values_tile(const float* probs, int64_t len, const at::BFloat16* v_cache, const int64_t* row_of,
                          const Shape& s, int64_t g0, int64_t c0, float* acc) {
  __m512 a[NG][NC];
  for (int g = 0; g < NG; ++g)
    for (int c = 0; c < NC; ++c) a[g][c] = _mm512_setzero_ps();
  for (int64_t i = 0; i < len; ++i) {
    const at::BFloat16* row = v_cache + row_of[i] * s.dv + c0 * 16;
    __m512 v[NC];
    for (int c = 0; c < NC; ++c) v[c] = load_bf16x16(row + c * 16);
    for (int g = 0; g < NG; ++g) {
      const __m512 p = _mm512_set1_ps(probs[(g0 + g) * len + i]);
      for (int c = 0; c < NC; ++c) a[g][c] = _mm512_fmadd_ps(p, v[c], a[g][c]);
    }
  }
  for (int g = 0; g < NG; ++g)
    for (int c = 0; c < NC; ++c) _mm512_storeu_ps(acc + (g0 + g) * s.dv + (c0 + c) * 16, a[g][c]);
}

template <int NG>
void weighted_values_groups(const float* probs, int64_t len, const at::BFloat16* v_cache, const int64_t* row_of,
                            const Shape& s, int64_t g0, float* acc) {
  const int64_t chunks = s.dv / 16;
  for (int64_t c0 = 0; c0 < chunks; c0 += 4) {
    switch (std::min<int64_t>(4, chunks - c0)) {
      case 1: weighted_values_tile<NG, 1>(probs, len, v_cache, row_of, s, g0, c0, acc); break;
      case 2: weighted_values_tile<NG, 2>(probs, len, v_cache, row_of, s, g0, c0, acc); break;
      case 3: weighted_values_tile<NG, 3>(probs, len, v_cache, row_of, s, g0, c0, acc); break;
      default: weighted_values_tile<NG, 4>(probs, len, v_cache, row_of, s, g0, c0, acc);
    }
  }
}

void weighted_values(const float* probs, const at::BFloat16* v_cache, const int64_t* row_of, int64_t len,
                     const Shape& s, float* acc) {
  for_group_tiles(s.groups, [&](auto ng, int64_t g0) {
    weighted_values_groups<decltype(ng)::value>(probs, len, v_cache, row_of, s, g0, acc);
  });
}

// probs @ V on AVX512-BF16 for query heads [g0, g0 + NG) and value lanes [32 * c0, 32 * (c0 + NC)): two
// value rows at a time are interleaved into position pairs (vpunpck*wd), so that one dot product folds
// both rows; the probabilities are bf16 pairs, as HF's eager attention rounds them before its matmul.
// Each 128-bit lane of an accumulator pair holds 4 + 4 of 8 consecutive value lanes (lo, hi); the
// store puts them back in order.
template <int NG, int NC>
void weighted_values_bf16_tile(const uint32_t* prob_pairs, int64_t pairs, const at::BFloat16* v_cache,
                               const int64_t* row_of, int64_t len, const Shape& s, int64_t g0, int64_t c0, float* acc) {
  __m512 lo[NG][NC], hi[NG][NC];
  for (int g = 0; g < NG; ++g)
    for (int c = 0; c < NC; ++c) lo[g][c] = hi[g][c] = _mm512_setzero_ps();
  for (int64_t j = 0; j < pairs; ++j) {
    const at::BFloat16* r0 = v_cache + row_of[2 * j] * s.dv + c0 * 32;
    const at::BFloat16* r1 = v_cache + row_of[std::min(2 * j + 1, len - 1)] * s.dv + c0 * 32;  // prob 0 past the end
    __m512bh vlo[NC], vhi[NC];
    for (int c = 0; c < NC; ++c) {
      const __m512i a = _mm512_loadu_si512(r0 + c * 32), b = _mm512_loadu_si512(r1 + c * 32);
      vlo[c] = (__m512bh)_mm512_unpacklo_epi16(a, b);
      vhi[c] = (__m512bh)_mm512_unpackhi_epi16(a, b);
    }
    for (int g = 0; g < NG; ++g) {
      const __m512bh p = (__m512bh)_mm512_set1_epi32(prob_pairs[(g0 + g) * pairs + j]);
      for (int c = 0; c < NC; ++c) {
        lo[g][c] = _mm512_dpbf16_ps(lo[g][c], p, vlo[c]);
        hi[g][c] = _mm512_dpbf16_ps(hi[g][c], p, vhi[c]);
      }
    }
  }
  // value lane 8L + k (k < 4) sits in lo's lane 4L + k, 8L + 4 + k in hi's lane 4L + k
  const __m512i first = _mm512_set_epi32(23, 22, 21, 20, 7, 6, 5, 4, 19, 18, 17, 16, 3, 2, 1, 0);
  const __m512i second = _mm512_set_epi32(31, 30, 29, 28, 15, 14, 13, 12, 27, 26, 25, 24, 11, 10, 9, 8);
  for (int g = 0; g < NG; ++g)
    for (int c = 0; c < NC; ++c) {
      float* out = acc + (g0 + g) * s.dv + (c0 + c) * 32;
      _mm512_storeu_ps(out, _mm512_permutex2var_ps(lo[g][c], first, hi[g][c]));
      _mm512_storeu_ps(out + 16, _mm512_permutex2var_ps(lo[g][c], second, hi[g][c]));
    }
}

template <int NG>
void weighted_values_bf16_groups(const uint32_t* prob_pairs, int64_t pairs, const at::BFloat16* v_cache,
                                 const int64_t* row_of, int64_t len, const Shape& s, int64_t g0, float* acc) {
  const int64_t chunks = s.dv / 32;
  for (int64_t c0 = 0; c0 < chunks; c0 += 2) {
    if (chunks - c0 >= 2)
      weighted_values_bf16_tile<NG, 2>(prob_pairs, pairs, v_cache, row_of, len, s, g0, c0, acc);
    else
      weighted_values_bf16_tile<NG, 1>(prob_pairs, pairs, v_cache, row_of, len, s, g0, c0, acc);
  }
}

// probs [groups, len] float -> [groups, pairs] bf16 pairs, the odd tail padded with a 0 probability.
void to_prob_pairs(const float* probs, int64_t len, int64_t groups, uint32_t* pairs) {
  const int64_t n = (len + 1) / 2;
  for (int64_t g = 0; g < groups; ++g) {
    at::BFloat16* out = reinterpret_cast<at::BFloat16*>(pairs + g * n);
    const float* x = probs + g * len;
    int64_t i = 0;
    for (; i + 16 <= len; i += 16) store_bf16x16(out + i, _mm512_loadu_ps(x + i));
    for (; i < len; ++i) out[i] = static_cast<at::BFloat16>(x[i]);
    if (len % 2) out[len] = static_cast<at::BFloat16>(0.f);
  }
}

void weighted_values_bf16(const float* probs, const at::BFloat16* v_cache, const int64_t* row_of, int64_t len,
                          const Shape& s, uint32_t* prob_pairs, float* acc) {
  const int64_t pairs = (len + 1) / 2;
  to_prob_pairs(probs, len, s.groups, prob_pairs);
  for_group_tiles(s.groups, [&](auto ng, int64_t g0) {
    weighted_values_bf16_groups<decltype(ng)::value>(prob_pairs, pairs, v_cache, row_of, len, s, g0, acc);
  });
}

void attend_one(const Task& task, const at::BFloat16* k_cache, const at::BFloat16* v_cache, const float* sinks,
                const Shape& s, const Options& o, std::vector<float>& scratch) {
  const int64_t len = task.len;
  // scores [G, len], acc [G, Dv], denom [G], then the bf16 probability pairs [G, (len + 1) / 2], a float's room each
  scratch.resize(s.groups * (len + s.dv + 1 + (len + 1) / 2));
  float *scores = scratch.data(), *acc = scores + s.groups * len, *denom = acc + s.groups * s.dv;
  scores_of(task.q, k_cache, v_cache, task.rows, len, s, o.scale, scores);
  softmax_of(scores, len, sinks, task.head * s.groups, o, s.groups, denom);
  if (s.dv % 32 == 0)
    weighted_values_bf16(scores, v_cache, task.rows, len, s, reinterpret_cast<uint32_t*>(denom + s.groups), acc);
  else
    weighted_values(scores, v_cache, task.rows, len, s, acc);
  store_task(task, acc, denom, s);
}

}  // namespace

void decode_attention(const at::Tensor& query, const at::Tensor& k_cache, const at::Tensor& v_cache,
                      const at::Tensor& block_tables, const at::Tensor& seq_lens, const at::Tensor& sinks,
                      at::Tensor& out, double scale, int64_t window, int64_t chunk, double softcap) {
  decode_attention_tasks(query, k_cache, v_cache, block_tables, seq_lens, sinks, out, scale, window, chunk, softcap,
                         attend_one);
}
