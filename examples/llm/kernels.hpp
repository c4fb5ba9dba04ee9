// Vector kernels of the engine, chosen at run time: AVX2+FMA+F16C versions where
// the CPU has them (function-level target attributes, so the binary stays
// portable and needs no -march=native), plain loops elsewhere.
//
//  * qmatvec: Y (n, rows) = X (n, cols) W^T with W kept in the file's block format
//    (Q4_1, Q8_0 or F32): each block is decoded in registers once for all n rows
//    of X, so a decoding step reads each weight once, at 5 bits (Q4_1). Q8_0 and
//    F32 blocks are the values dequantize() gives; Q4_1 is summed as
//    d * (q . x) + m * sum(x), the same product rounded differently. Large
//    products run W's rows on OpenMP's threads (the same result bit for bit).
//  * dot, axpy: attention of one query row over a cache.
//  * exp_inplace: e^x over a row for the softmax and SiLU, within 2 ulp of
//    std::exp on [-87, 88.3] (tested), 0 below, clamped to e^88.37 above.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <stdexcept>
#include <vector>

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#include <cpuid.h>
#include <immintrin.h>
#define LLM_X86_DISPATCH 1
#define LLM_AVX2 __attribute__((target("avx2,fma,f16c")))
#endif

#if defined(_OPENMP)
#include <omp.h>
#endif

#include "gguf.hpp"

namespace llm {

// A weight matrix (rows, cols) row-major in a block format; rows are whole blocks.
struct QWeight {
  ggml_type type = ggml_type::f32;
  std::size_t rows = 0, cols = 0, row_bytes = 0;
  std::vector<std::uint8_t> data;  // (rows, row_bytes)

  // Q4_1 and Q8_0 stay as they are; any other type becomes F32.
  static QWeight from(ggml_type t, const std::uint8_t* src, std::size_t rows, std::size_t cols) {
    QWeight w;
    w.rows = rows;
    w.cols = cols;
    const TypeTraits tr = type_traits(t);
    if ((t == ggml_type::q4_1 || t == ggml_type::q8_0) && cols % tr.block == 0) {
      w.type = t;
      w.row_bytes = cols / tr.block * tr.bytes;
      w.data.assign(src, src + rows * w.row_bytes);
    } else {
      w.type = ggml_type::f32;
      w.row_bytes = cols * 4;
      w.data.resize(rows * w.row_bytes);
      dequantize(t, src, reinterpret_cast<float*>(w.data.data()), rows * cols);
    }
    return w;
  }
};

namespace kernels {

// Tests switch the vector paths off to check the portable ones.
inline bool& portable_only() {
  static bool v = false;
  return v;
}

inline bool have_avx2() {
#if defined(LLM_X86_DISPATCH)
  // F16C from CPUID leaf 1 (ECX bit 29): not every compiler's __builtin_cpu_supports knows it.
  static const bool v = [] {
    unsigned a = 0, b = 0, c = 0, d = 0;
    const bool f16c = __get_cpuid(1, &a, &b, &c, &d) && (c & (1u << 29));
    return f16c && __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  }();
  return v && !portable_only();
#else
  return false;
#endif
}

// ---- portable --------------------------------------------------------------------

inline float dot_portable(const float* a, const float* b, std::size_t n) {
  float s[8] = {};
  std::size_t i = 0;
  for (; i + 8 <= n; i += 8)
    for (int j = 0; j < 8; ++j) s[j] += a[i + j] * b[i + j];
  float t = ((s[0] + s[4]) + (s[1] + s[5])) + ((s[2] + s[6]) + (s[3] + s[7]));
  for (; i < n; ++i) t += a[i] * b[i];
  return t;
}

inline void qmatvec_portable(const QWeight& W, const float* X, std::size_t n, float* Y,
                             std::size_t r0, std::size_t r1) {
  const TypeTraits tr = type_traits(W.type);
  const std::size_t nb = W.cols / tr.block;
  std::vector<float> row(W.cols);
  for (std::size_t r = r0; r < r1; ++r) {
    const std::uint8_t* src = W.data.data() + r * W.row_bytes;
    if (W.type == ggml_type::f32)
      std::memcpy(row.data(), src, W.cols * 4);
    else
      dequantize(W.type, src, row.data(), nb * tr.block);
    for (std::size_t i = 0; i < n; ++i)
      Y[i * W.rows + r] = dot_portable(row.data(), X + i * W.cols, W.cols);
  }
}

inline void exp_portable(float* x, std::size_t n) {
  for (std::size_t i = 0; i < n; ++i) x[i] = std::exp(x[i]);
}

// ---- AVX2 + FMA + F16C -------------------------------------------------------------

#if defined(LLM_X86_DISPATCH)
LLM_AVX2 inline float hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

LLM_AVX2 inline float dot_avx2(const float* a, const float* b, std::size_t n) {
  __m256 s0 = _mm256_setzero_ps(), s1 = _mm256_setzero_ps();
  std::size_t i = 0;
  for (; i + 16 <= n; i += 16) {
    s0 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i), _mm256_loadu_ps(b + i), s0);
    s1 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i + 8), _mm256_loadu_ps(b + i + 8), s1);
  }
  for (; i + 8 <= n; i += 8)
    s0 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i), _mm256_loadu_ps(b + i), s0);
  float t = hsum(_mm256_add_ps(s0, s1));
  for (; i < n; ++i) t += a[i] * b[i];
  return t;
}

