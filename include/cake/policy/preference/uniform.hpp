// Every layer prefers the same: with a proportional budget this gives uniform
// budgets, and the statistics pass skips entropy and layer variance.
#pragma once

#include "../../core/concepts.hpp"

namespace cake {

struct UniformPreference {
  static constexpr bool needs_entropy = false;
  static constexpr bool needs_variance = false;
  double operator()(const LayerStats&) const { return 1.0; }
  status validate() const { return status::success(); }
};

}  // namespace cake
