// The ISA-independent half of the bf16 linear kernels (linear.cpp, avx2/linear.cpp): the packed weight's
// checks, the outputs, and the split of the work into tiles over the threads.
//
// The packed weight is [N/16, K/2, 16, 2] (platforms/cpu/linear.py packs it; N padded to 16, K to 2 with
// zeros): for each block of 16 output columns, each pair of input positions is one 64-byte row. Work items
// are (row chunk, panel of a few blocks); a tile is up to kMaxRows rows of x against a panel.

#pragma once

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>

#include "thread_pool.h"

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <vector>

namespace pagedformers {

constexpr int64_t kRowChunk = 256;  // rows of x that one pass over the weight serves (x stays in cache)
constexpr int64_t kMemoryBoundRows = 4;  // up to this many rows, a linear streams its weight from memory

template <typename X>  // how the kernel reads x: bf16 as given, or widened to float once for every tile
struct TileOf {
  const X* x;  // the tile's first row
  int64_t ldx;
  const at::BFloat16* w;  // the first of its packed column blocks
  int64_t k, pairs;       // pairs = packed rows per block = ceil(k / 2)
  const float* bias;      // fp32, padded to the blocks; or null
  at::BFloat16* const* out;  // per block: its first column in row 0 of the output that takes it
  const int64_t* ldo;        // per block: that output's row stride
  int64_t row;
  int last_cols;             // columns of the tile's last block that exist (1-16)

  TileOf block(int64_t c, int cols) const {  // the tile's c-th block alone, `cols` of its columns existing
    TileOf one = *this;
    one.w += c * pairs * 32;
    one.bias = bias ? bias + c * 16 : nullptr;
    one.out += c;
    one.ldo += c;
    one.last_cols = cols;
    return one;
  }
};

using Tile = TileOf<at::BFloat16>;

// Row stride of x widened to floats: 16 floats past k, so that rows k = 1024 apart (4 KiB) do not share L1
// sets (a 6 x 16 float32 micro-kernel: 44 against 80 GFLOP/s on a Zen 3 core).
inline int64_t widened_stride(int64_t k) { return k + 16; }

// x [m, k] bf16 (unit column stride) as floats, rows widened_stride(k) apart; a plain loop the compiler
// vectorises.
inline std::vector<float> widen_rows(const at::Tensor& x) {
  const int64_t m = x.size(0), k = x.size(1), ld = x.stride(0), ldo = widened_stride(k);
  std::vector<float> out(m * ldo);
  const auto* in = reinterpret_cast<const uint16_t*>(x.data_ptr<at::BFloat16>());
  float* widened = out.data();
  // By value, into locals: through the lambda's references GCC reloaded every pointer for every element
  // and did not vectorise (a fifth of a 32-row linear's time).
  at::parallel_for(0, m, std::max<int64_t>(1, 65536 / std::max<int64_t>(k, 1)), [=](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const uint16_t* __restrict src = in + r * ld;
      float* __restrict dst = widened + r * ldo;
      for (int64_t i = 0; i < k; ++i) {
        const uint32_t bits = static_cast<uint32_t>(src[i]) << 16;
        std::memcpy(dst + i, &bits, sizeof bits);
      }
    }
  });
  return out;
}

// input [..., K] bf16; packed [ceil(N/16), ceil(K/2), 32] bf16; bias fp32 [ceil(N/16) * 16] or empty;
// widths: how the N output columns split into separate outputs (sibling linears: q, k, v), each a
// multiple of 16 but the last. Returns one contiguous [..., width] bf16 tensor per width. Rows of
// the input may be strided; a last dim that is not contiguous is copied first.
// run_tile(tile, rows, blocks) computes a tile (TileOf<X>) of `rows` <= max_rows rows against `blocks` <=
// max_blocks blocks.
template <typename X = at::BFloat16, typename RunTile>
std::vector<at::Tensor> linear_tiles(const at::Tensor& input, const at::Tensor& packed, const at::Tensor& bias,
                                     const std::vector<int64_t>& widths, int64_t max_rows, int64_t max_blocks,
                                     const RunTile& run_tile) {
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
    outs.push_back(at::empty(shape, input.options()));
    for (int64_t col = 0; col < width; col += 16) {
      block_out.push_back(outs.back().data_ptr<at::BFloat16>() + col);
      block_ld.push_back(width);
    }
  }
  const int64_t panels = (blocks + max_blocks - 1) / max_blocks, chunks = (m + kRowChunk - 1) / kRowChunk;
  std::vector<float> widened;
  const X* xp;
  int64_t ldx = x.stride(0);
  if constexpr (std::is_same_v<X, float>) {
    widened = widen_rows(x);
    xp = widened.data(), ldx = widened_stride(k);
  } else {
    xp = x.data_ptr<at::BFloat16>();
  }
  const auto* wp = packed.data_ptr<at::BFloat16>();
  const float* bp = bias.numel() ? bias.data_ptr<float>() : nullptr;
  const int ragged_cols = n % 16 ? static_cast<int>(n % 16) : 16;
  // Work items are (row chunk, panel of <= max_blocks blocks), panels inner: a thread's range walks its
  // panels for one chunk of x before the next.
  const auto run = [&](int64_t begin, int64_t end) {
    for (int64_t item = begin; item < end; ++item) {
      const int64_t block = item % panels * max_blocks, width = std::min(max_blocks, blocks - block);
      const int64_t row_end = std::min(m, (item / panels + 1) * kRowChunk);
      const int last_cols = block + width == blocks ? ragged_cols : 16;
      // the chunk's rows in tiles as even as they can be (32 rows, 6 at most: 6 6 5 5 5 5, not 6 6 6 6 6 2)
      const int64_t row_begin = item / panels * kRowChunk, chunk_rows = row_end - row_begin;
      const int64_t tiles = (chunk_rows + max_rows - 1) / max_rows, base = chunk_rows / tiles;
      const int64_t extra = chunk_rows % tiles;
      for (int64_t i = 0, row = row_begin; i < tiles; ++i) {
        const int64_t rows = base + (i < extra);
        const TileOf<X> tile{xp + row * ldx, ldx, wp + block * pairs * 32, k, pairs,
                             bp ? bp + block * 16 : nullptr, block_out.data() + block, block_ld.data() + block,
                             row, last_cols};
        run_tile(tile, rows, width);
        row += rows;
      }
    }
  };
  const int64_t items = chunks * panels;
  if (m > kRowChunk) {  // a long prefill: even ranges, each thread's chunks of x in turn over all the panels
    at::parallel_for(0, items, 1, run);
    return outs;
  }
  if (m > kMemoryBoundRows) {  // a decode step's rows: claimed (openmp_claims: a preempted thread holds no share)
    openmp_claims(items, 1, run);
    return outs;
  }
  // Memory-bound (a few rows): the threads take 4 panels at a time until none are left, on the kernels' pool
  // (its worker prefetches the next weight once this one is done).
  parallel_claims(items, 4, run, Stream{reinterpret_cast<const char*>(wp), packed.nbytes()});
  return outs;
}

}  // namespace pagedformers
