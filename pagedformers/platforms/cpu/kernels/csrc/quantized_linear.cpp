// Weight-only quantized linears: x W^T with W kept as GGUF's blocks regrouped (loading/gguf_quantized.py),
// w[n, k] = scale[n, g] * q[n, k] + min[n, g] for g = k / group. Each group of q is widened to floats in
// registers and dotted with x in float32; the weight is never written out whole. A batch-1 decode then reads
// 9 (Q8_0) or 6 (Q4_*) bits a weight, float32 scales included, instead of bf16's 16.
//
// GCC vector extensions: one source for both builds (AVX-512 and AVX2, each compiled with its flags). The one
// exception is the AVX512-BF16 build's path for 4-bit groups against bf16 activations (row_dots_bf16), whose bf16
// pair dot products have no vector-extension spelling.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <vector>

#ifdef __AVX512BF16__
#include <immintrin.h>
#endif

namespace {

// A vector is one register: 16 floats with AVX-512, 8 with AVX2 (wider types split into halves badly: GCC
// moved each upper-half byte through a general register).
#ifdef __AVX512F__
constexpr int kLanes = 16;
#else
constexpr int kLanes = 8;
#endif
typedef float fvec __attribute__((vector_size(4 * kLanes)));
typedef int32_t i32vec __attribute__((vector_size(4 * kLanes)));
typedef int8_t i8vec __attribute__((vector_size(kLanes)));
typedef uint8_t u8vec __attribute__((vector_size(kLanes)));

constexpr int kMaxRows = 4;  // rows of x that one widened group serves
constexpr int64_t kPanel = 16;  // weight rows whose groups stay in L1 while the row tiles of x pass over them

inline fvec load(const float* p) {
  fvec v;
  std::memcpy(&v, p, sizeof v);
  return v;
}

// Bytes -> int32 -> float: vpmovsxbd or vpmovzxbd, then vcvtdq2ps. The empty asm puts the bytes in a vector
// register first: GCC 12 widens bytes it still sees as memory lane by lane, through general registers (an 8-bit
// row at a fifth the speed).
template <typename Bytes>
inline fvec to_floats(Bytes b) {
  asm("" : "+x"(b));
  return __builtin_convertvector(__builtin_convertvector(b, i32vec), fvec);
}

// The group's values as floats, a vector at a time: int8 as stored, or 4-bit pairs (byte l: element l in its low
// nibble, element l + 16 in its high one).
template <int kBits, int kGroup>
inline void widen_group(const uint8_t* q, fvec* w) {
  if constexpr (kBits == 8) {
    for (int h = 0; h < kGroup / kLanes; ++h) {
      i8vec raw;
      std::memcpy(&raw, q + kLanes * h, sizeof raw);
      w[h] = to_floats(raw);
    }
  } else {
    static_assert(kBits == 4 && kGroup == 32, "4-bit groups are 32 wide");
    for (int h = 0; h < 16 / kLanes; ++h) {  // widened to int32 lanes first: x86 has no byte shift
      u8vec raw;
      std::memcpy(&raw, q + kLanes * h, sizeof raw);
      asm("" : "+x"(raw));
      const i32vec both = __builtin_convertvector(raw, i32vec);
      w[h] = __builtin_convertvector(both & 0x0F, fvec);
      w[h + 16 / kLanes] = __builtin_convertvector(both >> 4, fvec);
    }
  }
}

inline float sum_lanes(fvec v) {
  float s = 0.f;
  for (int i = 0; i < kLanes; ++i) s += v[i];
  return s;
}

// dot(a, b) over n floats, a vector at a time.
inline float dot(const float* a, const float* b, int64_t n) {
  fvec acc = {};
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes) acc += load(a + i) * load(b + i);
  float sum = sum_lanes(acc);
  for (; i < n; ++i) sum += a[i] * b[i];
  return sum;
}

// add_group(g, acc) for every group, even and odd groups into two accumulators: one chain of dependent FMAs (4
// cycles each, a group apart) held a batch-1 row at half the loads' rate.
template <typename Acc, typename AddGroup>
__attribute__((always_inline)) inline void over_groups(int64_t groups, const AddGroup& add_group, Acc* even,
                                                       Acc* odd) {
  int64_t g = 0;
  for (; g + 1 < groups; g += 2) {
    add_group(g, even);
    add_group(g + 1, odd);
  }
  if (g < groups) add_group(g, even);
}

