// CAKE's eviction indicator: mean + gamma * unbiased variance of a token's
// attention over the window rows, average-pooled along the keys (spec section 3).
#pragma once

#include <cmath>

#include "../../core/concepts.hpp"

namespace cake {

struct MeanVarianceIndicator {
  float gamma = 200.0f;  // weight of the variance
  int pool_kernel = 5;   // average pool, stride 1, zero padding, divides by the kernel
  static constexpr bool needs_variance = true;

  CAKE_HOST_DEVICE float score(float mean, float var) const { return mean + gamma * var; }
  status validate() const {
    CAKE_CHECK(std::isfinite(gamma) && gamma >= 0, "cake.indicator.gamma",
               "gamma must be a finite value >= 0, got ", gamma);
    CAKE_CHECK(pool_kernel >= 1 && pool_kernel % 2 == 1, "cake.indicator.pool_kernel",
               "pool_kernel must be odd and >= 1, got ", pool_kernel);
    return status::success();
  }
};

}  // namespace cake
