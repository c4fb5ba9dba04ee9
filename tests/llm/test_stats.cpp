// The evaluation's confidence intervals against published values.
#include <doctest/doctest.h>

#include <vector>

#include "stats.hpp"

using llm::wilson;

TEST_CASE("Wilson 95% interval: textbook values, the edges, bad counts") {
  // Values of the closed form (p + z^2/2n +- z sqrt(p(1-p)/n + z^2/4n^2)) / (1 + z^2/n),
  // z = 1.959964, as tabulated e.g. for 0/10 (0, 0.2775) and 81/100 (0.7222, 0.8749).
  struct Case {
    long long k, n;
    double lo, hi;
  };
  for (const Case c : {Case{0, 10, 0.0, 0.277533}, Case{5, 10, 0.236593, 0.763407},
                       Case{10, 10, 0.722467, 1.0}, Case{81, 100, 0.722212, 0.874852},
                       Case{1, 3, 0.061492, 0.792340}, Case{1900, 2000, 0.939556, 0.958719}}) {
    CAPTURE(c.k);
    CAPTURE(c.n);
    const auto [lo, hi] = wilson(c.k, c.n);
    CHECK(lo == doctest::Approx(c.lo).epsilon(2e-6));
    CHECK(hi == doctest::Approx(c.hi).epsilon(2e-6));
    CHECK(lo <= static_cast<double>(c.k) / c.n);
    CHECK(hi >= static_cast<double>(c.k) / c.n);
  }
  // Symmetric: k of n failures mirror k of n successes.
  const auto a = wilson(3, 17), b = wilson(14, 17);
  CHECK(a.first == doctest::Approx(1.0 - b.second));
  CHECK(a.second == doctest::Approx(1.0 - b.first));
  // A wider z widens it; more trials narrow it.
  CHECK(wilson(5, 10, 2.576).first < wilson(5, 10).first);
  CHECK(wilson(50, 100).second - wilson(50, 100).first <
        wilson(5, 10).second - wilson(5, 10).first);
  CHECK_THROWS(wilson(0, 0));
  CHECK_THROWS(wilson(11, 10));
  CHECK_THROWS(wilson(-1, 10));

  // "Apart" only when the intervals do not overlap.
  CHECK(llm::apart(wilson(95, 100), wilson(60, 100)));
  CHECK_FALSE(llm::apart(wilson(6, 10), wilson(4, 10)));
}

TEST_CASE(
    "clustered Wilson interval: independent-looking clusters, all-or-nothing ones, bad counts") {
  using llm::wilson_clustered;
  // Every cluster at the same rate: no spread between clusters, so the steps count as
  // independent and the interval is Wilson's on all of them.
  {
    const std::vector<long long> k(20, 15), n(20, 20);
    const auto c = wilson_clustered(k, n);
    CHECK(c.p == doctest::Approx(0.75));
    CHECK(c.n_eff == doctest::Approx(400));
    CHECK(c.ci.first == doctest::Approx(wilson(300, 400).first));
    CHECK(c.ci.second == doctest::Approx(wilson(300, 400).second));
  }
  // Clusters that agree all-or-nothing: 15 of 20 prompts agree on all 10 steps. The
  // ratio-estimator variance is p (1 - p) / (c - 1), so n_eff = 19, and the interval is
  // Wilson's at 0.75 on 19 trials (0.5255, 0.8904), far wider than 150/200 as if independent.
  {
    std::vector<long long> k(20, 0), n(20, 10);
    for (int i = 0; i < 15; ++i) k[static_cast<std::size_t>(i)] = 10;
    const auto c = wilson_clustered(k, n);
    CHECK(c.p == doctest::Approx(0.75));
    CHECK(c.n_eff == doctest::Approx(19));
    CHECK(c.ci.first == doctest::Approx(0.52547).epsilon(1e-4));
    CHECK(c.ci.second == doctest::Approx(0.89044).epsilon(1e-4));
    CHECK(c.ci.first < wilson(150, 200).first - 0.1);
  }
  // In between: the spread of 3 prompts (9, 5, 7 of 10; p = 0.7): var = 3/2 * (4 + 4 + 0)
  // / 900 = 1/75, n_eff = 0.21 * 75 = 15.75 of 30 steps.
  {
    const std::vector<long long> k{9, 5, 7}, n{10, 10, 10};
    const auto c = wilson_clustered(k, n);
    CHECK(c.n_eff == doctest::Approx(15.75));
    CHECK(c.ci.first == doctest::Approx(llm::wilson_p(0.7, 15.75).first));
  }
  // Less spread than independent steps would show is not credited: n_eff stays N.
  {
    const std::vector<long long> k{5, 5, 5, 6}, n{10, 10, 10, 10};
    CHECK(wilson_clustered(k, n).n_eff == doctest::Approx(40));
  }
  // One cluster: nothing to estimate the spread from; Wilson on its steps.
  CHECK(wilson_clustered(std::vector<long long>{3}, std::vector<long long>{4}).ci.first ==
        doctest::Approx(wilson(3, 4).first));
  CHECK_THROWS(wilson_clustered(std::vector<long long>{}, std::vector<long long>{}));
  CHECK_THROWS(wilson_clustered(std::vector<long long>{1, 2}, std::vector<long long>{3}));
  CHECK_THROWS(wilson_clustered(std::vector<long long>{4}, std::vector<long long>{3}));
  CHECK_THROWS(wilson_clustered(std::vector<long long>{0, 0}, std::vector<long long>{0, 0}));
  CHECK_THROWS(llm::wilson_p(1.5, 10));
  CHECK_THROWS(llm::wilson_p(0.5, 0));
}
