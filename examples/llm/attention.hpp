// Causal self-attention over a whole prompt, tiled the way FlashAttention does it:
// a block of query rows (the G query heads of one KV head over 64 tokens) walks the
// key blocks of the causal lower triangle only, keeping a running max and sum per
// row (online softmax), so the scores never leave L1/L2 and K and V are read once
// per query block. The products are AVX-512 register-blocked micro-kernels (scores:
// 6 rows x 32 keys; output: 6 rows x 64 dims), or AVX2 ones (6 x 16 for both) without
// AVX-512, chosen at run time; on other CPUs (or for head_dims the tiles do not
// divide) the engine uses its sgemm route.
//
// Work items (KV head, query block) are shared by the cores through one atomic
// counter, largest first, since a query block's cost grows with its position.
#pragma once

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <thread>
#include <vector>

#include "kernels.hpp"

namespace llm::attention {

// Tests pin the AVX2 kernels on an AVX-512 machine to check them too.
inline bool& avx2_only() {
  static bool v = false;
  return v;
}

inline bool have_avx512() {
#if defined(LLM_X86_DISPATCH)
  static const bool v = __builtin_cpu_supports("avx512f") && kernels::have_avx2();
  return v && !kernels::portable_only() && !avx2_only();
#else
  return false;
#endif
}

// Tile sizes: a query block is 64 tokens (x G heads: 192 rows for SmolLM2), a key
// block 128 keys; the scores (192 x 128, 96 KiB) stay in L2. On the 2-core Zen 4
// at 8K tokens, 64 x 128 gave 78-81 GFLOP per CPU second; 16 x 128, 53.
constexpr int query_block = 64, key_block = 128;

#if defined(LLM_X86_DISPATCH)
// GCC 12 warns that its own AVX-512 intrinsics read _mm512_undefined_ps() (a false
// positive under -Werror once they are inlined here).
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#pragma GCC diagnostic ignored "-Wuninitialized"
#endif
#define LLM_AVX512 __attribute__((target("avx512f,avx2,fma,f16c")))

// 2^x for 16 lanes with x <= 0 (scores are kept in base-2 units: the queries carry
// log2(e)): x = k + r, |r| <= 1/2, 2^r by its degree-6 Taylor polynomial
// (relative error below 2e-7), times 2^k by vscalefps, which also gives 0 for
// x = -inf (a masked key) once r is kept finite.
LLM_AVX512 inline __m512 exp2_16(__m512 x) {
  x = _mm512_max_ps(x, _mm512_set1_ps(-200.0f));  // 2^-200 is 0 in float; r stays finite
  const __m512 k = _mm512_roundscale_ps(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  const __m512 r = _mm512_sub_ps(x, k);
  __m512 p = _mm512_set1_ps(1.5403530393381609e-4f);  // ln2^6 / 6!
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.3333558146428443e-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(9.6181291076284772e-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(5.5504108664821580e-2f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(2.4022650695910071e-1f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(6.9314718055994531e-1f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f));
  return _mm512_scalef_ps(p, k);
}

// S (MR, 32) = Q (MR, d; row stride d) . KT (d, 32 of ldk): a register tile.
template <int MR>
LLM_AVX512 inline void scores_tile(const float* q, int d, const float* kt, std::ptrdiff_t ldk,
                                   float* s, std::ptrdiff_t lds) {
  __m512 acc[MR][2];
#pragma GCC unroll 8
  for (int r = 0; r < MR; ++r) acc[r][0] = acc[r][1] = _mm512_setzero_ps();
  for (int x = 0; x < d; ++x) {
    const __m512 b0 = _mm512_loadu_ps(kt + x * ldk), b1 = _mm512_loadu_ps(kt + x * ldk + 16);
#pragma GCC unroll 8
    for (int r = 0; r < MR; ++r) {
      const __m512 a = _mm512_set1_ps(q[r * d + x]);
      acc[r][0] = _mm512_fmadd_ps(a, b0, acc[r][0]);
      acc[r][1] = _mm512_fmadd_ps(a, b1, acc[r][1]);
    }
  }
#pragma GCC unroll 8
  for (int r = 0; r < MR; ++r) {
    _mm512_storeu_ps(s + r * lds, acc[r][0]);
    _mm512_storeu_ps(s + r * lds + 16, acc[r][1]);
  }
}

// O (MR, 64 of ldo) += P (MR, n; stride ldp) . V (n, 64; row stride ldv).
template <int MR>
LLM_AVX512 inline void pv_tile(const float* p, std::ptrdiff_t ldp, const float* v,
                               std::ptrdiff_t ldv, int n, float* o, std::ptrdiff_t ldo) {
  __m512 acc[MR][4];
#pragma GCC unroll 8
  for (int r = 0; r < MR; ++r)
#pragma GCC unroll 8
    for (int c = 0; c < 4; ++c) acc[r][c] = _mm512_loadu_ps(o + r * ldo + 16 * c);
  for (int j = 0; j < n; ++j) {
    const float* vr = v + j * ldv;
    const __m512 b0 = _mm512_loadu_ps(vr), b1 = _mm512_loadu_ps(vr + 16),
                 b2 = _mm512_loadu_ps(vr + 32), b3 = _mm512_loadu_ps(vr + 48);
#pragma GCC unroll 8
    for (int r = 0; r < MR; ++r) {
      const __m512 a = _mm512_set1_ps(p[r * ldp + j]);
      acc[r][0] = _mm512_fmadd_ps(a, b0, acc[r][0]);
      acc[r][1] = _mm512_fmadd_ps(a, b1, acc[r][1]);
      acc[r][2] = _mm512_fmadd_ps(a, b2, acc[r][2]);
      acc[r][3] = _mm512_fmadd_ps(a, b3, acc[r][3]);
    }
  }
#pragma GCC unroll 8
  for (int r = 0; r < MR; ++r)
#pragma GCC unroll 8
    for (int c = 0; c < 4; ++c) _mm512_storeu_ps(o + r * ldo + 16 * c, acc[r][c]);
}

// Calls f.operator()<MR>(r) over rows [0, rows) in tiles of 6 rows, then one tile
// of the 1-5 rows left.
template <class F>
inline void in_sixes(int rows, F&& f) {
  int r = 0;
  for (; r + 6 <= rows; r += 6) f.template operator()<6>(r);
  switch (rows - r) {
    case 5:
      f.template operator()<5>(r);
      break;
    case 4:
      f.template operator()<4>(r);
      break;
    case 3:
      f.template operator()<3>(r);
      break;
    case 2:
      f.template operator()<2>(r);
      break;
    case 1:
      f.template operator()<1>(r);
      break;
    default:
      break;
  }
}

// The ISA-specific steps of a query block, as static members so that the block
// walk below (query_block, compiled for the default target) calls one per tile.
// scores: S (rows, n_pad) = Q K^T for the key block at kt (n_pad a multiple of
// key_step; kt is zero past S). exp_row: masks the row's keys [valid, n_pad) to
// -inf, sets m to max(m, row max), turns the row into 2^(row - m) and returns its
// sum. pv: O (rows, d) += P (rows, n) V. scale: o (d) *= a.
struct avx512_ops {
  static constexpr int key_step = 32;
  LLM_AVX512 static void scores(const float* qs, int rows, int d, const float* kt,
                                std::ptrdiff_t ldk, int n_pad, float* s, std::ptrdiff_t lds) {
    in_sixes(rows, [&]<int MR>(int r) {
      for (int j = 0; j < n_pad; j += 32)
        scores_tile<MR>(qs + r * d, d, kt + j, ldk, s + r * lds + j, lds);
    });
  }
  LLM_AVX512 static float exp_row(float* row, int n_pad, int valid, float& m) {
    __m512 vm = _mm512_set1_ps(-INFINITY);
    if (valid >= n_pad) {
      for (int j = 0; j < n_pad; j += 16) vm = _mm512_max_ps(vm, _mm512_loadu_ps(row + j));
    } else {
      for (int j = 0; j < n_pad; j += 16) {
        const int left = valid - j;
        const __mmask16 keep = left >= 16 ? static_cast<__mmask16>(0xffff)
                                          : (left <= 0 ? static_cast<__mmask16>(0)
                                                       : static_cast<__mmask16>((1u << left) - 1u));
        const __m512 x = _mm512_mask_loadu_ps(_mm512_set1_ps(-INFINITY), keep, row + j);
        _mm512_storeu_ps(row + j, x);
        vm = _mm512_max_ps(vm, x);
      }
    }
    m = std::max(m, _mm512_reduce_max_ps(vm));
    const __m512 vmn = _mm512_set1_ps(m);
    __m512 vs = _mm512_setzero_ps();
    for (int j = 0; j < n_pad; j += 16) {
      const __m512 e = exp2_16(_mm512_sub_ps(_mm512_loadu_ps(row + j), vmn));
      _mm512_storeu_ps(row + j, e);
      vs = _mm512_add_ps(vs, e);
    }
    return _mm512_reduce_add_ps(vs);
  }
  LLM_AVX512 static void pv(const float* s, std::ptrdiff_t lds, const float* vb, std::ptrdiff_t ldv,
                            int n, int rows, float* out, int d) {
    in_sixes(rows, [&]<int MR>(int r) {
      for (int c = 0; c < d; c += 64)
        pv_tile<MR>(s + r * lds, lds, vb + c, ldv, n, out + r * d + c, d);
    });
  }
  LLM_AVX512 static void scale(float* o, int d, float a) {
    const __m512 va = _mm512_set1_ps(a);
    for (int x = 0; x < d; x += 16)
      _mm512_storeu_ps(o + x, _mm512_mul_ps(va, _mm512_loadu_ps(o + x)));
  }
};
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic pop
#endif

// The same steps in AVX2 + FMA (16 ymm registers): score tiles of 6 rows x 16 keys
// and output tiles of 6 rows x 16 dims, each 12 accumulators.
#define LLM_AVX2_ATT __attribute__((target("avx2,fma")))

// 2^x for 8 lanes with x <= 0: x = k + r, |r| <= 1/2, 2^r as in exp2_16, times 2^k
// built in the exponent bits. x is clamped at -127, where k = -127 gives the bits
// of 0, so a masked key (-inf) weighs exactly 0 (2^-126.5 and below flush to 0).
LLM_AVX2_ATT inline __m256 exp2_8(__m256 x) {
  x = _mm256_max_ps(x, _mm256_set1_ps(-127.0f));
  const __m256 k = _mm256_round_ps(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  const __m256 r = _mm256_sub_ps(x, k);
  __m256 p = _mm256_set1_ps(1.5403530393381609e-4f);
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.3333558146428443e-3f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(9.6181291076284772e-3f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(5.5504108664821580e-2f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(2.4022650695910071e-1f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(6.9314718055994531e-1f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f));
  const __m256i e =
      _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(k), _mm256_set1_epi32(127)), 23);
  return _mm256_mul_ps(p, _mm256_castsi256_ps(e));
}

LLM_AVX2_ATT inline float hmax8(__m256 v) {
  __m128 x = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  x = _mm_max_ps(x, _mm_movehl_ps(x, x));
  return _mm_cvtss_f32(_mm_max_ss(x, _mm_movehdup_ps(x)));
}

LLM_AVX2_ATT inline float hsum8(__m256 v) {
  __m128 x = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  x = _mm_add_ps(x, _mm_movehl_ps(x, x));
  return _mm_cvtss_f32(_mm_add_ss(x, _mm_movehdup_ps(x)));
}

// S (MR, 16) = Q (MR, d; row stride d) . KT (d, 16 of ldk).
template <int MR>
LLM_AVX2_ATT inline void scores_tile8(const float* q, int d, const float* kt, std::ptrdiff_t ldk,
                                      float* s, std::ptrdiff_t lds) {
  __m256 acc[MR][2];
#pragma GCC unroll 8
  for (int r = 0; r < MR; ++r) acc[r][0] = acc[r][1] = _mm256_setzero_ps();
  for (int x = 0; x < d; ++x) {
    const __m256 b0 = _mm256_loadu_ps(kt + x * ldk), b1 = _mm256_loadu_ps(kt + x * ldk + 8);
#pragma GCC unroll 8
    for (int r = 0; r < MR; ++r) {
      const __m256 a = _mm256_broadcast_ss(q + r * d + x);
      acc[r][0] = _mm256_fmadd_ps(a, b0, acc[r][0]);
      acc[r][1] = _mm256_fmadd_ps(a, b1, acc[r][1]);
    }
  }
#pragma GCC unroll 8
  for (int r = 0; r < MR; ++r) {
    _mm256_storeu_ps(s + r * lds, acc[r][0]);
    _mm256_storeu_ps(s + r * lds + 8, acc[r][1]);
  }
}

// O (MR, 16 of ldo) += P (MR, n; stride ldp) . V (n, 16; row stride ldv).
template <int MR>
LLM_AVX2_ATT inline void pv_tile8(const float* p, std::ptrdiff_t ldp, const float* v,
                                  std::ptrdiff_t ldv, int n, float* o, std::ptrdiff_t ldo) {
  __m256 acc[MR][2];
#pragma GCC unroll 8
  for (int r = 0; r < MR; ++r) {
    acc[r][0] = _mm256_loadu_ps(o + r * ldo);
    acc[r][1] = _mm256_loadu_ps(o + r * ldo + 8);
  }
  for (int j = 0; j < n; ++j) {
    const __m256 b0 = _mm256_loadu_ps(v + j * ldv), b1 = _mm256_loadu_ps(v + j * ldv + 8);
#pragma GCC unroll 8
    for (int r = 0; r < MR; ++r) {
      const __m256 a = _mm256_broadcast_ss(p + r * ldp + j);
      acc[r][0] = _mm256_fmadd_ps(a, b0, acc[r][0]);
      acc[r][1] = _mm256_fmadd_ps(a, b1, acc[r][1]);
    }
  }
#pragma GCC unroll 8
  for (int r = 0; r < MR; ++r) {
    _mm256_storeu_ps(o + r * ldo, acc[r][0]);
    _mm256_storeu_ps(o + r * ldo + 8, acc[r][1]);
  }
}

struct avx2_ops {
  static constexpr int key_step = 16;
  LLM_AVX2_ATT static void scores(const float* qs, int rows, int d, const float* kt,
                                  std::ptrdiff_t ldk, int n_pad, float* s, std::ptrdiff_t lds) {
    in_sixes(rows, [&]<int MR>(int r) {
      for (int j = 0; j < n_pad; j += 16)
        scores_tile8<MR>(qs + r * d, d, kt + j, ldk, s + r * lds + j, lds);
    });
  }
  LLM_AVX2_ATT static float exp_row(float* row, int n_pad, int valid, float& m) {
    for (int j = std::max(valid, 0); j < n_pad; ++j) row[j] = -INFINITY;
    __m256 vm = _mm256_set1_ps(-INFINITY);
    for (int j = 0; j < n_pad; j += 8) vm = _mm256_max_ps(vm, _mm256_loadu_ps(row + j));
    m = std::max(m, hmax8(vm));
    const __m256 vmn = _mm256_set1_ps(m);
    __m256 vs = _mm256_setzero_ps();
    for (int j = 0; j < n_pad; j += 8) {
      const __m256 e = exp2_8(_mm256_sub_ps(_mm256_loadu_ps(row + j), vmn));
      _mm256_storeu_ps(row + j, e);
      vs = _mm256_add_ps(vs, e);
    }
    return hsum8(vs);
  }
  LLM_AVX2_ATT static void pv(const float* s, std::ptrdiff_t lds, const float* vb,
                              std::ptrdiff_t ldv, int n, int rows, float* out, int d) {
    in_sixes(rows, [&]<int MR>(int r) {
      for (int c = 0; c < d; c += 16)
        pv_tile8<MR>(s + r * lds, lds, vb + c, ldv, n, out + r * d + c, d);
    });
  }
  LLM_AVX2_ATT static void scale(float* o, int d, float a) {
    const __m256 va = _mm256_set1_ps(a);
    for (int x = 0; x < d; x += 8)
      _mm256_storeu_ps(o + x, _mm256_mul_ps(va, _mm256_loadu_ps(o + x)));
  }
};

// One work item: query block [t0, t1) of KV head g. qs: (rows, d) the group's query
// rows, pre-scaled, row r = token t0 + r / G, head r % G; kt: (d, ldk) this head's
// keys transposed (zero past S); v: (S, d) at row stride ldv; s: (rows, key_block)
// scratch. Writes out (rows, d).
template <class Ops>
void attend_block(const float* qs, int rows, int G, int t0, int d, const float* kt,
                  std::ptrdiff_t ldk, const float* v, std::ptrdiff_t ldv, float* s, float* out) {
  constexpr int ldS = key_block;
  std::vector<float> mx(static_cast<std::size_t>(rows), -INFINITY),
      sum(static_cast<std::size_t>(rows), 0.0f);
  std::fill(out, out + static_cast<std::ptrdiff_t>(rows) * d, 0.0f);
  const int kend = t0 + (rows - 1) / G + 1;  // keys [0, kend) reach some row of the block
  for (int k0 = 0; k0 < kend; k0 += key_block) {
    const int n = std::min(key_block, kend - k0),
              n_pad = (n + Ops::key_step - 1) / Ops::key_step * Ops::key_step;
    Ops::scores(qs, rows, d, kt + k0, ldk, n_pad, s, ldS);
    for (int r = 0; r < rows; ++r) {
      const auto ri = static_cast<std::size_t>(r);
      // Keys past the row's token (only in the diagonal block) are masked to -inf
      // before the max, so they weigh 0 after exp.
      const int valid = std::min(n, t0 + r / G + 1 - k0);
      float m = mx[ri];
      const float row_sum = Ops::exp_row(s + static_cast<std::ptrdiff_t>(r) * ldS, n_pad, valid, m);
      const float alpha = std::exp2(mx[ri] - m);  // 0 on the first block
      sum[ri] = sum[ri] * alpha + row_sum;
      mx[ri] = m;
      if (alpha != 1.0f) Ops::scale(out + static_cast<std::ptrdiff_t>(r) * d, d, alpha);
    }
    Ops::pv(s, ldS, v + static_cast<std::ptrdiff_t>(k0) * ldv, ldv, n, rows, out, d);
  }
  for (int r = 0; r < rows; ++r)
    Ops::scale(out + static_cast<std::ptrdiff_t>(r) * d, d,
               1.0f / sum[static_cast<std::size_t>(r)]);
}
#endif

// The tiled route can be switched off (tests compare both routes; the environment
// variable LLM_SGEMM_ATTENTION=1 does it for a benchmark's baseline).
inline bool& tiled_enabled() {
  static bool v = std::getenv("LLM_SGEMM_ATTENTION") == nullptr;
  return v;
}

// Which kernels causal() uses for this head size: AVX-512 tiles need head_dim a
// multiple of 64, AVX2 tiles a multiple of 16.
enum class route { sgemm, avx2, avx512 };
inline route route_for(int head_dim) {
  if (!tiled_enabled() || head_dim <= 0) return route::sgemm;
  if (have_avx512() && head_dim % 64 == 0) return route::avx512;
  if (kernels::have_avx2() && head_dim % 16 == 0) return route::avx2;
  return route::sgemm;
}

// Whether causal() runs here for this head size.
inline bool available(int head_dim) { return route_for(head_dim) != route::sgemm; }

// out (S, heads*d) = softmax(q k^T / sqrt(d), causal) v per head; q (S, heads*d),
// k and v (S, kv_heads*d), rows token-major. Query head h reads KV head h / G.
// Requires available(d).
inline void causal(const float* q, const float* k, const float* v, int S, int heads, int kv_heads,
                   int d, float* out, unsigned threads) {
#if defined(LLM_X86_DISPATCH)
  const bool use512 = route_for(d) == route::avx512;
  const int G = heads / kv_heads;
  const auto QD = static_cast<std::ptrdiff_t>(heads) * d,
             KD = static_cast<std::ptrdiff_t>(kv_heads) * d;
  const std::ptrdiff_t ldk = (S + 31) & ~31;
  // 1/sqrt(d), and log2(e) so that the softmax runs on 2^x.
  const float scale = static_cast<float>(1.4426950408889634 / std::sqrt(static_cast<double>(d)));
  // (kv_heads, d, ldk): each head's keys transposed, so a score tile reads 32
  // consecutive keys per dimension; zero past S (masked anyway).
  std::vector<float> kt(static_cast<std::size_t>(kv_heads) * static_cast<std::size_t>(d) *
                            static_cast<std::size_t>(ldk),
                        0.0f);
  for (int g = 0; g < kv_heads; ++g)
    for (int t = 0; t < S; ++t)
      for (int x = 0; x < d; ++x)
        kt[(static_cast<std::size_t>(g) * d + x) * static_cast<std::size_t>(ldk) + t] =
            k[t * KD + g * d + x];
  const int blocks = (S + query_block - 1) / query_block, items = blocks * kv_heads;
  std::atomic<int> next{0};
  auto work = [&] {
    const int rows_max = query_block * G;
    std::vector<float> qs(static_cast<std::size_t>(rows_max) * d),
        o(static_cast<std::size_t>(rows_max) * d),
        s(static_cast<std::size_t>(rows_max) * key_block);
    for (int it; (it = next.fetch_add(1)) < items;) {
      const int b = blocks - 1 - it / kv_heads, g = it % kv_heads;  // the costly blocks first
      const int t0 = b * query_block, t1 = std::min(S, t0 + query_block), rows = (t1 - t0) * G;
      for (int t = t0; t < t1; ++t)
        for (int x = 0; x < G * d; ++x)
          qs[static_cast<std::size_t>((t - t0) * G * d + x)] = q[t * QD + g * G * d + x] * scale;
      (use512 ? attend_block<avx512_ops>
              : attend_block<avx2_ops>)(qs.data(), rows, G, t0, d,
                                        kt.data() + static_cast<std::size_t>(g) * d *
                                                        static_cast<std::size_t>(ldk),
                                        ldk, v + g * d, KD, s.data(), o.data());
      for (int t = t0; t < t1; ++t)
        std::copy_n(&o[static_cast<std::size_t>((t - t0) * G * d)], G * d,
                    out + t * QD + g * G * d);
    }
  };
  threads = std::max(1u, std::min<unsigned>(threads, static_cast<unsigned>(items)));
  std::vector<std::thread> pool;
  for (unsigned i = 1; i < threads; ++i) pool.emplace_back(work);
  work();
  for (auto& t : pool) t.join();
#else
  (void)q, (void)k, (void)v, (void)S, (void)heads, (void)kv_heads, (void)d, (void)out,
      (void)threads;
#endif
}

}  // namespace llm::attention
