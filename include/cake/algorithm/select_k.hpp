// cake::select_k: the k highest scores of every row, k taken from the output's
// extent (as RAFT's select_k does). Expected O(n) per row: a radix select, never
// a full sort. Ties at the threshold go to the lower index, so the kept set is
// deterministic and equal across backends.
#pragma once

#include <concepts>
#include <type_traits>

#include "../core/tensor_traits.hpp"
#include "../core/types.hpp"
#include "../error.hpp"
#include "../execution.hpp"

namespace cake {

template <class Exec>
struct select_k_backend {
  static_assert(sizeof(Exec) == 0,
                "cake: no select_k for this execution policy (include <cake/cake.cuh> for "
                "cake::cuda)");
};

template <class TS, class TI, class Space>
status validate_select_k(view<TS, 2, Space> scores, view<TI, 2, Space> out) {
  CAKE_CHECK(out.extent(0) == scores.extent(0), "cake.select_k.rows",
             "out must have rows = ", scores.extent(0), " (from scores), got ", out.extent(0));
  CAKE_CHECK(out.extent(1) <= scores.extent(1), "cake.select_k.k",
             "k (out extent 1) must be in [0, n = ", scores.extent(1), "], got ", out.extent(1));
  CAKE_CHECK(scores.extent(1) <= 1 || scores.stride(1) == 1, "cake.select_k.layout",
             "scores must have unit stride along each row, got stride ", scores.stride(1));
  CAKE_CHECK(out.extent(1) <= 1 || out.stride(1) == 1, "cake.select_k.layout",
             "out must have unit stride along each row, got stride ", out.stride(1));
  return status::success();
}

// scores: (rows, n) float; out: (rows, k) integer indices into each row.
// order: descending (by score, ties by index) or position (ascending index).
// NaN scores are not ordered; callers validate finiteness first (KvCache does).
template <class Exec, tensor_like Scores, tensor_like Out>
void select_k(const Exec& exec, Scores&& scores, Out&& out,
              select_order order = select_order::descending) {
  auto s = as_view(scores);
  auto o = as_view(out);
  require_space<Exec, decltype(s), decltype(o)>();
  static_assert(std::is_same_v<std::remove_const_t<typename decltype(s)::element_type>, float>,
                "cake::select_k: scores must be float");
  static_assert(std::is_integral_v<typename decltype(o)::element_type>,
                "cake::select_k: out must hold integer indices");
  validate_select_k(s, o).throw_if_error();
  select_k_backend<Exec>::run(exec, s, o, order);
}

}  // namespace cake

#include "../backend/host/select_k.hpp"
