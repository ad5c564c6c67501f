// hetegen_cpu::linear — the CPU part of a split Linear at decode shapes (a few rows), for half-precision
// weights, bound by memory bandwidth rather than by conversions; hetegen_cpu::linears — the CPU parts of a
// job's Linears (q/k/v, gate/up) in one call, one OpenMP team, written into the job's buffer (the worker
// runs this one; the profiler times the first).
//
// torch's CPU GEMV for fp16 / bf16 weights is compute-bound on the GPU host: it streamed 60 / 29 GB/s of
// weights against 109 GB/s for fp32 (H100 host, 2026-11-22, commit 5883c6c), so per weight it ran no faster
// than fp32 that reads twice the bytes. Here each weight row is converted 16 (AVX-512) or 8 (AVX2 + F16C) halves at a time and
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
#include <string>
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

// y[m * ldy + n + r] = sum_k w[n + r, k] * x[m, k] for r in [0, R); xf: [M, K] fp32
template <int M, int R, bool BF16>
void rows(const uint16_t* w, const float* xf, float* y, int64_t ldy, int64_t K, int64_t n) {
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
      y[m * ldy + n + r] = s;
    }
  }
}

// a grain of rows that streams a few hundred KiB of weights per task
inline int64_t grain_of(int64_t K) { return std::max<int64_t>(1, (256 * 1024) / std::max<int64_t>(1, K * 2 * kBlock)); }

// One weight of a job: its rows, and where its outputs go in the job's [M, ldy] fp32 output.
struct Part {
  const uint16_t* w;
  int64_t N;
  float* y;
};

// y = x Wᵢᵀ for every part, in one OpenMP team: each part's row blocks are shared out guided, and a thread
// done with its share of one part goes on to the next (nowait), so a job of several Linears costs one fork
// and one join. The team size is the calling thread's torch setting.
template <int M, bool BF16>
void gemv(const std::vector<Part>& parts, const float* xf, int64_t ldy, int64_t K) {
  // OpenMP here, not at::parallel_for: ATen's OpenMP backend is inline code, and would run serially in an
  // extension built without -fopenmp
  const int64_t grain = grain_of(K);
  int64_t blocks = 0;
  for (const Part& p : parts) blocks += p.N / kBlock;
  const int threads = static_cast<int>(std::min<int64_t>(at::get_num_threads(), std::max<int64_t>(1, blocks / grain)));
  // guided, not static: a call ends with its slowest thread, and in the decode step (copies streaming, the
  // launching thread busy) some threads stream slower than others; with equal static shares the 7B step's
  // CPU jobs took 112 ms where guided shares of at least a grain took 76 (H100 host, interleaved rounds)
#pragma omp parallel num_threads(threads)
  {
    for (const Part& p : parts) {
      const int64_t nb = p.N / kBlock;
#pragma omp for schedule(guided, grain) nowait
      for (int64_t b = 0; b < nb; ++b) rows<M, kBlock, BF16>(p.w, xf, p.y, ldy, K, b * kBlock);
#pragma omp for nowait
      for (int64_t n = nb * kBlock; n < p.N; ++n) rows<M, 1, BF16>(p.w, xf, p.y, ldy, K, n);
    }
  }
}

template <bool BF16>
void dispatch(int64_t M, const std::vector<Part>& parts, const float* xf, int64_t ldy, int64_t K) {
  switch (M) {
    case 1: return gemv<1, BF16>(parts, xf, ldy, K);
    case 2: return gemv<2, BF16>(parts, xf, ldy, K);
    case 3: return gemv<3, BF16>(parts, xf, ldy, K);
    default: return gemv<4, BF16>(parts, xf, ldy, K);
  }
}

// Numbers in error messages are formatted by std::to_string, never streamed (TORCH_CHECK streams its
// arguments): on the GPU host, formatting a number with an ostream in an extension built there ended the
// process with SIGSEGV (gcc 13.3 against torch 2.11 built with gcc-toolset-13; strings stream fine), so
// every error below crashed instead of raising (docs/benchmarks-history.md, 2026-11-23, commit eb3cbe1).
std::string num(int64_t v) { return std::to_string(v); }

std::string dims(at::IntArrayRef sizes) {
  std::string s = "[";
  for (size_t i = 0; i < sizes.size(); ++i) s += (i ? ", " : "") + std::to_string(sizes[i]);
  return s + "]";
}

// Whether the kernel takes x [.., K] (M rows) with a weight of dtype: half precision, on the CPU, a few rows.
bool takes(const at::Tensor& x, const at::Tensor& w, int64_t M) {
  const auto dtype = w.scalar_type();
  return (dtype == at::kHalf || dtype == at::kBFloat16) && x.scalar_type() == dtype && x.device().is_cpu() &&
         w.device().is_cpu() && M >= 1 && M <= kMaxRows && w.size(0) > 0 && w.size(1) > 0;
}

