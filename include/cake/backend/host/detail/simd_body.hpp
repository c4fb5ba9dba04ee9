// cake: the host SIMD micro-kernels, written once over GCC vector types and
// compiled once per instruction set. No include guard: simd.hpp includes this file
// inside each target region with CAKE_SIMD_NS (the namespace) and CAKE_SIMD_VW
// (floats per vector: 8 for AVX2, 16 for AVX-512) defined. Every function here has
// plain pointer arguments, so nothing vector-typed crosses the region's boundary.

namespace cake::detail::simd::CAKE_SIMD_NS {

inline constexpr index_t VW = CAKE_SIMD_VW;
typedef float V __attribute__((vector_size(VW * 4)));
typedef std::int32_t VI __attribute__((vector_size(VW * 4)));
typedef float VU __attribute__((vector_size(VW * 4), aligned(4), may_alias));  // unaligned

CAKE_ALWAYS_INLINE V load(const float* p) { return *reinterpret_cast<const VU*>(p); }
CAKE_ALWAYS_INLINE void store(float* p, V v) { *reinterpret_cast<VU*>(p) = v; }
// A store that bypasses the caches (p aligned to a vector): for data read back much later.
CAKE_ALWAYS_INLINE void store_nt(float* p, V v) {
#if CAKE_SIMD_VW == 16
  _mm512_stream_ps(p, reinterpret_cast<__m512>(v));
#else
  _mm256_stream_ps(p, reinterpret_cast<__m256>(v));
#endif
}
CAKE_ALWAYS_INLINE V iota() {
  V v;
  for (index_t l = 0; l < VW; ++l) v[l] = static_cast<float>(l);
  return v;
}
#if CAKE_SIMD_VW == 16
CAKE_ALWAYS_INLINE V splat(float x) { return reinterpret_cast<V>(_mm512_set1_ps(x)); }
CAKE_ALWAYS_INLINE V fma(V a, V b, V c) {
  return reinterpret_cast<V>(_mm512_fmadd_ps(
      reinterpret_cast<__m512>(a), reinterpret_cast<__m512>(b), reinterpret_cast<__m512>(c)));
}
#else
CAKE_ALWAYS_INLINE V splat(float x) { return reinterpret_cast<V>(_mm256_set1_ps(x)); }
CAKE_ALWAYS_INLINE V fma(V a, V b, V c) {
  return reinterpret_cast<V>(_mm256_fmadd_ps(
      reinterpret_cast<__m256>(a), reinterpret_cast<__m256>(b), reinterpret_cast<__m256>(c)));
}
#endif
// A vector of keys as float, from float or (F16C) IEEE half storage.
CAKE_ALWAYS_INLINE V load_key(const float* p) { return load(p); }
#if CAKE_SIMD_HAS_HALF
CAKE_ALWAYS_INLINE V load_key(const _Float16* p) {
#if CAKE_SIMD_VW == 16
  return reinterpret_cast<V>(
      _mm512_maskz_cvtph_ps(0xffff, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p))));
#else
  return reinterpret_cast<V>(_mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))));
#endif
}
#endif
// bfloat16 is a float's top half: widen each 16-bit lane and shift it up (exact).
CAKE_ALWAYS_INLINE V load_key(const bfloat16* p) {
#if CAKE_SIMD_VW == 16
  // (the zero-masked forms: GCC 12 warns that the plain ones read an undefined vector)
  return reinterpret_cast<V>(_mm512_maskz_slli_epi32(
      0xffff,
      _mm512_maskz_cvtepu16_epi32(0xffff, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p))),
      16));
#else
  return reinterpret_cast<V>(_mm256_slli_epi32(
      _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))), 16));
#endif
}
CAKE_ALWAYS_INLINE V vmax(V a, V b) { return a > b ? a : b; }
CAKE_ALWAYS_INLINE V vmin(V a, V b) { return a < b ? a : b; }
CAKE_ALWAYS_INLINE float hsum(V v) {
  float s = 0;
  for (index_t l = 0; l < VW; ++l) s += v[l];
  return s;
}
CAKE_ALWAYS_INLINE float hmax(V v) {
  float m = v[0];
  for (index_t l = 1; l < VW; ++l) m = v[l] > m ? v[l] : m;
  return m;
}

// e^r for x = n ln2 + r: x reduced by n (ln2 in two parts) and Cephes' degree-6
// polynomial; the callers scale by 2^n.
CAKE_ALWAYS_INLINE V exp_reduced(V x, V n) {
  V r = fma(n, splat(-0.693359375f), x);
  r = fma(n, splat(2.12194440e-4f), r);
  const V z = r * r;
  V y = splat(1.9875691500e-4f);
  y = fma(y, r, splat(1.3981999507e-3f));
  y = fma(y, r, splat(8.3334519073e-3f));
  y = fma(y, r, splat(4.1665795894e-2f));
  y = fma(y, r, splat(1.6666665459e-1f));
  y = fma(y, r, splat(5.0000001201e-1f));
  return fma(y, z, r + splat(1.0f));
}

