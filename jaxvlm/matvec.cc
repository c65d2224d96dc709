// Weight-only quantized (int8 with float scales) and bfloat16 matrix products for the CPU decode step:
// y[M, N] = x[M, K] @ dequantize(w), with float32 x and y, reading each weight once and never writing
// a float32 copy of it. Registered with XLA through its FFI by jaxvlm/matvec.py; built by setup.py.
//
// w is [K, N] ("contract leading", a projection kernel such as [D, F]) or [N, K] (the tied embedding
// [V, D] used as the output head). int8 weights come with scales [K / g, N] or [N, K / g]: one per
// output channel and group of g consecutive inputs.
#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstring>
#include <memory>
#include <thread>

#if defined(__AVX2__) || defined(__AVX512F__)
#include <immintrin.h>
#endif

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

// GCC vector extensions: AVX-512 where the machine has it, narrower vectors elsewhere.
typedef float f32x16 __attribute__((vector_size(64)));
typedef int8_t i8x16 __attribute__((vector_size(16)));
typedef uint16_t u16x16 __attribute__((vector_size(32)));
typedef uint32_t u32x16 __attribute__((vector_size(64)));
constexpr int64_t kLanes = 16;

inline float to_float(int8_t v) { return static_cast<float>(v); }
inline float to_float(uint16_t v) {  // bfloat16 is the top half of a float32
  const uint32_t bits = static_cast<uint32_t>(v) << 16;
  float f;
  std::memcpy(&f, &bits, sizeof f);
  return f;
}
inline f32x16 load16(const int8_t* p) {
  // GCC turns a vector-extension conversion from int8 into scalar code: say the instructions.
#if defined(__AVX512F__)
  const __m512 v = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))));
#elif defined(__AVX2__)
  const __m128i bytes = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  const __m256 v[2] = {_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(bytes)),
                       _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_srli_si128(bytes, 8)))};
#else
  float v[kLanes];
  for (int i = 0; i < kLanes; ++i) v[i] = p[i];
#endif
  f32x16 f;
  std::memcpy(&f, &v, sizeof f);
  return f;
}
inline f32x16 load16(const uint16_t* p) {
  u16x16 v;
  std::memcpy(&v, p, sizeof v);
  const u32x16 bits = __builtin_convertvector(v, u32x16) << 16;
  f32x16 f;
  std::memcpy(&f, &bits, sizeof f);
  return f;
}
inline f32x16 load16(const float* p) {
  f32x16 v;
  std::memcpy(&v, p, sizeof v);
  return v;
}
inline void store16(float* p, f32x16 v) { std::memcpy(p, &v, sizeof v); }
inline float sum16(f32x16 v) {
  float s = 0.0f;
  for (int i = 0; i < kLanes; ++i) s += v[i];
  return s;
}

template <typename W>
struct Problem {
  const float* x;      // [M, K]
  const W* w;          // [K, N] or [N, K]
  const float* scale;  // [K / group, N] or [N, K / group]; null for bfloat16 weights
  float* y;            // [M, N]
  int64_t M, K, N, group;
  // [K, N]: where column n of row k of w is: w[k * w_stride + n - w_column0] (a packed chunk of columns
  // has its own stride and first column).
  int64_t w_stride, w_column0;
  const W* w_at(int64_t k, int64_t n) const { return w + k * w_stride + (n - w_column0); }
  float scale_at(int64_t j, int64_t n, bool leading) const {
    return scale == nullptr ? 1.0f : leading ? scale[j * N + n] : scale[n * (K / group) + j];
  }
};

constexpr int64_t kRows = 4;  // rows of x per pass over the weights (more rows make more passes)
constexpr int64_t kColumnsPerTask = 512;  // [K, N]
constexpr int64_t kOutputsPerTask = 64;   // [N, K]

