// hetegen_cpu::linear — the CPU part of a split Linear at decode shapes (a few rows), for half-precision
// weights, bound by memory bandwidth rather than by conversions.
//
// torch's CPU GEMV for fp16 / bf16 weights is compute-bound on the GPU host: it streamed 60 / 29 GB/s of
// weights against 109 GB/s for fp32 (docs/benchmarks.md), so per weight it ran no faster than fp32 that reads
// twice the bytes. Here each weight row is converted 16 (AVX-512) or 8 (AVX2 + F16C) halves at a time and
// multiplied into fp32 accumulators, four rows at once so every load of x serves four rows; the rows are
// shared out (guided, in chunks of at least a few hundred KiB) to an OpenMP team of the calling thread's
// torch thread count. Shapes with more than kMaxRows rows (a prefill) are compute-bound and go to at::linear.
//
// Built on first use for the machine it runs on (-march=native), see hetegen_fx/kernels.py.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cstdint>
#include <algorithm>
#include <chrono>
#include <cstring>
#include <vector>

#if defined(__AVX512F__) || (defined(__AVX2__) && defined(__F16C__) && defined(__FMA__))
#include <immintrin.h>
#endif

namespace {

#ifndef HETEGEN_PREFETCH
#define HETEGEN_PREFETCH 1024  // bytes ahead in each weight row that are prefetched (0: none)
#endif

constexpr int64_t kMaxRows = 4;  // rows of x (tokens) the kernel takes; more go to at::linear
constexpr int kBlock = 4;        // weight rows per block: one load of x serves four rows

#if defined(__AVX512F__)
constexpr int kLanes = 16;
using Vec = __m512;
inline Vec vzero() { return _mm512_setzero_ps(); }
inline Vec vload(const float* p) { return _mm512_loadu_ps(p); }
inline Vec vfma(Vec a, Vec b, Vec c) { return _mm512_fmadd_ps(a, b, c); }
inline float vsum(Vec v) { return _mm512_reduce_add_ps(v); }
inline Vec vload_half(const uint16_t* p) {
  return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
}
inline Vec vload_bf16(const uint16_t* p) {
  __m512i w = _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
  return _mm512_castsi512_ps(_mm512_slli_epi32(w, 16));
}
#elif defined(__AVX2__) && defined(__F16C__) && defined(__FMA__)
constexpr int kLanes = 8;
using Vec = __m256;
inline Vec vzero() { return _mm256_setzero_ps(); }
inline Vec vload(const float* p) { return _mm256_loadu_ps(p); }
inline Vec vfma(Vec a, Vec b, Vec c) { return _mm256_fmadd_ps(a, b, c); }
inline float vsum(Vec v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}
inline Vec vload_half(const uint16_t* p) {
  return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
}
inline Vec vload_bf16(const uint16_t* p) {
  __m256i w = _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  return _mm256_castsi256_ps(_mm256_slli_epi32(w, 16));
}
#else
constexpr int kLanes = 1;
using Vec = float;
inline Vec vzero() { return 0.f; }
inline Vec vload(const float* p) { return *p; }
inline Vec vfma(Vec a, Vec b, Vec c) { return a * b + c; }
inline float vsum(Vec v) { return v; }
inline Vec vload_half(const uint16_t* p) {
  c10::Half h;
  std::memcpy(&h, p, 2);
  return static_cast<float>(h);
}
inline Vec vload_bf16(const uint16_t* p) {
  uint32_t bits = static_cast<uint32_t>(*p) << 16;
  float f;
  std::memcpy(&f, &bits, 4);
  return f;
}
#endif

inline float to_float_half(uint16_t v) {
  c10::Half h;
  std::memcpy(&h, &v, 2);
  return static_cast<float>(h);
}

inline float to_float_bf16(uint16_t v) {
  uint32_t bits = static_cast<uint32_t>(v) << 16;
  float f;
  std::memcpy(&f, &bits, 4);
  return f;
}

// y[m, n] = sum_k w[n, k] * x[m, k] for n in [n0, n1), rows of w in blocks of R; xf: [M, K] fp32
template <int M, int R, bool BF16>
void rows(const uint16_t* w, const float* xf, float* y, int64_t N, int64_t K, int64_t n) {
  Vec acc[R][M];
  for (int r = 0; r < R; ++r)
    for (int m = 0; m < M; ++m) acc[r][m] = vzero();
  const int64_t body = K - K % kLanes;
  for (int64_t k = 0; k < body; k += kLanes) {
    Vec xv[M];
    for (int m = 0; m < M; ++m) xv[m] = vload(xf + m * K + k);
    for (int r = 0; r < R; ++r) {
      const uint16_t* p = w + (n + r) * K + k;
#if HETEGEN_PREFETCH > 0 && (defined(__AVX512F__) || (defined(__AVX2__) && defined(__F16C__) && defined(__FMA__)))
      // more lines in flight per core than the hardware prefetchers keep for four streams (a prefetch past
      // the end of the weights never faults)
      if ((k & 31) == 0) _mm_prefetch(reinterpret_cast<const char*>(p) + HETEGEN_PREFETCH, _MM_HINT_T0);
#endif
      Vec wv = BF16 ? vload_bf16(p) : vload_half(p);
      for (int m = 0; m < M; ++m) acc[r][m] = vfma(wv, xv[m], acc[r][m]);
    }
  }
  for (int r = 0; r < R; ++r) {
    for (int m = 0; m < M; ++m) {
      float s = vsum(acc[r][m]);
      for (int64_t k = body; k < K; ++k) {
        uint16_t v = w[(n + r) * K + k];
        s += (BF16 ? to_float_bf16(v) : to_float_half(v)) * xf[m * K + k];
      }
      y[m * N + n + r] = s;
    }
  }
}

template <int M, bool BF16>
void gemv(const uint16_t* w, const float* xf, float* y, int64_t N, int64_t K) {
  const int64_t blocks = N / kBlock;
  // a grain of rows that streams a few hundred KiB of weights per task
  const int64_t grain = std::max<int64_t>(1, (256 * 1024) / std::max<int64_t>(1, K * 2 * kBlock));
  // OpenMP here, not at::parallel_for: ATen's OpenMP backend is inline code, and would run serially in an
  // extension built without -fopenmp; the team size is the calling thread's torch setting
  const int threads = static_cast<int>(std::min<int64_t>(at::get_num_threads(), std::max<int64_t>(1, blocks / grain)));
  // guided, not static: a call ends with its slowest thread, and in the decode step (copies streaming, the
  // launching thread busy) some threads stream slower than others; with equal static shares the 7B step's
  // CPU jobs took 112 ms where guided shares of at least a grain took 76 (H100 host, interleaved rounds)
#pragma omp parallel for num_threads(threads) schedule(guided, grain)
  for (int64_t b = 0; b < blocks; ++b) rows<M, kBlock, BF16>(w, xf, y, N, K, b * kBlock);
  for (int64_t n = blocks * kBlock; n < N; ++n) rows<M, 1, BF16>(w, xf, y, N, K, n);
}

template <bool BF16>
void dispatch(int64_t M, const uint16_t* w, const float* xf, float* y, int64_t N, int64_t K) {
  switch (M) {
    case 1: return gemv<1, BF16>(w, xf, y, N, K);
    case 2: return gemv<2, BF16>(w, xf, y, N, K);
    case 3: return gemv<3, BF16>(w, xf, y, N, K);
    default: return gemv<4, BF16>(w, xf, y, N, K);
  }
}

at::Tensor linear(const at::Tensor& x, const at::Tensor& w, const c10::optional<at::Tensor>& b) {
  TORCH_CHECK(w.dim() == 2, "hetegen_cpu::linear: weight must be 2-D, got ", w.dim(), "-D");
  if (x.dim() == 0) return at::linear(x, w, b);  // torch's error
  TORCH_CHECK(x.size(-1) == w.size(1), "hetegen_cpu::linear: x has ", x.size(-1), " features, weight ", w.size(1));
  const auto dtype = w.scalar_type();
  const bool half = dtype == at::kHalf || dtype == at::kBFloat16;
  const int64_t K = w.size(1), N = w.size(0);
  const int64_t M = K ? x.numel() / K : 0;
  if (!half || x.scalar_type() != dtype || !x.device().is_cpu() || !w.device().is_cpu() || M < 1 ||
      M > kMaxRows || K == 0 || N == 0) {
    return at::linear(x, w, b);
  }
  const at::Tensor wc = w.contiguous();
  const at::Tensor xf = x.reshape({M, K}).to(at::kFloat).contiguous();
  at::Tensor y = at::empty({M, N}, x.options().dtype(at::kFloat));
  const auto* wp = reinterpret_cast<const uint16_t*>(wc.data_ptr());
  if (dtype == at::kBFloat16) {
    dispatch<true>(M, wp, xf.data_ptr<float>(), y.data_ptr<float>(), N, K);
  } else {
    dispatch<false>(M, wp, xf.data_ptr<float>(), y.data_ptr<float>(), N, K);
  }
  if (b.has_value() && b->defined()) y.add_(b->to(at::kFloat));
  std::vector<int64_t> shape(x.sizes().begin(), x.sizes().end());
  shape.back() = N;
  return y.to(dtype).view(shape);
}

// nanoseconds of the monotonic clock (CLOCK_MONOTONIC, as Python's time.perf_counter_ns on Linux): the job
// server stamps each job with it while a timeline is recorded, from TorchScript, which has no clock of its own
int64_t now() {
  return std::chrono::duration_cast<std::chrono::nanoseconds>(std::chrono::steady_clock::now().time_since_epoch())
      .count();
}

}  // namespace

TORCH_LIBRARY(hetegen_cpu, m) {
  m.def("linear(Tensor x, Tensor w, Tensor? b=None) -> Tensor");
  // CONSERVATIVE: a side effect to TorchScript, which would otherwise fold a call without inputs into a constant
  m.def(torch::schema("now() -> int", c10::AliasAnalysisKind::CONSERVATIVE), &now);
}

TORCH_LIBRARY_IMPL(hetegen_cpu, CPU, m) {
  m.impl("linear", &linear);
}
