// Decode attention over a KV cache: one new token per row against the cache entries before its position,
// then the new token's key and value written into the cache at that position.
//
// out[b, h] = softmax(q . [K[b, h, :pos[b]], k_new] / sqrt(D)) @ [V[b, h, :pos[b]], v_new]
// K[b, h, pos[b]] = k_new[b, h], V[b, h, pos[b]] = v_new[b, h]   (the caches are outputs aliased in place)
//
// Only the entries a row can see are read (XLA's einsum reads the whole window and masks), a bf16 cache
// is widened in registers (XLA converted it to f32 in memory first) and written in place (XLA copied it
// around each write), and the cache may hold more rows than the batch (the first B are used), so a decode
// of the leading slots needs no copy of the cache. Each (row, head) is computed alone, in a fixed order:
// a row's result does not depend on the batch.
#include <algorithm>
#include <cmath>
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

inline float Load(const float* p) { return *p; }
inline void Store(float v, float* p) { *p = v; }
// Round to nearest even, as XLA converts f32 to bf16 (a NaN stays a NaN).
inline void Store(float v, uint16_t* p) {
  uint32_t bits;
  std::memcpy(&bits, &v, sizeof(bits));
  if ((bits & 0x7fffffffu) > 0x7f800000u) {
    *p = static_cast<uint16_t>((bits >> 16) | 0x40);
    return;
  }
  *p = static_cast<uint16_t>((bits + 0x7fffu + ((bits >> 16) & 1)) >> 16);
}
inline float Load(const uint16_t* p) {
  uint32_t bits = static_cast<uint32_t>(*p) << 16;
  float f;
  std::memcpy(&f, &bits, sizeof(f));
  return f;
}

#ifdef GPT2JAX_AVX2
inline __m256 Load8(const float* p) { return _mm256_loadu_ps(p); }
inline __m256 Load8(const uint16_t* p) {
  __m128i v = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(v), 16));
}
inline float Sum8(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}
#endif

// Dot product of q [D] f32 with k [D]; D a multiple of 8 on the vector path.
template <typename C>
inline float Dot(const float* q, const C* k, int64_t D) {
#ifdef GPT2JAX_AVX2
  if (D % 8 == 0) {
    __m256 acc = _mm256_setzero_ps();
    for (int64_t d = 0; d < D; d += 8) acc = _mm256_fmadd_ps(_mm256_loadu_ps(q + d), Load8(k + d), acc);
    return Sum8(acc);
  }
#endif
  float acc = 0.f;
  for (int64_t d = 0; d < D; ++d) acc += q[d] * Load(k + d);
  return acc;
}

// out [D] += p * v [D].
template <typename C>
inline void Axpy(float p, const C* v, float* out, int64_t D) {
#ifdef GPT2JAX_AVX2
  if (D % 8 == 0) {
    __m256 pb = _mm256_set1_ps(p);
    for (int64_t d = 0; d < D; d += 8)
      _mm256_storeu_ps(out + d, _mm256_fmadd_ps(pb, Load8(v + d), _mm256_loadu_ps(out + d)));
    return;
  }
#endif
  for (int64_t d = 0; d < D; ++d) out[d] += p * Load(v + d);
}

struct Shapes {
  int64_t B, H, S, D;
};