LLM_AVX2 inline void axpy_avx2(float a, const float* x, float* y, std::size_t n) {
  const __m256 va = _mm256_set1_ps(a);
  std::size_t i = 0;
  for (; i + 8 <= n; i += 8)
    _mm256_storeu_ps(y + i, _mm256_fmadd_ps(va, _mm256_loadu_ps(x + i), _mm256_loadu_ps(y + i)));
  for (; i < n; ++i) y[i] += a * x[i];
}

// e^x: x = k ln2 + r, |r| <= ln2/2, e^r by a degree-6 Taylor-like minimax
// polynomial (Cephes' expf coefficients), times 2^k built in the exponent bits.
LLM_AVX2 inline __m256 exp8(__m256 x) {
  const __m256 hi = _mm256_set1_ps(88.3762626647949f), lo = _mm256_set1_ps(-87.3365447504f);
  const __m256 under = _mm256_cmp_ps(x, lo, _CMP_LT_OQ);
  x = _mm256_min_ps(_mm256_max_ps(x, lo), hi);
  const __m256 k = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                                   _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m256 r = _mm256_fnmadd_ps(k, _mm256_set1_ps(0.693359375f), x);
  r = _mm256_fnmadd_ps(k, _mm256_set1_ps(-2.12194440e-4f), r);
  __m256 p = _mm256_set1_ps(1.9875691500e-4f);
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.3981999507e-3f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(8.3334519073e-3f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(4.1665795894e-2f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.6666665459e-1f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(5.0000001201e-1f));
  p = _mm256_fmadd_ps(p, _mm256_mul_ps(r, r), _mm256_add_ps(r, _mm256_set1_ps(1.0f)));
  // 2^k in two halves so that k = 128 (x near 88.7) does not overflow the exponent.
  const __m256i ki = _mm256_cvtps_epi32(k);
  const __m256i k1 = _mm256_srai_epi32(ki, 1), k2 = _mm256_sub_epi32(ki, k1);
  const __m256i bias = _mm256_set1_epi32(127);
  const __m256 s1 = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_add_epi32(k1, bias), 23));
  const __m256 s2 = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_add_epi32(k2, bias), 23));
  return _mm256_andnot_ps(under, _mm256_mul_ps(_mm256_mul_ps(p, s1), s2));
}

LLM_AVX2 inline void exp_avx2(float* x, std::size_t n) {
  std::size_t i = 0;
  for (; i + 8 <= n; i += 8) _mm256_storeu_ps(x + i, exp8(_mm256_loadu_ps(x + i)));
  if (i < n) {
    float t[8] = {};
    std::memcpy(t, x + i, (n - i) * 4);
    _mm256_storeu_ps(t, exp8(_mm256_loadu_ps(t)));
    std::memcpy(x + i, t, (n - i) * 4);
  }
}

LLM_AVX2 inline float half(const std::uint8_t* p) {
  std::uint16_t h;
  std::memcpy(&h, p, 2);
  return _cvtsh_ss(h);
}

// One block of 32 weights as four vectors of 8, rounded as dequantize() rounds.
LLM_AVX2 inline void block_q4_1(const std::uint8_t* b, __m256 w[4]) {
  const __m256 d = _mm256_set1_ps(half(b)), m = _mm256_set1_ps(half(b + 2));
  const __m128i raw = _mm_loadu_si128(reinterpret_cast<const __m128i*>(b + 4));
  const __m128i mask = _mm_set1_epi8(0x0F);
  const __m128i lo = _mm_and_si128(raw, mask), hi = _mm_and_si128(_mm_srli_epi16(raw, 4), mask);
  const __m128i parts[4] = {lo, _mm_srli_si128(lo, 8), hi, _mm_srli_si128(hi, 8)};
  for (int j = 0; j < 4; ++j)
    w[j] = _mm256_add_ps(_mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(parts[j])), d), m);
}