// sums[r] = sum over groups g of scale[g] * dot(x[r, g], q[g]) + min[g] * x_sums[r, g], for R rows of x against
// one weight row.
template <int kBits, int kGroup, int R>
void row_dots(const float* x, int64_t ldx, const uint8_t* q, const float* scale, const float* min,
              const float* x_sums, int64_t groups, float* sums) {
  fvec even[R] = {}, odd[R] = {};
  const auto add_group = [&](int64_t g, fvec* acc) __attribute__((always_inline)) {
    fvec w[kGroup / kLanes];
    widen_group<kBits, kGroup>(q + g * (kGroup * kBits / 8), w);
    const float s = scale[g];
    for (int r = 0; r < R; ++r) {
      const float* xg = x + r * ldx + g * kGroup;
      fvec d = w[0] * load(xg);
      for (int h = 1; h < kGroup / kLanes; ++h) d += w[h] * load(xg + kLanes * h);
      acc[r] += d * s;
    }
  };
  over_groups(groups, add_group, even, odd);
  for (int r = 0; r < R; ++r) {
    sums[r] = sum_lanes(even[r] + odd[r]);
    if (min != nullptr) sums[r] += dot(min, x_sums + r * groups, groups);  // the mins' share
  }
}

#ifdef __AVX512BF16__
// 4-bit groups against bf16 activations in bf16 pair dot products: a nibble q becomes the bf16 128 + q (bits
// 0x4300 | q, exact), so one vdpbf16ps multiplies a whole 32-wide group by a row of x, every product exact, and
// the 128s come back out through each group's activation sum with the mins' share. Six instructions a group
// where widening to floats takes nine, and two for each further row where it takes three.
template <int R>
void row_dots_bf16(const at::BFloat16* x, int64_t ldx, const uint8_t* q, const float* scale, const float* min,
                   const float* x_sums, int64_t groups, float* sums) {
  // byte l holds element l in its low nibble, element l + 16 in its high one: the 16 bytes go to both halves of
  // 32 words, the upper half shifted down a nibble
  const __m512i shifts = _mm512_inserti64x4(_mm512_setzero_si512(), _mm256_set1_epi16(4), 1);
  const __m512i nibble = _mm512_set1_epi16(0x0F), bias = _mm512_set1_epi16(0x4300);
  __m512 even[R], odd[R];
  for (int r = 0; r < R; ++r) even[r] = odd[r] = _mm512_setzero_ps();
  const auto add_group = [&](int64_t g, __m512* acc) __attribute__((always_inline)) {
    const __m128i raw = _mm_loadu_si128(reinterpret_cast<const __m128i*>(q + g * 16));
    __m512i w = _mm512_srlv_epi16(_mm512_cvtepu8_epi16(_mm256_broadcastsi128_si256(raw)), shifts);
    w = _mm512_ternarylogic_epi32(w, nibble, bias, 0xEA);  // (w & nibble) | bias
    const __m512 s = _mm512_set1_ps(scale[g]);
    for (int r = 0; r < R; ++r) {
      const __m512i xg = _mm512_loadu_si512(x + r * ldx + g * 32);
      const __m512 d = _mm512_dpbf16_ps(_mm512_setzero_ps(), (__m512bh)w, (__m512bh)xg);
      acc[r] = _mm512_fmadd_ps(d, s, acc[r]);
    }
  };
  over_groups(groups, add_group, even, odd);
  for (int r = 0; r < R; ++r) {
    const float* xs = x_sums + r * groups;  // the mins' share less the 128s'
    const float offset = (min ? dot(min, xs, groups) : 0.f) - 128.f * dot(scale, xs, groups);
    sums[r] = _mm512_reduce_add_ps(_mm512_add_ps(even[r], odd[r])) + offset;
  }
}
#endif

template <typename Out>
struct Job {
  const float* x;  // [m, k] float32, contiguous
  const at::BFloat16* xb;  // the same rows in bf16 where the input is bf16, else null
  int64_t m, k, n;
  const uint8_t* q;
  const float *scales, *mins, *x_sums;  // mins null where every min is 0; x_sums null where nothing reads them
  Out* out;  // [m, n]
};

template <typename X>
using RowDots = void (*)(const X*, int64_t, const uint8_t*, const float*, const float*, const float*, int64_t,
                         float*);