// One (row, head): scores over the visible entries and the new token, softmax, weighted sum of values.
template <typename C>
void One(const Shapes& s, int64_t item, const float* q, const float* k_new, const float* v_new, C* kc, C* vc,
         const int32_t* position, float* out, std::vector<float>& scores) {
  const int64_t b = item / s.H, h = item % s.H, D = s.D;
  const int64_t n = std::clamp<int64_t>(position[b], 0, s.S);
  const float scale = 1.0f / std::sqrt(static_cast<float>(D));
  const float* qv = q + item * D;
  C* K = kc + (b * s.H + h) * s.S * D;
  C* V = vc + (b * s.H + h) * s.S * D;
  scores.resize(n);
  const float own = Dot(qv, k_new + item * D, D) * scale;
  float top = own;
  for (int64_t t = 0; t < n; ++t) top = std::max(top, scores[t] = Dot(qv, K + t * D, D) * scale);
  float denom = 0.f;
  for (int64_t t = 0; t < n; ++t) denom += scores[t] = std::exp(scores[t] - top);
  const float p_own = std::exp(own - top);
  denom += p_own;
  float* o = out + item * D;
  std::fill(o, o + D, 0.f);
  for (int64_t t = 0; t < n; ++t) Axpy(scores[t], V + t * D, o, D);
  Axpy(p_own, v_new + item * D, o, D);
  const float inv = 1.0f / denom;
  for (int64_t d = 0; d < D; ++d) o[d] *= inv;
  if (n < s.S)  // after the reads: the row's new entry, where its next step will see it
    for (int64_t d = 0; d < D; ++d) {
      Store(k_new[item * D + d], K + n * D + d);
      Store(v_new[item * D + d], V + n * D + d);
    }
}

template <ffi::DataType T, typename C>
ffi::Error Impl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> q, ffi::Buffer<ffi::F32> k_new,
                ffi::Buffer<ffi::F32> v_new, ffi::Buffer<T> k_cache, ffi::Buffer<T> v_cache,
                ffi::Buffer<ffi::S32> position, ffi::ResultBuffer<ffi::F32> out, ffi::ResultBuffer<T> k_out,
                ffi::ResultBuffer<T> v_out) {
  auto qd = q.dimensions(), cd = k_cache.dimensions();
  if (qd.size() != 3 || cd.size() != 4 || cd[0] < qd[0] || cd[1] != qd[1] || cd[3] != qd[2] ||
      k_new.element_count() != q.element_count() || v_new.element_count() != q.element_count() ||
      v_cache.element_count() != k_cache.element_count() || position.element_count() != qd[0])
    return ffi::Error::InvalidArgument(
        "decode_attention: q, k_new, v_new [B, H, D]; caches [>= B, H, S, D]; position [B]");
  if (k_out->untyped_data() != k_cache.untyped_data() || v_out->untyped_data() != v_cache.untyped_data())
    return ffi::Error::InvalidArgument("decode_attention: the caches must be aliased to the outputs");
  const Shapes s{qd[0], qd[1], cd[2], qd[2]};
  const float *qp = q.typed_data(), *kn = k_new.typed_data(), *vn = v_new.typed_data();
  C* kc = reinterpret_cast<C*>(k_out->untyped_data());
  C* vc = reinterpret_cast<C*>(v_out->untyped_data());
  const int32_t* pos = position.typed_data();
  float* o = out->typed_data();
  gpt2jax::ParallelFor(pool, s.B * s.H, [=](int64_t begin, int64_t end) {
    std::vector<float> scores;
    scores.reserve(s.S);
    for (int64_t i = begin; i < end; ++i) One(s, i, qp, kn, vn, kc, vc, pos, o, scores);
  });
  return ffi::Error::Success();
}

}  // namespace

#define GPT2JAX_ATTENTION(NAME, TYPE, CTYPE)                        \
  XLA_FFI_DEFINE_HANDLER_SYMBOL(NAME, (Impl<TYPE, CTYPE>),          \
                                ffi::Ffi::Bind()                    \
                                    .Ctx<ffi::ThreadPool>()         \
                                    .Arg<ffi::Buffer<ffi::F32>>()   \
                                    .Arg<ffi::Buffer<ffi::F32>>()   \
                                    .Arg<ffi::Buffer<ffi::F32>>()   \
                                    .Arg<ffi::Buffer<TYPE>>()       \
                                    .Arg<ffi::Buffer<TYPE>>()       \
                                    .Arg<ffi::Buffer<ffi::S32>>()   \
                                    .Ret<ffi::Buffer<ffi::F32>>()   \
                                    .Ret<ffi::Buffer<TYPE>>()       \
                                    .Ret<ffi::Buffer<TYPE>>());

GPT2JAX_ATTENTION(Gpt2jaxDecodeAttentionF32, ffi::F32, float)
GPT2JAX_ATTENTION(Gpt2jaxDecodeAttentionBF16, ffi::BF16, uint16_t)
