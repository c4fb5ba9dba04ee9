// The evaluation's confidence intervals against published values.
#include <doctest/doctest.h>

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
