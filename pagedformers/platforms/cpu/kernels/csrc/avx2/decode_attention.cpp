// bf16 decode attention over the paged KV cache, reading each sequence's blocks in place (AVX2).
//
// As ../decode_attention.cpp, without bf16 dot products: one task per (sequence, KV head) scores its G query
// heads against the visible keys in float FMAs (each bf16 product exact, float sums), softmaxes in float,
// and weights the values by the probabilities rounded to bf16, as HF's eager attention rounds them before
// its matmul. A key or value row is widened 16 values at a time, even and odd positions apart (one load,
// two ops): the query is split the same way once per task, and the values' sums are put back in order at
// the end.

#include <ATen/core/Tensor.h>
#include <immintrin.h>

#include "../decode_attention.h"
#include "vec.h"

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

namespace {

using namespace pagedformers;
using namespace pagedformers::avx2;

// Lane t of the result: the sum of v[t]'s lanes.
inline __m256 sum_lanes8(const __m256* v) {
  const __m256 s0 = _mm256_hadd_ps(_mm256_hadd_ps(v[0], v[1]), _mm256_hadd_ps(v[2], v[3]));
  const __m256 s1 = _mm256_hadd_ps(_mm256_hadd_ps(v[4], v[5]), _mm256_hadd_ps(v[6], v[7]));
  // s0: sources 0-3 over lanes 0-3 of theirs, then over lanes 4-7; s1 the same for sources 4-7
  return _mm256_add_ps(_mm256_permute2f128_ps(s0, s1, 0x20), _mm256_permute2f128_ps(s0, s1, 0x31));
}

// q [G, D] bf16 -> [G, D] float, each 16 values as their 8 even then their 8 odd positions.
void split_query(const at::BFloat16* q, const Shape& s, float* out) {
  for (int64_t i = 0; i < s.groups * s.d; i += 16) {
    __m256 even, odd;
    load_bf16x16_split(q + i, even, odd);
    _mm256_storeu_ps(out + i, even);
    _mm256_storeu_ps(out + i + 8, odd);
  }
}

// 8 positions at a time, with their values and the next keys prefetched (key_rows).
void scores_of(const float* q, const at::BFloat16* k_cache, const at::BFloat16* v_cache, const int64_t* row_of,
               int64_t len, const Shape& s, float scale, float* scores) {
  const at::BFloat16* rows[8];
  for (int64_t i = 0; i < len; i += 8) {  // 8 positions at a time (any blocks)
    const int64_t n = key_rows<8>(k_cache, v_cache, row_of, i, len, s, rows);
    for (int64_t g = 0; g < s.groups; ++g) {
      __m256 acc[8];
      for (int t = 0; t < 8; ++t) acc[t] = _mm256_setzero_ps();
      for (int64_t c = 0; c < s.d; c += 16) {
        const __m256 q_even = _mm256_loadu_ps(q + g * s.d + c), q_odd = _mm256_loadu_ps(q + g * s.d + c + 8);
        for (int t = 0; t < 8; ++t) {
          __m256 even, odd;
          load_bf16x16_split(rows[t] + c, even, odd);
          acc[t] = _mm256_fmadd_ps(q_odd, odd, _mm256_fmadd_ps(q_even, even, acc[t]));
        }
      }
      float sums[8];
      _mm256_storeu_ps(sums, _mm256_mul_ps(sum_lanes8(acc), _mm256_set1_ps(scale)));
      std::copy(sums, sums + n, scores + g * len + i);
    }
  }
}

// In place: scores -> bf16(exp(score - max)), as floats; returns the softmax denominators (the sink's share
// included), summed before the rounding as the AVX-512 kernel sums them.
void softmax_of(float* scores, int64_t len, const float* sinks, int64_t first_head, const Options& o,
                int64_t groups, float* denom) {
  for (int64_t g = 0; g < groups; ++g) {
    float* x = scores + g * len;
    if (o.softcap > 0)
      for (int64_t i = 0; i < len; ++i) x[i] = std::tanh(x[i] / o.softcap) * o.softcap;
    float m = sinks ? sinks[first_head + g] : -std::numeric_limits<float>::infinity();
    int64_t i = 0;
    __m256 vmax = _mm256_set1_ps(m);
    for (; i + 8 <= len; i += 8) vmax = _mm256_max_ps(vmax, _mm256_loadu_ps(x + i));
    m = max_lanes(vmax);
    for (; i < len; ++i) m = std::max(m, x[i]);
    __m256 vsum = _mm256_setzero_ps();
    for (i = 0; i < len; i += 8) {
      const int64_t n = std::min<int64_t>(8, len - i);  // a short tail is read and written through a copy
      float part[8] = {};
      const bool whole = n == 8;
      if (!whole) std::copy(x + i, x + len, part);
      const __m256 lanes = _mm256_castsi256_ps(_mm256_cmpgt_epi32(_mm256_set1_epi32(static_cast<int>(n)),
                                                                  _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7)));
      const __m256 scores_i = _mm256_loadu_ps(whole ? x + i : part);
      const __m256 e = _mm256_and_ps(lanes, exp8(_mm256_sub_ps(scores_i, _mm256_set1_ps(m))));
      vsum = _mm256_add_ps(vsum, e);
      _mm256_storeu_ps(whole ? x + i : part, round_bf16(e));
      if (!whole) std::copy(part, part + n, x + i);
    }
    denom[g] = sum_lanes(vsum) + (sinks ? std::exp(sinks[first_head + g] - m) : 0.f);
  }
}