LLM_AVX2 inline void block_q8_0(const std::uint8_t* b, __m256 w[4]) {
  const __m256 d = _mm256_set1_ps(half(b));
  for (int j = 0; j < 4; ++j) {
    const __m128i q = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(b + 2 + 8 * j));
    w[j] = _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(q)), d);
  }
}

LLM_AVX2 inline void block_f32(const std::uint8_t* b, __m256 w[4]) {
  const float* f = reinterpret_cast<const float*>(b);
  for (int j = 0; j < 4; ++j) w[j] = _mm256_loadu_ps(f + 8 * j);
}

// Rows r0..r1 of Y for up to 4 rows of X at a time: every weight block is decoded
// once per group of 4 inputs.
template <void (*Block)(const std::uint8_t*, __m256*)>
LLM_AVX2 void qmatvec_avx2_t(const QWeight& W, const float* X, std::size_t n, float* Y,
                             std::size_t r0, std::size_t r1, std::size_t block_bytes) {
  const std::size_t nb = W.cols / 32;
  for (std::size_t r = r0; r < r1; ++r) {
    const std::uint8_t* row = W.data.data() + r * W.row_bytes;
    for (std::size_t i0 = 0; i0 < n; i0 += 4) {
      const std::size_t m = std::min<std::size_t>(4, n - i0);
      __m256 acc[4] = {_mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps(),
                       _mm256_setzero_ps()};
      for (std::size_t b = 0; b < nb; ++b) {
        __m256 w[4];
        Block(row + b * block_bytes, w);
        for (std::size_t i = 0; i < m; ++i) {
          const float* x = X + (i0 + i) * W.cols + b * 32;
          __m256 a = acc[i];
          a = _mm256_fmadd_ps(w[0], _mm256_loadu_ps(x), a);
          a = _mm256_fmadd_ps(w[1], _mm256_loadu_ps(x + 8), a);
          a = _mm256_fmadd_ps(w[2], _mm256_loadu_ps(x + 16), a);
          a = _mm256_fmadd_ps(w[3], _mm256_loadu_ps(x + 24), a);
          acc[i] = a;
        }
      }
      for (std::size_t i = 0; i < m; ++i) Y[(i0 + i) * W.rows + r] = hsum(acc[i]);
    }
  }
}

// Q4_1 rows as d * (q . x) + m * sum(x) per block: the offset m meets each block
// of x once as a precomputed sum, and d once per block, instead of being applied
// to all 32 weights. Mathematically the same product; the rounding differs from
// dequantising first by a few ulp of each block's sum.
LLM_AVX2 inline void qmatvec_q4_1_avx2(const QWeight& W, const float* X, std::size_t n, float* Y,
                                       std::size_t r0, std::size_t r1) {
  const std::size_t nb = W.cols / 32;
  std::vector<float> xs(n * nb);  // (n, blocks): sum of each block of x
  for (std::size_t i = 0; i < n; ++i)
    for (std::size_t b = 0; b < nb; ++b) {
      const float* x = X + i * W.cols + b * 32;
      xs[i * nb + b] =
          hsum(_mm256_add_ps(_mm256_add_ps(_mm256_loadu_ps(x), _mm256_loadu_ps(x + 8)),
                             _mm256_add_ps(_mm256_loadu_ps(x + 16), _mm256_loadu_ps(x + 24))));
    }
  const __m128i mask = _mm_set1_epi8(0x0F);
  for (std::size_t r = r0; r < r1; ++r) {
    const std::uint8_t* row = W.data.data() + r * W.row_bytes;
    for (std::size_t i0 = 0; i0 < n; i0 += 4) {
      const std::size_t m = std::min<std::size_t>(4, n - i0);
      __m256 acc[4] = {_mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps(),
                       _mm256_setzero_ps()};
      float off[4] = {0, 0, 0, 0};
      for (std::size_t b = 0; b < nb; ++b) {
        const std::uint8_t* blk = row + b * 20;
        const __m256 d = _mm256_set1_ps(half(blk));
        const float mb = half(blk + 2);
        const __m128i raw = _mm_loadu_si128(reinterpret_cast<const __m128i*>(blk + 4));
        const __m128i lo = _mm_and_si128(raw, mask),
                      hi = _mm_and_si128(_mm_srli_epi16(raw, 4), mask);
        const __m256 q0 = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(lo));
        const __m256 q1 = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_srli_si128(lo, 8)));
        const __m256 q2 = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(hi));
        const __m256 q3 = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_srli_si128(hi, 8)));
        for (std::size_t i = 0; i < m; ++i) {
          const float* x = X + (i0 + i) * W.cols + b * 32;
          __m256 t = _mm256_mul_ps(q0, _mm256_loadu_ps(x));
          t = _mm256_fmadd_ps(q1, _mm256_loadu_ps(x + 8), t);
          t = _mm256_fmadd_ps(q2, _mm256_loadu_ps(x + 16), t);
          t = _mm256_fmadd_ps(q3, _mm256_loadu_ps(x + 24), t);
          acc[i] = _mm256_fmadd_ps(d, t, acc[i]);
          off[i] += mb * xs[(i0 + i) * nb + b];
        }
      }
      for (std::size_t i = 0; i < m; ++i) Y[(i0 + i) * W.rows + r] = hsum(acc[i]) + off[i];
    }
  }
}

