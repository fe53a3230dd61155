// y[M, N] = (x[M, K] @ W[K, N]) * scale[N] for W stored as packed int8 or bfloat16 tiles.
//
// W is packed as [T, K, 16] (T = ceil(N / 16); column n is tile n / 16, lane n % 16), so that one tile's
// sweep over K reads one contiguous stream. Weights are widened to f32 in registers and accumulated in
// f32: nothing is dequantised to memory, so a decode step reads 1 (int8) or 2 (bf16) bytes per weight.
// Tiles are shared out to XLA's intra-op thread pool and the calling thread (parallel.h).
#include <algorithm>
#include <cstdint>
#include <cstring>
#include <vector>

#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#define GPT2JAX_AVX2 1
#endif

#include "parallel.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

constexpr int64_t kLanes = 16;

#ifdef GPT2JAX_AVX2
inline void Widen(const int8_t* p, __m256& lo, __m256& hi) {
  __m128i v = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  lo = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(v));
  hi = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_srli_si128(v, 8)));
}

// bf16 is the top half of an f32: interleaving zeros below each value widens it in one op per 8 values,
// but within 128-bit lanes, so lo holds columns 0-3, 8-11 and hi 4-7, 12-15 (`Unshuffle` puts them back).
inline void Widen(const uint16_t* p, __m256& lo, __m256& hi) {
  __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  lo = _mm256_castsi256_ps(_mm256_unpacklo_epi16(_mm256_setzero_si256(), v));
  hi = _mm256_castsi256_ps(_mm256_unpackhi_epi16(_mm256_setzero_si256(), v));
}

inline void Widen(const float* p, __m256& lo, __m256& hi) {
  lo = _mm256_loadu_ps(p);
  hi = _mm256_loadu_ps(p + 8);
}

inline void Unshuffle(const int8_t*, __m256&, __m256&) {}
inline void Unshuffle(const float*, __m256&, __m256&) {}

inline void Unshuffle(const uint16_t*, __m256& lo, __m256& hi) {
  __m256 a = _mm256_permute2f128_ps(lo, hi, 0x20), b = _mm256_permute2f128_ps(lo, hi, 0x31);
  lo = a;
  hi = b;
}

// R rows of x against TT consecutive tiles starting at w. Every output is summed over k in order, one FMA
// per k, whatever R and TT: a row's result does not depend on the rows or the batch size beside it.
// x(r, k) is x[r * rs + k * ks]: rows of x as they are (rs = K, ks = 1) or a packed panel (rs = 1, ks = R).
template <int R, int TT, typename W>
void Block(const float* x, int64_t rs, int64_t ks, int64_t K, const W* w, const float* scale, float* y,
           int64_t N, int64_t n0) {
  __m256 acc[R][TT][2];
#pragma GCC unroll 8
  for (int r = 0; r < R; ++r)
#pragma GCC unroll 8
    for (int t = 0; t < TT; ++t) acc[r][t][0] = acc[r][t][1] = _mm256_setzero_ps();
  // Whichever of the rows' broadcasts and the tiles' widened values are fewer are held in registers for
  // the k step (with 6 rows and 12 accumulators, holding 6 broadcasts would spill).
  for (int64_t k = 0; k < K; ++k) {
    if constexpr (R > TT) {
      __m256 lo[TT], hi[TT];
#pragma GCC unroll 8
      for (int t = 0; t < TT; ++t) Widen(w + (t * K + k) * kLanes, lo[t], hi[t]);
#pragma GCC unroll 8
      for (int r = 0; r < R; ++r) {
        __m256 xb = _mm256_broadcast_ss(x + r * rs + k * ks);
#pragma GCC unroll 8
        for (int t = 0; t < TT; ++t) {
          acc[r][t][0] = _mm256_fmadd_ps(xb, lo[t], acc[r][t][0]);
          acc[r][t][1] = _mm256_fmadd_ps(xb, hi[t], acc[r][t][1]);
        }
      }
    } else {
      __m256 xb[R];
#pragma GCC unroll 8
      for (int r = 0; r < R; ++r) xb[r] = _mm256_broadcast_ss(x + r * rs + k * ks);
#pragma GCC unroll 8
      for (int t = 0; t < TT; ++t) {
        __m256 lo, hi;
        Widen(w + (t * K + k) * kLanes, lo, hi);
#pragma GCC unroll 8
        for (int r = 0; r < R; ++r) {
          acc[r][t][0] = _mm256_fmadd_ps(xb[r], lo, acc[r][t][0]);
          acc[r][t][1] = _mm256_fmadd_ps(xb[r], hi, acc[r][t][1]);
        }
      }
    }
  }
  // Scaled results go through a buffer, so that the accumulators never need an address in the loop.
  alignas(32) float out[R][TT][kLanes];
#pragma GCC unroll 8
  for (int t = 0; t < TT; ++t) {
    __m256 s0 = _mm256_loadu_ps(scale + t * kLanes), s1 = _mm256_loadu_ps(scale + t * kLanes + 8);
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r) {
      Unshuffle(w, acc[r][t][0], acc[r][t][1]);
      _mm256_store_ps(out[r][t], _mm256_mul_ps(acc[r][t][0], s0));
      _mm256_store_ps(out[r][t] + 8, _mm256_mul_ps(acc[r][t][1], s1));
    }
  }
  for (int t = 0; t < TT; ++t) {
    int64_t col = n0 + t * kLanes, cols = std::min<int64_t>(kLanes, N - col);
    for (int r = 0; r < R && cols > 0; ++r) std::memcpy(y + r * N + col, out[r][t], cols * sizeof(float));
  }
}

