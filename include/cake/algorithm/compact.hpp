// cake::compact: gather the kept token rows of K or V.
//
// Dense:  dst(b, g, t, :) = src(b, g, keep(b, g, t), :)
//   In place (dst aliasing src) is allowed when every row of keep is strictly
//   ascending, since then keep(b, g, t) >= t: the row read at step t lies at or after
//   the row written, and every row written before it lies before it, so nothing is
//   overwritten before it is read.
//
// Paged (an engine's block pool, core/paged.hpp), always in place:
//   token t of row (s, h) <- token keep(s, h, t) of the same row, t < keep_lens(s, h)
//   token t of row (s, h) <- zero K/V, keep_lens(s, h) <= t < max over h' of keep_lens(s, h')
//   The same argument holds through the block table: it maps the tokens of a sequence
//   one to one onto distinct slots (ids are unique, validate_block_table), so the
//   ascending walk of each row reads every slot before any write reaches it, and rows
//   of different sequences or heads never share a slot. paged_plan (core/paged.hpp)
//   says, per sequence, the new length and how many trailing blocks are free.
//
// Bad indices (out of range, or not strictly ascending where the gather is in place)
// are an error `[cake.compact.keep]` naming the row, the position and the value, and
// nothing is written, on every backend. Host-resident indices are checked by the call,
// which throws. On CUDA the indices live on the device, and checking them at the call
// would cost a synchronisation: pass a cake::cuda_index_guard (cake.cuh) and the call
// checks them on the device before its gather, writes nothing if any is bad, and the
// guard's throw_if_error() throws the same error when the engine chooses to
// synchronise. Without a guard CUDA trusts its indices (the cache passes select_k's
// output); an out-of-range one is skipped, never dereferenced.
#pragma once

#include <cstdint>
#include <cstring>
#include <type_traits>
#include <utility>

#include "../core/paged.hpp"
#include "../core/tensor_traits.hpp"
#include "../error.hpp"
#include "../execution.hpp"

