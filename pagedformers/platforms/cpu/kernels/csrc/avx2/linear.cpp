// bf16 linear layer, y = x W^T + b (AVX2), on the weight packed for the AVX-512 kernel (../linear.h).
//
// Without bf16 dot products, each 64-byte packed row (16 columns x a pair of positions) is two 256-bit loads,
// widened to floats with one op per parity: the even position of every column is a shift, the odd one a
// mask. x is widened to floats once per call, for broadcasts straight from memory. Each output is one
// chain of FMAs over the positions in order, in every tile shape, so a row computes the same alone or in a
// batch. A tile keeps R rows x C blocks of accumulators (2 registers a block):
// - several rows: up to 6 rows of one block (12 of the 16 registers; a pair's two positions take 24 FMAs
//   against 4 widening ops, 2 loads and 2 reloads), their loop over the pairs in assembly (pair_loop);
// - a lone row (a batch-1 decode): the panel's 3 blocks at once, 6 independent chains over 3 streams: the
//   200M Llama's linears in 14.5-19.5 against 20.1-25.5 ms for one block at a time with 4 chains (in-process
//   A/B, weights from DRAM). Three streams read faster than one: a plain read of 336 MB in such panels,
//   2 threads, 27 against 22 GB/s for the blocks interleaved into one stream (2, 4, 6 streams: 26, 28, 29).

#include <ATen/core/Tensor.h>
#include <immintrin.h>

#include "../linear.h"
#include "vec.h"

#include <cstring>
#include <vector>