// exp_approx and log_approx of math.hpp, lane-wise (the same polynomials; here
// with fused multiply-adds, so within an ulp of the scalar versions, not equal).
CAKE_ALWAYS_INLINE V exp_v(V x) {
  const VI under = x < splat(-87.3f);
  x = vmin(x, splat(88.3f));
  x = vmax(x, splat(-87.3f));
  const V magic = splat(12582912.0f);
  const V n = fma(x, splat(1.44269504088896341f), magic) - magic;
  V y = exp_reduced(x, n);
  const VI e = __builtin_convertvector(n, VI) + 127;
  y = y * reinterpret_cast<V>(e << 23);
  return under ? splat(0.0f) : y;
}

// exp_v for the softmax's x = logit - max <= 0 (or -inf): the same reduction and
// polynomial, with the underflow to 0 below -87.3 as a mask and no clamp at the top.
// AVX-512: its rounding and 2^n scaling instructions (exact), 5 instructions fewer.
// AVX2: exp_v's steps less the clamps and a conversion, equal to exp_v for every such x.
CAKE_ALWAYS_INLINE V exp_neg(V x) {
#if CAKE_SIMD_VW == 16
  const __m512 xv = reinterpret_cast<__m512>(x);
  const __mmask16 live = _mm512_cmp_ps_mask(xv, _mm512_set1_ps(-87.3f), _CMP_GE_OQ);
  // (the zero-masked form: GCC 12 warns that the plain one reads an undefined vector)
  const V n = reinterpret_cast<V>(_mm512_maskz_roundscale_ps(
      0xffff, _mm512_mul_ps(xv, _mm512_set1_ps(1.44269504088896341f)), _MM_FROUND_TO_NEAREST_INT));
  V y = exp_reduced(x, n);
  return reinterpret_cast<V>(
      _mm512_maskz_scalef_ps(live, reinterpret_cast<__m512>(y), reinterpret_cast<__m512>(n)));
#else
  // No clamp: a lane below -87.3 (or -inf) is zeroed by the mask whatever the steps give
  // it. 2^n from the bits of n + 1.5 * 2^23 (its low mantissa bits are n, |n| < 2^22)
  // shifted into the exponent, without a conversion.
  const __m256 live =
      _mm256_cmp_ps(reinterpret_cast<__m256>(x), _mm256_set1_ps(-87.3f), _CMP_GE_OQ);
  const V magic = splat(12582912.0f);
  const V nm = fma(x, splat(1.44269504088896341f), magic);
  const V n = nm - magic;
  V y = exp_reduced(x, n);
  // The bias added with wrapping (intrinsic) addition: a masked lane may overflow.
  const __m256i e = _mm256_add_epi32(_mm256_slli_epi32(reinterpret_cast<__m256i>(nm), 23),
                                     _mm256_set1_epi32(127 << 23));
  y = y * reinterpret_cast<V>(e);
  return reinterpret_cast<V>(_mm256_and_ps(live, reinterpret_cast<__m256>(y)));
#endif
}

CAKE_ALWAYS_INLINE V log_v(V x) {
  const VI bits = reinterpret_cast<VI>(x);
  VI e = ((bits >> 23) & 0xff) - 126;
  V m = reinterpret_cast<V>((bits & 0x007fffff) | 0x3f000000);  // [0.5, 1)
  const VI small = m < splat(0.707106781186547524f);
  e = small ? e - 1 : e;
  m = small ? m + m - splat(1.0f) : m - splat(1.0f);
  const V z = m * m;
  V y = splat(7.0376836292e-2f);
  y = fma(y, m, splat(-1.1514610310e-1f));
  y = fma(y, m, splat(1.1676998740e-1f));
  y = fma(y, m, splat(-1.2420140846e-1f));
  y = fma(y, m, splat(1.4249322787e-1f));
  y = fma(y, m, splat(-1.6668057665e-1f));
  y = fma(y, m, splat(2.0000714765e-1f));
  y = fma(y, m, splat(-2.4999993993e-1f));
  y = fma(y, m, splat(3.3333331174e-1f));
  y = y * m * z;
  const V fe = __builtin_convertvector(e, V);
  y = fma(fe, splat(-2.12194440e-4f), y);
  y = fma(splat(-0.5f), z, y);
  return fma(fe, splat(0.693359375f), m + y);
}

// One row's piece of a score tile: keys [0, cnt) are visible (cnt >= 1), keys
// [cnt, cols) masked; cols a multiple of VW. Writes e = exp(s - m) (0 where masked)
// in place, with m the piece's maximum; returns m, the sum of e, and over the first
// `prefix` keys the sums of e and of e * (s - m) (what the row's entropy needs: with
// p = e * c, ln p = s - (the row's max + ln of its sum); see group_simd). Relative
// to m, so that huge scores do not cancel each other in the entropy.
inline void tile_softmax(float* CAKE_RESTRICT row, index_t cnt, index_t cols, index_t prefix,
                         float* m_out, float* sum_out, float* ep_out, float* es_out) {
  const V lane = iota();
  V mv = splat(-3.0e38f);
  index_t j = 0;
  for (; j + VW <= cnt; j += VW) mv = vmax(mv, load(row + j));
  if (j < cnt) {
    const V v = load(row + j);
    mv = vmax(mv, (lane < splat(static_cast<float>(cnt - j))) ? v : splat(-3.0e38f));
  }
  const float m = hmax(mv);
  const V ms = splat(m);
  V sv = splat(0.0f), pv = splat(0.0f), qv = splat(0.0f);
  for (j = 0; j < cols; j += VW) {
    const V x = load(row + j) - ms;
    V e = exp_v(x);
    if (j + VW > cnt) e = (lane < splat(static_cast<float>(cnt - j))) ? e : splat(0.0f);
    store(row + j, e);
    sv += e;
    if (j < prefix) {
      const V ep = (lane < splat(static_cast<float>(prefix - j))) ? e : splat(0.0f);
      pv += ep;
      qv = fma(ep, x, qv);
    }
  }
  *m_out = m;
  *sum_out = hsum(sv);
  *ep_out = hsum(pv);
  *es_out = hsum(qv);
}

