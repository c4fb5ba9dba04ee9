// Policies: each models its concept, custom policies do too, hyperparameter checks.
#include <doctest/doctest.h>

#include <cake/cake.hpp>

#include <cmath>
#include <limits>
#include <span>

using cake::index_t;

namespace policy_test {

// A custom preference: entropy only.
struct EntropyPreference {
  float scale = 1.0f;
  static constexpr bool needs_entropy = true;
  static constexpr bool needs_variance = false;
  double operator()(const cake::LayerStats& s) const { return scale * s.entropy; }
  cake::status validate() const { return cake::status::success(); }
};

// A custom budget: everything to the last layer seen.
struct LastLayerBudget {
  void operator()(std::span<const float> prefs, index_t, index_t total, index_t ceiling,
                  std::span<index_t> out) const {
    for (std::size_t l = 0; l < prefs.size(); ++l) out[l] = 0;
    out[prefs.size() - 1] = std::min(total, ceiling);
  }
  cake::status validate() const { return cake::status::success(); }
};

// A custom indicator: variance only (H2O-like shift detector).
struct VarianceIndicator {
  int pool_kernel = 3;
  static constexpr bool needs_variance = true;
  CAKE_HOST_DEVICE float score(float, float var) const { return var; }
  cake::status validate() const { return cake::status::success(); }
};

// Not policies.
struct NoValidate {
  static constexpr bool needs_entropy = true;
  static constexpr bool needs_variance = true;
  double operator()(const cake::LayerStats&) const { return 1; }
};
struct NotTrivial {
  int pool_kernel = 5;
  static constexpr bool needs_variance = false;
  NotTrivial(const NotTrivial&) {}
  float score(float m, float) const { return m; }
  cake::status validate() const { return {}; }
};

}  // namespace policy_test

static_assert(cake::PreferencePolicy<cake::CakePreference>);
static_assert(cake::PreferencePolicy<cake::UniformPreference>);
static_assert(cake::BudgetPolicy<cake::ProportionalBudget>);
static_assert(cake::BudgetPolicy<cake::UniformBudget>);
static_assert(cake::BudgetPolicy<cake::PyramidBudget>);
static_assert(cake::IndicatorPolicy<cake::MeanVarianceIndicator>);
static_assert(cake::IndicatorPolicy<cake::WindowMeanIndicator>);

static_assert(cake::PreferencePolicy<policy_test::EntropyPreference>);
static_assert(cake::BudgetPolicy<policy_test::LastLayerBudget>);
static_assert(cake::IndicatorPolicy<policy_test::VarianceIndicator>);

static_assert(!cake::PreferencePolicy<policy_test::NoValidate>);
static_assert(!cake::IndicatorPolicy<policy_test::NotTrivial>);
static_assert(!cake::PreferencePolicy<cake::MeanVarianceIndicator>);
static_assert(!cake::IndicatorPolicy<cake::CakePreference>);
static_assert(!cake::BudgetPolicy<cake::CakePreference>);
static_assert(!cake::PreferencePolicy<int>);

// The statistics request follows the preference's needs.
static_assert(cake::StatsRequest::for_preference<cake::UniformPreference>().entropy == false);
static_assert(cake::StatsRequest::for_preference<cake::UniformPreference>().variance == false);
static_assert(cake::StatsRequest::for_preference<cake::CakePreference>().entropy == true);
static_assert(cake::StatsRequest::for_preference<policy_test::EntropyPreference>().variance ==
              false);

TEST_CASE("CakePreference: E^(1/tau1) * V^(1/tau2)") {
  SUBCASE("E=4, V=9, tau1=tau2=2 -> 2*3 = 6") {
    cake::CakePreference p{2.0f, 2.0f};
    CHECK(p(cake::LayerStats{4.0, 9.0}) == doctest::Approx(6.0).epsilon(1e-6));
  }
  SUBCASE("E=2, V=3, tau1=1, tau2=0.5 -> 2*9 = 18") {
    cake::CakePreference p{1.0f, 0.5f};
    CHECK(p(cake::LayerStats{2.0, 3.0}) == doctest::Approx(18.0).epsilon(1e-6));
  }
  SUBCASE("defaults tau1=tau2=1: E*V") {
    cake::CakePreference p{};
    CHECK(p.tau1 == 1.0f);
    CHECK(p.tau2 == 1.0f);
    CHECK(p(cake::LayerStats{940.0, 1.5}) == doctest::Approx(1410.0).epsilon(1e-6));
  }
  SUBCASE("E=8, V=16, tau1=3, tau2=4 -> 2*2 = 4") {
    cake::CakePreference p{3.0f, 4.0f};
    CHECK(p(cake::LayerStats{8.0, 16.0}) == doctest::Approx(4.0).epsilon(1e-6));
  }
  CHECK(cake::UniformPreference{}(cake::LayerStats{5.0, 7.0}) == 1.0);
  CHECK(cake::CakePreference{}.validate().ok());
}

