// Host backend of cake::compact: one memcpy (or memmove, in place) per kept row.
#pragma once

#include <cstring>

#include "../../detail/parallel.hpp"

namespace cake {

template <>
struct compact_backend<host_policy> {
  template <class T, class TI>
  static void run(const host_policy& exec, host_view<const T, 4> src, host_view<const TI, 3> keep,
                  host_view<T, 4> dst) {
    const index_t B = src.extent(0), Hkv = src.extent(1), S = src.extent(2), d = src.extent(3);
    const index_t m = keep.extent(2);
    // Range and aliasing checks before anything is written (strong guarantee).
    const bool aliased =
        static_cast<const void*>(src.data_handle()) == static_cast<const void*>(dst.data_handle());
    for (index_t b = 0; b < B; ++b)
      for (index_t g = 0; g < Hkv; ++g)
        for (index_t t = 0; t < m; ++t) {
          const index_t j = static_cast<index_t>(keep(b, g, t));
          CAKE_EXPECTS(j >= 0 && j < S, "cake.compact.keep", "keep(", b, ", ", g, ", ", t,
                       ") must be in [0, ", S, "), got ", j);
          CAKE_EXPECTS(!aliased || t == 0 || j > static_cast<index_t>(keep(b, g, t - 1)),
                       "cake.compact.keep",
                       "in-place compaction needs strictly ascending keep rows; keep(", b, ", ", g,
                       ", ", t, ") = ", j, " follows ", keep(b, g, t - 1));
        }
    // Kept rows are scattered over the source: prefetch a few rows ahead so the
    // gather streams instead of waiting on each row's first cache miss.
    constexpr index_t ahead = 8;
    const std::size_t row_bytes = static_cast<std::size_t>(d) * sizeof(T);
    detail::parallel_for(exec, B * Hkv, [&](index_t row, int) {
      const index_t b = row / Hkv, g = row % Hkv;
      for (index_t t = 0; t < m; ++t) {
#if defined(__GNUC__) || defined(__clang__)
        if (t + ahead < m) {
          const char* next = reinterpret_cast<const char*>(
              &src(b, g, static_cast<index_t>(keep(b, g, t + ahead)), 0));
          for (std::size_t off = 0; off < row_bytes; off += 64) __builtin_prefetch(next + off);
        }
#endif
        const T* from = &src(b, g, static_cast<index_t>(keep(b, g, t)), 0);
        T* to = &dst(b, g, t, 0);
        // Distinct token rows never overlap, so a row is copied (not moved) when it moves.
        if (from != to) std::memcpy(to, from, row_bytes);
      }
    });
  }
};

}  // namespace cake
