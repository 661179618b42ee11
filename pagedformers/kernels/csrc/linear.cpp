// bf16 linear layer, y = x W^T + b, on a weight packed once at load for AVX512-BF16's pair dot product.
//
// The packed weight is [N/16, K/2, 16, 2] (layers/cpu_linear.py packs it; N padded to 16, K to 2 with
// zeros): for each block of 16 output columns, each pair of input positions is one 64-byte row, so
// one vdpbf16ps takes 16 columns x 2 positions against one broadcast pair of x. A micro-kernel keeps an
// R x C tile of fp32 accumulators, two partial sums each (R <= 4 rows, C <= 3 blocks: 24 of the 32
// registers) over the whole K; the C blocks it streams (K x 48 bf16: 96 KB at K = 1024) stay in L2 while
// the tile steps down the rows. On 2 Zen 4 cores that is ~430 against oneDNN's ~340 GFLOP/s at 32 tokens
// with the weights coming from DRAM, and ~430 from 128 tokens up. A single row (a batch-1 decode) takes
// the blocks one at a time instead, the same sums in the same order: the weight is then read as one
// sequential run, which the prefetchers follow better than three runs 32 KB apart (+8.5% of bandwidth
// where this VM's memory gives 55-65 GB/s, the same where it gives ~33).

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <immintrin.h>

#include <array>
#include <atomic>
#include <cstring>
#include <utility>
#include <vector>

namespace {

// Two partial sums per output, even pairs into one and odd pairs into the other, added at the end: one
// chain of dependent vdpbf16ps capped a single row at ~72 GB/s from cache, two reach ~139 (the memory
// gives up to ~65). Every tile shape sums in this order, so that a row computes the same alone or in a batch.
constexpr int kSums = 2;
constexpr int kMaxRows = 4, kMaxBlocks = 3;
constexpr int64_t kRowChunk = 256;  // rows of x that one pass over the weight serves (A stays in cache)

struct Tile {
  const at::BFloat16* x;  // the tile's first row
  int64_t ldx;
  const at::BFloat16* w;  // the first of its C packed column blocks
  int64_t k, pairs;       // pairs = packed rows per block = ceil(k / 2)
  const float* bias;      // fp32, padded to the blocks; or null
  at::BFloat16* const* out;  // per block: its first column in row 0 of the output that takes it
  const int64_t* ldo;        // per block: that output's row stride
  int64_t row;
  __mmask16 last_mask;    // columns of the last block that exist
};

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
    const __mmask16 mask = c == C - 1 ? t.last_mask : 0xFFFF;
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

}  // namespace

// input [..., K] bf16; packed [ceil(N/16), ceil(K/2), 32] bf16; bias fp32 [ceil(N/16) * 16] or empty;
// widths: how the N output columns split into separate outputs (sibling linears: q, k, v), each a
// multiple of 16 but the last. Returns one contiguous [..., width] bf16 tensor per width. Rows of
// the input may be strided; a last dim that is not contiguous is copied first.
std::vector<at::Tensor> linear(const at::Tensor& input, const at::Tensor& packed, const at::Tensor& bias,
                               const std::vector<int64_t>& widths) {
  TORCH_CHECK(input.dim() >= 1 && input.scalar_type() == at::kBFloat16, "linear: bf16 input expected");
  const int64_t k = input.size(-1);
  at::Tensor x = input.reshape({-1, k});
  if (x.stride(1) != 1) x = x.contiguous();
  const int64_t m = x.size(0), blocks = packed.size(0), pairs = packed.size(1);
  int64_t n = 0;
  for (size_t i = 0; i < widths.size(); ++i) {
    TORCH_CHECK(widths[i] > 0 && (i + 1 == widths.size() || widths[i] % 16 == 0),
                "linear: output widths must be positive, multiples of 16 but the last");
    n += widths[i];
  }
  TORCH_CHECK(packed.is_contiguous() && packed.scalar_type() == at::kBFloat16 && packed.dim() == 3 &&
                  packed.size(2) == 32 && pairs == (k + 1) / 2 && blocks == (n + 15) / 16 &&
                  (bias.numel() == 0 || (bias.is_contiguous() && bias.scalar_type() == at::kFloat &&
                                         bias.numel() == blocks * 16)),
              "linear: a weight packed for this input expected");
  std::vector<int64_t> shape = input.sizes().vec();
  std::vector<at::Tensor> outs;
  std::vector<at::BFloat16*> block_out;
  std::vector<int64_t> block_ld;
  for (const int64_t width : widths) {
    shape.back() = width;
    outs.push_back(at::empty(shape, x.options()));
    for (int64_t col = 0; col < width; col += 16) {
      block_out.push_back(outs.back().data_ptr<at::BFloat16>() + col);
      block_ld.push_back(width);
    }
  }
  const int64_t panels = (blocks + kMaxBlocks - 1) / kMaxBlocks, chunks = (m + kRowChunk - 1) / kRowChunk;
  const auto* xp = x.data_ptr<at::BFloat16>();
  const auto* wp = packed.data_ptr<at::BFloat16>();
  const float* bp = bias.numel() ? bias.data_ptr<float>() : nullptr;
  const __mmask16 ragged_mask = n % 16 ? (__mmask16)((1u << (n % 16)) - 1) : (__mmask16)0xFFFF;
  // Work items are (row chunk, panel of <= 3 blocks), panels inner: a thread's range walks its
  // panels for one chunk of x before the next.
  const auto run = [&](int64_t begin, int64_t end) {
    for (int64_t item = begin; item < end; ++item) {
      const int64_t block = item % panels * kMaxBlocks, width = std::min<int64_t>(kMaxBlocks, blocks - block);
      const int64_t row_end = std::min(m, (item / panels + 1) * kRowChunk);
      const __mmask16 last_mask = block + width == blocks ? ragged_mask : (__mmask16)0xFFFF;
      for (int64_t row = item / panels * kRowChunk; row < row_end; row += kMaxRows) {
        const int64_t rows = std::min<int64_t>(kMaxRows, row_end - row);
        const Tile tile{xp + row * x.stride(0), x.stride(0), wp + block * pairs * 32, k, pairs,
                        bp ? bp + block * 16 : nullptr, block_out.data() + block, block_ld.data() + block, row,
                        last_mask};
        if (rows > 1) {
          kTiles[width - 1][rows - 1](tile);
          continue;
        }
        for (int64_t c = 0; c < width; ++c) {  // one block after another: one sequential run, same sums
          Tile one = tile;
          one.w += c * pairs * 32;
          one.bias = tile.bias ? tile.bias + c * 16 : nullptr;
          one.out += c;
          one.ldo += c;
          one.last_mask = c + 1 == width ? last_mask : (__mmask16)0xFFFF;
          kTiles[0][0](one);
        }
      }
    }
  };
  const int64_t items = chunks * panels;
  if (m > kMaxRows) {  // compute-bound: even ranges
    at::parallel_for(0, items, 1, run);
    return outs;
  }
  // Memory-bound (a few rows): the threads take 4 panels at a time until none are left, so that neither
  // streams alone at the end while the other waits (+2-3% of bandwidth over the even split, 2 threads).
  std::atomic<int64_t> next{0};
  at::parallel_for(0, at::get_num_threads(), 1, [&](int64_t, int64_t) {
    for (int64_t item; (item = next.fetch_add(4, std::memory_order_relaxed)) < items;)
      run(item, std::min(items, item + 4));
  });
  return outs;
}
