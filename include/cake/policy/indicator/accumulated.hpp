// H2O's eviction (Zhang et al., 2023, "H2O: Heavy-Hitter Oracle"): a token is worth
// the attention it has accumulated from every query that saw it. At prefill the
// queries observed are the window rows (causal: a window token is summed over the
// rows at or after it); while decoding each new query adds its attention to every
// held token, and the cache keeps those sums per token (they travel with the
// token through every cut, reorder and eviction). Summing, not averaging, is H2O's:
// older tokens have had more chances to be attended.
#pragma once

#include "../../core/concepts.hpp"

namespace cake {

struct AccumulatedIndicator {
  // Sums are per token; pooling them along the keys is not H2O and is not offered.
  static constexpr int pool_kernel = 1;
  static constexpr bool needs_variance = false;
  static constexpr indicator_source source = indicator_source::accumulated;

  CAKE_HOST_DEVICE float score(float attention, float /*var*/) const { return attention; }
  status validate() const { return status::success(); }
};

}  // namespace cake
