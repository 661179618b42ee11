// A mixture-of-experts layer's expert linears in one op (no vector code: one source for both builds). The rows
// of x come sorted by expert, expert e's rows ending at ends[e]; each expert's rows go through this build's
// `linear` on that expert's packed weight. One dispatcher op, so that a traced decode step records it as one node
// and no Python reads the row counts.

#include <ATen/ATen.h>

#include <vector>

std::vector<at::Tensor> linear(const at::Tensor& x, const at::Tensor& packed, const at::Tensor& bias,
                               const std::vector<int64_t>& widths);

// x [M, K] bf16; packed [E, ceil(N/16), ceil(K/2), 32] (each expert packed as linear's weight); ends [E] int32,
// non-decreasing, at most M. Returns [M, N]: rows past ends[E - 1] are zeros.
at::Tensor grouped_linear(const at::Tensor& x, const at::Tensor& packed, const at::Tensor& ends, int64_t n) {
  TORCH_CHECK(x.dim() == 2 && packed.dim() == 4 && ends.dim() == 1 && ends.size(0) == packed.size(0) &&
                  ends.scalar_type() == at::kInt,
              "grouped_linear: x [M, K], packed [E, N/16, K/2, 32] and int32 ends [E] expected");
  at::Tensor out = at::zeros({x.size(0), n}, x.options());
  const at::Tensor no_bias = at::empty({0}, x.options().dtype(at::kFloat));
  const at::Tensor row_ends = ends.contiguous();
  const int32_t* end = row_ends.data_ptr<int32_t>();
  int64_t start = 0;
  for (int64_t e = 0; e < packed.size(0); ++e) {
    const int64_t stop = std::min<int64_t>(end[e], x.size(0));
    if (stop > start) {
      out.slice(0, start, stop).copy_(linear(x.slice(0, start, stop), packed[e], no_bias, {n})[0]);
    }
    start = std::max(start, stop);
  }
  return out;
}
