// bf16 linear layer, y = x W^T + b, on a weight packed once at load for AVX512-BF16's pair dot product.
//
// The packed weight is [N/16, K/2, 16, 2] (platforms/cpu/linear.py packs it; N padded to 16, K to 2 with
// zeros): for each block of 16 output columns, each pair of input positions is one 64-byte row, so
// one vdpbf16ps takes 16 columns x 2 positions against one broadcast pair of x. A micro-kernel keeps an
// R x C tile of fp32 accumulators, two partial sums each (R <= 4 rows, C <= 3 blocks: 24 of the 32
// registers) over the whole K; the C blocks it streams (K x 48 bf16: 96 KB at K = 1024) stay in L2 while
// the tile steps down the rows. On 2 Zen 4 cores that is ~430 against oneDNN's ~340 GFLOP/s at 32 tokens
// with the weights coming from DRAM, and ~430 from 128 tokens up. A single row (a batch-1 decode) takes
// the blocks one at a time instead, the same sums in the same order: the weight is then read as one
// sequential run, which the prefetchers follow better than three runs 32 KB apart (+8.5% of bandwidth
// where this VM's memory gives 55-65 GB/s, the same where it gives ~33).

#include <ATen/core/Tensor.h>
#include <immintrin.h>

#include "linear.h"

#include <array>
#include <cstring>
#include <utility>
#include <vector>

namespace {

using pagedformers::Tile;

// Two partial sums per output, even pairs into one and odd pairs into the other, added at the end: one
// chain of dependent vdpbf16ps capped a single row at ~72 GB/s from cache, two reach ~139 (the memory
// gives up to ~65). Every tile shape sums in this order, so that a row computes the same alone or in a batch.
constexpr int kSums = 2;
constexpr int kMaxRows = 4, kMaxBlocks = 3;

inline __m512bh broadcast_pair(const at::BFloat16* p) {
  int32_t pair;
  std::memcpy(&pair, p, sizeof pair);
  return (__m512bh)_mm512_set1_epi32(pair);
}

template <int R, int C>
void tile_kernel(const Tile& t) {
  __m512 acc[kSums][R][C];
  for (int s = 0; s < kSums; ++s)
    for (int r = 0; r < R; ++r)
      for (int c = 0; c < C; ++c) acc[s][r][c] = _mm512_setzero_ps();
  const int64_t full_pairs = t.k / 2;
  auto step = [&](int s, int64_t p) {
    __m512bh w[C];
    for (int c = 0; c < C; ++c) w[c] = (__m512bh)_mm512_loadu_si512(t.w + (c * t.pairs + p) * 32);
    for (int r = 0; r < R; ++r) {
      const __m512bh x = broadcast_pair(t.x + r * t.ldx + 2 * p);
      for (int c = 0; c < C; ++c) acc[s][r][c] = _mm512_dpbf16_ps(acc[s][r][c], x, w[c]);
    }
  };
  int64_t p = 0;
  for (; p + kSums <= full_pairs; p += kSums)
    for (int s = 0; s < kSums; ++s) step(s, p + s);
  for (; p < full_pairs; ++p) step(0, p);  // the pairs left over go to the first sum, as does the last position:
  if (t.k % 2) {  // the last position alone: its pair's upper half is zero in the weight, and must be in x
    for (int r = 0; r < R; ++r) {
      uint16_t last;
      std::memcpy(&last, t.x + r * t.ldx + t.k - 1, sizeof last);
      const __m512bh x = (__m512bh)_mm512_set1_epi32(last);
      for (int c = 0; c < C; ++c)
        acc[0][r][c] = _mm512_dpbf16_ps(acc[0][r][c], x, (__m512bh)_mm512_loadu_si512(t.w + (c * t.pairs + full_pairs) * 32));
    }
  }
  for (int c = 0; c < C; ++c) {
    const __m512 b = t.bias ? _mm512_loadu_ps(t.bias + c * 16) : _mm512_setzero_ps();
    const __mmask16 mask = c == C - 1 ? (__mmask16)((1u << t.last_cols) - 1) : (__mmask16)0xFFFF;
    for (int r = 0; r < R; ++r) {
      __m512 sum = acc[0][r][c];
      for (int s = 1; s < kSums; ++s) sum = _mm512_add_ps(sum, acc[s][r][c]);
      _mm256_mask_storeu_epi16(t.out[c] + (t.row + r) * t.ldo[c], mask,
                               (__m256i)_mm512_cvtneps_pbh(_mm512_add_ps(sum, b)));
    }
  }
}

using TileKernel = void (*)(const Tile&);

template <int C, int... R>
constexpr std::array<TileKernel, sizeof...(R)> kernels_for(std::integer_sequence<int, R...>) {
  return {tile_kernel<R + 1, C>...};
}

// kTiles[c - 1][r - 1]: the kernel for an r-row, c-block tile
const std::array<std::array<TileKernel, kMaxRows>, kMaxBlocks> kTiles = {
    kernels_for<1>(std::make_integer_sequence<int, kMaxRows>{}),
    kernels_for<2>(std::make_integer_sequence<int, kMaxRows>{}),
    kernels_for<3>(std::make_integer_sequence<int, kMaxRows>{})};

void run_tile(const Tile& tile, int64_t rows, int64_t blocks) {
  if (rows > 1) {
    kTiles[blocks - 1][rows - 1](tile);
    return;
  }
  for (int64_t c = 0; c < blocks; ++c)  // one block after another: one sequential run, same sums
    kTiles[0][0](tile.block(c, c + 1 == blocks ? tile.last_cols : 16));
}

}  // namespace

std::vector<at::Tensor> linear(const at::Tensor& input, const at::Tensor& packed, const at::Tensor& bias,
                               const std::vector<int64_t>& widths) {
  return pagedformers::linear_tiles(input, packed, bias, widths, kMaxRows, kMaxBlocks, run_tile);
}