TEST_CASE("indicator scores") {
  cake::MeanVarianceIndicator mv{};
  CHECK(mv.gamma == 200.0f);
  CHECK(mv.pool_kernel == 5);
  CHECK(mv.score(0.25f, 0.01f) == doctest::Approx(2.25));
  cake::MeanVarianceIndicator mv3{3.0f, 1};
  CHECK(mv3.score(0.5f, 0.25f) == doctest::Approx(1.25));
  cake::WindowMeanIndicator wm{};
  CHECK(wm.pool_kernel == 5);
  CHECK(wm.score(0.3f, 100.0f) == 0.3f);
}

TEST_CASE("policy validate(): ids of bad hyperparameters") {
  const float nan = std::numeric_limits<float>::quiet_NaN();
  const float inf = std::numeric_limits<float>::infinity();
  SUBCASE("tau1 <= 0") {
    auto s = cake::CakePreference{0.0f, 1.0f}.validate();
    CHECK(!s.ok());
    CHECK(!static_cast<bool>(s));
    CHECK(s.id == "cake.preference.tau1");
    CHECK(s.message.find("[cake.preference.tau1]") == 0);
    CHECK(s.message.find("got 0") != std::string::npos);
    CHECK(cake::CakePreference{-1.0f, 1.0f}.validate().id == "cake.preference.tau1");
  }
  SUBCASE("tau2 <= 0") {
    CHECK(cake::CakePreference{1.0f, 0.0f}.validate().id == "cake.preference.tau2");
    CHECK(cake::CakePreference{1.0f, -0.5f}.validate().id == "cake.preference.tau2");
  }
  SUBCASE("tau NaN / Inf") {
    CHECK(cake::CakePreference{nan, 1.0f}.validate().id == "cake.preference.tau1");
    CHECK(cake::CakePreference{1.0f, nan}.validate().id == "cake.preference.tau2");
    CHECK(cake::CakePreference{inf, 1.0f}.validate().id == "cake.preference.tau1");
  }
  SUBCASE("gamma < 0 or NaN") {
    auto s = cake::MeanVarianceIndicator{-1.0f, 5}.validate();
    CHECK(s.id == "cake.indicator.gamma");
    CHECK(s.message.find("got -1") != std::string::npos);
    CHECK(cake::MeanVarianceIndicator{nan, 5}.validate().id == "cake.indicator.gamma");
    CHECK(cake::MeanVarianceIndicator{0.0f, 5}.validate().ok());
  }
  SUBCASE("even or non-positive pool_kernel") {
    auto s = cake::MeanVarianceIndicator{200.0f, 4}.validate();
    CHECK(s.id == "cake.indicator.pool_kernel");
    CHECK(s.message.find("got 4") != std::string::npos);
    CHECK(cake::MeanVarianceIndicator{200.0f, 0}.validate().id == "cake.indicator.pool_kernel");
    CHECK(cake::WindowMeanIndicator{2}.validate().id == "cake.indicator.pool_kernel");
    CHECK(cake::WindowMeanIndicator{-3}.validate().id == "cake.indicator.pool_kernel");
    CHECK(cake::WindowMeanIndicator{1}.validate().ok());
    CHECK(cake::MeanVarianceIndicator{200.0f, 7}.validate().ok());
  }
  SUBCASE("pyramid beta < 1") {
    CHECK(cake::PyramidBudget{0.5f}.validate().id == "cake.budget.beta");
    CHECK(cake::PyramidBudget{nan}.validate().id == "cake.budget.beta");
    CHECK(cake::PyramidBudget{}.validate().ok());
  }
  SUBCASE("throw_if_error maps to invalid_argument with the id") {
    auto s = cake::CakePreference{0.0f, 1.0f}.validate();
    try {
      s.throw_if_error();
      FAIL("expected a throw");
    } catch (const cake::invalid_argument& e) {
      CHECK(e.id() == "cake.preference.tau1");
      CHECK(std::string(e.what()) == s.message);
    }
  }
}

