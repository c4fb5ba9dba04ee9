// SnapKV's indicator (Li et al., 2024): the mean attention a token receives from
// the observation window, pooled along the keys. No variance term, so the
// statistics pass skips it.
#pragma once

#include "../../core/concepts.hpp"

namespace cake {

struct WindowMeanIndicator {
  int pool_kernel = 5;
  static constexpr bool needs_variance = false;

  CAKE_HOST_DEVICE float score(float mean, float /*var*/) const { return mean; }
  status validate() const {
    CAKE_CHECK(pool_kernel >= 1 && pool_kernel % 2 == 1, "cake.indicator.pool_kernel",
               "pool_kernel must be odd and >= 1, got ", pool_kernel);
    return status::success();
  }
};

}  // namespace cake