#if CAKE_SIMD_VW == 8
// Lane a of the low half: acc[a]'s lanes 0-3 summed; lane 4 + a: its lanes 4-7.
CAKE_ALWAYS_INLINE __m256 hadd2(V a0, V a1, V a2, V a3) {
  return _mm256_hadd_ps(_mm256_hadd_ps(reinterpret_cast<__m256>(a0), reinterpret_cast<__m256>(a1)),
                        _mm256_hadd_ps(reinterpret_cast<__m256>(a2), reinterpret_cast<__m256>(a3)));
}
#endif
// Sums of 8 vectors' lanes: out[a] = sum of acc[a].
CAKE_ALWAYS_INLINE void reduce8(const V* acc, float* out) {
#if CAKE_SIMD_VW == 16
  // Halves, then 128-bit quarters, then within quarters: 15 shuffles and adds for all 8
  // (the zero-masked forms: GCC 12 warns that the plain ones read an undefined vector).
  __m512 u[4];
#pragma GCC unroll 4
  for (int a = 0; a < 4; ++a) {
    const __m512 x = reinterpret_cast<__m512>(acc[2 * a]),
                 y = reinterpret_cast<__m512>(acc[2 * a + 1]);
    u[a] = _mm512_add_ps(_mm512_maskz_shuffle_f32x4(0xffff, x, y, 0x44),
                         _mm512_maskz_shuffle_f32x4(0xffff, x, y, 0xee));
  }
  const __m512 w0 =
      _mm512_add_ps(_mm512_maskz_shuffle_f32x4(0xffff, u[0], u[1], 0x88),
                    _mm512_maskz_shuffle_f32x4(0xffff, u[0], u[1], 0xdd));  // acc 0..3 by quarter
  const __m512 w1 =
      _mm512_add_ps(_mm512_maskz_shuffle_f32x4(0xffff, u[2], u[3], 0x88),
                    _mm512_maskz_shuffle_f32x4(0xffff, u[2], u[3], 0xdd));  // acc 4..7
  const __m512 x = _mm512_add_ps(_mm512_maskz_shuffle_ps(0xffff, w0, w1, 0x88),
                                 _mm512_maskz_shuffle_ps(0xffff, w0, w1, 0xdd));
  const __m512 y = _mm512_add_ps(_mm512_maskz_shuffle_ps(0xffff, x, x, 0x88),
                                 _mm512_maskz_shuffle_ps(0xffff, x, x, 0xdd));
  const V yv = reinterpret_cast<V>(y);
#pragma GCC unroll 4
  for (int a = 0; a < 4; ++a) {
    out[a] = yv[4 * a];
    out[a + 4] = yv[4 * a + 1];
  }
#else
  // Pairwise within 128-bit halves (two rounds of hadd), then the halves added: 9
  // operations for all 8 sums instead of 8 separate horizontal sums.
  const __m256 y0 = hadd2(acc[0], acc[1], acc[2], acc[3]),
               y1 = hadd2(acc[4], acc[5], acc[6], acc[7]);
  _mm256_storeu_ps(out, _mm256_add_ps(_mm256_permute2f128_ps(y0, y1, 0x20),
                                      _mm256_permute2f128_ps(y0, y1, 0x31)));
#endif
}
#if CAKE_SIMD_VW == 8
// Sums of 4 vectors' lanes: out[a] = sum of acc[a].
CAKE_ALWAYS_INLINE void reduce4(const V* acc, float* out) {
  const __m256 y = hadd2(acc[0], acc[1], acc[2], acc[3]);
  _mm_storeu_ps(out, _mm_add_ps(_mm256_castps256_ps128(y), _mm256_extractf128_ps(y, 1)));
}
#endif

