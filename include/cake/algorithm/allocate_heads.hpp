// cake::allocate_heads: head-wise allocation inside one layer (Ada-KV). For each
// batch entry, the kv_heads rows share budget * kv_heads tokens: row g first gets its
// min(floor, available_g) best tokens, then the best remaining tokens of any row
// fill the rest (ties: lower row, then lower token index). Writes how many tokens
// each row keeps; which ones is then each row's own top-k.
//
// Host only: it runs where the budgets are decided, on scores the host can read.
#pragma once

#include <algorithm>
#include <span>
#include <tuple>
#include <vector>

#include "../core/tensor_traits.hpp"
#include "../error.hpp"
#include "../execution.hpp"

namespace cake {

namespace detail {
// scores(b, g, j) for j < available[b * Hkv + g] (all of the row when available is empty).
template <class SV, class LV>
void allocate_heads_rows(const SV& scores, std::span<const index_t> available, index_t budget,
                         index_t floor, LV& lengths) {
  const index_t B = scores.extent(0), Hkv = scores.extent(1), N = scores.extent(2);
  struct Cand {
    float score;
    index_t row, j;
  };
  const auto before = [](const Cand& a, const Cand& c) {  // higher score first, then lower ids
    return std::tie(c.score, a.row, a.j) < std::tie(a.score, c.row, c.j);
  };
  std::vector<Cand> row_c, rest;
  for (index_t b = 0; b < B; ++b) {
    rest.clear();
    index_t floors = 0;
    for (index_t g = 0; g < Hkv; ++g) {
      const index_t n = available.empty() ? N : available[static_cast<std::size_t>(b * Hkv + g)];
      row_c.clear();
      for (index_t j = 0; j < n; ++j) row_c.push_back({static_cast<float>(scores(b, g, j)), g, j});
      const index_t f = std::min(floor, n);
      std::nth_element(row_c.begin(), row_c.begin() + f, row_c.end(), before);
      rest.insert(rest.end(), row_c.begin() + f, row_c.end());
      lengths(b, g) = f;
      floors += f;
    }
    const index_t m =
        std::clamp<index_t>(budget * Hkv - floors, 0, static_cast<index_t>(rest.size()));
    std::nth_element(rest.begin(), rest.begin() + m, rest.end(), before);
    for (index_t i = 0; i < m; ++i) ++lengths(b, rest[static_cast<std::size_t>(i)].row);
  }
}
}  // namespace detail

// scores:  (batch, kv_heads, tokens) float, one score per candidate token
// lengths: (batch, kv_heads) integer, tokens each row keeps (they sum to
//          min(budget * kv_heads, batch entry's tokens) per batch entry)
template <tensor_like Scores, tensor_like Lengths>
void allocate_heads(const host_policy&, Scores&& scores, index_t budget, index_t floor,
                    Lengths&& lengths) {
  auto s = as_view(scores);
  auto l = as_view(lengths);
  require_space<host_policy, decltype(s), decltype(l)>();
  CAKE_EXPECTS(l.extent(0) == s.extent(0) && l.extent(1) == s.extent(1), "cake.heads.lengths",
               "lengths must be (batch, kv_heads) = (", s.extent(0), ", ", s.extent(1), "), got (",
               l.extent(0), ", ", l.extent(1), ")");
  CAKE_EXPECTS(budget >= 0 && budget <= s.extent(2), "cake.heads.budget",
               "budget must be in [0, tokens = ", s.extent(2), "], got ", budget);
  CAKE_EXPECTS(floor >= 0 && floor <= budget, "cake.heads.floor",
               "floor must be in [0, budget = ", budget, "], got ", floor);
  detail::allocate_heads_rows(s, {}, budget, floor, l);
}

}  // namespace cake