namespace cake {

template <class Exec>
struct compact_backend {
  static_assert(sizeof(Exec) == 0,
                "cake: no compact for this execution policy (include <cake/cake.cuh> for "
                "cake::cuda)");
};

namespace detail {
// keep(b, g, t) for t < len must lie in [0, bound) and, when `ascending`, increase
// strictly. Runs on host-resident indices only.
template <class TI>
status check_keep_row(host_view<const TI, 3> keep, index_t b, index_t g, index_t len, index_t bound,
                      bool ascending, const char* bound_name) {
  for (index_t t = 0; t < len; ++t) {
    const auto j = static_cast<long long>(keep(b, g, t));
    CAKE_CHECK(j >= 0 && j < bound, "cake.compact.keep", "keep(", b, ", ", g, ", ", t,
               ") must be in [0, ", bound_name, bound, "), got ", j);
    CAKE_CHECK(!ascending || t == 0 || j > static_cast<long long>(keep(b, g, t - 1)),
               "cake.compact.keep", "in-place compaction needs strictly ascending keep rows; keep(",
               b, ", ", g, ", ", t, ") = ", j, " follows ",
               static_cast<long long>(keep(b, g, t - 1)));
  }
  return status::success();
}

// The bytes [lo, hi) a strided view can touch; lo == hi when it is empty. Pointer
// arithmetic only, so it serves device views as well.
template <class V>
std::pair<std::uintptr_t, std::uintptr_t> byte_span(const V& v) {
  using E = typename V::element_type;
  const auto lo = reinterpret_cast<std::uintptr_t>(v.data_handle());
  std::int64_t last = 0;
  for (std::size_t r = 0; r < V::rank(); ++r) {
    if (v.extent(r) == 0) return {lo, lo};
    last += static_cast<std::int64_t>(v.extent(r) - 1) * static_cast<std::int64_t>(v.stride(r));
  }
  return {lo, lo + static_cast<std::uintptr_t>(last + 1) * sizeof(E)};
}
}  // namespace detail

template <class T, class TI, class Space>
status validate_compact(view<const T, 4, Space> src, view<const TI, 3, Space> keep,
                        view<T, 4, Space> dst) {
  const index_t B = src.extent(0), Hkv = src.extent(1), S = src.extent(2), d = src.extent(3);
  CAKE_CHECK(keep.extent(0) == B && keep.extent(1) == Hkv, "cake.compact.keep",
             "keep must be (batch, kv_heads, m) with batch = ", B, ", kv_heads = ", Hkv, ", got (",
             keep.extent(0), ", ", keep.extent(1), ", ", keep.extent(2), ")");
  CAKE_CHECK(dst.extent(0) == B && dst.extent(1) == Hkv && dst.extent(2) == keep.extent(2) &&
                 dst.extent(3) == d,
             "cake.compact.dst", "dst must be (", B, ", ", Hkv, ", ", keep.extent(2), ", ", d,
             "), got (", dst.extent(0), ", ", dst.extent(1), ", ", dst.extent(2), ", ",
             dst.extent(3), ")");
  CAKE_CHECK(inner_contiguous(src) && inner_contiguous(dst), "cake.compact.layout",
             "src and dst must have unit stride along head_dim");
  // In place is safe only when each dst row is the first m token rows of the same src
  // row (same start, same strides): then the ascending walk of a row reads before it
  // writes, and rows never meet. Any other overlap lets one row's writes reach another
  // row's unread tokens (and races across threads or CUDA blocks).
  const auto [s_lo, s_hi] = detail::byte_span(src);
  const auto [d_lo, d_hi] = detail::byte_span(dst);
  const bool aliased = s_lo < d_hi && d_lo < s_hi;
  CAKE_CHECK(!aliased || (s_lo == d_lo && src.stride(0) == dst.stride(0) &&
                          src.stride(1) == dst.stride(1) && src.stride(2) == dst.stride(2)),
             "cake.compact.layout",
             "dst overlaps src, so it must be src's first m tokens of each row (same data "
             "pointer and strides); src strides (",
             src.stride(0), ", ", src.stride(1), ", ", src.stride(2), ", ", src.stride(3),
             "), dst strides (", dst.stride(0), ", ", dst.stride(1), ", ", dst.stride(2), ", ",
             dst.stride(3), "), dst starts ", static_cast<std::int64_t>(d_lo - s_lo),
             " bytes after src");
  if constexpr (std::is_same_v<Space, host_space>) {
    for (index_t b = 0; b < B; ++b)
      for (index_t g = 0; g < Hkv; ++g)
        CAKE_TRY(detail::check_keep_row(keep, b, g, keep.extent(2), S, aliased, ""));
  }
  return status::success();
}

// Paged: pool (num_blocks, kv_heads, block_size, head_dim); keep (num_seqs, kv_heads, m),
// row (s, h) read up to keep_lens(s, h) <= m; keep_lens (num_seqs, kv_heads).
// Device-resident tables and indices are checked for shape only (see the header).
template <class T, class TI, class Space>
status validate_compact(view<T, 4, Space> pool, const block_table<Space>& table,
                        view<const TI, 3, Space> keep,
                        view<const std::int32_t, 2, Space> keep_lens) {
  const index_t N = pool.extent(0), Hkv = pool.extent(1), bs = pool.extent(2);
  const index_t n = table.num_seqs(), m = keep.extent(2);
  CAKE_CHECK(bs >= 1, "cake.compact.pool", "pool must be (num_blocks, kv_heads, block_size >= 1, ",
             "head_dim), got block_size = ", bs);
  CAKE_CHECK(inner_contiguous(pool), "cake.compact.layout",
             "pool must have unit stride along head_dim");
  CAKE_TRY(validate_pool_strides(pool, "cake.compact.pool", "pool"));
  CAKE_CHECK(table.indptr.extent(0) == n + 1, "cake.compact.indptr",
             "indptr must have num_seqs + 1 = ", n + 1, " entries, got ", table.indptr.extent(0));
  CAKE_CHECK(keep.extent(0) == n && keep.extent(1) == Hkv, "cake.compact.keep",
             "keep must be (num_seqs = ", n, ", kv_heads = ", Hkv, ", m), got (", keep.extent(0),
             ", ", keep.extent(1), ", ", m, ")");
  CAKE_CHECK(keep_lens.extent(0) == n && keep_lens.extent(1) == Hkv, "cake.compact.keep_lens",
             "keep_lens must be (num_seqs = ", n, ", kv_heads = ", Hkv, "), got (",
             keep_lens.extent(0), ", ", keep_lens.extent(1), ")");
  if constexpr (std::is_same_v<Space, host_space>) {
    CAKE_TRY(validate_block_table(table, N, bs));
    for (index_t s = 0; s < n; ++s)
      for (index_t h = 0; h < Hkv; ++h) {
        const index_t len = keep_lens(s, h), S = table.seq_lens(s);
        CAKE_CHECK(len >= 0 && len <= m && len <= S, "cake.compact.keep_lens", "keep_lens(", s,
                   ", ", h, ") must be in [0, min(m = ", m, ", seq_lens(", s, ") = ", S, ")], got ",
                   len);
        CAKE_TRY(detail::check_keep_row(keep, s, h, len, S, true, "seq_lens = "));
      }
  }
  return status::success();
}

namespace detail {
// The front-ends' bodies; `guard` is empty, or the CUDA guard record handed to the
// backend (backend/cuda/compact.cuh), so guarded and plain calls share every check.
template <class Exec, tensor_like Src, tensor_like Keep, tensor_like Dst, class... Guard>
void compact_dense(const Exec& exec, Src&& src, Keep&& keep, Dst&& dst, Guard... guard) {
  auto d = as_view(dst);
  using T = typename decltype(d)::element_type;
  using Space = typename std::remove_cvref_t<Exec>::memory_space;
  auto s0 = as_view(src);
  auto k0 = as_view(keep);
  require_space<Exec, decltype(s0), decltype(k0), decltype(d)>();
  using TI = std::remove_const_t<typename decltype(k0)::element_type>;
  static_assert(std::is_same_v<std::remove_const_t<typename decltype(s0)::element_type>, T>,
                "cake::compact: src and dst must have the same element type");
  view<const T, 4, Space> s(s0.data_handle(), s0.mapping());
  view<const TI, 3, Space> k(k0.data_handle(), k0.mapping());
  validate_compact(s, k, d).throw_if_error();
  compact_backend<Exec>::run(exec, s, k, d, guard...);
}

// A paged call's keep (num_seqs, kv_heads, m) and keep_lens (num_seqs, kv_heads) as
// const views, keep_lens required to hold std::int32_t.
template <class Space, class KeepView, class LensView>
auto paged_keep(const KeepView& keep, const LensView& keep_lens) {
  using TI = std::remove_const_t<typename KeepView::element_type>;
  static_assert(std::is_same_v<std::remove_const_t<typename LensView::element_type>, std::int32_t>,
                "cake::compact: keep_lens must hold std::int32_t");
  return std::pair{
      view<const TI, 3, Space>(keep.data_handle(), keep.mapping()),
      view<const std::int32_t, 2, Space>(keep_lens.data_handle(), keep_lens.mapping())};
}

template <class Exec, tensor_like Pool, class Space, tensor_like Keep, tensor_like Lens,
          class... Guard>
void compact_paged(const Exec& exec, Pool&& pool, const block_table<Space>& table, Keep&& keep,
                   Lens&& keep_lens, Guard... guard) {
  auto p = as_view(pool);
  auto k0 = as_view(keep);
  auto l0 = as_view(keep_lens);
  require_space<Exec, decltype(p), decltype(k0), decltype(l0), decltype(table.ids)>();
  using T = typename decltype(p)::element_type;
  static_assert(!std::is_const_v<T>,
                "cake::compact: the pool is written in place; pass a "
                "non-const view");
  const auto [k, l] = paged_keep<Space>(k0, l0);
  validate_compact(p, table, k, l).throw_if_error();
  compact_backend<Exec>::run_paged(exec, p, table, k, l, guard...);
}

// K and V pools of one layer: the same (num_blocks, kv_heads, block_size, head_dim), and
// disjoint (compacting one block twice would move its tokens twice).
template <class KP, class VP>
status check_kv_pools(const KP& k, const VP& v) {
  CAKE_CHECK(k.extent(0) == v.extent(0) && k.extent(1) == v.extent(1) &&
                 k.extent(2) == v.extent(2) && k.extent(3) == v.extent(3),
             "cake.compact.pool", "k_pool and v_pool must have the same (num_blocks, kv_heads, ",
             "block_size, head_dim), got (", k.extent(0), ", ", k.extent(1), ", ", k.extent(2),
             ", ", k.extent(3), ") and (", v.extent(0), ", ", v.extent(1), ", ", v.extent(2), ", ",
             v.extent(3), ")");
  CAKE_CHECK(inner_contiguous(v), "cake.compact.layout",
             "v_pool must have unit stride along head_dim");
  CAKE_TRY(validate_pool_strides(k, "cake.compact.pool", "k_pool"));
  CAKE_TRY(validate_pool_strides(v, "cake.compact.pool", "v_pool"));
  const auto [k_lo, k_hi] = byte_span(k);
  const auto [v_lo, v_hi] = byte_span(v);
  CAKE_CHECK(!(k_lo < v_hi && v_lo < k_hi), "cake.compact.pool",
             "k_pool and v_pool must not overlap");
  return status::success();
}

template <class Exec, tensor_like KPool, tensor_like VPool, class Space, tensor_like Keep,
          tensor_like Lens, class... Guard>
void compact_paged_kv(const Exec& exec, KPool&& k_pool, VPool&& v_pool,
                      const block_table<Space>& table, Keep&& keep, Lens&& keep_lens,
                      Guard... guard) {
  auto kp = as_view(k_pool);
  auto vp = as_view(v_pool);
  auto k0 = as_view(keep);
  auto l0 = as_view(keep_lens);
  require_space<Exec, decltype(kp), decltype(vp), decltype(k0), decltype(l0),
                decltype(table.ids)>();
  using T = typename decltype(kp)::element_type;
  static_assert(!std::is_const_v<T> && std::is_same_v<typename decltype(vp)::element_type, T>,
                "cake::compact: k_pool and v_pool are written in place; pass non-const views of "
                "one element type");
  const auto [k, l] = paged_keep<Space>(k0, l0);
  view<T, 4, Space> v(vp.data_handle(), vp.mapping());
  validate_compact(kp, table, k, l).throw_if_error();
  check_kv_pools(kp, v).throw_if_error();
  compact_backend<Exec>::run_paged(exec, kp, table, k, l, guard...);
  compact_backend<Exec>::run_paged(exec, v, table, k, l, guard...);
}
}  // namespace detail

// src: (batch, kv_heads, tokens, head_dim); keep: (batch, kv_heads, m) indices into tokens;
// dst: (batch, kv_heads, m, head_dim).
template <class Exec, tensor_like Src, tensor_like Keep, tensor_like Dst>
void compact(const Exec& exec, Src&& src, Keep&& keep, Dst&& dst) {
  detail::compact_dense(exec, src, keep, dst);
}

// Paged, in place: pool (num_blocks, kv_heads, block_size, head_dim) of one layer's K or
// V; table: the sequences' blocks and current lengths; keep (num_seqs, kv_heads, m)
// ascending token indices, row (s, h) read up to keep_lens(s, h). For a layer's K and V
// prefer the call below that takes both: two calls leave K compacted when V's throws.
template <class Exec, tensor_like Pool, class Space, tensor_like Keep, tensor_like Lens>
void compact(const Exec& exec, Pool&& pool, const block_table<Space>& table, Keep&& keep,
             Lens&& keep_lens) {
  detail::compact_paged(exec, pool, table, keep, keep_lens);
}

// Paged, in place, a layer's K and V together: every check (both pools, the table, the
// indices) passes before either pool moves, so bad input leaves both unchanged. The
// pools must have equal extents; block_size is their extent(2).
template <class Exec, tensor_like KPool, tensor_like VPool, class Space, tensor_like Keep,
          tensor_like Lens>
void compact(const Exec& exec, KPool&& k_pool, VPool&& v_pool, const block_table<Space>& table,
             Keep&& keep, Lens&& keep_lens) {
  detail::compact_paged_kv(exec, k_pool, v_pool, table, keep, keep_lens);
}

// As above, and the plan (paged_plan, block_size from the pools): new_lens and freed
// (num_seqs) are validated with everything else before anything is written. The table
// and keep_lens are read on the host, so this form takes host-resident ones; on CUDA,
// plan with paged_plan on the host copies the engine keeps.
template <class Exec, tensor_like KPool, tensor_like VPool, tensor_like Keep, tensor_like Lens>
void compact(const Exec& exec, KPool&& k_pool, VPool&& v_pool, const block_table<host_space>& table,
             Keep&& keep, Lens&& keep_lens, host_view<std::int32_t, 1> new_lens,
             host_view<std::int32_t, 1> freed) {
  auto kp = as_view(k_pool);
  auto l0 = as_view(keep_lens);
  host_view<const std::int32_t, 2> l(l0.data_handle(), l0.mapping());
  validate_paged_plan(table, l, kp.extent(2), new_lens, freed).throw_if_error();
  compact(exec, kp, v_pool, table, keep, keep_lens);  // validates everything before moving
  paged_plan(table, l, kp.extent(2), new_lens, freed);
}

}  // namespace cake

#include "../backend/host/compact.hpp"
