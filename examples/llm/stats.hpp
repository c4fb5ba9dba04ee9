// Confidence intervals for the evaluation's proportions.
#pragma once

#include <algorithm>
#include <cmath>
#include <stdexcept>
#include <utility>

namespace llm {

// The Wilson score interval of k successes in n trials at confidence z (1.96: 95%).
// Unlike p +- z sqrt(p(1-p)/n) it stays inside [0, 1] and is not empty at k = 0 or n.
inline std::pair<double, double> wilson(long long k, long long n, double z = 1.959963984540054) {
  if (n <= 0 || k < 0 || k > n) throw std::invalid_argument("wilson: need 0 <= k <= n, n > 0");
  const double N = static_cast<double>(n), p = static_cast<double>(k) / N, z2 = z * z;
  const double d = 1.0 + z2 / N, c = (p + z2 / (2.0 * N)) / d;
  const double h = z / d * std::sqrt(p * (1.0 - p) / N + z2 / (4.0 * N * N));
  // At k = 0 (k = n) the bound is exactly 0 (1); rounding would leave it a hair off.
  return {k == 0 ? 0.0 : std::max(0.0, c - h), k == n ? 1.0 : std::min(1.0, c + h)};
}

// Whether two intervals are apart: the only "better" the evaluation reports.
inline bool apart(std::pair<double, double> a, std::pair<double, double> b) {
  return a.second < b.first || b.second < a.first;
}

}  // namespace llm