// probs @ V for query heads [g0, g0 + NG) and value lanes [c, c + 16): 2 x NG float accumulators (even and
// odd lanes) stay in registers while the rows are read.
template <int NG>
void weighted_values_tile(const float* probs, int64_t len, const at::BFloat16* v_cache, const int64_t* row_of,
                          const Shape& s, int64_t g0, int64_t c, float* acc) {
  __m256 even_acc[NG], odd_acc[NG];
  for (int g = 0; g < NG; ++g) even_acc[g] = odd_acc[g] = _mm256_setzero_ps();
  for (int64_t i = 0; i < len; ++i) {
    __m256 even, odd;
    load_bf16x16_split(v_cache + row_of[i] * s.dv + c, even, odd);
    for (int g = 0; g < NG; ++g) {
      const __m256 p = _mm256_broadcast_ss(probs + (g0 + g) * len + i);
      even_acc[g] = _mm256_fmadd_ps(p, even, even_acc[g]);
      odd_acc[g] = _mm256_fmadd_ps(p, odd, odd_acc[g]);
    }
  }
  for (int g = 0; g < NG; ++g) {  // back in order: lanes (e0 o0 e1 o1 e2 o2 e3 o3) and (e4 o4 .. e7 o7)
    const __m256 lo = _mm256_unpacklo_ps(even_acc[g], odd_acc[g]), hi = _mm256_unpackhi_ps(even_acc[g], odd_acc[g]);
    float* out = acc + (g0 + g) * s.dv + c;
    _mm256_storeu_ps(out, _mm256_permute2f128_ps(lo, hi, 0x20));
    _mm256_storeu_ps(out + 8, _mm256_permute2f128_ps(lo, hi, 0x31));
  }
}

void weighted_values(const float* probs, const at::BFloat16* v_cache, const int64_t* row_of, int64_t len,
                     const Shape& s, float* acc) {
  for_group_tiles(s.groups, [&](auto ng, int64_t g0) {
    for (int64_t c = 0; c < s.dv; c += 16)
      weighted_values_tile<decltype(ng)::value>(probs, len, v_cache, row_of, s, g0, c, acc);
  });
}

void attend_one(const Task& task, const at::BFloat16* k_cache, const at::BFloat16* v_cache, const float* sinks,
                const Shape& s, const Options& o, std::vector<float>& scratch) {
  const int64_t len = task.len;
  // the split query [G, D], scores [G, len], acc [G, Dv], denom [G]
  scratch.resize(s.groups * (s.d + len + s.dv + 1));
  float *q = scratch.data(), *scores = q + s.groups * s.d;
  float *acc = scores + s.groups * len, *denom = acc + s.groups * s.dv;
  split_query(task.q, s, q);
  scores_of(q, k_cache, v_cache, task.rows, len, s, o.scale, scores);
  softmax_of(scores, len, sinks, task.head * s.groups, o, s.groups, denom);
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
