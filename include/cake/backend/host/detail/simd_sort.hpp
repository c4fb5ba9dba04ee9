// cake: the AVX-512 sort of a reference-order decoding step (layer_store::
// sort_descending): one row's candidate scores, descending, ties to the lower index.
// No include guard: simd.hpp includes this file once, inside its AVX-512 target region.
//
// Why a sorting network: a step sorts about 1K scores per row, and the scalar counting
// sort's insertion pass and bucket walk branch on the data (perf: about 7 us a row on
// Zen 4 inside a step, where the scores' order changes completely from one step to the
// next). A bitonic network branches on nothing: each score becomes one 64-bit key
// (its descending order-preserving bits above its index, so that every key is distinct
// and ascending keys are select_k's order), and AVX-512 orders 8 keys per instruction
// (unsigned 64-bit min and max).
//
// Layout: the P keys (a power of two, padded with ~0) lie in V = P / 8 vectors with
// element e = lane * V + v in lane `lane` of vector v: the low index bits select the
// vector, so all but the stages over the top three bits compare whole vectors; those
// few permute lanes. Stages over the low bits run on groups of vectors held in
// registers, several per pass over the keys (13 passes at P = 1024, not 55).

namespace cake::detail::simd::avx512 {
namespace bitonic {

using U = __m512i;
typedef std::uint64_t word __attribute__((may_alias));
CAKE_ALWAYS_INLINE U load(const word* p) { return _mm512_loadu_si512(p); }
CAKE_ALWAYS_INLINE void store(word* p, U v) { _mm512_storeu_si512(p, v); }

// x, y = min, max (ascending) or max, min
CAKE_ALWAYS_INLINE void exchange(U& x, U& y, bool ascending) {
  const U lo = _mm512_maskz_min_epu64(0xff, x, y), hi = _mm512_maskz_max_epu64(0xff, x, y);
  x = ascending ? lo : hi;
  y = ascending ? hi : lo;
}
// the same with a direction per lane: lanes in `ascending` take min, max
CAKE_ALWAYS_INLINE void exchange(U& x, U& y, __mmask8 ascending) {
  const U lo = _mm512_maskz_min_epu64(0xff, x, y), hi = _mm512_maskz_max_epu64(0xff, x, y);
  x = _mm512_mask_blend_epi64(ascending, hi, lo);
  y = _mm512_mask_blend_epi64(ascending, lo, hi);
}
// Lanes l and l ^ jl (jl = 1, 2, 4) of v swapped. (The zero-masked forms of the
// intrinsics throughout: GCC 12 warns that the plain ones read an undefined vector.)
CAKE_ALWAYS_INLINE U partner(U v, index_t jl) {
  return jl == 4   ? _mm512_maskz_shuffle_i64x2(0xff, v, v, 0x4E)
         : jl == 2 ? _mm512_maskz_permutex_epi64(0xff, v, 0x4E)
                   : _mm512_maskz_shuffle_epi32(0xffff, v, static_cast<_MM_PERM_ENUM>(0x4E));
}
// The lanes whose elements lie where bit k of the index is clear, for k >= V (a lane
// bit): the ascending half of level k.
inline __mmask8 ascending_lanes(index_t k, index_t V) {
  unsigned m = 0;
  for (index_t l = 0; l < 8; ++l)
    if ((l & (k / V)) == 0) m |= 1u << l;
  return static_cast<__mmask8>(m);
}
// The lanes that take the minimum in stage j >= V (a lane bit) of level k: the lower
// of each pair in an ascending half, the upper in a descending one.
inline __mmask8 min_lanes(index_t j, index_t k, index_t V) {
  unsigned m = 0;
  for (index_t l = 0; l < 8; ++l)
    if (((l & (j / V)) == 0) == ((l & (k / V)) == 0)) m |= 1u << l;
  return static_cast<__mmask8>(m);
}

// Levels k = 2 .. 16 on each 16 consecutive vectors, in registers (needs V >= 32, so
// that bit 4 of the index selects vectors).
inline void first_levels(word* a, index_t V) {
  for (index_t t = 0; t < V; t += 16) {
    U r[16];
#pragma GCC unroll 16
    for (int g = 0; g < 16; ++g) r[g] = load(a + 8 * (t + g));
#pragma GCC unroll 4
    for (int k = 2; k <= 16; k <<= 1)
#pragma GCC unroll 4
      for (int dist = k / 2; dist >= 1; dist >>= 1)
#pragma GCC unroll 16
        for (int g = 0; g < 16; ++g)
          if ((g & dist) == 0) exchange(r[g], r[(g + dist) & 15], ((t + g) & k) == 0);
#pragma GCC unroll 16
    for (int g = 0; g < 16; ++g) store(a + 8 * (t + g), r[g]);
  }
}

// One pass of level k: first `ni` stages inside each vector (lane distance jl[s], lanes
// lo[s] take the minimum), then NST stages across vectors at index distances jtop,
// jtop / 2, ..., each group of 2^NST vectors in registers.
template <int NST>
void level_pass(word* a, index_t V, index_t k, index_t jtop, int ni, const index_t* jl,
                const __mmask8* lo) {
  constexpr int GS = 1 << NST;
  const index_t jlow = jtop >> (NST - 1);
  const bool by_lane = k >= V;
  const __mmask8 lanes_up = by_lane ? ascending_lanes(k, V) : __mmask8{0};
  for (index_t i = 0; i < V; i += 2 * jtop)
    for (index_t t = i; t < i + jlow; ++t) {
      U r[GS];
#pragma GCC unroll 16
      for (int g = 0; g < GS; ++g) r[g] = load(a + 8 * (t + g * jlow));
      for (int s = 0; s < ni; ++s)
#pragma GCC unroll 16
        for (int g = 0; g < GS; ++g) {
          const U p = partner(r[g], jl[s]);
          r[g] = _mm512_mask_blend_epi64(lo[s], _mm512_maskz_max_epu64(0xff, r[g], p),
                                         _mm512_maskz_min_epu64(0xff, r[g], p));
        }
      // below V, the group's direction is bit k of its vectors' index (all alike: k >
      // 2 * jtop - jlow, the group's span)
      const bool up = (t & k) == 0;
#pragma GCC unroll 4
      for (int s = 0; s < NST; ++s) {
        const int dist = GS >> (s + 1);
#pragma GCC unroll 16
        for (int g = 0; g < GS; ++g)
          if ((g & dist) == 0) {
            if (by_lane)
              exchange(r[g], r[(g + dist) & (GS - 1)], lanes_up);
            else
              exchange(r[g], r[(g + dist) & (GS - 1)], up);
          }
      }
#pragma GCC unroll 16
      for (int g = 0; g < GS; ++g) store(a + 8 * (t + g * jlow), r[g]);
    }
}

// a[0, P) ascending in the layout above (P a power of two, 256 <= P).
inline void sort(word* a, index_t P) {
  const index_t V = P / 8;
  first_levels(a, V);
  for (index_t k = 32; k <= P; k <<= 1) {
    index_t jl[3];
    __mmask8 lo[3];
    int ni = 0;  // stages over lane bits (j >= V) come first
    for (index_t j = k >> 1; j >= V; j >>= 1, ++ni) {
      jl[ni] = j / V;
      lo[ni] = min_lanes(j, k, V);
    }
    index_t j = std::min(k >> 1, V / 2);
    int c = static_cast<int>(std::bit_width(static_cast<std::uint64_t>(j)));  // stages j .. 1
    while (c > 0) {
      const int n = c - 4 * ((c - 1) / 4);  // the first pass takes the remainder
      switch (n) {
        case 1:
          level_pass<1>(a, V, k, j, ni, jl, lo);
          break;
        case 2:
          level_pass<2>(a, V, k, j, ni, jl, lo);
          break;
        case 3:
          level_pass<3>(a, V, k, j, ni, jl, lo);
          break;
        default:
          level_pass<4>(a, V, k, j, ni, jl, lo);
          break;
      }
      ni = 0;
      j >>= n;
      c -= n;
    }
  }
}

}  // namespace bitonic

// o[0, keep): the indices of the keep highest of x[0, cand) by descending score, ties
// to the lower index, -0 and +0 alike (layer_store::sort_descending's result).
// scratch: 2 * bit_ceil(cand) + 16 32-bit words. kSortMin <= cand <= kSortMax (simd.hpp).
inline void sort_desc(const float* CAKE_RESTRICT x, index_t cand, index_t keep,
                      index_t* CAKE_RESTRICT o, std::uint32_t* scratch) {
  const index_t P = static_cast<index_t>(std::bit_ceil(static_cast<std::uint64_t>(cand)));
  // (the scratch is 32-bit words: its 64-bit keys are read and written through a
  // may_alias type or the intrinsics only)
  auto* a = reinterpret_cast<bitonic::word*>((reinterpret_cast<std::uintptr_t>(scratch) + 63) &
                                             ~std::uintptr_t{63});
  // Keys: ~ordered_bits(x) << 32 | index, 8 at a time; the order-preserving bits of a
  // float: -0 as +0, then negatives' bits inverted, the sign bit set on the others.
  // Padding past cand: all ones, after every key.
  const __m256i sign = _mm256_set1_epi32(static_cast<int>(0x80000000u)),
                ones = _mm256_set1_epi32(-1);
  for (index_t j = 0; j < P; j += 8) {
    const auto live =
        static_cast<__mmask8>(j + 8 <= cand ? 0xffu : (j < cand ? (1u << (cand - j)) - 1u : 0u));
    __m256i u = _mm256_maskz_loadu_epi32(live, x + (j < cand ? j : 0));
    u = _mm256_mask_mov_epi32(u, _mm256_cmpeq_epi32_mask(u, sign), _mm256_setzero_si256());
    const __m256i ordered =
        _mm256_mask_xor_epi32(_mm256_or_si256(u, sign), _mm256_test_epi32_mask(u, sign), u, ones);
    const __m512i key = _mm512_or_si512(
        _mm512_maskz_slli_epi64(
            0xff, _mm512_maskz_cvtepu32_epi64(0xff, _mm256_xor_si256(ordered, ones)), 32),
        _mm512_add_epi64(_mm512_set_epi64(7, 6, 5, 4, 3, 2, 1, 0), _mm512_set1_epi64(j)));
    bitonic::store(a + j, _mm512_mask_mov_epi64(_mm512_set1_epi64(-1), live, key));
  }
  bitonic::sort(a, P);
  // sorted element t lies in lane t / V of vector t % V
  const index_t V = P / 8;
  for (index_t l = 0, t = 0; l < 8 && t < keep; ++l)
    for (index_t v = 0; v < V && t < keep; ++v, ++t)
      o[t] = static_cast<index_t>(static_cast<std::uint32_t>(a[8 * v + l]));
}

}  // namespace cake::detail::simd::avx512