// Tiles [t0, t1) for all M rows: 6 rows a tile at a time (12 accumulators, BLIS's 6x16 shape for AVX2; the
// tile stays in cache across row blocks) read from xp, x's first M / 6 * 6 rows packed in panels [K, 6] so
// that a k step's six values share a cache line; then 4 rows, then the last 1-3 rows against 2 or 4 tiles
// at once so that 8 accumulators hide the FMA latency.
template <typename W>
void Tiles(const float* x, const float* xp, int64_t M, int64_t K, const W* w, const float* scale, float* y,
           int64_t N, int64_t t0, int64_t t1) {
  const int64_t tile = K * kLanes;
  int64_t m6 = M / 6 * 6, m4 = m6 + (M - m6) / 4 * 4;
  for (int64_t t = t0; t < t1; ++t) {
    for (int64_t m = 0; m < m6; m += 6)
      Block<6, 1>(xp + m * K, 1, 6, K, w + t * tile, scale + t * kLanes, y + m * N, N, t * kLanes);
    if (m4 > m6)
      Block<4, 1>(x + m6 * K, K, 1, K, w + t * tile, scale + t * kLanes, y + m6 * N, N, t * kLanes);
  }
  int64_t m = m4;
  if (M - m >= 2) {
    int64_t t = t0;
    for (; t + 2 <= t1; t += 2)
      Block<2, 2>(x + m * K, K, 1, K, w + t * tile, scale + t * kLanes, y + m * N, N, t * kLanes);
    for (; t < t1; ++t)
      Block<2, 1>(x + m * K, K, 1, K, w + t * tile, scale + t * kLanes, y + m * N, N, t * kLanes);
    m += 2;
  }
  if (M - m == 1) {
    int64_t t = t0;
    for (; t + 4 <= t1; t += 4)
      Block<1, 4>(x + m * K, K, 1, K, w + t * tile, scale + t * kLanes, y + m * N, N, t * kLanes);
    for (; t < t1; ++t)
      Block<1, 1>(x + m * K, K, 1, K, w + t * tile, scale + t * kLanes, y + m * N, N, t * kLanes);
  }
}

// x's first M / 6 * 6 rows as panels: panel p holds rows 6p..6p+5 as [K, 6].
std::vector<float> Panels(const float* x, int64_t M, int64_t K) {
  std::vector<float> xp(M / 6 * 6 * K);
  for (int64_t p = 0; p < M / 6; ++p)
    for (int64_t k = 0; k < K; ++k)
      for (int64_t r = 0; r < 6; ++r) xp[(p * K + k) * 6 + r] = x[(p * 6 + r) * K + k];
  return xp;
}
#else
inline float ToFloat(int8_t v) { return static_cast<float>(v); }
inline float ToFloat(float v) { return v; }
inline float ToFloat(uint16_t v) {
  uint32_t bits = static_cast<uint32_t>(v) << 16;
  float f;
  std::memcpy(&f, &bits, sizeof(f));
  return f;
}