TEST_CASE("custom policies drive a KvCache") {
  cake::CacheConfig cfg;
  cfg.layers = 2;
  cfg.batch = 1;
  cfg.q_heads = 2;
  cfg.kv_heads = 1;
  cfg.head_dim = 4;
  cfg.window = 2;
  cfg.cache_size = 6;
  cake::KvCache<policy_test::EntropyPreference, policy_test::LastLayerBudget,
                policy_test::VarianceIndicator>
      c(cfg);
  const index_t S = 20;
  std::vector<float> q(2 * 2 * 4), k(S * 4), v(S * 4);
  for (std::size_t i = 0; i < q.size(); ++i) q[i] = static_cast<float>((i * 7) % 5) - 2.0f;
  for (std::size_t i = 0; i < k.size(); ++i) k[i] = static_cast<float>((i * 3) % 7) * 0.3f - 1.0f;
  for (std::size_t i = 0; i < v.size(); ++i) v[i] = static_cast<float>(i);
  for (index_t l = 0; l < 2; ++l)
    c.prefill(l, cake::make_view(q.data(), std::array<index_t, 4>{1, 2, 2, 4}),
              cake::make_view(k.data(), std::array<index_t, 4>{1, 1, S, 4}),
              cake::make_view(v.data(), std::array<index_t, 4>{1, 1, S, 4}));
  // T = (6 - 2) * 2 = 8, all to the last layer.
  CHECK(c.budget(0) == 0);
  CHECK(c.budget(1) == 8);
  CHECK(c.tokens_held(0) == 2);
  CHECK(c.tokens_held(1) == 10);
  CHECK(c.preference(0) == doctest::Approx(c.stats(0).entropy));
}

namespace policy_test {
// A source of its own: keeps the oldest tokens (score -position), at prefill and
// while decoding, whatever the queries say.
struct OldestFirst {
  template <class Exec, class Q, class K, class O>
  void prefill_scores(const Exec&, const Q&, const K&, const O& out) const {
    for (index_t b = 0; b < out.extent(0); ++b)
      for (index_t g = 0; g < out.extent(1); ++g)
        for (index_t t = 0; t < out.extent(2); ++t) out(b, g, t) = -static_cast<float>(t);
  }
  template <class Exec, class Q, class K, class O>
  void decode_scores(const Exec& e, const Q& q, const K& k, const O& out) const {
    prefill_scores(e, q, k, out);  // slot order is position order in a position-order cache
  }
  cake::status validate() const { return cake::status::success(); }
};
// A budget that says it is head-wise but cannot split a layer: not a HeadwiseBudgetPolicy.
struct HalfHeadwise {
  static constexpr bool headwise = true;
  void operator()(std::span<const float>, index_t, index_t, index_t, std::span<index_t>) const {}
  cake::status validate() const { return cake::status::success(); }
};
}  // namespace policy_test

static_assert(cake::SourceIndicator<policy_test::OldestFirst>);
static_assert(cake::IndicatorPolicy<policy_test::OldestFirst>);
static_assert(cake::indicator_source_of<policy_test::OldestFirst> ==
              cake::indicator_source::custom);
static_assert(!cake::SourceIndicator<cake::MeanVarianceIndicator>);
static_assert(cake::HeadwiseBudgetPolicy<cake::HeadwiseBudget<>>);
static_assert(!cake::HeadwiseBudgetPolicy<cake::ProportionalBudget>);
static_assert(cake::BudgetPolicy<policy_test::HalfHeadwise>);
static_assert(!cake::HeadwiseBudgetPolicy<policy_test::HalfHeadwise>);

TEST_CASE("policies: a source indicator's hooks choose the tokens at prefill and decode") {
  cake::CacheConfig cfg;
  cfg.layers = 1;
  cfg.batch = 1;
  cfg.q_heads = 2;
  cfg.kv_heads = 1;
  cfg.head_dim = 4;
  cfg.window = 2;
  cfg.cache_size = 6;
  cake::KvCache<cake::UniformPreference, cake::UniformBudget, policy_test::OldestFirst> c(cfg);
  const index_t S = 20;
  std::vector<float> q(2 * 2 * 4, 0.5f), k(S * 4), v(S * 4);
  for (std::size_t i = 0; i < k.size(); ++i) k[i] = static_cast<float>((i * 5) % 11) * 0.2f;
  c.prefill(0, cake::make_view(q.data(), std::array<index_t, 4>{1, 2, 2, 4}),
            cake::make_view(k.data(), std::array<index_t, 4>{1, 1, S, 4}),
            cake::make_view(k.data(), std::array<index_t, 4>{1, 1, S, 4}));
  // Budget 4: positions 0..3, then the window 18, 19.
  auto pos = c.positions(0);
  REQUIRE(pos.extent(2) == 6);
  const std::vector<index_t> want{0, 1, 2, 3, 18, 19};
  for (index_t t = 0; t < 6; ++t) CHECK(pos(0, 0, t) == want[static_cast<std::size_t>(t)]);
  // A decoding step evicts the youngest candidate (18), keeping 0..3 and the window.
  std::vector<float> dq(2 * 4, 1.0f), dk(4, 0.1f);
  c.decode(0, cake::make_view(dq.data(), std::array<index_t, 3>{1, 2, 4}),
           cake::make_view(dk.data(), std::array<index_t, 3>{1, 1, 4}),
           cake::make_view(dk.data(), std::array<index_t, 3>{1, 1, 4}));
  pos = c.positions(0);
  const std::vector<index_t> after{0, 1, 2, 3, 19, 20};
  for (index_t t = 0; t < 6; ++t) CHECK(pos(0, 0, t) == after[static_cast<std::size_t>(t)]);
}
