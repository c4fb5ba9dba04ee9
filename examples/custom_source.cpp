// A custom indicator source: one value type with two hooks, and the cache uses it
// for prefill and decoding on its own; no library file changes.
//
// Here: keep the tokens whose keys have the smallest L2 norm (low-norm keys tend to
// draw the most attention), a source that reads neither the queries nor the window
// statistics. prefill_scores scores the S - w prefix tokens of a layer, decode_scores
// the candidates of a decoding step; higher scores are kept. The hooks run on the
// backend the cache runs on (here the host: plain loops over the views).
#include <cake/cake.hpp>

#include <cmath>
#include <cstdio>
#include <random>
#include <vector>

using cake::index_t;

struct KeyNormIndicator {
  // q: (batch, q_heads, window, head_dim), keys: (batch, kv_heads, S, head_dim),
  // out: (batch, kv_heads, S - w)
  template <class Exec, class Q, class K, class O>
  void prefill_scores(const Exec&, const Q&, const K& keys, const O& out) const {
    score(keys, out);
  }
  // q: (batch, q_heads, head_dim), keys: (batch, kv_heads, held, head_dim),
  // out: (batch, kv_heads, candidates), candidates <= held
  template <class Exec, class Q, class K, class O>
  void decode_scores(const Exec&, const Q&, const K& keys, const O& out) const {
    score(keys, out);
  }
  cake::status validate() const { return cake::status::success(); }

  template <class K, class O>
  static void score(const K& keys, const O& out) {
    for (index_t b = 0; b < out.extent(0); ++b)
      for (index_t g = 0; g < out.extent(1); ++g)
        for (index_t t = 0; t < out.extent(2); ++t)
          out(b, g, t) = -norm(&keys(b, g, t, 0), keys.extent(3));
  }
  static float norm(const float* k, index_t d) {
    float s = 0;
    for (index_t x = 0; x < d; ++x) s += k[x] * k[x];
    return std::sqrt(s);
  }
};
static_assert(cake::SourceIndicator<KeyNormIndicator>);
static_assert(cake::IndicatorPolicy<KeyNormIndicator>);

int main() {
  const index_t L = 2, B = 1, H = 4, Hkv = 2, d = 16, w = 4, S = 96;
  cake::CacheConfig cfg{.layers = L,
                        .batch = B,
                        .q_heads = H,
                        .kv_heads = Hkv,
                        .head_dim = d,
                        .window = w,
                        .cache_size = 24};
  std::mt19937 rng(3);
  std::normal_distribution<float> normal(0.0f, 1.0f);
  std::uniform_real_distribution<float> scale(0.2f, 3.0f);
  const auto random_keys = [&](index_t tokens) {  // (B, Hkv, tokens, d), norms spread out
    std::vector<float> k(static_cast<std::size_t>(B * Hkv * tokens * d));
    for (std::size_t t = 0; t < k.size() / d; ++t) {
      const float s = scale(rng);
      for (index_t x = 0; x < d; ++x) k[t * d + static_cast<std::size_t>(x)] = s * normal(rng);
    }
    return k;
  };
  std::vector<std::vector<float>> keys;
  std::vector<float> q(static_cast<std::size_t>(B * H * w * d));
  for (auto& x : q) x = normal(rng);

  cake::KvCache<cake::CakePreference, cake::ProportionalBudget, KeyNormIndicator> cache(cfg);
  for (index_t l = 0; l < L; ++l) {
    keys.push_back(random_keys(S));
    const auto kv = cake::make_view(keys.back().data(), std::array<index_t, 4>{B, Hkv, S, d});
    cache.prefill(l, cake::make_view(q.data(), std::array<index_t, 4>{B, H, w, d}), kv, kv);
  }

  // Every row keeps exactly the budget(l) prefix tokens of smallest key norm.
  int failures = 0;
  for (index_t l = 0; l < L; ++l) {
    const auto pos = cache.positions(l);
    const auto* k = keys[static_cast<std::size_t>(l)].data();
    for (index_t g = 0; g < Hkv; ++g) {
      float kept_max = 0, dropped_min = INFINITY;
      std::vector<bool> held(static_cast<std::size_t>(S), false);
      for (index_t t = 0; t < pos.extent(2); ++t)
        held[static_cast<std::size_t>(pos(0, g, t))] = true;
      for (index_t t = 0; t < S - w; ++t) {
        const float n = KeyNormIndicator::norm(k + (g * S + t) * d, d);
        if (held[static_cast<std::size_t>(t)])
          kept_max = std::max(kept_max, n);
        else
          dropped_min = std::min(dropped_min, n);
      }
      failures += kept_max > dropped_min;
      failures += cache.tokens_held(l) != cache.budget(l) + w;
      std::printf(
          "layer %lld head %lld: kept %lld of %lld prefix tokens, largest kept norm %.3f, "
          "smallest dropped %.3f\n",
          (long long)l, (long long)g, (long long)cache.budget(l), (long long)(S - w), kept_max,
          dropped_min);
    }
  }

  // Decoding: each step appends a token and evicts, per row, the candidate (a held
  // token outside the last w) of largest norm.
  std::vector<float> dq(static_cast<std::size_t>(B * H * d), 0.5f);
  std::vector<std::vector<float>> norms(Hkv);  // layer 0, (kv_heads, position)
  for (index_t g = 0; g < Hkv; ++g)
    for (index_t t = 0; t < S; ++t)
      norms[g].push_back(KeyNormIndicator::norm(keys[0].data() + (g * S + t) * d, d));
  for (int step = 0; step < 3; ++step) {
    const auto before = cache.positions(0);
    const index_t n = before.extent(2);
    const auto nk = random_keys(1);  // (B, Hkv, 1, d): the new token
    for (index_t g = 0; g < Hkv; ++g)
      norms[g].push_back(KeyNormIndicator::norm(nk.data() + g * d, d));
    float expect[Hkv];
    for (index_t g = 0; g < Hkv; ++g) {  // the largest candidate norm: what must go
      expect[g] = 0;
      for (index_t t = 0; t < n + 1 - w; ++t)
        expect[g] = std::max(expect[g], norms[g][before(0, g, t)]);
    }
    cache.decode(0, cake::make_view(dq.data(), std::array<index_t, 3>{B, H, d}),
                 cake::make_view(nk.data(), std::array<index_t, 3>{B, Hkv, d}),
                 cake::make_view(nk.data(), std::array<index_t, 3>{B, Hkv, d}));
    const auto after = cache.positions(0);
    for (index_t g = 0; g < Hkv; ++g) {
      float held_max = 0;
      for (index_t t = 0; t < after.extent(2) - w; ++t)
        held_max = std::max(held_max, norms[g][after(0, g, t)]);
      failures += held_max >= expect[g] || after.extent(2) != n;
    }
  }
  std::printf("%s\n", failures == 0 ? "custom source: ok" : "custom source: FAILED");
  return failures == 0 ? 0 : 1;
}
