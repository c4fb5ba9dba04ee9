// Budget allocation (spec section 4): hand-computed cases, an independent
// re-implementation of the spec's four steps, and properties over random inputs.
#include <doctest/doctest.h>

#include <cake/cake.hpp>

#include <cmath>
#include <limits>
#include <numeric>
#include <random>
#include <vector>

using cake::index_t;

namespace alloc_test {

inline std::vector<index_t> proportional(const std::vector<float>& p, index_t total,
                                         index_t ceiling, index_t num_layers = 0) {
  std::vector<index_t> out(p.size(), -99);
  cake::allocate_budgets(cake::ProportionalBudget{}, p,
                         num_layers ? num_layers : static_cast<index_t>(p.size()), total, ceiling,
                         out);
  return out;
}

inline index_t sum(const std::vector<index_t>& v) {
  return std::accumulate(v.begin(), v.end(), index_t{0});
}

// The spec's steps, written independently. `overshoot` reports whether step 2 or 3
// pushed a layer above the ceiling (step 4 then drops tokens and the sum falls short of T).
inline std::vector<index_t> spec_allocation(const std::vector<float>& p, index_t T, index_t R,
                                            bool& overshoot) {
  const std::size_t m = p.size();
  std::vector<index_t> b(m);
  float s = 0;
  for (float x : p) s += x;
  for (std::size_t l = 0; l < m; ++l)
    b[l] = s > 0 ? static_cast<index_t>(p[l] / s * static_cast<float>(T)) : 0;
  // step 2
  index_t excess = 0;
  for (auto& x : b)
    if (x > R) {
      excess += x - R;
      x = R;
    }
  if (excess > 0) {
    std::vector<std::size_t> below;
    for (std::size_t l = 0; l < m; ++l)
      if (b[l] < R) below.push_back(l);
    if (!below.empty()) {
      const index_t cnt = static_cast<index_t>(below.size());
      for (std::size_t i = 0; i < below.size(); ++i)
        b[below[i]] += excess / cnt + (static_cast<index_t>(i) < excess % cnt ? 1 : 0);
    }
  }
  // step 3
  const index_t diff = T - sum(b);
  std::vector<std::size_t> elig;
  for (std::size_t l = 0; l < m; ++l)
    if (diff > 0 ? b[l] < R : b[l] > 1) elig.push_back(l);
  if (diff != 0 && !elig.empty()) {
    const index_t cnt = static_cast<index_t>(elig.size()), mag = std::abs(diff);
    for (std::size_t i = 0; i < elig.size(); ++i)
      b[elig[i]] +=
          (diff > 0 ? 1 : -1) * (mag / cnt + (static_cast<index_t>(i) < mag % cnt ? 1 : 0));
  }
  overshoot = false;
  for (auto& x : b)
    if (x > R) {
      overshoot = true;
      x = R;
    }
  return b;
}

}  // namespace alloc_test

using namespace alloc_test;

