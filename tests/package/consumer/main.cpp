// Uses the public API the way an engine would; exits 0 when the cut is right.
#include <cake/cake.hpp>

#include <vector>

int main() {
  using cake::index_t;
  cake::CacheConfig cfg{.layers = 2,
                        .batch = 1,
                        .q_heads = 2,
                        .kv_heads = 1,
                        .head_dim = 8,
                        .window = 4,
                        .cache_size = 12};
  cake::KvCache<> cache(cfg);
  const index_t S = 64;
  std::vector<float> q(2 * 4 * 8), k(S * 8), v(S * 8);
  for (std::size_t i = 0; i < k.size(); ++i) k[i] = static_cast<float>((i * 7919) % 17) * 0.1f;
  for (std::size_t i = 0; i < q.size(); ++i) q[i] = static_cast<float>((i * 104729) % 13) * 0.1f;
  for (index_t l = 0; l < 2; ++l)
    cache.prefill(l, cake::make_view(q.data(), std::array<index_t, 4>{1, 2, 4, 8}),
                  cake::make_view(k.data(), std::array<index_t, 4>{1, 1, S, 8}),
                  cake::make_view(v.data(), std::array<index_t, 4>{1, 1, S, 8}));
  return cache.budget(0) + cache.budget(1) == 16 ? 0 : 1;
}