// Each panel's weight rows against every row tile of x.
template <int kBits, int kGroup, typename X, typename Out>
void run_panels_on(const Job<Out>& job, const X* x, const RowDots<X> (&dots)[kMaxRows], int64_t begin,
                   int64_t end) {
  const int64_t groups = job.k / kGroup, row_bytes = job.k * kBits / 8;
  for (int64_t panel = begin; panel < end; ++panel) {
    const int64_t first = panel * kPanel, last = std::min(job.n, first + kPanel);
    for (int64_t row = 0; row < job.m; row += kMaxRows) {
      const int rows = static_cast<int>(std::min<int64_t>(kMaxRows, job.m - row));
      for (int64_t col = first; col < last; ++col) {
        float sums[kMaxRows];
        dots[rows - 1](x + row * job.k, job.k, job.q + col * row_bytes, job.scales + col * groups,
                       job.mins ? job.mins + col * groups : nullptr, job.x_sums ? job.x_sums + row * groups : nullptr,
                       groups, sums);
        for (int r = 0; r < rows; ++r) job.out[(row + r) * job.n + col] = static_cast<Out>(sums[r]);
      }
    }
  }
}

template <int kBits, int kGroup, typename Out>
void run_panels(const Job<Out>& job, int64_t begin, int64_t end) {
#ifdef __AVX512BF16__
  if constexpr (kBits == 4) {
    if (job.xb != nullptr) {
      static constexpr RowDots<at::BFloat16> kDots[kMaxRows] = {row_dots_bf16<1>, row_dots_bf16<2>,
                                                                row_dots_bf16<3>, row_dots_bf16<4>};
      return run_panels_on<kBits, kGroup>(job, job.xb, kDots, begin, end);
    }
  }
#endif
  static constexpr RowDots<float> kDots[kMaxRows] = {row_dots<kBits, kGroup, 1>, row_dots<kBits, kGroup, 2>,
                                                     row_dots<kBits, kGroup, 3>, row_dots<kBits, kGroup, 4>};
  run_panels_on<kBits, kGroup>(job, job.x, kDots, begin, end);
}

template <int kBits, int kGroup, typename Out>
void run(const Job<Out>& job) {
  const int64_t panels = (job.n + kPanel - 1) / kPanel;
  const auto f = [&job](int64_t begin, int64_t end) { run_panels<kBits, kGroup>(job, begin, end); };
  at::parallel_for(0, panels, 1, f);
}

// f(bits, group) with the two as compile-time constants, for the layouts `check` lets through.
template <typename F>
void with_layout(int64_t bits, int64_t group, const F& f) {
  using std::integral_constant;
  if (bits == 4) {
    f(integral_constant<int, 4>{}, integral_constant<int, 32>{});
  } else if (group == 32) {
    f(integral_constant<int, 8>{}, integral_constant<int, 32>{});
  } else {
    f(integral_constant<int, 8>{}, integral_constant<int, 16>{});
  }
}

template <typename Out>
void dispatch(const Job<Out>& job, int64_t bits, int64_t group) {
  with_layout(bits, group, [&](auto b, auto g) { run<decltype(b)::value, decltype(g)::value>(job); });
}

void check(const at::Tensor& q, const at::Tensor& scales, const at::Tensor& mins, int64_t bits, int64_t group,
           int64_t k) {
  TORCH_CHECK((bits == 8 && (group == 16 || group == 32)) || (bits == 4 && group == 32),
              "quantized_linear: 8-bit groups of 16 or 32, or 4-bit groups of 32");
  TORCH_CHECK(q.dim() == 2 && q.is_contiguous() && q.scalar_type() == (bits == 8 ? at::kChar : at::kByte) &&
                  q.size(1) * 8 == k * bits && k % group == 0,
              "quantized_linear: values [N, K * bits / 8] (int8 for 8 bits, uint8 pairs for 4) for a K that groups "
              "divide");
  TORCH_CHECK(scales.scalar_type() == at::kFloat && scales.is_contiguous() &&
                  scales.sizes() == at::IntArrayRef({q.size(0), k / group}) &&
                  (mins.numel() == 0 || (mins.scalar_type() == at::kFloat && mins.is_contiguous() &&
                                         mins.sizes() == scales.sizes())),
              "quantized_linear: float32 scales (and mins, or none) [N, K / group]");
}

}  // namespace