std::vector<float> Panels(const float*, int64_t, int64_t) { return {}; }

template <typename W>
void Tiles(const float* x, const float*, int64_t M, int64_t K, const W* w, const float* scale, float* y,
           int64_t N, int64_t t0, int64_t t1) {
  for (int64_t t = t0; t < t1; ++t) {
    int64_t cols = std::min<int64_t>(kLanes, N - t * kLanes);
    for (int64_t m = 0; m < M; ++m) {
      float acc[kLanes] = {0};
      for (int64_t k = 0; k < K; ++k)
        for (int64_t j = 0; j < kLanes; ++j) acc[j] += x[m * K + k] * ToFloat(w[(t * K + k) * kLanes + j]);
      for (int64_t j = 0; j < cols; ++j) y[m * N + t * kLanes + j] = acc[j] * scale[t * kLanes + j];
    }
  }
}
#endif

template <typename W>
ffi::Error PackedMatmul(ffi::ThreadPool pool, const float* x, int64_t M, int64_t K, const W* w, int64_t T,
                        const float* scale, float* y, int64_t N) {
  if (T * kLanes < N) return ffi::Error::InvalidArgument("packed weight has fewer columns than the output");
  // Tasks beyond the pool's threads only add scheduling; a chunk of a few tiles keeps the threads even.
  int64_t workers = std::max<int64_t>(1, std::min<int64_t>(pool.num_threads() + 1, T / 4));
  int64_t chunks = std::min<int64_t>(T, workers * 8);
  int64_t per_chunk = ((T + chunks - 1) / chunks + 3) / 4 * 4;  // whole groups of 4 tiles
  std::vector<float> panels = Panels(x, M, K);
  const float* xp = panels.data();
  gpt2jax::ParallelChunks(pool, T, per_chunk, workers,
                          [=](int64_t t0, int64_t t1) { Tiles(x, xp, M, K, w, scale, y, N, t0, t1); });
  return ffi::Error::Success();
}

template <ffi::DataType D, typename W>
ffi::Error Impl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<D> w, ffi::Buffer<ffi::F32> scale,
                ffi::ResultBuffer<ffi::F32> y) {
  auto xd = x.dimensions(), wd = w.dimensions(), yd = y->dimensions();
  if (xd.size() != 2 || wd.size() != 3 || yd.size() != 2 || wd[2] != kLanes || wd[1] != xd[1] ||
      yd[0] != xd[0] || scale.element_count() != wd[0] * kLanes)
    return ffi::Error::InvalidArgument("packed_matmul: x [M, K], w [T, K, 16], scale [T * 16], y [M, N]");
  return PackedMatmul(pool, x.typed_data(), xd[0], xd[1], reinterpret_cast<const W*>(w.untyped_data()), wd[0],
                      scale.typed_data(), y->typed_data(), yd[1]);
}

}  // namespace

#define GPT2JAX_PACKED_MATMUL(NAME, TYPE, CTYPE)                    \
  XLA_FFI_DEFINE_HANDLER_SYMBOL(NAME, (Impl<TYPE, CTYPE>),          \
                                ffi::Ffi::Bind()                    \
                                    .Ctx<ffi::ThreadPool>()         \
                                    .Arg<ffi::Buffer<ffi::F32>>()   \
                                    .Arg<ffi::Buffer<TYPE>>()       \
                                    .Arg<ffi::Buffer<ffi::F32>>()   \
                                    .Ret<ffi::Buffer<ffi::F32>>());

GPT2JAX_PACKED_MATMUL(Gpt2jaxPackedMatmulS8, ffi::S8, int8_t)
GPT2JAX_PACKED_MATMUL(Gpt2jaxPackedMatmulBF16, ffi::BF16, uint16_t)
GPT2JAX_PACKED_MATMUL(Gpt2jaxPackedMatmulF32, ffi::F32, float)