// [K, N], R rows of x and V * 16 columns from n0: the accumulators (R * V vectors) stay in registers
// while k runs down a group, and the scales apply once per group. Rows of w are read V * 16 columns at a
// time: long runs, since the hardware prefetcher does not follow the stride of a whole row between them.
template <int R, int V, typename W>
void tile_kn(const Problem<W>& p, int64_t m0, int64_t n0) {
  for (int64_t g0 = 0; g0 < p.K; g0 += p.group) {
    f32x16 acc[R][V] = {};
    for (int64_t k = g0; k < g0 + p.group; ++k) {
      const W* wk = p.w_at(k, n0);
      f32x16 w[V];
      for (int i = 0; i < V; ++i) w[i] = load16(wk + i * kLanes);
      for (int r = 0; r < R; ++r) {
        const float xv = p.x[(m0 + r) * p.K + k];
        for (int i = 0; i < V; ++i) acc[r][i] += xv * w[i];
      }
    }
    // Each group's sum, scaled, goes to the output (in cache): no registers are held across groups.
    for (int i = 0; i < V; ++i) {
      const f32x16 sv = p.scale ? load16(p.scale + (g0 / p.group) * p.N + n0 + i * kLanes) : f32x16{} + 1.0f;
      for (int r = 0; r < R; ++r) {
        float* out = p.y + (m0 + r) * p.N + n0 + i * kLanes;
        store16(out, g0 == 0 ? acc[r][i] * sv : load16(out) + acc[r][i] * sv);
      }
    }
  }
}

// The columns past the last whole tile, one at a time.
template <typename W>
void column_kn(const Problem<W>& p, int64_t m, int64_t n) {
  float total = 0.0f;
  for (int64_t g0 = 0; g0 < p.K; g0 += p.group) {
    float acc = 0.0f;
    for (int64_t k = g0; k < g0 + p.group; ++k) acc += p.x[m * p.K + k] * to_float(*p.w_at(k, n));
    total += acc * p.scale_at(g0 / p.group, n, true);
  }
  p.y[m * p.N + n] = total;
}

// Wide tiles while the columns last (as many vectors as R rows leave registers for), then narrower ones,
// then single columns.
template <int R, typename W>
void rows_kn(const Problem<W>& p, int64_t m0, int64_t n0, int64_t n1) {
  constexpr int kWide = R == 1 ? 16 : R == 2 ? 8 : 4;
  int64_t n = n0;
  for (; n + kWide * kLanes <= n1; n += kWide * kLanes) tile_kn<R, kWide>(p, m0, n);
  for (; n + kLanes <= n1; n += kLanes) tile_kn<R, 1>(p, m0, n);
  for (; n < n1; ++n)
    for (int r = 0; r < R; ++r) column_kn(p, m0 + r, n);
}

// Columns in chunks of kChunk, and within a chunk every block of rows of x. With more than one block, the
// chunk is first packed (its rows made contiguous): the blocks then read it from the cache, where rows a
// whole row of w apart would each touch another page.
constexpr int64_t kChunk = 256;

template <typename W>
void task_kn(const Problem<W>& p, int64_t n0, int64_t n1) {
  std::unique_ptr<W[]> packed;
  for (int64_t c0 = n0; c0 < n1; c0 += kChunk) {
    const int64_t c1 = std::min(c0 + kChunk, n1), width = c1 - c0;
    Problem<W> q = p;
    if (p.M > kRows) {
      if (!packed) packed.reset(new W[p.K * kChunk]);
      for (int64_t k = 0; k < p.K; ++k) std::memcpy(&packed[k * width], p.w_at(k, c0), width * sizeof(W));
      q.w = packed.get();
      q.w_stride = width;
      q.w_column0 = c0;
    }
    int64_t m = 0;
    for (; m + kRows <= p.M; m += kRows) rows_kn<kRows>(q, m, c0, c1);
    if (p.M - m >= 2) rows_kn<2>(q, m, c0, c1), m += 2;
    if (p.M - m == 1) rows_kn<1>(q, m, c0, c1);
  }
}

// [N, K]: output n is a dot product along row n of w, taken 16 lanes at a time when a group allows.
template <int R, typename W>
void output_nk(const Problem<W>& p, int64_t m0, int64_t n) {
  const W* wn = p.w + n * p.K;
  float total[R] = {};
  for (int64_t g0 = 0; g0 < p.K; g0 += p.group) {
    f32x16 acc[R] = {};
    float tail[R] = {};
    int64_t k = g0;
    for (; k + kLanes <= g0 + p.group; k += kLanes) {
      const f32x16 w = load16(wn + k);
      for (int r = 0; r < R; ++r) acc[r] += load16(p.x + (m0 + r) * p.K + k) * w;
    }
    for (; k < g0 + p.group; ++k)
      for (int r = 0; r < R; ++r) tail[r] += p.x[(m0 + r) * p.K + k] * to_float(wn[k]);
    const float s = p.scale_at(g0 / p.group, n, false);
    for (int r = 0; r < R; ++r) total[r] += (sum16(acc[r]) + tail[r]) * s;
  }
  for (int r = 0; r < R; ++r) p.y[(m0 + r) * p.N + n] = total[r];
}