// Decode logits: out[r * ld + j] = scale * (q[r] . k[j]) for r < rows (a multiple of
// 4), j < n; q: (rows, d) row-major, k: n rows of pitch k_ld; d a multiple of VW.
// Along head_dim, four query rows against KB keys at a time, so each key row is read
// once for the whole GQA group: AVX2 4 x 3 accumulators + 3 key vectors + 1 query
// vector (all 16 registers; 12 independent FMA chains hide the FMA latency, which 4 x 2
// did not: 1.5x faster on Zen 3), AVX-512 4 x 4 of its 32.
inline constexpr int KB = VW == 16 ? 4 : 3;
// The key rows of decode_dots_t: k + j * ld (strided), or one pointer per key (listed:
// a layer's slots through its slot map or a paged layer's block table).
template <class T>
struct strided_keys {
  const T* k;
  index_t ld;
  CAKE_ALWAYS_INLINE const T* operator()(index_t j) const { return k + j * ld; }
};
template <class T>
struct listed_keys {
  const T* const* k;
  CAKE_ALWAYS_INLINE const T* operator()(index_t j) const { return k[j]; }
};
template <class T, class Keys>
CAKE_ALWAYS_INLINE void decode_dots_t(const float* CAKE_RESTRICT q, index_t rows, index_t d,
                                      const Keys& keys, index_t n, float scale,
                                      float* CAKE_RESTRICT out, index_t ld) {
  for (index_t r0 = 0; r0 < rows; r0 += 4) {
    const float* qr = q + r0 * d;
    index_t j = 0;
    for (; j + KB <= n; j += KB) {
      const T* kj[KB];
#pragma GCC unroll 4
      for (int t = 0; t < KB; ++t) kj[t] = keys(j + t);
      // The next block's key rows requested now: rows listed through a slot map or a
      // block table jump where the hardware's stream prefetch stops (8-10% at C = 1024).
      if (j + 2 * KB <= n)
#pragma GCC unroll 4
        for (int t = 0; t < KB; ++t) {
          const char* next = reinterpret_cast<const char*>(keys(j + KB + t));
          for (index_t b = 0; b < d * static_cast<index_t>(sizeof(T)); b += 64)
            _mm_prefetch(next + b, _MM_HINT_T0);
        }
      V acc[4 * KB];  // acc[4 * key + row]
#pragma GCC unroll 16
      for (int a = 0; a < 4 * KB; ++a) acc[a] = splat(0.0f);
      for (index_t x = 0; x < d; x += VW) {
        V kv[KB];
        // Each key and query vector loaded once into a register (the empty asm keeps
        // GCC from folding the loads into the FMAs, which reloaded every key vector
        // four times and left the loop bound by loads: 1.8x slower on Zen 3).
#pragma GCC unroll 4
        for (int t = 0; t < KB; ++t) {
          kv[t] = load_key(kj[t] + x);
          asm("" : "+v"(kv[t]));
        }
#pragma GCC unroll 4
        for (int r = 0; r < 4; ++r) {
          V qv = load(qr + r * d + x);
          asm("" : "+v"(qv));
#pragma GCC unroll 4
          for (int t = 0; t < KB; ++t) acc[4 * t + r] = fma(qv, kv[t], acc[4 * t + r]);
        }
      }
      float sums[4 * KB];
#pragma GCC unroll 2
      for (int a = 0; a + 8 <= 4 * KB; a += 8) reduce8(acc + a, sums + a);
#if CAKE_SIMD_VW == 8
      if constexpr (4 * KB % 8 != 0) reduce4(acc + 4 * KB - 4, sums + 4 * KB - 4);
#endif
#pragma GCC unroll 4
      for (int t = 0; t < KB; ++t)
#pragma GCC unroll 4
        for (int r = 0; r < 4; ++r) out[(r0 + r) * ld + j + t] = sums[4 * t + r] * scale;
    }
    for (; j < n; ++j) {
      const T* k0 = keys(j);
      for (int r = 0; r < 4; ++r) {
        V acc = splat(0.0f);
        for (index_t x = 0; x < d; x += VW) acc = fma(load(qr + r * d + x), load_key(k0 + x), acc);
        out[(r0 + r) * ld + j] = hsum(acc) * scale;
      }
    }
  }
}
inline void decode_dots(const float* CAKE_RESTRICT q, index_t rows, index_t d,
                        const float* CAKE_RESTRICT k, index_t k_ld, index_t n, float scale,
                        float* CAKE_RESTRICT out, index_t ld) {
  decode_dots_t<float>(q, rows, d, strided_keys<float>{k, k_ld}, n, scale, out, ld);
}
inline void decode_dots_b(const float* CAKE_RESTRICT q, index_t rows, index_t d,
                          const bfloat16* CAKE_RESTRICT k, index_t k_ld, index_t n, float scale,
                          float* CAKE_RESTRICT out, index_t ld) {
  decode_dots_t<bfloat16>(q, rows, d, strided_keys<bfloat16>{k, k_ld}, n, scale, out, ld);
}
// The same with key j at k[j] (k[j] to k[j] + d readable for j < n).
inline void decode_dots_l(const float* CAKE_RESTRICT q, index_t rows, index_t d,
                          const float* const* k, index_t n, float scale, float* CAKE_RESTRICT out,
                          index_t ld) {
  decode_dots_t<float>(q, rows, d, listed_keys<float>{k}, n, scale, out, ld);
}
inline void decode_dots_lb(const float* CAKE_RESTRICT q, index_t rows, index_t d,
                           const bfloat16* const* k, index_t n, float scale,
                           float* CAKE_RESTRICT out, index_t ld) {
  decode_dots_t<bfloat16>(q, rows, d, listed_keys<bfloat16>{k}, n, scale, out, ld);
}
#if CAKE_SIMD_HAS_HALF
inline void decode_dots_h(const float* CAKE_RESTRICT q, index_t rows, index_t d,
                          const _Float16* CAKE_RESTRICT k, index_t k_ld, index_t n, float scale,
                          float* CAKE_RESTRICT out, index_t ld) {
  decode_dots_t<_Float16>(q, rows, d, strided_keys<_Float16>{k, k_ld}, n, scale, out, ld);
}
inline void decode_dots_lh(const float* CAKE_RESTRICT q, index_t rows, index_t d,
                           const _Float16* const* k, index_t n, float scale,
                           float* CAKE_RESTRICT out, index_t ld) {
  decode_dots_t<_Float16>(q, rows, d, listed_keys<_Float16>{k}, n, scale, out, ld);
}
#endif

