// cake: the host SIMD micro-kernels (simd_body.hpp) compiled for AVX2 + FMA and for
// AVX-512 inside target regions, whatever flags the including file was compiled
// with, and the table the backends pick them from at run time (isa.hpp).
#pragma once

#include <cstdint>

#include "../../../config.hpp"
#include "../../../core/bfloat16.hpp"
#include "isa.hpp"

#if CAKE_HOST_X86_DISPATCH
#include <immintrin.h>
#endif

// IEEE half keys (_Float16) converted by F16C inside the kernels, where the compiler has the type.
#if CAKE_HOST_X86_DISPATCH && defined(__FLT16_MAX__)
#define CAKE_SIMD_HAS_HALF 1
#else
#define CAKE_SIMD_HAS_HALF 0
#endif

namespace cake::detail::simd {

// The candidates kernels::sort_desc takes: more than 128 (its network's first levels
// need 32 vectors of keys), at most 8192 (64 KiB of keys; the scalar counting sort is
// O(n) against the network's O(n log^2 n)).
inline constexpr index_t kSortMin = 129, kSortMax = 8192;

// The micro-kernels of one instruction set (see simd_body.hpp for each contract).
struct kernels {
  index_t vw;  // floats per vector
  void (*tile_softmax)(float*, index_t, index_t, index_t, float*, float*, float*, float*);
  void (*decode_dots)(const float*, index_t, index_t, const float*, index_t, index_t, float, float*,
                      index_t);
  void (*decode_dots_b)(const float*, index_t, index_t, const bfloat16*, index_t, index_t, float,
                        float*, index_t);
#if CAKE_SIMD_HAS_HALF
  void (*decode_dots_h)(const float*, index_t, index_t, const _Float16*, index_t, index_t, float,
                        float*, index_t);
#endif
  // The same with one pointer per key row (a slot map's or a block table's order).
  void (*decode_dots_l)(const float*, index_t, index_t, const float* const*, index_t, float, float*,
                        index_t);
  void (*decode_dots_lb)(const float*, index_t, index_t, const bfloat16* const*, index_t, float,
                         float*, index_t);
#if CAKE_SIMD_HAS_HALF
  void (*decode_dots_lh)(const float*, index_t, index_t, const _Float16* const*, index_t, float,
                         float*, index_t);
#endif
  // Window statistics with the rows in lanes (simd_body.hpp): rows per pair, keys per
  // micro-tile and keys per tile of pair_tile.
  index_t pr, kt, tk;
  void (*pair_tile)(const float*, index_t, const float*, index_t, index_t, index_t, index_t,
                    const float*, float, float*, float*, float*, float*, index_t,
                    float* const (&)[4], const char* const*, index_t, index_t);
  void (*combine_rows)(const float*, const float*, const float*, const float*, index_t, index_t,
                       float*, double*);
  void (*head_columns_lanes)(const float*, index_t, index_t, index_t, index_t, const float*,
                             index_t, index_t, bool, float*, float*, double*);
  void (*widen_rows_b)(const bfloat16*, index_t, index_t, index_t, float*);
#if CAKE_SIMD_HAS_HALF
  void (*widen_rows_h)(const _Float16*, index_t, index_t, index_t, float*);
#endif
  // A reference-order step's descending sort of kSortMin..kSortMax candidates
  // (simd_sort.hpp), or nullptr where the scalar sort is faster (AVX2: no 64-bit min).
  void (*sort_desc)(const float*, index_t, index_t, index_t*, std::uint32_t*);
};

}  // namespace cake::detail::simd

#if CAKE_HOST_X86_DISPATCH

#if defined(__clang__)
#pragma clang attribute push(__attribute__((target("avx2,fma,f16c"))), apply_to = function)
#else
#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c")
#endif
#define CAKE_SIMD_NS avx2
#define CAKE_SIMD_VW 8
#include "simd_body.hpp"
#undef CAKE_SIMD_NS
#undef CAKE_SIMD_VW
#if defined(__clang__)
#pragma clang attribute pop
#else
#pragma GCC pop_options
#endif

#if defined(__clang__)
#pragma clang attribute push(                                                    \
    __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,f16c"))), \
    apply_to = function)
#else
#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,f16c")
#endif
#define CAKE_SIMD_NS avx512
#define CAKE_SIMD_VW 16
#include "simd_body.hpp"
#include "simd_sort.hpp"
#undef CAKE_SIMD_NS
#undef CAKE_SIMD_VW
#if defined(__clang__)
#pragma clang attribute pop
#else
#pragma GCC pop_options
#endif

#endif  // CAKE_HOST_X86_DISPATCH

namespace cake::detail::simd {

// The kernels of the active path (active_host_isa()), or nullptr on the portable one.
inline const kernels* active_kernels() noexcept {
#if CAKE_HOST_X86_DISPATCH
  static constexpr kernels k2 {
    avx2::VW, &avx2::tile_softmax, &avx2::decode_dots, &avx2::decode_dots_b
#if CAKE_SIMD_HAS_HALF
        ,
        &avx2::decode_dots_h
#endif
        ,
        &avx2::decode_dots_l, &avx2::decode_dots_lb
#if CAKE_SIMD_HAS_HALF
        ,
        &avx2::decode_dots_lh
#endif
        ,
        avx2::PR, avx2::KT, avx2::TK, &avx2::pair_tile, &avx2::combine_rows,
        &avx2::head_columns_lanes, &avx2::widen_rows_b
#if CAKE_SIMD_HAS_HALF
        ,
        &avx2::widen_rows_h
#endif
        ,
        nullptr
  };
  static constexpr kernels k512 {
    avx512::VW, &avx512::tile_softmax, &avx512::decode_dots, &avx512::decode_dots_b
#if CAKE_SIMD_HAS_HALF
        ,
        &avx512::decode_dots_h
#endif
        ,
        &avx512::decode_dots_l, &avx512::decode_dots_lb
#if CAKE_SIMD_HAS_HALF
        ,
        &avx512::decode_dots_lh
#endif
        ,
        avx512::PR, avx512::KT, avx512::TK, &avx512::pair_tile, &avx512::combine_rows,
        &avx512::head_columns_lanes, &avx512::widen_rows_b
#if CAKE_SIMD_HAS_HALF
        ,
        &avx512::widen_rows_h
#endif
        ,
        &avx512::sort_desc
  };
  switch (active_host_isa()) {
    case host_isa::avx512:
      return &k512;
    case host_isa::avx2:
      return &k2;
    default:
      return nullptr;
  }
#else
  return nullptr;
#endif
}

}  // namespace cake::detail::simd
