// CAKE's layer preference: entropy^(1/tau1) * variance^(1/tau2) (spec section 2).
#pragma once

#include <cmath>

#include "../../core/concepts.hpp"

namespace cake {

struct CakePreference {
  float tau1 = 1.0f;  // temperature of the entropy (spatial dispersion)
  float tau2 = 1.0f;  // temperature of the variance (temporal shift)
  static constexpr bool needs_entropy = true;
  static constexpr bool needs_variance = true;

  double operator()(const LayerStats& s) const {
    // float32 as the reference computes it; the result is finite for finite stats.
    const float e = static_cast<float>(s.entropy);
    const float v = static_cast<float>(s.variance);
    return static_cast<double>(std::pow(e, 1.0f / tau1) * std::pow(v, 1.0f / tau2));
  }
  status validate() const {
    CAKE_CHECK(std::isfinite(tau1) && tau1 > 0, "cake.preference.tau1",
               "tau1 must be a finite value > 0, got ", tau1);
    CAKE_CHECK(std::isfinite(tau2) && tau2 > 0, "cake.preference.tau2",
               "tau2 must be a finite value > 0, got ", tau2);
    return status::success();
  }
};

}  // namespace cake