inline void qmatvec_avx2(const QWeight& W, const float* X, std::size_t n, float* Y, std::size_t r0,
                         std::size_t r1) {
  if (W.cols % 32) return qmatvec_portable(W, X, n, Y, r0, r1);
  switch (W.type) {
    case ggml_type::q4_1:
      return qmatvec_q4_1_avx2(W, X, n, Y, r0, r1);
    case ggml_type::q8_0:
      return qmatvec_avx2_t<block_q8_0>(W, X, n, Y, r0, r1, 34);
    default:
      return qmatvec_avx2_t<block_f32>(W, X, n, Y, r0, r1, 128);
  }
}
#endif

#if defined(LLM_X86_DISPATCH)
// One query head of D = 8 * V dims against n keys and values (key j at krow(j),
// value j at vrow(j)): out = softmax(q . k_j * scale) . v. The output row stays in
// registers.
template <int V, class KRow, class VRow>
LLM_AVX2 void attend_avx2_t(const float* q, KRow krow, VRow vrow, std::int64_t n, float scale,
                            float* p, float* out) {
  __m256 qv[V];
  for (int i = 0; i < V; ++i) qv[i] = _mm256_loadu_ps(q + 8 * i);
  float mx = -INFINITY;
  for (std::int64_t j = 0; j < n; ++j) {
    const float* kr = krow(j);
    __m256 a = _mm256_mul_ps(qv[0], _mm256_loadu_ps(kr)), b = _mm256_setzero_ps();
    for (int i = 1; i < V; i += 2) {
      b = _mm256_fmadd_ps(qv[i], _mm256_loadu_ps(kr + 8 * i), b);
      if (i + 1 < V) a = _mm256_fmadd_ps(qv[i + 1], _mm256_loadu_ps(kr + 8 * i + 8), a);
    }
    const float e = hsum(_mm256_add_ps(a, b)) * scale;
    p[j] = e;
    mx = std::max(mx, e);
  }
  const __m256 vmx = _mm256_set1_ps(mx);
  __m256 vsum = _mm256_setzero_ps();
  std::int64_t j = 0;
  for (; j + 8 <= n; j += 8) {
    const __m256 e = exp8(_mm256_sub_ps(_mm256_loadu_ps(p + j), vmx));
    _mm256_storeu_ps(p + j, e);
    vsum = _mm256_add_ps(vsum, e);
  }
  float sum = hsum(vsum);
  for (; j < n; ++j) {
    float t[8] = {p[j] - mx};
    _mm256_storeu_ps(t, exp8(_mm256_loadu_ps(t)));
    sum += (p[j] = t[0]);
  }
  __m256 o[V];
  for (int i = 0; i < V; ++i) o[i] = _mm256_setzero_ps();
  for (j = 0; j < n; ++j) {
    const __m256 a = _mm256_broadcast_ss(p + j);
    const float* vr = vrow(j);
    for (int i = 0; i < V; ++i) o[i] = _mm256_fmadd_ps(a, _mm256_loadu_ps(vr + 8 * i), o[i]);
  }
  const __m256 inv = _mm256_set1_ps(1.0f / sum);
  for (int i = 0; i < V; ++i) _mm256_storeu_ps(out + 8 * i, _mm256_mul_ps(o[i], inv));
}
#endif