TEST_CASE("ProportionalBudget: hand-computed cases") {
  SUBCASE("truncation and rounding: prefs {1,1,2}, T=10") {
    // raw = 2.5, 2.5, 5 -> 2, 2, 5 (sum 9); diff 1 goes to the first eligible layer.
    CHECK(proportional({1, 1, 2}, 10, 100) == std::vector<index_t>{3, 2, 5});
  }
  SUBCASE("rounding spreads diff / count, the first diff % count one more") {
    // prefs {1,1,1}, T=11: raw 3.67 -> 3,3,3 (sum 9), diff 2 -> {4,4,3}
    CHECK(proportional({1, 1, 1}, 11, 100) == std::vector<index_t>{4, 4, 3});
    // 7 equal layers, T=20: raw 2.857 -> 2 each (sum 14), diff 6 -> first 6 get one more
    CHECK(proportional({1, 1, 1, 1, 1, 1, 1}, 20, 100) ==
          std::vector<index_t>{3, 3, 3, 3, 3, 3, 2});
  }
  SUBCASE("ceiling: excess shared evenly") {
    // prefs {8,1,1}, T=30, R=10: raw 24,3,3; excess 14 -> {10, 3+7, 3+7}
    CHECK(proportional({8, 1, 1}, 30, 10) == std::vector<index_t>{10, 10, 10});
  }
  SUBCASE("ceiling: excess % count goes to the first layers below the ceiling, then rounding") {
    // prefs {10,1,1}, T=31, R=14: raw 25.83, 2.58, 2.58 -> 25, 2, 2 (sum 29)
    // excess 11 over 2 layers: 5 each, the first one more -> {14, 8, 7}
    // diff 2 over the 2 layers below R -> {14, 9, 8}
    CHECK(proportional({10, 1, 1}, 31, 14) == std::vector<index_t>{14, 9, 8});
  }
  SUBCASE("ceiling then rounding") {
    // prefs {10,1,1,1}, T=40, R=15: raw 30.77, 3.08 x3 -> 30, 3, 3, 3 (sum 39)
    // excess 15 over 3 layers -> {15, 8, 8, 8}; diff 1 -> {15, 9, 8, 8}
    CHECK(proportional({10, 1, 1, 1}, 40, 15) == std::vector<index_t>{15, 9, 8, 8});
  }
  SUBCASE("step 2 does not re-check the ceiling; step 4 caps (T > m*R)") {
    // prefs {100,100,1}, T=40, R=10: raw 19.9, 19.9, 0.199 -> 19, 19, 0
    // excess 18 all to layer 2 -> {10, 10, 18}; diff 2 has no eligible layer; cap -> {10,10,10}
    CHECK(proportional({100, 100, 1}, 40, 10) == std::vector<index_t>{10, 10, 10});
  }
  SUBCASE("the reference's overshoot: tokens lost to the final cap even with T <= m*R") {
    // prefs {12.5,12.5,9.5,0.5}, T=35, R=10: raw = p -> 12, 12, 9, 0 (sum 33)
    // excess 4 over layers 2, 3 -> {10, 10, 11, 2}; diff 2 -> layer 3 only -> {10,10,11,4}
    // cap -> {10, 10, 10, 4}: sum 34 < 35. This is the spec's (and reference's) behaviour.
    CHECK(proportional({12.5f, 12.5f, 9.5f, 0.5f}, 35, 10) == std::vector<index_t>{10, 10, 10, 4});
  }
  SUBCASE("single layer and zero preferences") {
    CHECK(proportional({3.0f}, 17, 100) == std::vector<index_t>{17});
    CHECK(proportional({3.0f}, 170, 100) == std::vector<index_t>{100});
    CHECK(proportional({0.0f, 0.0f, 0.0f}, 10, 100) == std::vector<index_t>{4, 3, 3});
    CHECK(proportional({1.0f, 0.0f}, 10, 100) == std::vector<index_t>{10, 0});
    CHECK(proportional({1.0f, 2.0f}, 0, 100) == std::vector<index_t>{0, 0});
  }
  SUBCASE("only the layers seen are written") {
    std::vector<index_t> out(5, -1);
    cake::allocate_budgets(cake::ProportionalBudget{}, std::vector<float>{1, 3}, 5, 40, 100, out);
    CHECK(out == std::vector<index_t>{10, 30, -1, -1, -1});
  }
}