// x [..., K] float32 or bf16 -> [..., N] in x's dtype.
at::Tensor quantized_linear(const at::Tensor& input, const at::Tensor& q, const at::Tensor& scales,
                            const at::Tensor& mins, int64_t bits, int64_t group) {
  const bool bf16 = input.scalar_type() == at::kBFloat16;
  TORCH_CHECK(bf16 || input.scalar_type() == at::kFloat, "quantized_linear: float32 or bf16 input expected");
  const int64_t k = input.size(-1), n = q.size(0), m = input.numel() / std::max<int64_t>(k, 1);
  check(q, scales, mins, bits, group, k);
  const at::Tensor x = input.reshape({m, k}).contiguous();
#ifdef __AVX512BF16__
  const bool pairs = bf16 && bits == 4;  // row_dots_bf16 reads x as it is, and every group's sum
#else
  const bool pairs = false;
#endif
  // x as float32 rows where the groups are widened to floats, and each group's sum where something reads it:
  // plain loops (ATen ops cost more than these)
  std::vector<float> widened, x_sums;
  const float* xp = bf16 ? nullptr : x.data_ptr<float>();
  const at::BFloat16* xb = bf16 ? x.data_ptr<at::BFloat16>() : nullptr;
  if (bf16 && !pairs) {
    widened.resize(m * k);
    for (int64_t i = 0; i < m * k; ++i) widened[i] = static_cast<float>(xb[i]);
    xp = widened.data();
  }
  if (mins.numel() || pairs) {
    x_sums.assign(m * (k / group), 0.f);
    for (int64_t g = 0; g < m * (k / group); ++g)
      for (int64_t i = 0; i < group; ++i)
        x_sums[g] += xp ? xp[g * group + i] : static_cast<float>(xb[g * group + i]);
  }
  std::vector<int64_t> shape = input.sizes().vec();
  shape.back() = n;
  at::Tensor out = at::empty(shape, input.options());
  const auto* qp = static_cast<const uint8_t*>(q.data_ptr());
  const float* mp = mins.numel() ? mins.data_ptr<float>() : nullptr;
  const float* xs = x_sums.empty() ? nullptr : x_sums.data();
  if (bf16) {
    dispatch(Job<at::BFloat16>{xp, pairs ? xb : nullptr, m, k, n, qp, scales.data_ptr<float>(), mp, xs,
                               out.data_ptr<at::BFloat16>()},
             bits, group);
  } else {
    dispatch(Job<float>{xp, nullptr, m, k, n, qp, scales.data_ptr<float>(), mp, xs, out.data_ptr<float>()}, bits,
             group);
  }
  return out;
}

typedef uint16_t u16vec __attribute__((vector_size(2 * kLanes)));

inline void store(float* out, fvec v) { std::memcpy(out, &v, sizeof v); }

inline void store(at::BFloat16* out, fvec v) {  // rounded to nearest even, as torch rounds (weights: no NaN)
  i32vec bits;
  std::memcpy(&bits, &v, sizeof bits);
  bits += 0x7FFF + ((bits >> 16) & 1);
  const u16vec high = __builtin_convertvector(bits >> 16, u16vec);
  std::memcpy(out, &high, sizeof high);
}

template <int kBits, int kGroup, typename Out>
void dequantize_rows(const uint8_t* q, const float* scales, const float* mins, int64_t n, int64_t k, Out* out) {
  const int64_t groups = k / kGroup;
  at::parallel_for(0, n, 16, [&](int64_t begin, int64_t end) {
    for (int64_t row = begin; row < end; ++row) {
      for (int64_t g = 0; g < groups; ++g) {
        fvec w[kGroup / kLanes];
        widen_group<kBits, kGroup>(q + row * (k * kBits / 8) + g * (kGroup * kBits / 8), w);
        const float s = scales[row * groups + g], m = mins ? mins[row * groups + g] : 0.f;
        Out* o = out + row * k + g * kGroup;
        for (int h = 0; h < kGroup / kLanes; ++h) store(o + h * kLanes, w[h] * s + m);
      }
    }
  });
}

// The whole weight [N, K] in `dtype` (float32 or bf16): for a prefill, which a dense matmul then runs at full speed.
at::Tensor dequantize_weight(const at::Tensor& q, const at::Tensor& scales, const at::Tensor& mins, int64_t bits,
                             int64_t group, at::ScalarType dtype) {
  TORCH_CHECK(bits == 4 || bits == 8, "dequantize_weight: 4 or 8 bits");
  const int64_t n = q.size(0), k = q.size(1) * 8 / bits;
  check(q, scales, mins, bits, group, k);
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kBFloat16, "dequantize_weight: float32 or bf16 out");
  at::Tensor out = at::empty({n, k}, scales.options().dtype(dtype));
  const auto* qp = static_cast<const uint8_t*>(q.data_ptr());
  const float *sp = scales.data_ptr<float>(), *mp = mins.numel() ? mins.data_ptr<float>() : nullptr;
  const auto run = [&](auto* o) {
    with_layout(bits, group, [&](auto b, auto g) {
      dequantize_rows<decltype(b)::value, decltype(g)::value>(qp, sp, mp, n, k, o);
    });
  };
  if (dtype == at::kBFloat16) {
    run(out.data_ptr<at::BFloat16>());
  } else {
    run(out.data_ptr<float>());
  }
  return out;
}
