// bf16 linear layer, y = x W^T + b (AVX2), on the weight packed for the AVX-512 kernel (../linear.h).
//
// Without bf16 dot products, each 64-byte packed row (16 columns x a pair of positions) is two 256-bit loads,
// widened to floats with one op per parity: the even position of every column is a shift, the odd one a
// mask. A tile keeps 2 x 2 float accumulators per row (columns 0-7 and 8-15, even and odd positions), up to
// 3 rows (12 of the 16 registers), and sums the parities at the end: every tile shape sums in this order,
// so a row computes the same alone or in a batch, and a lone row still has four independent chains. x is
// widened to floats once per call, for broadcasts straight from memory.

#include <ATen/core/Tensor.h>
#include <immintrin.h>

#include "../linear.h"
#include "vec.h"

#include <cstring>
#include <vector>

namespace {

using Tile = pagedformers::TileOf<float>;
using namespace pagedformers::avx2;

constexpr int64_t kMaxRows = 3, kMaxBlocks = 3;

// One position of a pair (parity 0: the even one) for R rows: acc[4 r + 2 c + parity] is row r's sum over
// columns 0-7 (c = 0) or 8-15. A flat array, its loops fully unrolled, down to the stores: GCC keeps it in
// registers (a nested one, or a rolled loop over it, it mirrored to the stack at every step: 55 against
// 94 GFLOP/s).
template <int R>
inline void accumulate_pair(__m256* acc, __m256i lo, __m256i hi, const float* x, int64_t ldx, int parity) {
  const __m256i odd_mask = _mm256_set1_epi32(static_cast<int32_t>(0xFFFF0000u));
  const __m256 w0 = _mm256_castsi256_ps(parity ? _mm256_and_si256(lo, odd_mask) : _mm256_slli_epi32(lo, 16));
  const __m256 w1 = _mm256_castsi256_ps(parity ? _mm256_and_si256(hi, odd_mask) : _mm256_slli_epi32(hi, 16));
#pragma GCC unroll 4
  for (int r = 0; r < R; ++r) {
    const __m256 xb = _mm256_broadcast_ss(x + r * ldx);
    acc[4 * r + parity] = _mm256_fmadd_ps(xb, w0, acc[4 * r + parity]);
    acc[4 * r + 2 + parity] = _mm256_fmadd_ps(xb, w1, acc[4 * r + 2 + parity]);
  }
}

// One block of 16 columns for R rows of x.
template <int R>
void tile_kernel(const Tile& t) {
  __m256 acc[4 * R];
#pragma GCC unroll 12
  for (int i = 0; i < 4 * R; ++i) acc[i] = _mm256_setzero_ps();
  const auto* w = reinterpret_cast<const __m256i*>(t.w);  // two vectors per pair
  const int64_t full_pairs = t.k / 2;
  for (int64_t p = 0; p < full_pairs; ++p) {
    const __m256i lo = _mm256_loadu_si256(w + 2 * p), hi = _mm256_loadu_si256(w + 2 * p + 1);
    accumulate_pair<R>(acc, lo, hi, t.x + 2 * p, t.ldx, 0);
    accumulate_pair<R>(acc, lo, hi, t.x + 2 * p + 1, t.ldx, 1);
  }
  if (t.k % 2)  // the last position alone, an even one: its pair's odd half is zero in the weight
    accumulate_pair<R>(acc, _mm256_loadu_si256(w + 2 * full_pairs), _mm256_loadu_si256(w + 2 * full_pairs + 1),
                       t.x + t.k - 1, t.ldx, 0);
  const __m256 b0 = t.bias ? _mm256_loadu_ps(t.bias) : _mm256_setzero_ps();
  const __m256 b1 = t.bias ? _mm256_loadu_ps(t.bias + 8) : _mm256_setzero_ps();
#pragma GCC unroll 4
  for (int r = 0; r < R; ++r) {
    at::BFloat16 row[16];
    _mm_storeu_si128(reinterpret_cast<__m128i*>(row),
                     pack_bf16x8(_mm256_add_ps(_mm256_add_ps(acc[4 * r], acc[4 * r + 1]), b0)));
    _mm_storeu_si128(reinterpret_cast<__m128i*>(row + 8),
                     pack_bf16x8(_mm256_add_ps(_mm256_add_ps(acc[4 * r + 2], acc[4 * r + 3]), b1)));
    std::memcpy(t.out[0] + (t.row + r) * t.ldo[0], row, t.last_cols * sizeof(at::BFloat16));
  }
}

template <int R>
void run_blocks(const Tile& tile, int64_t blocks) {
  for (int64_t c = 0; c < blocks; ++c) tile_kernel<R>(tile.block(c, c + 1 == blocks ? tile.last_cols : 16));
}

// One block after another: for a lone row, one sequential run over the panel's weights.
void run_tile(const Tile& tile, int64_t rows, int64_t blocks) {
  switch (rows) {
    case 1: run_blocks<1>(tile, blocks); break;
    case 2: run_blocks<2>(tile, blocks); break;
    default: run_blocks<3>(tile, blocks);
  }
}

}  // namespace

std::vector<at::Tensor> linear(const at::Tensor& input, const at::Tensor& packed, const at::Tensor& bias,
                               const std::vector<int64_t>& widths) {
  return pagedformers::linear_tiles<float>(input, packed, bias, widths, kMaxRows, kMaxBlocks, run_tile);
}