TEST_CASE("ProportionalBudget: random preferences against the spec's steps, and properties") {
  std::mt19937 gen(20250101);
  std::uniform_int_distribution<int> layers(1, 40), kind(0, 3);
  std::uniform_real_distribution<float> uni(0.0f, 1.0f);
  std::lognormal_distribution<float> wide(0.0f, 3.0f);
  int capped_cases = 0, exact_capped_cases = 0, overshoot_cases = 0;
  for (int it = 0; it < 3000; ++it) {
    const int m = layers(gen);
    std::vector<float> p(static_cast<std::size_t>(m));
    const int k = kind(gen);
    for (auto& x : p) {
      x = k == 0   ? uni(gen)
          : k == 1 ? wide(gen)
          : k == 2 ? 1000.0f * uni(gen) + 1.0f
                   : (uni(gen) < 0.3f ? 0.0f : wide(gen));
    }
    const index_t R = std::uniform_int_distribution<index_t>(1, 500)(gen);
    // Mostly T <= m * R, sometimes above.
    const index_t T =
        std::uniform_int_distribution<index_t>(0, m * R + (it % 5 == 0 ? 3 * R : 0))(gen);
    CAPTURE(it);
    CAPTURE(m);
    CAPTURE(T);
    CAPTURE(R);
    const auto b = proportional(p, T, R, m + (it % 3));
    bool overshoot = false;
    const auto want = spec_allocation(p, T, R, overshoot);
    REQUIRE(b == want);
    for (auto x : b) {
      REQUIRE(x >= 0);
      REQUIRE(x <= R);
    }
    REQUIRE(sum(b) <= std::max(T, index_t{0}));
    bool capped = false;
    {
      float s = 0;
      for (float x : p) s += x;
      for (float x : p) capped |= s > 0 && static_cast<index_t>(x / s * static_cast<float>(T)) > R;
    }
    if (T <= m * R) {
      if (!overshoot) REQUIRE(sum(b) == T);
      overshoot_cases += overshoot;
      if (capped && !overshoot) ++exact_capped_cases;
    } else {
      REQUIRE(sum(b) <= m * R);  // the ceiling wins over T
    }
    capped_cases += capped;
  }
  // The properties were exercised where the ceiling binds, not only in the easy regime.
  CHECK(capped_cases > 100);
  CHECK(exact_capped_cases > 50);
  // The reference's overshoot (sum < T although T <= m * R) is common, not a corner case.
  CHECK(overshoot_cases > 0);
}

TEST_CASE("ProportionalBudget: sum is exactly T when the ceiling cannot bind") {
  std::mt19937 gen(77);
  std::lognormal_distribution<float> wide(0.0f, 2.0f);
  for (int it = 0; it < 2000; ++it) {
    const int m = 1 + it % 32;
    std::vector<float> p(static_cast<std::size_t>(m));
    for (auto& x : p) x = wide(gen);
    const index_t T = std::uniform_int_distribution<index_t>(0, 100000)(gen);
    const auto b = proportional(p, T, T);  // R = T: no layer can exceed it
    REQUIRE(sum(b) == T);
    for (auto x : b) REQUIRE(x >= 0);
  }
}

TEST_CASE("UniformBudget and PyramidBudget") {
  SUBCASE("uniform: T / L each, the first T % L one more, independent of preferences") {
    std::vector<index_t> out(4, -1);
    cake::allocate_budgets(cake::UniformBudget{}, std::vector<float>{5, 1, 0, 9}, 4, 42, 100, out);
    CHECK(out == std::vector<index_t>{11, 11, 10, 10});
    std::vector<index_t> part(4, -1);
    cake::allocate_budgets(cake::UniformBudget{}, std::vector<float>{5}, 4, 42, 100, part);
    CHECK(part == std::vector<index_t>{11, -1, -1, -1});
    // Ceiling binds: {11,11,10,10} with R = 10 -> excess 2 has no layer below R.
    cake::allocate_budgets(cake::UniformBudget{}, std::vector<float>{5, 1, 0, 9}, 4, 42, 10, out);
    CHECK(out == std::vector<index_t>{10, 10, 10, 10});
  }
  SUBCASE("pyramid: decreasing with depth, sums to T") {
    // L=4, T=100, beta=20: avg 25, low 1.25, high 48.75 -> 48, 32, 17, 1 (sum 98) -> +1 to the
    // first two
    std::vector<index_t> out(4, -1);
    cake::allocate_budgets(cake::PyramidBudget{}, std::vector<float>{1, 1, 1, 1}, 4, 100, 1000,
                           out);
    CHECK(out == std::vector<index_t>{49, 33, 17, 1});
    std::mt19937 gen(3);
    for (int it = 0; it < 300; ++it) {
      const index_t L = 1 + it % 40;
      const index_t T = std::uniform_int_distribution<index_t>(0, 50000)(gen);
      const float beta = std::uniform_real_distribution<float>(1.0f, 50.0f)(gen);
      std::vector<float> prefs(static_cast<std::size_t>(L), 1.0f);
      std::vector<index_t> b(static_cast<std::size_t>(L));
      cake::allocate_budgets(cake::PyramidBudget{beta}, prefs, L, T, T, b);
      CAPTURE(L);
      CAPTURE(T);
      CAPTURE(beta);
      REQUIRE(sum(b) == T);
      for (std::size_t l = 1; l < b.size(); ++l) REQUIRE(b[l] <= b[l - 1]);
      if (L > 1 && T >= 4 * L) CHECK(b.front() > b.back());
      // Independent of how many layers were seen: a prefix gives the same budgets.
      std::vector<index_t> first(static_cast<std::size_t>(L), -1);
      const std::size_t seen = static_cast<std::size_t>((L + 1) / 2);
      cake::allocate_budgets(cake::PyramidBudget{beta}, std::span<const float>(prefs.data(), seen),
                             L, T, T, first);
      for (std::size_t l = 0; l < seen; ++l) REQUIRE(first[l] == b[l]);
    }
  }
}

