// cake::compact: gather the kept token rows of K or V.
//   dst(b, g, t, :) = src(b, g, keep(b, g, t), :)
// In place (dst aliasing src) is allowed when every row of keep is strictly
// ascending, since then no row is overwritten before it is read.
#pragma once

#include <cstring>
#include <type_traits>

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

template <class T, class TI, class Space>
status validate_compact(view<const T, 4, Space> src, view<const TI, 3, Space> keep,
                        view<T, 4, Space> dst) {
  const index_t B = src.extent(0), Hkv = src.extent(1), d = src.extent(3);
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
  return status::success();
}

// src: (batch, kv_heads, tokens, head_dim); keep: (batch, kv_heads, m) indices into tokens;
// dst: (batch, kv_heads, m, head_dim).
template <class Exec, tensor_like Src, tensor_like Keep, tensor_like Dst>
void compact(const Exec& exec, Src&& src, Keep&& keep, Dst&& dst) {
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
  compact_backend<Exec>::run(exec, s, k, d);
}

}  // namespace cake

#include "../backend/host/compact.hpp"