namespace {

using Tile = pagedformers::TileOf<float>;
using namespace pagedformers::avx2;

constexpr int64_t kMaxRows = 6, kMaxBlocks = 3;
// A lone row asks for each of its 3 streams' lines 256 bytes (4 pairs) ahead of its loads: the 48 layer
// linears of the 200M Llama at 1 token went 3-9% faster, its LM head 3-8% (in-process A/B, 5 runs of
// 20-60 alternated rounds, weights from DRAM). 512 bytes ahead gained less, 1024 nothing, 2048 and 4096
// lost 8-10% (probably lines evicted from L1 before their loads: a lone row consumes a line in a few ns,
// where the several-row tiles, prefetching 2 KiB ahead, take far longer). Past a weight's end it may ask for
// lines that are not mapped: a prefetch never faults.
constexpr int kLoneRowPrefetch = 256;

// One position of pair p (parity 0: the even one) for R rows x C blocks: acc[2 C r + 2 c + half] sums row r's
// columns 8 half .. 8 half + 7 of block c. A flat array, its loops fully unrolled, down to the stores: GCC
// keeps it in registers (a nested one, or a rolled loop over it, it mirrored to the stack at every step).
template <int R, int C>
inline void accumulate(__m256* acc, const __m256i* w, int64_t pairs, int64_t p, const float* x, int64_t ldx,
                       int parity) {
  const __m256i odd_mask = _mm256_set1_epi32(static_cast<int32_t>(0xFFFF0000u));
  __m256 wv[2 * C];
#pragma GCC unroll 6
  for (int c = 0; c < 2 * C; ++c) {
    const __m256i raw = _mm256_loadu_si256(w + (c / 2) * pairs * 2 + 2 * p + c % 2);
    wv[c] = _mm256_castsi256_ps(parity ? _mm256_and_si256(raw, odd_mask) : _mm256_slli_epi32(raw, 16));
  }
#pragma GCC unroll 6
  for (int r = 0; r < R; ++r) {
    const __m256 xb = _mm256_broadcast_ss(x + r * ldx);
#pragma GCC unroll 6
    for (int c = 0; c < 2 * C; ++c) acc[2 * C * r + c] = _mm256_fmadd_ps(xb, wv[c], acc[2 * C * r + c]);
  }
}

// The pair loop of an R-row, one-block tile (2 <= R <= 6) in assembly: the same FMAs in the same order as
// accumulate<R, 1>, so its sums are bitwise the same. It takes all 16 registers: ymm0-11 the accumulators
// (row r's columns 0-7 and 8-15 in 2r and 2r + 1), ymm12-13 a pair's widened weights, ymm14 a broadcast x,
// ymm15 the odd-position mask. From the same C++, GCC spilled 4 accumulators to the stack at every pair:
// 53 against 85 GFLOP/s a Zen 3 core (L1-resident micro-benchmark; the core's FMA peak is 92). In the
// kernel, the 200M Llama's 49 linears (in-process A/B, 2 threads, weights from DRAM): 103 -> 94 ms at 32
// rows, 702 -> 619 ms at 256. The weights are prefetched 2 KiB (32 pairs) ahead into L1: 663 -> 619 ms of
// those.
#define PF_ROW(x, a, b)                                                               \
  "vbroadcastss " x ", %%ymm14\n\tvfmadd231ps %%ymm12, %%ymm14, %%ymm" #a "\n\t"     \
  "vfmadd231ps %%ymm13, %%ymm14, %%ymm" #b "\n\t"
// Row r's x: xa = row 0, xb = row 3, ld = the row stride in bytes; off "" for the even position, "4" odd.
#define PF_ROWS1(off) PF_ROW(off "(%[xa])", 0, 1)
#define PF_ROWS2(off) PF_ROWS1(off) PF_ROW(off "(%[xa],%[ld],1)", 2, 3)
#define PF_ROWS3(off) PF_ROWS2(off) PF_ROW(off "(%[xa],%[ld],2)", 4, 5)
#define PF_ROWS4(off) PF_ROWS3(off) PF_ROW(off "(%[xb])", 6, 7)
#define PF_ROWS5(off) PF_ROWS4(off) PF_ROW(off "(%[xa],%[ld],4)", 8, 9)
#define PF_ROWS6(off) PF_ROWS5(off) PF_ROW(off "(%[xb],%[ld],2)", 10, 11)
#define PF_LOAD(i) "vmovups " #i "*32(%[acc]), %%ymm" #i "\n\t"
#define PF_STORE(i) "vmovups %%ymm" #i ", " #i "*32(%[acc])\n\t"
#define PF_PAIR_LOOP(ROWS)                                                                                  \
  asm volatile(                                                                                             \
      PF_LOAD(0) PF_LOAD(1) PF_LOAD(2) PF_LOAD(3) PF_LOAD(4) PF_LOAD(5)                                     \
      PF_LOAD(6) PF_LOAD(7) PF_LOAD(8) PF_LOAD(9) PF_LOAD(10) PF_LOAD(11)                                   \
      "vpcmpeqd %%ymm15, %%ymm15, %%ymm15\n\tvpslld $16, %%ymm15, %%ymm15\n"                                \
      "1:\n\t"                                                                                              \
      "prefetcht0 2048(%[w])\n\t"                                                                           \
      "vmovdqu (%[w]), %%ymm12\n\tvmovdqu 32(%[w]), %%ymm13\n\t"                                            \
      "vpslld $16, %%ymm12, %%ymm12\n\tvpslld $16, %%ymm13, %%ymm13\n\t" ROWS("")                           \
      "vpand (%[w]), %%ymm15, %%ymm12\n\tvpand 32(%[w]), %%ymm15, %%ymm13\n\t" ROWS("4")                    \
      "add $64, %[w]\n\tadd $8, %[xa]\n\tadd $8, %[xb]\n\tdec %[n]\n\tjnz 1b\n\t"                           \
      PF_STORE(0) PF_STORE(1) PF_STORE(2) PF_STORE(3) PF_STORE(4) PF_STORE(5)                               \
      PF_STORE(6) PF_STORE(7) PF_STORE(8) PF_STORE(9) PF_STORE(10) PF_STORE(11)                             \
      : [w] "+r"(w), [xa] "+r"(xa), [xb] "+r"(xb), [n] "+r"(pairs)                                          \
      : [ld] "r"(ld), [acc] "r"(acc)                                                                        \
      : "memory", "cc", "xmm0", "xmm1", "xmm2", "xmm3", "xmm4", "xmm5", "xmm6", "xmm7", "xmm8", "xmm9",      \
        "xmm10", "xmm11", "xmm12", "xmm13", "xmm14", "xmm15")

// acc[12] (2 R in use) += the first `pairs` (>= 1) pairs of one block's weights times R rows of x.
template <int R>
void pair_loop(__m256* acc, const __m256i* w, int64_t pairs, const float* x, int64_t ldx) {
  const float* xa = x;
  const float* xb = R > 3 ? x + 3 * ldx : x;  // row 3's x, read only when R > 3
  const int64_t ld = ldx * static_cast<int64_t>(sizeof(float));
  if constexpr (R == 2) PF_PAIR_LOOP(PF_ROWS2);
  else if constexpr (R == 3) PF_PAIR_LOOP(PF_ROWS3);
  else if constexpr (R == 4) PF_PAIR_LOOP(PF_ROWS4);
  else if constexpr (R == 5) PF_PAIR_LOOP(PF_ROWS5);
  else PF_PAIR_LOOP(PF_ROWS6);
}

template <int R, int C>
void tile_kernel(const Tile& t) {
  constexpr bool kAsm = C == 1 && R >= 2;  // pair_loop's shape
  constexpr int kAcc = kAsm ? 12 : 2 * C * R;  // pair_loop loads and stores all 12
  __m256 acc[kAcc];
#pragma GCC unroll 12
  for (int i = 0; i < kAcc; ++i) acc[i] = _mm256_setzero_ps();
  const auto* w = reinterpret_cast<const __m256i*>(t.w);  // per block: two vectors per pair
  const int64_t full_pairs = t.k / 2;
  if constexpr (kAsm) {
    if (full_pairs > 0) pair_loop<R>(acc, w, full_pairs, t.x, t.ldx);
  } else {
    for (int64_t p = 0; p < full_pairs; ++p) {
      if constexpr (R == 1)  // see kLoneRowPrefetch
#pragma GCC unroll 3
        for (int c = 0; c < C; ++c)
          _mm_prefetch(reinterpret_cast<const char*>(w + c * t.pairs * 2 + 2 * p) + kLoneRowPrefetch, _MM_HINT_T0);
      accumulate<R, C>(acc, w, t.pairs, p, t.x + 2 * p, t.ldx, 0);
      accumulate<R, C>(acc, w, t.pairs, p, t.x + 2 * p + 1, t.ldx, 1);
    }
  }
  if (t.k % 2)  // the last position alone, an even one: its pair's odd half is zero in the weight
    accumulate<R, C>(acc, w, t.pairs, full_pairs, t.x + t.k - 1, t.ldx, 0);
#pragma GCC unroll 3
  for (int c = 0; c < C; ++c) {
    const __m256 b0 = t.bias ? _mm256_loadu_ps(t.bias + 16 * c) : _mm256_setzero_ps();
    const __m256 b1 = t.bias ? _mm256_loadu_ps(t.bias + 16 * c + 8) : _mm256_setzero_ps();
    const int cols = c == C - 1 ? t.last_cols : 16;
#pragma GCC unroll 6
    for (int r = 0; r < R; ++r) {
      at::BFloat16 row[16];
      _mm_storeu_si128(reinterpret_cast<__m128i*>(row), pack_bf16x8(_mm256_add_ps(acc[2 * C * r + 2 * c], b0)));
      _mm_storeu_si128(reinterpret_cast<__m128i*>(row + 8),
                       pack_bf16x8(_mm256_add_ps(acc[2 * C * r + 2 * c + 1], b1)));
      std::memcpy(t.out[c] + (t.row + r) * t.ldo[c], row, cols * sizeof(at::BFloat16));
    }
  }
}

template <int R>
void run_blocks(const Tile& tile, int64_t blocks) {
  for (int64_t c = 0; c < blocks; ++c) tile_kernel<R, 1>(tile.block(c, c + 1 == blocks ? tile.last_cols : 16));
}

void run_tile(const Tile& tile, int64_t rows, int64_t blocks) {
  switch (rows) {
    case 1:
      if (blocks == 3) tile_kernel<1, 3>(tile);
      else if (blocks == 2) tile_kernel<1, 2>(tile);
      else tile_kernel<1, 1>(tile);
      break;
    case 2: run_blocks<2>(tile, blocks); break;
    case 3: run_blocks<3>(tile, blocks); break;
    case 4: run_blocks<4>(tile, blocks); break;
    case 5: run_blocks<5>(tile, blocks); break;
    default: run_blocks<6>(tile, blocks);
  }
}

}  // namespace

std::vector<at::Tensor> linear(const at::Tensor& input, const at::Tensor& packed, const at::Tensor& bias,
                               const std::vector<int64_t>& widths) {
  return pagedformers::linear_tiles<float>(input, packed, bias, widths, kMaxRows, kMaxBlocks, run_tile);
}
