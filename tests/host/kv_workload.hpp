// Synthetic KvCache workloads and checks shared by the cache tests: random Q/K/V
// per layer with a few heavy-hitter keys, decode tokens, and readers of what a
// cache holds.
#pragma once

#include <doctest/doctest.h>

#include <cake/cake.hpp>

#include <algorithm>
#include <functional>
#include <random>
#include <set>
#include <span>
#include <vector>

using cake::index_t;

namespace kv_test {

// Random Q/K/V for every layer of a prompt with a few heavy-hitter keys (a shared
// direction that the window queries also point to), and decode tokens. V's
// channel 0 holds the token position, as in the golden data.
struct Workload {
  cake::CacheConfig cfg;
  index_t S = 0;
  std::vector<std::vector<float>> q, k, v;  // per layer: (B,H,w,d), (B,Hkv,S,d), (B,Hkv,S,d)
  std::vector<std::vector<std::vector<float>>> dq, dk,
      dv;  // [step][layer]: (B,H,d), (B,Hkv,d), (B,Hkv,d)

  auto qv(index_t l) const {
    return cake::make_view(
        q[static_cast<std::size_t>(l)].data(),
        std::array<index_t, 4>{cfg.batch, cfg.q_heads, cfg.window, cfg.head_dim});
  }
  auto kv(index_t l) const {
    return cake::make_view(k[static_cast<std::size_t>(l)].data(),
                           std::array<index_t, 4>{cfg.batch, cfg.kv_heads, S, cfg.head_dim});
  }
  auto vv(index_t l) const {
    return cake::make_view(v[static_cast<std::size_t>(l)].data(),
                           std::array<index_t, 4>{cfg.batch, cfg.kv_heads, S, cfg.head_dim});
  }
  auto dqv(std::size_t t, index_t l) const {
    return cake::make_view(dq[t][static_cast<std::size_t>(l)].data(),
                           std::array<index_t, 3>{cfg.batch, cfg.q_heads, cfg.head_dim});
  }
  auto dkv(std::size_t t, index_t l) const {
    return cake::make_view(dk[t][static_cast<std::size_t>(l)].data(),
                           std::array<index_t, 3>{cfg.batch, cfg.kv_heads, cfg.head_dim});
  }
  auto dvv(std::size_t t, index_t l) const {
    return cake::make_view(dv[t][static_cast<std::size_t>(l)].data(),
                           std::array<index_t, 3>{cfg.batch, cfg.kv_heads, cfg.head_dim});
  }
  // The key of token `pos` in row (b, g) of layer l, from the prompt or a decode step.
  const float* key_of(index_t l, index_t b, index_t g, index_t pos) const {
    if (pos < S)
      return k[static_cast<std::size_t>(l)].data() +
             ((b * cfg.kv_heads + g) * S + pos) * cfg.head_dim;
    return dk[static_cast<std::size_t>(pos - S)][static_cast<std::size_t>(l)].data() +
           (b * cfg.kv_heads + g) * cfg.head_dim;
  }
};

inline Workload make_workload(const cake::CacheConfig& cfg, index_t S, unsigned seed,
                              int decode_steps = 0) {
  Workload wl;
  wl.cfg = cfg;
  wl.S = S;
  std::mt19937 gen(seed);
  std::normal_distribution<float> nd(0.0f, 1.0f);
  const index_t B = cfg.batch, H = cfg.q_heads, Hkv = cfg.kv_heads, d = cfg.head_dim,
                w = cfg.window;
  for (index_t l = 0; l < cfg.layers; ++l) {
    std::vector<float> u(static_cast<std::size_t>(d));
    for (auto& x : u) x = nd(gen);
    const float qscale = 0.5f + 0.5f * static_cast<float>(l);  // layers differ in sharpness
    std::vector<float> q(static_cast<std::size_t>(B * H * w * d)),
        k(static_cast<std::size_t>(B * Hkv * S * d)), v(k.size());
    for (std::size_t i = 0; i < q.size(); ++i)
      q[i] = qscale * (nd(gen) + 0.7f * u[i % static_cast<std::size_t>(d)]);
    std::set<index_t> heavy;
    std::uniform_int_distribution<index_t> pick(0, S - 1);
    for (int h = 0; h < 4; ++h) heavy.insert(pick(gen));
    for (index_t b = 0; b < B; ++b)
      for (index_t g = 0; g < Hkv; ++g)
        for (index_t t = 0; t < S; ++t)
          for (index_t x = 0; x < d; ++x) {
            const std::size_t i = static_cast<std::size_t>(((b * Hkv + g) * S + t) * d + x);
            k[i] = nd(gen) + (heavy.count(t) ? 2.5f * u[static_cast<std::size_t>(x)] : 0.0f);
            v[i] = x == 0 ? static_cast<float>(t) : nd(gen);
          }
    wl.q.push_back(std::move(q));
    wl.k.push_back(std::move(k));
    wl.v.push_back(std::move(v));
  }
  for (int t = 0; t < decode_steps; ++t) {
    std::vector<std::vector<float>> sq, sk, sv;
    for (index_t l = 0; l < cfg.layers; ++l) {
      std::vector<float> q(static_cast<std::size_t>(B * H * d)),
          k(static_cast<std::size_t>(B * Hkv * d)), v(k.size());
      for (auto& x : q) x = nd(gen);
      for (auto& x : k) x = nd(gen);
      for (std::size_t i = 0; i < v.size(); ++i)
        v[i] = i % static_cast<std::size_t>(d) == 0 ? static_cast<float>(S + t) : nd(gen);
      sq.push_back(std::move(q));
      sk.push_back(std::move(k));
      sv.push_back(std::move(v));
    }
    wl.dq.push_back(std::move(sq));
    wl.dk.push_back(std::move(sk));
    wl.dv.push_back(std::move(sv));
  }
  return wl;
}

inline cake::CacheConfig small_config(bool cascade) {
  cake::CacheConfig c;
  c.layers = 4;
  c.batch = 2;
  c.q_heads = 4;
  c.kv_heads = 2;
  c.head_dim = 8;
  c.window = 4;
  c.cache_size = 16;  // T = 12 * 4 = 48
  c.cascade = cascade;
  return c;
}

template <class Cache>
void prefill_all(Cache& c, const Workload& wl, const std::function<void(index_t)>& after = {}) {
  for (index_t l = 0; l < wl.cfg.layers; ++l) {
    c.prefill(l, wl.qv(l), wl.kv(l), wl.vv(l));
    if (after) after(l);
  }
}

template <class Cache>
void decode_step(Cache& c, const Workload& wl, std::size_t t) {
  for (index_t l = 0; l < wl.cfg.layers; ++l) c.decode(l, wl.dqv(t, l), wl.dkv(t, l), wl.dvv(t, l));
}

// Positions of row (b, g) of layer l, in cache order.
template <class Cache>
std::vector<index_t> row_positions(const Cache& c, index_t l, index_t b, index_t g) {
  auto p = c.positions(l);
  std::vector<index_t> out;
  for (index_t t = 0; t < p.extent(2); ++t) out.push_back(p(b, g, t));
  return out;
}

// Every layer, every row: positions strictly ascending (when `sorted`), the values'
// channel 0 and the keys follow positions, and the last w positions up to `last` are held.
template <class Cache>
void check_layer_contents(const Cache& c, const Workload& wl, index_t last, bool sorted = true) {
  const auto& cfg = wl.cfg;
  for (index_t l = 0; l < cfg.layers; ++l) {
    auto p = c.positions(l);
    auto vals = c.values(l);
    auto keys = c.keys(l);
    REQUIRE(p.extent(2) == c.tokens_held(l));
    REQUIRE(vals.extent(2) == c.tokens_held(l));
    REQUIRE(keys.extent(2) == c.tokens_held(l));
    for (index_t b = 0; b < cfg.batch; ++b)
      for (index_t g = 0; g < cfg.kv_heads; ++g) {
        CAPTURE(l);
        CAPTURE(b);
        CAPTURE(g);
        auto pos = row_positions(c, l, b, g);
        if (sorted)
          for (std::size_t t = 1; t < pos.size(); ++t) REQUIRE(pos[t] > pos[t - 1]);
        std::set<index_t> held(pos.begin(), pos.end());
        REQUIRE(held.size() == pos.size());
        for (index_t t = last - cfg.window + 1; t <= last; ++t) REQUIRE(held.count(t) == 1);
        for (index_t t = 0; t < p.extent(2); ++t) {
          REQUIRE(vals(b, g, t, 0) == static_cast<float>(p(b, g, t)));
          const float* want = wl.key_of(l, b, g, p(b, g, t));
          for (index_t x = 0; x < cfg.head_dim; ++x) REQUIRE(keys(b, g, t, x) == want[x]);
        }
      }
  }
}

template <class Cache>
bool stage_budgets_non_increasing(const Cache& c) {
  const auto& st = c.stage_budgets();
  for (std::size_t m = 1; m < st.size(); ++m)
    for (std::size_t l = 0; l < st[m - 1].size(); ++l)
      if (st[m][l] > st[m - 1][l]) return false;
  return true;
}

template <class CacheA, class CacheB>
bool same_kept(const CacheA& a, const CacheB& b, const cake::CacheConfig& cfg) {
  for (index_t l = 0; l < cfg.layers; ++l) {
    if (a.tokens_held(l) != b.tokens_held(l)) return false;
    for (index_t bb = 0; bb < cfg.batch; ++bb)
      for (index_t g = 0; g < cfg.kv_heads; ++g) {
        auto pa = row_positions(a, l, bb, g), pb = row_positions(b, l, bb, g);
        std::sort(pa.begin(), pa.end());
        std::sort(pb.begin(), pb.end());
        if (pa != pb) return false;
      }
  }
  return true;
}

inline index_t sum(std::span<const index_t> v) {
  index_t s = 0;
  for (auto x : v) s += x;
  return s;
}

}  // namespace kv_test
