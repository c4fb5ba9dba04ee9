// Confidence intervals for the evaluation's proportions.
#pragma once

#include <algorithm>
#include <cmath>
#include <span>
#include <stdexcept>
#include <utility>

namespace llm {

// The Wilson score interval of a proportion p measured on n (possibly fractional,
// effective) trials at confidence z.
inline std::pair<double, double> wilson_p(double p, double n, double z = 1.959963984540054) {
  if (!(n > 0) || !(p >= 0 && p <= 1))
    throw std::invalid_argument("wilson_p: need 0 <= p <= 1, n > 0");
  const double z2 = z * z, d = 1.0 + z2 / n, c = (p + z2 / (2.0 * n)) / d;
  const double h = z / d * std::sqrt(p * (1.0 - p) / n + z2 / (4.0 * n * n));
  // At p = 0 (1) the bound is exactly 0 (1); rounding would leave it a hair off.
  return {p == 0 ? 0.0 : std::max(0.0, c - h), p == 1 ? 1.0 : std::min(1.0, c + h)};
}

// The Wilson score interval of k successes in n trials at confidence z (1.96: 95%).
// Unlike p +- z sqrt(p(1-p)/n) it stays inside [0, 1] and is not empty at k = 0 or n.
inline std::pair<double, double> wilson(long long k, long long n, double z = 1.959963984540054) {
  if (n <= 0 || k < 0 || k > n) throw std::invalid_argument("wilson: need 0 <= k <= n, n > 0");
  return wilson_p(static_cast<double>(k) / static_cast<double>(n), static_cast<double>(n), z);
}

// A proportion whose trials come in clusters that are not independent inside (the
// agreement steps of one prompt: a prompt whose cache lost the needle disagrees on
// many of its steps at once): successes k[i] of n[i] trials in cluster i. The
// between-cluster (ratio estimator) variance var = c / (c - 1) * sum (k_i - p n_i)^2 /
// N^2 over c clusters, N = sum n_i, gives the effective number of trials n_eff =
// p (1 - p) / var, at most N (a design effect below 1 is not credited), and the
// interval is Wilson's at p on n_eff trials. Steps that agree independently give about
// N; prompts that agree all-or-nothing give c - 1. Fewer than two clusters, or a
// spread of zero (every cluster at p, p = 0 or 1 among them), leave N.
struct clustered_interval {
  double p = 0, n_eff = 0;
  std::pair<double, double> ci{0, 0};
};
inline clustered_interval wilson_clustered(std::span<const long long> k,
                                           std::span<const long long> n,
                                           double z = 1.959963984540054) {
  if (k.size() != n.size() || k.empty())
    throw std::invalid_argument("wilson_clustered: need as many counts as cluster sizes, >= 1");
  double K = 0, N = 0;
  for (std::size_t i = 0; i < k.size(); ++i) {
    if (n[i] < 0 || k[i] < 0 || k[i] > n[i])
      throw std::invalid_argument("wilson_clustered: need 0 <= k[i] <= n[i] in every cluster");
    K += static_cast<double>(k[i]);
    N += static_cast<double>(n[i]);
  }
  if (!(N > 0)) throw std::invalid_argument("wilson_clustered: need some trials");
  clustered_interval out;
  out.p = K / N;
  out.n_eff = N;
  const double c = static_cast<double>(k.size());
  if (k.size() >= 2) {
    double ss = 0;
    for (std::size_t i = 0; i < k.size(); ++i) {
      const double r = static_cast<double>(k[i]) - out.p * static_cast<double>(n[i]);
      ss += r * r;
    }
    const double var = c / (c - 1) * ss / (N * N);
    if (var > 0) out.n_eff = std::min(N, out.p * (1 - out.p) / var);
  }
  out.ci = wilson_p(out.p, out.n_eff, z);
  return out;
}

// Whether two intervals are apart: the only "better" the evaluation reports.
inline bool apart(std::pair<double, double> a, std::pair<double, double> b) {
  return a.second < b.first || b.second < a.first;
}

}  // namespace llm