template <typename W>
void task_nk(const Problem<W>& p, int64_t n0, int64_t n1) {
  for (int64_t n = n0; n < n1; ++n) {
    int64_t m = 0;
    for (; m + kRows <= p.M; m += kRows) output_nk<kRows>(p, m, n);
    for (; m < p.M; ++m) output_nk<1>(p, m, n);
  }
}

// Runs tasks 0 .. tasks - 1 on the calling thread and XLA's intra-op threads. Tasks are claimed from a
// shared counter, so the caller never waits for a helper that has not started (one that starts late
// finds nothing left): no deadlock when the pool is busy or has no threads.
template <typename Task>
void parallel(ffi::ThreadPool& pool, int64_t tasks, Task task) {
  struct Counters {
    std::atomic<int64_t> next{0}, finished{0};
  };
  auto counters = std::make_shared<Counters>();
  auto run = [counters, tasks, task]() {
    for (int64_t t; (t = counters->next.fetch_add(1)) < tasks;) {
      task(t);
      counters->finished.fetch_add(1, std::memory_order_release);
    }
  };
  const int64_t helpers = std::min<int64_t>(pool.num_threads(), tasks - 1);
  for (int64_t i = 0; i < helpers; ++i) pool.Schedule([run] { run(); });
  run();
  while (counters->finished.load(std::memory_order_acquire) < tasks) std::this_thread::yield();
}

template <typename W>
ffi::Error matmul(ffi::ThreadPool pool, const float* x, const W* w, const float* scale, int64_t groups,
                  int64_t M, int64_t K, int64_t N, bool leading, float* y) {
  if (groups <= 0 || K % groups) return ffi::Error::InvalidArgument("the scales' groups do not divide K");
  const Problem<W> p{x, w, scale, y, M, K, N, K / groups, N, 0};
  const int64_t per_task = leading ? kColumnsPerTask : kOutputsPerTask;
  parallel(pool, (N + per_task - 1) / per_task, [p, per_task, leading](int64_t t) {
    const int64_t n0 = t * per_task, n1 = std::min(n0 + per_task, p.N);
    leading ? task_kn(p, n0, n1) : task_nk(p, n0, n1);
  });
  return ffi::Error::Success();
}

using Matrix = ffi::Buffer<ffi::F32, 2>;
using Int8Matrix = ffi::Buffer<ffi::S8, 2>;
using Bf16Matrix = ffi::Buffer<ffi::BF16, 2>;
using Output = ffi::ResultBuffer<ffi::F32, 2>;

ffi::Error Int8Matmul(ffi::ThreadPool pool, Matrix x, Int8Matrix w, Matrix scale, bool leading, Output y) {
  const int64_t M = x.dimensions()[0], K = x.dimensions()[1], N = y->dimensions()[1];
  const int64_t groups = leading ? scale.dimensions()[0] : scale.dimensions()[1];
  return matmul(pool, x.typed_data(), w.typed_data(), scale.typed_data(), groups, M, K, N, leading,
                y->typed_data());
}

ffi::Error Bf16Matmul(ffi::ThreadPool pool, Matrix x, Bf16Matrix w, bool leading, Output y) {
  const int64_t M = x.dimensions()[0], K = x.dimensions()[1], N = y->dimensions()[1];
  return matmul<uint16_t>(pool, x.typed_data(), w.typed_data(), nullptr, 1, M, K, N, leading, y->typed_data());
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(jaxvlm_int8_matmul, Int8Matmul,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<Matrix>()
                                  .Arg<Int8Matrix>()
                                  .Arg<Matrix>()
                                  .Attr<bool>("contract_leading")
                                  .Ret<Matrix>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(jaxvlm_bf16_matmul, Bf16Matmul,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<Matrix>()
                                  .Arg<Bf16Matrix>()
                                  .Attr<bool>("contract_leading")
                                  .Ret<Matrix>());
