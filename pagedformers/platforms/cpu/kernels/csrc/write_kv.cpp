// The new tokens' keys and values into their cache slots: one row copy per (token, KV head).
// `k_cache[blocks, :, offsets] = key` in PyTorch is an index_put with its own index tensors and
// dtype checks, ~20 us a layer at 32 decodes; this is a few rows of memcpy.

#include <ATen/core/Tensor.h>

#include <cstring>

namespace {

// cache [num_blocks, H_kv, block_size, D] contiguous; rows [T, H_kv, D] with a unit last stride, same dtype.
void write_rows(at::Tensor& cache, const at::Tensor& rows, const int64_t* blocks, const int64_t* offsets) {
  TORCH_CHECK(cache.is_contiguous() && cache.dim() == 4 && rows.dim() == 3 && rows.stride(2) == 1 &&
                  rows.scalar_type() == cache.scalar_type() && rows.size(1) == cache.size(1) &&
                  rows.size(2) == cache.size(3),
              "write_kv: rows [T, H_kv, D] (unit last stride) of the cache's dtype expected");
  const int64_t heads = cache.size(1), block_size = cache.size(2), dim = cache.size(3);
  const int64_t num_blocks = cache.size(0), item = cache.element_size();
  const auto* src = static_cast<const char*>(rows.data_ptr());
  auto* dst = static_cast<char*>(cache.data_ptr());
  for (int64_t t = 0; t < rows.size(0); ++t) {
    TORCH_CHECK(blocks[t] >= 0 && blocks[t] < num_blocks && offsets[t] >= 0 && offsets[t] < block_size,
                "write_kv: slot out of range");
    for (int64_t h = 0; h < heads; ++h)
      std::memcpy(dst + (((blocks[t] * heads + h) * block_size + offsets[t]) * dim) * item,
                  src + (t * rows.stride(0) + h * rows.stride(1)) * item, dim * item);
  }
}

}  // namespace

// blocks, offsets: [T] int64, the block id and the position in the block of each new token.
void write_kv(at::Tensor& k_cache, at::Tensor& v_cache, const at::Tensor& key, const at::Tensor& value,
              const at::Tensor& blocks, const at::Tensor& offsets) {
  TORCH_CHECK(blocks.is_contiguous() && offsets.is_contiguous() && blocks.scalar_type() == at::kLong &&
                  offsets.scalar_type() == at::kLong && blocks.numel() == key.size(0) &&
                  offsets.numel() == key.size(0) && value.size(0) == key.size(0),
              "write_kv: int64 [T] blocks and offsets expected");
  write_rows(k_cache, key, blocks.data_ptr<int64_t>(), offsets.data_ptr<int64_t>());
  write_rows(v_cache, value, blocks.data_ptr<int64_t>(), offsets.data_ptr<int64_t>());
}
