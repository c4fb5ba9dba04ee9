// PyramidKV's allocation (Cai et al., 2024): budgets decrease linearly with depth,
// the last layer getting total / (beta * L) and the first 2 * total / L minus that,
// so that they sum to the total. Independent of preferences.
#pragma once

#include <cmath>

#include "proportional.hpp"

namespace cake {

struct PyramidBudget {
  float beta = 20.0f;  // the top layer's budget is total / (beta * L)

  void operator()(std::span<const float> prefs, index_t num_layers, index_t total, index_t ceiling,
                  std::span<index_t> out) const {
    const double L = static_cast<double>(num_layers);
    const double avg = static_cast<double>(total) / L;
    const double low = avg / beta;
    const double high = 2.0 * avg - low;
    std::vector<index_t> all(static_cast<std::size_t>(num_layers));
    for (index_t l = 0; l < num_layers; ++l) {
      const double frac = num_layers > 1 ? static_cast<double>(l) / (L - 1.0) : 0.0;
      all[static_cast<std::size_t>(l)] = static_cast<index_t>(high - (high - low) * frac);
    }
    detail::settle_budgets(all, total, ceiling);
    for (std::size_t l = 0; l < prefs.size(); ++l) out[l] = all[l];
  }
  status validate() const {
    CAKE_CHECK(std::isfinite(beta) && beta >= 1.0f, "cake.budget.beta",
               "beta must be a finite value >= 1, got ", beta);
    return status::success();
  }
};

}  // namespace cake
