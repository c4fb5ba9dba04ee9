// Host backend of cake::compact: one memcpy per moved token row. The front-end
// (algorithm/compact.hpp) has checked every index before this runs.
#pragma once

#include <cstring>

#include "../../detail/parallel.hpp"
#include "detail/threads.hpp"

namespace cake {

template <>
struct compact_backend<host_policy> {
  template <class T, class TI>
  static void run(const host_policy& policy, host_view<const T, 4> src, host_view<const TI, 3> keep,
                  host_view<T, 4> dst) {
    const index_t Hkv = src.extent(1), d = src.extent(3);
    const index_t m = keep.extent(2);
    // A gather runs at memory speed, which a second core barely raises: counted as one
    // multiply-add per byte moved, so under the default threshold up to 32 MiB of rows
    // stay on the calling thread.
    const host_policy exec =
        detail::for_work(policy, src.extent(0) * Hkv * m * d * static_cast<index_t>(sizeof(T)));
    // Kept rows are scattered over the source: prefetch a few rows ahead so the
    // gather streams instead of waiting on each row's first cache miss.
    constexpr index_t ahead = 8;
    const std::size_t row_bytes = static_cast<std::size_t>(d) * sizeof(T);
    detail::parallel_for(exec, src.extent(0) * Hkv, [&](index_t row, int) {
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

  // One task per (sequence, kv-head) row, walking it in ascending order, then zeroing
  // its padding slots [keep_lens(s, h), new_lens(s)): rows share no
  // slot (distinct heads, or distinct blocks), and within a row the read slot is never
  // one written earlier (keep ascending, see algorithm/compact.hpp).
  template <class T, class TI>
  static void run_paged(const host_policy& policy, host_view<T, 4> pool,
                        const block_table<host_space>& table, host_view<const TI, 3> keep,
                        host_view<const std::int32_t, 2> keep_lens) {
    const index_t Hkv = pool.extent(1), bs = pool.extent(2), d = pool.extent(3);
    const host_policy exec = detail::for_work(
        policy, table.num_seqs() * Hkv * keep.extent(2) * d * static_cast<index_t>(sizeof(T)));
    constexpr index_t ahead = 8;
    const std::size_t row_bytes = static_cast<std::size_t>(d) * sizeof(T);
    detail::parallel_for(exec, table.num_seqs() * Hkv, [&](index_t row, int) {
      const index_t s = row / Hkv, h = row % Hkv, first = table.indptr(s);
      const auto slot = [&](index_t t) -> T* {
        return &pool(table.ids(first + t / bs), h, t % bs, 0);
      };
      const index_t len = keep_lens(s, h);
      for (index_t t = 0; t < len; ++t) {
#if defined(__GNUC__) || defined(__clang__)
        // As the dense gather: the sources are scattered, prefetch a few ahead.
        if (t + ahead < len) {
          const char* next =
              reinterpret_cast<const char*>(slot(static_cast<index_t>(keep(s, h, t + ahead))));
          for (std::size_t off = 0; off < row_bytes; off += 64) __builtin_prefetch(next + off);
        }
#endif
        const auto j = static_cast<index_t>(keep(s, h, t));
        if (j != t) std::memcpy(slot(t), slot(j), row_bytes);
      }
      // Paged attention reads new_lens(s) = the longest head's length for every head:
      // a shorter head is padded with zero K/V, as the dense cache pads heads. Only this
      // row's slots, after its own reads.
      index_t longest = 0;
      for (index_t g = 0; g < Hkv; ++g)
        longest = keep_lens(s, g) > longest ? static_cast<index_t>(keep_lens(s, g)) : longest;
      for (index_t t = len; t < longest; ++t) std::memset(slot(t), 0, row_bytes);
    });
  }
};

}  // namespace cake
