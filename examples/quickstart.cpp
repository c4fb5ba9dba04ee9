// Quickstart: a CAKE-managed KV cache for a 4-layer model, prefilled layer by
// layer with cascading eviction, then decoding a few tokens.
#include <cake/cake.hpp>

#include <cstdio>
#include <random>
#include <vector>

int main() {
  using cake::index_t;
  cake::CacheConfig cfg;
  cfg.layers = 4;
  cfg.batch = 1;
  cfg.q_heads = 8;
  cfg.kv_heads = 2;  // GQA: 4 query heads per KV head
  cfg.head_dim = 64;
  cfg.window = 16;      // the last 16 tokens are always kept
  cfg.cache_size = 64;  // tokens per layer on average, window included

  // Defaults are CAKE: CakePreference, ProportionalBudget, MeanVarianceIndicator.
  cake::KvCache<> cache(cfg, cake::CakePreference{1.6f, 0.4f});

  const index_t S = 512, B = cfg.batch, H = cfg.q_heads, Hkv = cfg.kv_heads, d = cfg.head_dim,
                w = cfg.window;
  std::mt19937 rng(7);
  std::normal_distribution<float> normal(0.0f, 1.0f);
  std::vector<float> q(
      static_cast<std::size_t>(B * H * w * d));  // (batch, q_heads, window, head_dim)
  std::vector<float> k(
      static_cast<std::size_t>(B * Hkv * S * d));  // (batch, kv_heads, tokens, head_dim)
  std::vector<float> v(k.size());                  // (batch, kv_heads, tokens, head_dim)

  for (index_t layer = 0; layer < cfg.layers; ++layer) {
    for (auto* t : {&q, &k, &v})
      for (auto& x : *t) x = normal(rng);
    // Views over the engine's buffers: nothing is copied until the cache keeps a token.
    cache.prefill(layer, cake::make_view(q.data(), std::array<index_t, 4>{B, H, w, d}),
                  cake::make_view(k.data(), std::array<index_t, 4>{B, Hkv, S, d}),
                  cake::make_view(v.data(), std::array<index_t, 4>{B, Hkv, S, d}));
  }
  for (index_t l = 0; l < cfg.layers; ++l)
    std::printf("layer %lld: preference %.4g, budget %lld, holds %lld of %lld tokens\n",
                (long long)l, cache.preference(l), (long long)cache.budget(l),
                (long long)cache.tokens_held(l), (long long)S);

  // Decoding: one new token per layer per step; the cache stays at budget + window.
  std::vector<float> q1(static_cast<std::size_t>(B * H * d)),
      k1(static_cast<std::size_t>(B * Hkv * d)), v1(k1.size());
  for (int step = 0; step < 8; ++step)
    for (index_t l = 0; l < cfg.layers; ++l) {
      for (auto* t : {&q1, &k1, &v1})
        for (auto& x : *t) x = normal(rng);
      cache.decode(l, cake::make_view(q1.data(), std::array<index_t, 3>{B, H, d}),
                   cake::make_view(k1.data(), std::array<index_t, 3>{B, Hkv, d}),
                   cake::make_view(v1.data(), std::array<index_t, 3>{B, Hkv, d}));
    }
  const auto pos = cache.positions(0);  // (batch, kv_heads, tokens_held), ascending
  std::printf("after 8 decoding steps layer 0 holds %lld tokens; its last position is %lld\n",
              (long long)cache.tokens_held(0), (long long)pos(0, 0, pos.extent(2) - 1));
  std::printf("total %zu bytes of K/V held instead of %zu\n", cache.bytes_held(),
              static_cast<std::size_t>(2 * cfg.layers * B * Hkv * S * d) * sizeof(float));
  // The total budget is honoured exactly: the prefix budgets sum to (C - w) * L.
  index_t sum = 0;
  for (auto b : cache.budgets()) sum += b;
  return sum == cache.total_budget() ? 0 : 1;
}
