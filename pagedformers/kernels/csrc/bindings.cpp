// The Python module of the CPU kernels: one binding per kernel file.

#include <torch/extension.h>

void decode_attention(const torch::Tensor& query, const torch::Tensor& k_cache, const torch::Tensor& v_cache,
                      const torch::Tensor& block_tables, const torch::Tensor& seq_lens, const torch::Tensor& sinks,
                      torch::Tensor& out, double scale, int64_t window, int64_t chunk, double softcap);
void rms_norm(const torch::Tensor& x, const torch::Tensor& weight, double eps, torch::Tensor& out);

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("decode_attention", &decode_attention, "bf16 paged decode attention (CPU, AVX512-BF16)");
  m.def("rms_norm", &rms_norm, "bf16 RMSNorm, rounded as HF's Llama-style RMSNorm (CPU, AVX512-BF16)");
}