// ---------------------------------------------------------------- window statistics
// The window rows of a GQA group in lanes: each key's scores against VW rows are one
// vector, so the row-wise softmax pieces (max, sums) are lane-wise and need no
// horizontal step, K is read in place (each key value broadcast, no transpose), and
// a key's probabilities over a head's rows sit side by side for the column pass.

// Rows per pair (the micro-tile's two row vectors), keys per micro-tile (2 * KT
// accumulators: 16 of AVX-512's 32 registers, 12 of AVX2's 16) and keys per tile (a
// multiple of both KT and VW; the scores of one pair and tile stay in L1).
inline constexpr index_t PR = 2 * VW;
inline constexpr index_t KT = VW == 16 ? 8 : 6;
inline constexpr index_t TK = VW == 16 ? 128 : 96;

// Scores of one pair against KT keys: acc[t][v] = q_v . k_t, q (d, PR): the pair's rows
// transposed; k_t = k + t * k_ld.
CAKE_ALWAYS_INLINE void pair_block(const float* CAKE_RESTRICT qt, index_t d,
                                   const float* CAKE_RESTRICT k, index_t k_ld, V (&acc)[KT][2]) {
#pragma GCC unroll 8
  for (index_t t = 0; t < KT; ++t) acc[t][0] = acc[t][1] = splat(0.0f);
  for (index_t x = 0; x < d; ++x) {
    const V q0 = load(qt + x * PR), q1 = load(qt + x * PR + VW);
#pragma GCC unroll 8
    for (index_t t = 0; t < KT; ++t) {
      const V kb = splat(k[t * k_ld + x]);
      acc[t][0] = fma(q0, kb, acc[t][0]);
      acc[t][1] = fma(q1, kb, acc[t][1]);
    }
  }
}

