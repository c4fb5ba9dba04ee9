// The compared methods side by side: one prompt prefilled into a cache of every
// cake::methods alias at the same memory, then what each keeps. A head-wise cache
// (Ada-KV) gives each KV head its own length: row_lengths() says how many of the
// stored slots are real, the rest are padding (position -1).
#include <cake/cake.hpp>

#include <cstdio>
#include <random>
#include <string>
#include <vector>

namespace {

using cake::index_t;

// One layer of a prompt: keys with a few strongly attended tokens ("heavy hitters")
// and window queries that look for them, plus attention sinks at the start.
struct Prompt {
  index_t B = 1, H = 8, Hkv = 2, d = 32, S = 512, w = 16;
  std::vector<float> q, k, v;  // (B,H,w,d), (B,Hkv,S,d), (B,Hkv,S,d)
  explicit Prompt(unsigned seed) {
    std::mt19937 rng(seed);
    std::normal_distribution<float> normal(0.0f, 1.0f);
    q.resize(static_cast<std::size_t>(B * H * w * d));
    k.resize(static_cast<std::size_t>(B * Hkv * S * d));
    v.resize(k.size());
    for (auto* t : {&q, &k, &v})
      for (auto& x : *t) x = normal(rng);
    for (index_t g = 0; g < Hkv; ++g)
      for (index_t j :
           {index_t{0}, index_t{1}, 100 + 50 * g, 300 - 20 * g})  // sinks, then one hitter per head
        for (index_t x = 0; x < d; ++x) k[static_cast<std::size_t>((g * S + j) * d + x)] += 3.0f;
    for (auto& x : q) x += 1.0f;
  }
  auto qv() const { return cake::make_view(q.data(), std::array<index_t, 4>{B, H, w, d}); }
  auto kv() const { return cake::make_view(k.data(), std::array<index_t, 4>{B, Hkv, S, d}); }
  auto vv() const { return cake::make_view(v.data(), std::array<index_t, 4>{B, Hkv, S, d}); }
};

template <class Cache>
void run(const char* name, const std::vector<Prompt>& layers, const cake::CacheConfig& cfg) {
  Cache cache(cfg);
  for (index_t l = 0; l < cfg.layers; ++l) {
    const Prompt& p = layers[static_cast<std::size_t>(l)];
    cache.prefill(l, p.qv(), p.kv(), p.vv());
  }
  std::string budgets, rows;
  for (index_t l = 0; l < cfg.layers; ++l) {
    budgets += std::to_string(cache.budget(l)) + " ";
    for (index_t n : cache.row_lengths(l)) rows += std::to_string(n) + "/";
    rows.back() = ' ';
  }
  // Does layer 0, KV head 0 still hold its heavy hitter (token 100)?
  const auto pos = cache.positions(0);
  bool hitter = false;
  for (index_t t = 0; t < pos.extent(2); ++t) hitter |= pos(0, 0, t) == 100;
  std::printf("%-13s budgets %-16s row lengths %-24s hitter kept: %s\n", name, budgets.c_str(),
              rows.c_str(), hitter ? "yes" : "no");
}

}  // namespace

int main() {
  namespace m = cake::methods;
  cake::CacheConfig cfg;
  cfg.layers = 3;
  cfg.q_heads = 8;
  cfg.kv_heads = 2;
  cfg.head_dim = 32;
  cfg.window = 16;
  cfg.cache_size = 40;  // 24 prefix tokens per row on average, in every method
  std::vector<Prompt> layers;
  for (unsigned l = 0; l < 3; ++l) layers.emplace_back(11 + l);

  run<m::Cake<>>("cake", layers, cfg);
  run<m::SnapKv<>>("snapkv", layers, cfg);
  run<m::PyramidKv<>>("pyramidkv", layers, cfg);
  run<m::StreamingLlm<>>("streamingllm", layers, cfg);
  run<m::H2o<>>("h2o", layers, cfg);
  run<m::Tova<>>("tova", layers, cfg);
  run<m::AdaSnapKv<>>("ada_snapkv", layers, cfg);
  run<m::CakeAdaKv<>>("cake_adakv", layers, cfg);
  return 0;
}
