// A custom policy: write a value type that models a cake concept, and plug it in.
//
// Here: an indicator that scores tokens by their peak attention instead of the
// mean (approximated from the window statistics as mean + 3 standard deviations),
// and a budget policy that gives every layer at least a floor before slicing the
// rest proportionally. Both compose with CAKE's preference in one KvCache.
#include <cake/cake.hpp>

#include <cmath>
#include <cstdio>
#include <random>
#include <vector>

// Indicator: score(mean, var) per key, pooled and GQA-averaged by the library.
struct PeakIndicator {
  int pool_kernel = 3;
  static constexpr bool needs_variance = true;
  CAKE_HOST_DEVICE float score(float mean, float var) const { return mean + 3.0f * std::sqrt(var); }
  cake::status validate() const {
    CAKE_CHECK(pool_kernel >= 1 && pool_kernel % 2 == 1, "example.peak.pool_kernel",
               "pool_kernel must be odd and >= 1, got ", pool_kernel);
    return cake::status::success();
  }
};
static_assert(cake::IndicatorPolicy<PeakIndicator>);

// Budget: each seen layer gets `floor` tokens first; the rest of the total is
// sliced in proportion to preference with the reference's rounding rules.
struct FloorThenProportional {
  cake::index_t floor = 8;
  void operator()(std::span<const float> prefs, cake::index_t num_layers, cake::index_t total,
                  cake::index_t ceiling, std::span<cake::index_t> out) const {
    const auto m = static_cast<cake::index_t>(prefs.size());
    const cake::index_t base = std::min(floor, total / std::max<cake::index_t>(m, 1));
    cake::ProportionalBudget{}(prefs, num_layers, total - base * m, ceiling - base, out);
    for (cake::index_t l = 0; l < m; ++l) out[static_cast<std::size_t>(l)] += base;
  }
  cake::status validate() const {
    CAKE_CHECK(floor >= 0, "example.floor", "floor must be >= 0, got ", floor);
    return cake::status::success();
  }
};
static_assert(cake::BudgetPolicy<FloorThenProportional>);

int main() {
  using cake::index_t;
  cake::CacheConfig cfg{.layers = 3,
                        .batch = 1,
                        .q_heads = 4,
                        .kv_heads = 2,
                        .head_dim = 32,
                        .window = 8,
                        .cache_size = 40};
  cake::KvCache<cake::CakePreference, FloorThenProportional, PeakIndicator> cache(
      cfg, cake::CakePreference{1.0f, 1.0f}, FloorThenProportional{8}, PeakIndicator{3});

  const index_t S = 300;
  std::mt19937 rng(3);
  std::normal_distribution<float> normal(0.0f, 1.0f);
  for (index_t l = 0; l < cfg.layers; ++l) {
    std::vector<float> q(static_cast<std::size_t>(4 * 8 * 32)),
        k(static_cast<std::size_t>(2 * S * 32)), v(k.size());
    for (auto* t : {&q, &k, &v})
      for (auto& x : *t) x = normal(rng) * (1.0f + static_cast<float>(l));
    cache.prefill(l, cake::make_view(q.data(), std::array<index_t, 4>{1, 4, 8, 32}),
                  cake::make_view(k.data(), std::array<index_t, 4>{1, 2, S, 32}),
                  cake::make_view(v.data(), std::array<index_t, 4>{1, 2, S, 32}));
  }
  bool ok = true;
  for (index_t l = 0; l < cfg.layers; ++l) {
    std::printf("layer %lld: budget %lld (floor 8), holds %lld\n", (long long)l,
                (long long)cache.budget(l), (long long)cache.tokens_held(l));
    ok = ok && cache.budget(l) >= 8;
  }
  return ok ? 0 : 1;
}