// One pair of row vectors against one tile of nk keys (1 <= nk <= TK) starting at key
// j0 of the prompt: P = S - w prefix keys; row i (lane's ri) sees keys j <= P + i
// (padding lanes carry a huge ri). qt: (d, PR); k: key rows of pitch k_ld; kpad: KT * d
// floats of scratch; buf: TK * PR floats of scratch; pf: pf_n key rows of pf_bytes
// each (the next tile's share of this pair) to fetch into cache a slice per micro-tile,
// so that reading K from memory overlaps with the products. For each lane, with m its largest
// visible scaled score in the tile: writes e = exp(scale * score - m) of the prefix
// keys (j < P) to e_v[t * e_ld] (e_v null: not stored), and m (-inf when the lane sees
// none of the tile), the sum of e over the visible keys, and over the prefix keys the
// sums of e and of e * (scale * score - m) to st[0..3][lane].
inline void pair_tile(const float* CAKE_RESTRICT qt, index_t d, const float* CAKE_RESTRICT k,
                      index_t k_ld, index_t nk, index_t j0, index_t P,
                      const float* CAKE_RESTRICT ri, float scale, float* CAKE_RESTRICT kpad,
                      float* CAKE_RESTRICT buf, float* e0, float* e1, index_t e_ld,
                      float* const (&st)[4], const char* const* pf, index_t pf_n,
                      index_t pf_bytes) {
  const V ninf = splat(-__builtin_inff());
  const V r0 = load(ri), r1 = load(ri + VW);
  V mx0 = ninf, mx1 = ninf;
  const index_t row_lines = (pf_bytes + 63) / 64, pf_lines = pf_n * row_lines;
  const index_t per_block = (pf_lines + TK / KT - 1) / (TK / KT);
  index_t pf_row = 0, pf_line = 0;  // the next line to fetch: of row pf_row
  for (index_t b = 0; b < nk; b += KT) {
    for (index_t l = 0; l < per_block && pf_row < pf_n; ++l) {
      __builtin_prefetch(pf[pf_row] + 64 * pf_line);
      if (++pf_line == row_lines) {
        pf_line = 0;
        ++pf_row;
      }
    }
    const index_t cnt = nk - b < KT ? nk - b : KT;
    const float* kb = k + b * k_ld;
    index_t kld = k_ld;
    if (cnt < KT) {  // the tile's last keys: a zero-padded copy, so the block stays whole
      for (index_t t = 0; t < KT; ++t)
        for (index_t x = 0; x < d; ++x) kpad[t * d + x] = t < cnt ? kb[t * k_ld + x] : 0.0f;
      kb = kpad;
      kld = d;
    }
    V acc[KT][2];
    pair_block(qt, d, kb, kld, acc);
    // first key of the block some row cannot see: j > P + i for i = 0
    const bool masked = j0 + b + cnt - 1 > P;
#pragma GCC unroll 8
    for (index_t t = 0; t < KT; ++t) {
      if (t >= cnt) break;
      V s0 = acc[t][0], s1 = acc[t][1];
      if (masked) {
        const V lim = splat(static_cast<float>(j0 + b + t - P));  // row i sees it iff i >= lim
        s0 = r0 < lim ? ninf : s0;
        s1 = r1 < lim ? ninf : s1;
      }
      store(buf + (b + t) * PR, s0);
      store(buf + (b + t) * PR + VW, s1);
      mx0 = vmax(mx0, s0);
      mx1 = vmax(mx1, s1);
    }
  }
  const V sc = splat(scale), zero = splat(0.0f);
  // x = (score - max) * scale: <= 0, and 0 at the max, however large the scores (an fma
  // of score * scale - m would leave the rounding error of m, huge for huge scores). A
  // lane that sees none of the tile gets m = -inf (st) and max 0 here (its e are 0).
  const V m0 = mx0 * sc, m1 = mx1 * sc;
  const V b0 = mx0 == ninf ? zero : mx0, b1 = mx1 == ninf ? zero : mx1;
  const index_t npre = P - j0 < nk ? (P - j0 > 0 ? P - j0 : 0) : nk;
#if CAKE_SIMD_VW == 8
  // One row vector at a time: with both at once AVX2's 16 registers do not hold the
  // polynomial's constants and the sums, which then round-trip through the stack. (A
  // vector is half a cache line: the caller lays e out so that e_ld = VW, the keys'
  // vectors one after another, so that the streaming stores fill whole lines.)
  float* const ev[2] = {e0, e1};
  const V bv[2] = {b0, b1}, mv[2] = {m0, m1}, xv[2] = {mx0, mx1};
  for (index_t v = 0; v < 2; ++v) {
    const float* bt = buf + v * VW;
    float* et = ev[v];
    const V bb = bv[v];
    V s = zero, q = zero;
    index_t t = 0;
    for (; t < npre; ++t) {
      const V x = (load(bt + t * PR) - bb) * sc;
      const V y = exp_neg(x);
      if (et) store_nt(et + t * e_ld, y);
      s += y;
      q = fma(y, x, q);
    }
    const V p = s;
    for (; t < nk; ++t) s += exp_neg((load(bt + t * PR) - bb) * sc);  // window keys (see below)
    store(st[0] + v * VW, xv[v] == ninf ? ninf : mv[v]);
    store(st[1] + v * VW, s);
    store(st[2] + v * VW, p);
    store(st[3] + v * VW, q);
  }
  _mm_sfence();
#else
  V s0 = zero, s1 = zero, p0 = zero, p1 = zero, q0 = zero, q1 = zero;
  index_t t = 0;
  for (; t < npre; ++t) {
    const V x0 = (load(buf + t * PR) - b0) * sc, x1 = (load(buf + t * PR + VW) - b1) * sc;
    const V y0 = exp_neg(x0), y1 = exp_neg(x1);
    if (e0) store_nt(e0 + t * e_ld, y0);
    if (e1) store_nt(e1 + t * e_ld, y1);
    s0 += y0;
    s1 += y1;
    q0 = fma(y0, x0, q0);
    q1 = fma(y1, x1, q1);
  }
  p0 = s0;
  p1 = s1;
  for (; t < nk; ++t) {  // window keys: masked scores are -inf, so e = 0
    s0 += exp_neg((load(buf + t * PR) - b0) * sc);
    s1 += exp_neg((load(buf + t * PR + VW) - b1) * sc);
  }
  _mm_sfence();
  store(st[0], mx0 == ninf ? ninf : m0);
  store(st[0] + VW, mx1 == ninf ? ninf : m1);
  store(st[1], s0);
  store(st[1] + VW, s1);
  store(st[2], p0);
  store(st[2] + VW, p1);
  store(st[3], q0);
  store(st[3] + VW, q1);
#endif
}

// Key rows widened to float: out[t * d + x] = k[t * k_ld + x] for t < nk.
template <class T>
CAKE_ALWAYS_INLINE void widen_rows_t(const T* CAKE_RESTRICT k, index_t k_ld, index_t nk, index_t d,
                                     float* CAKE_RESTRICT out) {
  for (index_t t = 0; t < nk; ++t) {
    index_t x = 0;
    for (; x + VW <= d; x += VW) store(out + t * d + x, load_key(k + t * k_ld + x));
    for (; x < d; ++x) out[t * d + x] = static_cast<float>(k[t * k_ld + x]);
  }
}
inline void widen_rows_b(const bfloat16* CAKE_RESTRICT k, index_t k_ld, index_t nk, index_t d,
                         float* CAKE_RESTRICT out) {
  widen_rows_t(k, k_ld, nk, d, out);
}
#if CAKE_SIMD_HAS_HALF
inline void widen_rows_h(const _Float16* CAKE_RESTRICT k, index_t k_ld, index_t nk, index_t d,
                         float* CAKE_RESTRICT out) {
  widen_rows_t(k, k_ld, nk, d, out);
}
#endif