// y [M, sum Nᵢ] fp32 = x Wᵢᵀ side by side (weights checked by the caller: 2-D, K columns, x's dtype)
at::Tensor gemv_parts(const at::Tensor& x2, const std::vector<at::Tensor>& ws, int64_t M, int64_t K) {
  const at::Tensor xf = x2.to(at::kFloat).contiguous();
  int64_t features = 0;
  for (const auto& w : ws) features += w.size(0);
  at::Tensor y = at::empty({M, features}, x2.options().dtype(at::kFloat));
  std::vector<at::Tensor> kept;  // contiguous weights (a transposed view is copied here, per call)
  std::vector<Part> parts;
  int64_t off = 0;
  for (const auto& w : ws) {
    kept.push_back(w.contiguous());
    parts.push_back({reinterpret_cast<const uint16_t*>(kept.back().data_ptr()), w.size(0), y.data_ptr<float>() + off});
    off += w.size(0);
  }
  if (ws.front().scalar_type() == at::kBFloat16) {
    dispatch<true>(M, parts, xf.data_ptr<float>(), features, K);
  } else {
    dispatch<false>(M, parts, xf.data_ptr<float>(), features, K);
  }
  return y;
}

at::Tensor linear(const at::Tensor& x, const at::Tensor& w, const c10::optional<at::Tensor>& b) {
  TORCH_CHECK(w.dim() == 2, "hetegen_cpu::linear: weight must be 2-D, got ", num(w.dim()), "-D");
  if (x.dim() == 0) return at::linear(x, w, b);  // torch's error
  TORCH_CHECK(x.size(-1) == w.size(1), "hetegen_cpu::linear: x has ", num(x.size(-1)), " features, weight ",
              num(w.size(1)));
  const int64_t K = w.size(1), N = w.size(0);
  const int64_t M = K ? x.numel() / K : 0;
  if (!takes(x, w, M)) return at::linear(x, w, b);
  at::Tensor y = gemv_parts(x.reshape({M, K}), {w}, M, K);
  if (b.has_value() && b->defined()) y.add_(b->to(at::kFloat));
  std::vector<int64_t> shape(x.sizes().begin(), x.sizes().end());
  shape.back() = N;
  return y.to(w.scalar_type()).view(shape);
}

// out [M, sum Nᵢ] = x Wᵢᵀ + bᵢ side by side: a CPU job's Linears (q/k/v, gate/up) in one OpenMP team, written
// into the job's output buffer. Outside the kernel's shapes (a prefill, other dtypes) each goes to at::linear.
void linears(const at::Tensor& x, at::TensorList ws, c10::List<c10::optional<at::Tensor>> bs, at::Tensor out) {
  TORCH_CHECK(!ws.empty() && bs.size() == ws.size(), "hetegen_cpu::linears: ", num(ws.size()), " weights and ",
              num(bs.size()), " biases");
  TORCH_CHECK(x.dim() == 2 && out.dim() == 2 && out.size(0) == x.size(0),
              "hetegen_cpu::linears: x must be [rows, in] and out [rows, out], got ", dims(x.sizes()), " and ",
              dims(out.sizes()));
  const int64_t M = x.size(0), K = x.size(1);
  int64_t features = 0;
  bool fast = out.scalar_type() == x.scalar_type();
  for (const auto& w : ws) {
    TORCH_CHECK(w.dim() == 2 && w.size(1) == K, "hetegen_cpu::linears: x has ", num(K), " features, a weight is ",
                dims(w.sizes()));
    fast = fast && takes(x, w, M) && w.scalar_type() == ws.front().scalar_type();
    features += w.size(0);
  }
  TORCH_CHECK(out.size(1) == features, "hetegen_cpu::linears: out has ", num(out.size(1)), " columns, the weights ",
              num(features), " rows");
  if (!fast) {
    int64_t off = 0;
    for (size_t i = 0; i < ws.size(); ++i) {
      out.narrow(1, off, ws[i].size(0)).copy_(at::linear(x, ws[i], bs.get(i)));
      off += ws[i].size(0);
    }
    return;
  }
  at::Tensor y = gemv_parts(x, ws.vec(), M, K);
  int64_t off = 0;
  for (size_t i = 0; i < ws.size(); ++i) {
    const c10::optional<at::Tensor> b = bs.get(i);
    if (b.has_value() && b->defined()) y.narrow(1, off, ws[i].size(0)).add_(b->to(at::kFloat));
    off += ws[i].size(0);
  }
  out.copy_(y);
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
  m.def("linears(Tensor x, Tensor[] ws, Tensor?[] bs, Tensor(a!) out) -> ()");
  // CONSERVATIVE: a side effect to TorchScript, which would otherwise fold a call without inputs into a constant
  m.def(torch::schema("now() -> int", c10::AliasAnalysisKind::CONSERVATIVE), &now);
}

TORCH_LIBRARY_IMPL(hetegen_cpu, CPU, m) {
  m.impl("linear", &linear);
  m.impl("linears", &linears);
}
