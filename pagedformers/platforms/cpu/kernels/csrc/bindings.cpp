// The CPU kernels as dispatcher ops (torch.ops.pagedformers.*): one registration per kernel file.
// Ops rather than a Python module so that torch.jit.trace records each call as one node (decode graphs,
// platforms/cpu/decode_graphs.py); their CPU implementation is registered below, so the tracer sees them whole.

#include <torch/library.h>

void decode_attention(const at::Tensor& query, const at::Tensor& k_cache, const at::Tensor& v_cache,
                      const at::Tensor& block_tables, const at::Tensor& seq_lens, const at::Tensor& sinks,
                      at::Tensor& out, double scale, int64_t window, int64_t chunk, double softcap);
void rms_norm(const at::Tensor& x, const at::Tensor& weight, double eps, at::Tensor& out);
std::tuple<at::Tensor, at::Tensor> add_rms_norm(const at::Tensor& x, const at::Tensor& residual,
                                                const at::Tensor& weight, double eps);
void silu_and_mul(const at::Tensor& gate_up, int64_t gate_col, int64_t up_col, int64_t width, at::Tensor& out);
void write_kv(at::Tensor& k_cache, at::Tensor& v_cache, const at::Tensor& key, const at::Tensor& value,
              const at::Tensor& blocks, const at::Tensor& offsets);
at::Tensor argmax_rows(const at::Tensor& logits);
void draw_rows(const at::Tensor& logits, const at::Tensor& table, at::Tensor& token_ids);
at::Tensor float_rows(const at::Tensor& logits);
at::Tensor rotary_embed(const at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin);
std::vector<at::Tensor> linear(const at::Tensor& x, const at::Tensor& packed, const at::Tensor& bias,
                               const std::vector<int64_t>& widths);
at::Tensor grouped_linear(const at::Tensor& x, const at::Tensor& packed, const at::Tensor& ends, int64_t n);
at::Tensor quantized_linear(const at::Tensor& x, const at::Tensor& q, const at::Tensor& scales, const at::Tensor& mins,
                            int64_t bits, int64_t group);
at::Tensor dequantize_weight(const at::Tensor& q, const at::Tensor& scales, const at::Tensor& mins, int64_t bits,
                             int64_t group, at::ScalarType dtype);

TORCH_LIBRARY(pagedformers, m) {
  // bf16 paged decode attention (AVX512-BF16)
  m.def("decode_attention(Tensor query, Tensor k_cache, Tensor v_cache, Tensor block_tables, Tensor seq_lens, "
        "Tensor sinks, Tensor(a!) out, float scale, int window, int chunk, float softcap) -> ()");
  // bf16 RMSNorm, rounded as HF's Llama-style RMSNorm (AVX512-BF16)
  m.def("rms_norm(Tensor x, Tensor weight, float eps, Tensor(a!) out) -> ()");
  // bf16 x + residual, then the RMSNorm above of that sum: (sum, normed) (decode graphs' rewrite)
  m.def("add_rms_norm(Tensor x, Tensor residual, Tensor weight, float eps) -> (Tensor, Tensor)");
  // bf16 silu(gate) * up from a fused gate/up output (AVX-512)
  m.def("silu_and_mul(Tensor gate_up, int gate_col, int up_col, int width, Tensor(a!) out) -> ()");
  // new keys and values into their paged cache slots (any dtype)
  m.def("write_kv(Tensor(a!) k_cache, Tensor(b!) v_cache, Tensor key, Tensor value, Tensor blocks, "
        "Tensor offsets) -> ()");
  // bf16 x W^T + b on a weight packed for AVX512-BF16, split by output widths
  m.def("linear(Tensor x, Tensor packed, Tensor bias, int[] widths) -> Tensor[]");
  // an MoE layer's experts: rows sorted by expert, each expert's through `linear` on its packed weight
  m.def("grouped_linear(Tensor x, Tensor packed, Tensor ends, int n) -> Tensor");
  // float32 or bf16 x W^T on a weight kept in groups of 8- or 4-bit values with a scale (and a min) each
  m.def("quantized_linear(Tensor x, Tensor q, Tensor scales, Tensor mins, int bits, int group) -> Tensor");
  // that weight as float32 or bf16 [N, K]
  m.def("dequantize_weight(Tensor q, Tensor scales, Tensor mins, int bits, int group, ScalarType dtype) -> Tensor");
  // row-wise argmax of float32 logits, torch.argmax's ties and NaNs
  m.def("argmax_rows(Tensor logits) -> Tensor");
  // sampling draws of float32 logits' rows without top-k / top-p, engine/sampler.py's draw table (draw.h)
  m.def("draw_rows(Tensor logits, Tensor table, Tensor(a!) token_ids) -> ()");
  // bf16 logits [rows, n] as float32, split over threads where the step's kernels run (float_rows.cpp)
  m.def("float_rows(Tensor logits) -> Tensor");
  // bf16 x * cos + rotate_half(x) * sin, rounded as HF's ops (decode graphs' rewrite)
  m.def("rotary_embed(Tensor x, Tensor cos, Tensor sin) -> Tensor");
}

TORCH_LIBRARY_IMPL(pagedformers, CPU, m) {
  m.impl("decode_attention", &decode_attention);
  m.impl("rms_norm", &rms_norm);
  m.impl("add_rms_norm", &add_rms_norm);
  m.impl("silu_and_mul", &silu_and_mul);
  m.impl("write_kv", &write_kv);
  m.impl("linear", &linear);
  m.impl("grouped_linear", &grouped_linear);
  m.impl("quantized_linear", &quantized_linear);
  m.impl("dequantize_weight", &dequantize_weight);
  m.impl("argmax_rows", &argmax_rows);
  m.impl("draw_rows", &draw_rows);
  m.impl("float_rows", &float_rows);
  m.impl("rotary_embed", &rotary_embed);
}