// One query head (d dims) over n cached keys and values: out = softmax(q k^T * scale) v,
// key j at krow(j) and value j at vrow(j) (const float* (std::int64_t)). Where the
// rows live (one strided buffer, or the blocks of a paged pool) changes no
// arithmetic: both give bit-identical outputs for the same rows. p: scratch of n floats.
template <class KRow, class VRow>
inline void attend_rows(const float* q, KRow krow, VRow vrow, std::int64_t n, int d, float scale,
                        float* p, float* out) {
#if defined(LLM_X86_DISPATCH)
  if (have_avx2() && n > 0) {
    if (d == 64) return attend_avx2_t<8>(q, krow, vrow, n, scale, p, out);
    if (d == 128) return attend_avx2_t<16>(q, krow, vrow, n, scale, p, out);
    if (d == 32) return attend_avx2_t<4>(q, krow, vrow, n, scale, p, out);
  }
#endif
  const auto D = static_cast<std::size_t>(d);
  float mx = -INFINITY;
  for (std::int64_t j = 0; j < n; ++j) {
    p[j] = dot_portable(q, krow(j), D) * scale;
    mx = std::max(mx, p[j]);
  }
  float sum = 0.0f;
  for (std::int64_t j = 0; j < n; ++j) sum += (p[j] = std::exp(p[j] - mx));
  std::fill(out, out + d, 0.0f);
  for (std::int64_t j = 0; j < n; ++j) {
    const float* vr = vrow(j);
    for (std::size_t x = 0; x < D; ++x) out[x] += p[j] * vr[x];
  }
  for (std::size_t x = 0; x < D; ++x) out[x] /= sum;
}

// The same over rows at fixed strides: key j at k + j * ks, value j at v + j * vs.
inline void attend(const float* q, const float* k, std::ptrdiff_t ks, const float* v,
                   std::ptrdiff_t vs, std::int64_t n, int d, float scale, float* p, float* out) {
  attend_rows(
      q, [k, ks](std::int64_t j) { return k + j * ks; },
      [v, vs](std::int64_t j) { return v + j * vs; }, n, d, scale, p, out);
}

// ---- dispatch ----------------------------------------------------------------------

inline void qmatvec_rows(const QWeight& W, const float* X, std::size_t n, float* Y, std::size_t r0,
                         std::size_t r1) {
#if defined(LLM_X86_DISPATCH)
  if (have_avx2()) return qmatvec_avx2(W, X, n, Y, r0, r1);
#endif
  qmatvec_portable(W, X, n, Y, r0, r1);
}

// Products of at least this many weights x rows of X are split over the threads.
inline constexpr std::size_t kSplitWeights = std::size_t{1} << 16;

// On `threads` threads (0: OpenMP's count; one where the engine was built without
// OpenMP), each taking a run of W's rows: every row is computed as on one thread (the
// same blocks in the same order), so the result is the same bit for bit. The
// decoding step at batch 1 decodes the Q4_1 blocks in registers at a few GB/s, far
// below the memory's rate: compute-bound, so a second core nearly halves it.
inline void qmatvec(const QWeight& W, const float* X, std::size_t n, float* Y, int threads = 0) {
#if defined(_OPENMP)
  if (threads <= 0) threads = omp_get_max_threads();
  const std::size_t rows = W.rows;
  if (threads > 1 && rows >= 16 && rows * W.cols * n >= kSplitWeights) {
    const auto T = static_cast<std::size_t>(std::min<std::size_t>(threads, rows / 8));
#pragma omp parallel for num_threads(static_cast <int>(T)) schedule(static, 1)
    for (std::size_t t = 0; t < T; ++t) qmatvec_rows(W, X, n, Y, rows * t / T, rows * (t + 1) / T);
    return;
  }
#else
  (void)threads;
#endif
  qmatvec_rows(W, X, n, Y, 0, W.rows);
}

inline float dot(const float* a, const float* b, std::size_t n) {
#if defined(LLM_X86_DISPATCH)
  if (have_avx2()) return dot_avx2(a, b, n);
#endif
  return dot_portable(a, b, n);
}

inline void axpy(float a, const float* x, float* y, std::size_t n) {
#if defined(LLM_X86_DISPATCH)
  if (have_avx2()) return axpy_avx2(a, x, y, n);
#endif
  for (std::size_t i = 0; i < n; ++i) y[i] += a * x[i];
}

inline void exp_inplace(float* x, std::size_t n) {
#if defined(LLM_X86_DISPATCH)
  if (have_avx2()) return exp_avx2(x, n);
#endif
  exp_portable(x, n);
}

}  // namespace kernels
}  // namespace llm