typedef double VD __attribute__((vector_size(VW * 8)));

// Per lane (row) r < R (a multiple of VW) over the T tiles of st ([4][T][R], as
// pair_tile wrote them): the row's max M and sum L = sum_t tsum_t exp(m_t - M) (in
// double), then c[t][r] = exp(m_t - M) / L, the factor that turns the tile's e into
// probabilities (0 where the tile is masked), and out[0..2][r] = L, the sum of p over
// the prefix and the sum of p * (logit - M) over the prefix (what the entropy needs:
// ln p = logit - M - ln L).
inline void combine_rows(const float* CAKE_RESTRICT tmax, const float* CAKE_RESTRICT tsum,
                         const float* CAKE_RESTRICT tep, const float* CAKE_RESTRICT tes, index_t T,
                         index_t R, float* CAKE_RESTRICT c, double* CAKE_RESTRICT out) {
  const V ninf = splat(-__builtin_inff()), zero = splat(0.0f);
  for (index_t r = 0; r < R; r += VW) {
    V m = ninf;
    for (index_t t = 0; t < T; ++t) m = vmax(m, load(tmax + t * R + r));
    VD l = __builtin_convertvector(zero, VD);
    for (index_t t = 0; t < T; ++t) {
      const V f = exp_v(load(tmax + t * R + r) - m);  // 0 for a masked tile (m_t = -inf)
      store(c + t * R + r, f);
      l += __builtin_convertvector(load(tsum + t * R + r) * f, VD);
    }
    VD sp = __builtin_convertvector(zero, VD), sps = sp;
    const VD inv_l = 1.0 / l;
    for (index_t t = 0; t < T; ++t) {
      const V f = load(c + t * R + r);
      const VD ct = __builtin_convertvector(f, VD) * inv_l;
      const V dm = f > zero ? load(tmax + t * R + r) - m : zero;
      sp += ct * __builtin_convertvector(load(tep + t * R + r), VD);
      sps += ct * __builtin_convertvector(load(tes + t * R + r) + dm * load(tep + t * R + r), VD);
      store(c + t * R + r, __builtin_convertvector(ct, V));
    }
    for (index_t l2 = 0; l2 < VW; ++l2) {
      out[r + l2] = l[l2];
      out[R + r + l2] = sp[l2];
      out[2 * R + r + l2] = sps[l2];
    }
  }
}

// Sums of the lanes of VW vectors, one per output lane: a[s]'s lanes land in lane
// reduce_key(s) (the order the shuffle tree below leaves: output lane 4 q + r, q < VW / 4
// the 128-bit quarter, holds a[q + (VW / 4) r]).
CAKE_ALWAYS_INLINE constexpr index_t reduce_key(index_t s) {
  return 4 * (s % (VW / 4)) + s / (VW / 4);
}
CAKE_ALWAYS_INLINE V reduce_lanes(const V* a) {
#if CAKE_SIMD_VW == 16
  __m512 u[8];
#pragma GCC unroll 8
  for (int i = 0; i < 8; ++i) {  // halves: [x lo + x hi | y lo + y hi]
    const __m512 x = reinterpret_cast<__m512>(a[2 * i]), y = reinterpret_cast<__m512>(a[2 * i + 1]);
    u[i] = _mm512_add_ps(_mm512_maskz_shuffle_f32x4(0xffff, x, y, 0x44),
                         _mm512_maskz_shuffle_f32x4(0xffff, x, y, 0xee));
  }
  __m512 w4[4];
#pragma GCC unroll 4
  for (int i = 0; i < 4; ++i)  // 128-bit quarters: one vector per quarter
    w4[i] = _mm512_add_ps(_mm512_maskz_shuffle_f32x4(0xffff, u[2 * i], u[2 * i + 1], 0x88),
                          _mm512_maskz_shuffle_f32x4(0xffff, u[2 * i], u[2 * i + 1], 0xdd));
  __m512 w2[2];
#pragma GCC unroll 2
  for (int i = 0; i < 2; ++i)
    w2[i] = _mm512_add_ps(_mm512_maskz_shuffle_ps(0xffff, w4[2 * i], w4[2 * i + 1], 0x88),
                          _mm512_maskz_shuffle_ps(0xffff, w4[2 * i], w4[2 * i + 1], 0xdd));
  return reinterpret_cast<V>(_mm512_add_ps(_mm512_maskz_shuffle_ps(0xffff, w2[0], w2[1], 0x88),
                                           _mm512_maskz_shuffle_ps(0xffff, w2[0], w2[1], 0xdd)));
#else
  __m256 u[4];
#pragma GCC unroll 4
  for (int i = 0; i < 4; ++i) {
    const __m256 x = reinterpret_cast<__m256>(a[2 * i]), y = reinterpret_cast<__m256>(a[2 * i + 1]);
    u[i] = _mm256_add_ps(_mm256_permute2f128_ps(x, y, 0x20), _mm256_permute2f128_ps(x, y, 0x31));
  }
  __m256 w2[2];
#pragma GCC unroll 2
  for (int i = 0; i < 2; ++i)
    w2[i] = _mm256_add_ps(_mm256_shuffle_ps(u[2 * i], u[2 * i + 1], 0x88),
                          _mm256_shuffle_ps(u[2 * i], u[2 * i + 1], 0xdd));
  return reinterpret_cast<V>(
      _mm256_add_ps(_mm256_shuffle_ps(w2[0], w2[1], 0x88), _mm256_shuffle_ps(w2[0], w2[1], 0xdd)));
#endif
}