TEST_CASE("allocate_budgets: errors") {
  std::vector<index_t> out(3, 7);
  auto expect = [&](auto&& call, const char* id, std::initializer_list<const char*> parts) {
    try {
      call();
      FAIL("expected a throw for ", id);
    } catch (const cake::invalid_argument& e) {
      CHECK(e.id() == id);
      const std::string msg = e.what();
      CHECK(msg.find(std::string("[") + id + "]") == 0);
      for (const char* p : parts) {
        INFO(msg, " should contain ", p);
        CHECK(msg.find(p) != std::string::npos);
      }
    }
    CHECK(out == std::vector<index_t>{7, 7, 7});  // nothing written
  };
  const std::vector<float> ok{1, 2, 3};
  SUBCASE("negative total") {
    expect([&] { cake::allocate_budgets(cake::ProportionalBudget{}, ok, 3, -3, 10, out); },
           "cake.budget.total", {"got -3"});
  }
  SUBCASE("NaN preference") {
    const std::vector<float> bad{1, std::numeric_limits<float>::quiet_NaN(), 3};
    expect([&] { cake::allocate_budgets(cake::ProportionalBudget{}, bad, 3, 30, 10, out); },
           "cake.budget.preferences", {"layer 1", "nan"});
  }
  SUBCASE("negative or infinite preference") {
    const std::vector<float> neg{1, 2, -3};
    expect([&] { cake::allocate_budgets(cake::ProportionalBudget{}, neg, 3, 30, 10, out); },
           "cake.budget.preferences", {"layer 2", "-3"});
    const std::vector<float> inf{std::numeric_limits<float>::infinity(), 2, 3};
    expect([&] { cake::allocate_budgets(cake::ProportionalBudget{}, inf, 3, 30, 10, out); },
           "cake.budget.preferences", {"layer 0", "inf"});
  }
  SUBCASE("too few outputs") {
    const std::vector<float> four{1, 2, 3, 4};
    expect([&] { cake::allocate_budgets(cake::ProportionalBudget{}, four, 4, 30, 10, out); },
           "cake.budget.out", {">= 4", "got 3"});
  }
  SUBCASE("more preferences than layers, negative ceiling, bad beta") {
    expect([&] { cake::allocate_budgets(cake::ProportionalBudget{}, ok, 2, 30, 10, out); },
           "cake.budget.preferences", {"num_layers = 2", "got 3"});
    expect([&] { cake::allocate_budgets(cake::ProportionalBudget{}, ok, 3, 30, -1, out); },
           "cake.budget.ceiling", {"got -1"});
    expect([&] { cake::allocate_budgets(cake::PyramidBudget{0.5f}, ok, 3, 30, 10, out); },
           "cake.budget.beta", {"got 0.5"});
  }
}
