// The ISA-independent half of the decode-attention kernels (decode_attention.cpp, avx2/decode_attention.cpp):
// the options, the cache rows a task reads, and the entry point's checks and tasks.

#pragma once

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <immintrin.h>

#include <algorithm>
#include <type_traits>
#include <vector>

#include "thread_pool.h"

namespace pagedformers {

struct Options {
  float scale;
  int64_t window;  // 0: none; else the last `window` positions, the query's own included
  int64_t chunk;   // 0: none; else the query's own chunk of `chunk` positions (Llama 4)
  float softcap;   // 0: none
};

struct Shape {
  int64_t h_kv, groups, block_size, d, dv;
};

// The cache rows of positions [start, end) of one KV head, block by block: no division per position.
inline void rows_of(const int64_t* table, int64_t start, int64_t end, int64_t head, const Shape& s, int64_t* rows) {
  for (int64_t pos = start; pos < end;) {
    const int64_t off = pos % s.block_size, n = std::min(s.block_size - off, end - pos);
    const int64_t base = (table[pos / s.block_size] * s.h_kv + head) * s.block_size + off;
    for (int64_t j = 0; j < n; ++j) rows[pos - start + j] = base + j;
    pos += n;
  }
}

template <_mm_hint Hint>
inline void prefetch_row(const at::BFloat16* row, int64_t len) {
  const char* bytes = reinterpret_cast<const char*>(row);
  for (int64_t i = 0; i < len * 2; i += 64) _mm_prefetch(bytes + i, Hint);
}

// The key rows of positions [i, i + W) into rows (a short tail repeats its last row: computed, never stored);
// returns how many exist. Prefetches these positions' values into L2 (the weighted sum reads them after the
// softmax; into L1 the keys streaming through would evict them) and the next W positions' keys into L1, so
// that their misses overlap with the dot products.
template <int W>
inline int64_t key_rows(const at::BFloat16* k_cache, const at::BFloat16* v_cache, const int64_t* row_of, int64_t i,
                        int64_t len, const Shape& s, const at::BFloat16** rows) {
  const int64_t n = std::min<int64_t>(W, len - i);
  for (int64_t t = 0; t < W; ++t) {
    const int64_t row = row_of[i + std::min(t, n - 1)];
    rows[t] = k_cache + row * s.d;
    prefetch_row<_MM_HINT_T1>(v_cache + row * s.dv, s.dv);
    prefetch_row<_MM_HINT_T0>(k_cache + row_of[std::min(i + W + t, len - 1)] * s.d, s.d);
  }
  return n;
}

// Keys visible to a decode whose context, its own token included, is seq_len long: [start, seq_len).
inline int64_t first_visible(int64_t seq_len, const Options& o) {
  int64_t start = 0;
  if (o.window > 0) start = std::max(start, seq_len - o.window);
  if (o.chunk > 0) start = std::max(start, (seq_len - 1) / o.chunk * o.chunk);
  return start;
}

// The one task of a (sequence, KV head): its G query heads from q against the cache rows of its `len` visible
// positions, out its G output rows.
struct Task {
  const at::BFloat16* q;
  const int64_t* rows;
  int64_t len, head;
  at::BFloat16* out;
};

// Calls tile(std::integral_constant<int, n>{}, g0) over the query heads, in tiles of n <= 4 heads from head g0:
// the kernels' tiles are templates on their number of heads.
template <typename GroupTile>
void for_group_tiles(int64_t groups, const GroupTile& tile) {
  for (int64_t g0 = 0; g0 < groups; g0 += 4) {
    switch (std::min<int64_t>(4, groups - g0)) {
      case 1: tile(std::integral_constant<int, 1>{}, g0); break;
      case 2: tile(std::integral_constant<int, 2>{}, g0); break;
      case 3: tile(std::integral_constant<int, 3>{}, g0); break;
      default: tile(std::integral_constant<int, 4>{}, g0);
    }
  }
}

// The task's output rows: the weighted values acc [G, Dv] over their softmax denominators, rounded to bf16.
inline void store_task(const Task& task, const float* acc, const float* denom, const Shape& s) {
  for (int64_t g = 0; g < s.groups; ++g)
    for (int64_t i = 0; i < s.dv; ++i) task.out[g * s.dv + i] = static_cast<at::BFloat16>(acc[g * s.dv + i] / denom[g]);
}

// query [B, H, D]; k_cache [NB, H_kv, bs, D]; v_cache [NB, H_kv, bs, Dv]; block_tables [B, max_blocks] int64;
// seq_lens [B] int64; sinks [H] float32 or empty; out [B, H, Dv] (written). All bf16, D % 32 == 0, Dv % 16 == 0.
// attend_one(task, k_cache, v_cache, sinks or null, shape, options, scratch) runs one task; scratch is the
// calling thread's, reused from task to task.
template <typename AttendOne>
void decode_attention_tasks(const at::Tensor& query, const at::Tensor& k_cache, const at::Tensor& v_cache,
                            const at::Tensor& block_tables, const at::Tensor& seq_lens, const at::Tensor& sinks,
                            at::Tensor& out, double scale, int64_t window, int64_t chunk, double softcap,
                            const AttendOne& attend_one) {
  for (const at::Tensor* t : {&query, &k_cache, &v_cache, static_cast<const at::Tensor*>(&out)}) {
    TORCH_CHECK(t->is_contiguous() && t->scalar_type() == at::kBFloat16, "decode_attention: contiguous bf16 expected");
  }
  TORCH_CHECK(block_tables.scalar_type() == at::kLong && seq_lens.scalar_type() == at::kLong,
              "decode_attention: int64 block tables and lengths expected");
  const int64_t b = query.size(0), h = query.size(1);
  const Shape s{k_cache.size(1), h / k_cache.size(1), k_cache.size(2), query.size(2), v_cache.size(3)};
  TORCH_CHECK(h % s.h_kv == 0 && s.d % 32 == 0 && s.dv % 16 == 0, "decode_attention: unsupported head shape");
  const Options o{static_cast<float>(scale), window, chunk, static_cast<float>(softcap)};
  const at::Tensor tables = block_tables.contiguous(), lens = seq_lens.contiguous();
  const at::Tensor sink = sinks.numel() ? sinks.to(at::kFloat).contiguous() : sinks;
  const float* sink_ptr = sinks.numel() ? sink.data_ptr<float>() : nullptr;
  const auto* q = query.data_ptr<at::BFloat16>();
  const auto* kc = k_cache.data_ptr<at::BFloat16>();
  const auto* vc = v_cache.data_ptr<at::BFloat16>();
  auto* o_ptr = out.data_ptr<at::BFloat16>();
  const int64_t* tab = tables.data_ptr<int64_t>();
  const int64_t* len = lens.data_ptr<int64_t>();
  const int64_t max_blocks = tables.size(1);
  const auto tasks = [&](int64_t begin, int64_t end) {
    thread_local std::vector<float> scratch;  // claimed a task at a time: kept across claims
    thread_local std::vector<int64_t> rows;
    for (int64_t task = begin; task < end; ++task) {
      const int64_t i = task / s.h_kv, head = task % s.h_kv, row = i * h + head * s.groups;
      const int64_t start = first_visible(len[i], o), visible = len[i] - start;
      rows.resize(visible);
      rows_of(tab + i * max_blocks, start, len[i], head, s, rows.data());
      attend_one(Task{q + row * s.d, rows.data(), visible, head, o_ptr + row * s.dv}, kc, vc, sink_ptr, s, o, scratch);
    }
  };
  step_claims(b, b * s.h_kv, 1, tasks);
}

}  // namespace pagedformers
