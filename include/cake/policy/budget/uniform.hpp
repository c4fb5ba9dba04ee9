// Every layer gets T / L (the first T mod L one more), capped at the ceiling with
// the excess redistributed as the proportional allocator does. Independent of the
// preferences and of how many layers have been seen, so cascading never shrinks it.
#pragma once

#include "proportional.hpp"

namespace cake {

struct UniformBudget {
  void operator()(std::span<const float> prefs, index_t num_layers, index_t total, index_t ceiling,
                  std::span<index_t> out) const {
    std::vector<index_t> all(static_cast<std::size_t>(num_layers));
    for (index_t l = 0; l < num_layers; ++l)
      all[static_cast<std::size_t>(l)] = total / num_layers + (l < total % num_layers ? 1 : 0);
    detail::settle_budgets(all, total, ceiling);
    for (std::size_t l = 0; l < prefs.size(); ++l) out[l] = all[l];
  }
  status validate() const { return status::success(); }
};

}  // namespace cake