// Column statistics of one head over n prefix keys (n <= a multiple of VW the buffers
// hold): the head's rows in lanes, nv vectors per key (rows >= w padding), vector v of
// key j at e + j * key_ld + v * vec_ld (interleaved: key_ld = nv * VW, vec_ld = VW; or
// one plane per vector: key_ld = VW); c[t * c_ld + lane]: the rows' factors for the
// keys of tile t (keys t * TK ...; e starts at a tile boundary). Writes the mean over
// the w rows and (if var) the unbiased variance of each key's probabilities to mean[j]
// and m2[j] (up to the next multiple of VW); adds the variances of the n keys to
// *var_sum. NV: nv fixed at compile time (0: nv at run time).
template <index_t NV>
CAKE_ALWAYS_INLINE void head_columns_t(const float* CAKE_RESTRICT e, index_t nv_rt, index_t key_ld,
                                       index_t vec_ld, index_t w, const float* CAKE_RESTRICT c,
                                       index_t c_ld, index_t n, bool var, float* CAKE_RESTRICT mean,
                                       float* CAKE_RESTRICT m2, double* var_sum) {
  const index_t nv = NV > 0 ? NV : nv_rt;
  const V lane = iota(), zero = splat(0.0f);
  const V inv_w = splat(1.0f / static_cast<float>(w));
  const V inv_w1 = splat(1.0f / static_cast<float>(w - 1));
  const index_t last = nv - 1;  // the vector that may hold padding rows
  const VI keep = lane < splat(static_cast<float>(w - last * VW));
  const bool planes = vec_ld != VW;
  V vv = zero;
  for (index_t j = 0; j < n; j += VW) {
    const float* ct = c + (j / TK) * c_ld;
    const float* ej0 = e + j * key_ld;
    // the keys two steps on: streams from memory while these are reduced
    if (planes) {
      for (index_t v = 0; v < nv; ++v)
        for (index_t l = 0; l < VW * key_ld; l += 16)
          __builtin_prefetch(ej0 + v * vec_ld + 2 * VW * key_ld + l);
    } else {
      for (index_t l = 0; l < VW * key_ld; l += 16) __builtin_prefetch(ej0 + 2 * VW * key_ld + l);
    }
    V a[VW];
#pragma GCC unroll 16
    for (index_t s = 0; s < VW; ++s) {
      const float* ej = ej0 + reduce_key(s) * key_ld;
      V acc = zero;
      for (index_t v = 0; v < last; ++v) acc = fma(load(ej + v * vec_ld), load(ct + v * VW), acc);
      const V pl = load(ej + last * vec_ld) * load(ct + last * VW);
      a[s] = acc + (keep ? pl : zero);
    }
    const V mu = reduce_lanes(a) * inv_w;
    store(mean + j, mu);
    if (!var) continue;
#pragma GCC unroll 16
    for (index_t s = 0; s < VW; ++s) {
      const index_t key = reduce_key(s);
      const float* ej = ej0 + key * key_ld;
      const V mk = splat(mean[j + key]);
      V acc = zero;
      for (index_t v = 0; v < last; ++v) {
        const V dv = fma(load(ej + v * vec_ld), load(ct + v * VW), -mk);
        acc = fma(dv, dv, acc);
      }
      V dv = fma(load(ej + last * vec_ld), load(ct + last * VW), -mk);
      dv = keep ? dv : zero;
      a[s] = fma(dv, dv, acc);
    }
    const V q = reduce_lanes(a) * inv_w1;
    store(m2 + j, q);
    vv += lane < splat(static_cast<float>(n - j)) ? q : zero;
  }
  *var_sum += static_cast<double>(hsum(vv));
}
inline void head_columns_lanes(const float* CAKE_RESTRICT e, index_t nv, index_t key_ld,
                               index_t vec_ld, index_t w, const float* CAKE_RESTRICT c,
                               index_t c_ld, index_t n, bool var, float* CAKE_RESTRICT mean,
                               float* CAKE_RESTRICT m2, double* var_sum) {
  switch (nv) {  // a window of 32 rows: 2 vectors (AVX-512), 4 (AVX2)
    case 1:
      return head_columns_t<1>(e, nv, key_ld, vec_ld, w, c, c_ld, n, var, mean, m2, var_sum);
    case 2:
      return head_columns_t<2>(e, nv, key_ld, vec_ld, w, c, c_ld, n, var, mean, m2, var_sum);
    case 4:
      return head_columns_t<4>(e, nv, key_ld, vec_ld, w, c, c_ld, n, var, mean, m2, var_sum);
    default:
      return head_columns_t<0>(e, nv, key_ld, vec_ld, w, c, c_ld, n, var, mean, m2, var_sum);
  }
}

}  // namespace cake::detail::simd::CAKE_SIMD_NS
