// CAKE's "cake slicing": budgets proportional to preference, with the reference
// implementation's ceiling and rounding rules reproduced exactly (spec section 4).
#pragma once

#include <algorithm>
#include <cmath>
#include <span>
#include <vector>

#include "../../core/concepts.hpp"

namespace cake {

namespace detail {
// Steps 2-4 of the spec: clamp at the ceiling and hand the excess to layers below
// it, then move the rounding difference onto eligible layers, then cap again.
// Shared by every allocator that produces raw integer budgets.
inline void settle_budgets(std::span<index_t> b, index_t total, index_t ceiling) {
  const index_t m = static_cast<index_t>(b.size());
  if (m == 0) return;
  index_t excess = 0;
  for (auto& x : b) {
    if (x > ceiling) {
      excess += x - ceiling;
      x = ceiling;
    }
  }
  if (excess > 0) {
    index_t count = 0;
    for (auto x : b) count += (x < ceiling);
    if (count > 0) {
      const index_t share = excess / count, extra = excess % count;
      index_t seen = 0;
      for (auto& x : b) {
        if (x < ceiling) {
          x += share + (seen < extra ? 1 : 0);
          ++seen;
        }
      }
    }
  }
  index_t sum = 0;
  for (auto x : b) sum += x;
  const index_t diff = total - sum;
  if (diff != 0) {
    index_t count = 0;
    for (auto x : b) count += diff > 0 ? (x < ceiling) : (x > 1);
    if (count > 0) {
      const index_t mag = diff > 0 ? diff : -diff;
      const index_t share = mag / count, extra = mag % count;
      const index_t sign = diff > 0 ? 1 : -1;
      index_t seen = 0;
      for (auto& x : b) {
        if (diff > 0 ? (x < ceiling) : (x > 1)) {
          x += sign * (share + (seen < extra ? 1 : 0));
          ++seen;
        }
      }
    }
  }
  for (auto& x : b) x = std::min(x, ceiling);
}

inline status validate_allocation(std::span<const float> prefs, index_t num_layers, index_t total,
                                  index_t ceiling, std::span<index_t> out) {
  CAKE_CHECK(num_layers >= 1, "cake.budget.num_layers", "num_layers must be >= 1, got ",
             num_layers);
  CAKE_CHECK(!prefs.empty() && static_cast<index_t>(prefs.size()) <= num_layers,
             "cake.budget.preferences", "preferences must hold 1..num_layers = ", num_layers,
             " values, got ", prefs.size());
  CAKE_CHECK(out.size() >= prefs.size(), "cake.budget.out", "budgets must hold >= ", prefs.size(),
             " values, got ", out.size());
  CAKE_CHECK(total >= 0, "cake.budget.total", "total budget must be >= 0, got ", total);
  CAKE_CHECK(ceiling >= 0, "cake.budget.ceiling", "ceiling must be >= 0, got ", ceiling);
  for (std::size_t l = 0; l < prefs.size(); ++l)
    CAKE_CHECK(std::isfinite(prefs[l]) && prefs[l] >= 0, "cake.budget.preferences",
               "preference of layer ", l, " must be finite and >= 0, got ", prefs[l]);
  return status::success();
}
}  // namespace detail

struct ProportionalBudget {
  void operator()(std::span<const float> prefs, index_t /*num_layers*/, index_t total,
                  index_t ceiling, std::span<index_t> out) const {
    const std::size_t m = prefs.size();
    // float32 in the reference's order: raw = p / sum(p) * T, truncated toward zero.
    float sum = 0.0f;
    for (float p : prefs) sum += p;
    const float t = static_cast<float>(total);
    for (std::size_t l = 0; l < m; ++l) {
      // All-zero preferences (e.g. a single degenerate layer) share nothing by
      // proportion; the rounding step then spreads T evenly.
      const float raw = sum > 0.0f ? prefs[l] / sum * t : 0.0f;
      out[l] = static_cast<index_t>(raw);
    }
    detail::settle_budgets(out.first(m), total, ceiling);
  }
  status validate() const { return status::success(); }
};

}  // namespace cake
