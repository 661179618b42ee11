// The Python module of the CPU kernels: one binding per kernel file.

#include <torch/extension.h>

void decode_attention(const torch::Tensor& query, const torch::Tensor& k_cache, const torch::Tensor& v_cache,
                      const torch::Tensor& block_tables, const torch::Tensor& seq_lens, const torch::Tensor& sinks,
                      torch::Tensor& out, double scale, int64_t window, int64_t chunk, double softcap);
void rms_norm(const torch::Tensor& x, const torch::Tensor& weight, double eps, torch::Tensor& out);
void silu_and_mul(const torch::Tensor& gate_up, int64_t gate_col, int64_t up_col, int64_t width, torch::Tensor& out);
void write_kv(torch::Tensor& k_cache, torch::Tensor& v_cache, const torch::Tensor& key, const torch::Tensor& value,
              const torch::Tensor& blocks, const torch::Tensor& offsets);
torch::Tensor argmax_rows(const torch::Tensor& logits);
std::vector<torch::Tensor> linear(const torch::Tensor& x, const torch::Tensor& packed, const torch::Tensor& bias,
                                  const std::vector<int64_t>& widths);

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("decode_attention", &decode_attention, "bf16 paged decode attention (CPU, AVX512-BF16)");
  m.def("rms_norm", &rms_norm, "bf16 RMSNorm, rounded as HF's Llama-style RMSNorm (CPU, AVX512-BF16)");
  m.def("silu_and_mul", &silu_and_mul, "bf16 silu(gate) * up from a fused gate/up output (CPU, AVX-512)");
  m.def("write_kv", &write_kv, "new keys and values into their paged cache slots (CPU, any dtype)");
  m.def("linear", &linear, "bf16 x W^T + b on a weight packed for AVX512-BF16, split by output widths (CPU)");
  m.def("argmax_rows", &argmax_rows, "row-wise argmax of float32 logits, torch.argmax's ties and NaNs (CPU)");
}
