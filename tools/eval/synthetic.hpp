// The demo's synthetic workload (examples/demo.cpp), extended with held-out
// queries: attention sinks (the first 4 tokens draw attention from every query),
// heavy hitters (1 token in 64 aligned with a per-head "topic"), locality
// (rotary-like features in the first dims of K and Q), and a sharpness that
// changes with depth so that layers differ in preference. The held-out queries
// are drawn like the window queries, at positions S, S+1, ... after the prompt.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <string>

#include "eval.hpp"

namespace cake_eval {

struct SyntheticOptions {
  index_t layers = 8, heads = 16, kv_heads = 4, head_dim = 64, seq_len = 4096, batch = 1;
  index_t window = 32, queries = 16;
  float tau1 = 1.6f, tau2 = 0.4f, gamma = 200.0f;  // the paper's Llama-3.1-8B temperatures
  bool cascade = true;
  unsigned seed = 42;
  index_t chunk = 0;  // > 0: prefill in chunks of this many tokens (batch 1)
  cake::chunk_eviction chunking = cake::chunk_eviction::bounded;
};

// splitmix64 with an approximately normal draw (Irwin-Hall, 4 terms, unit variance).
struct Rng {
  std::uint64_t s;
  std::uint64_t next() {
    std::uint64_t z = (s += 0x9e3779b97f4a7c15ull);
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    return z ^ (z >> 31);
  }
  float uniform() { return static_cast<float>(next() >> 40) * (1.0f / 16777216.0f); }
  float normal() { return (uniform() + uniform() + uniform() + uniform() - 2.0f) * 1.7320508f; }
};

inline LayerInput synthesise(const SyntheticOptions& o, index_t layer) {
  const index_t B = o.batch, H = o.heads, Hkv = o.kv_heads, d = o.head_dim, S = o.seq_len,
                w = o.window, nq = o.queries, n = H / Hkv;
  LayerInput in;
  in.q_window.resize(static_cast<std::size_t>(B * H * w * d));
  in.q_held.resize(static_cast<std::size_t>(B * H * nq * d));
  in.k.resize(static_cast<std::size_t>(B * Hkv * S * d));
  in.v.resize(in.k.size());
  Rng rng{o.seed * 1000003ull + static_cast<std::uint64_t>(layer)};
  const float sharp = 0.6f + 1.4f * std::fabs(std::sin(0.37f * static_cast<float>(layer) + 0.3f));
  const index_t pos_dims = std::min<index_t>(8, d / 2);
  const float sd = std::sqrt(static_cast<float>(d));
  for (index_t b = 0; b < B; ++b)
    for (index_t g = 0; g < Hkv; ++g) {
      std::vector<float> topic(static_cast<std::size_t>(d));
      for (auto& x : topic) x = rng.normal() / sd;
      float* K = in.k.data() + (b * Hkv + g) * S * d;
      float* V = in.v.data() + (b * Hkv + g) * S * d;
      for (index_t j = 0; j < S; ++j) {
        const bool sink = j < 4;
        const bool heavy = (rng.next() % 64) == 0;
        const float lift = sink ? 9.0f : heavy ? 5.0f : 0.0f;
        for (index_t x = 0; x < d; ++x) {
          K[j * d + x] =
              rng.normal() * 0.7f + lift * topic[static_cast<std::size_t>(x)] * sd * 0.25f;
          V[j * d + x] = rng.normal();
        }
        for (index_t f = 0; f < pos_dims; ++f) {
          const float ang = static_cast<float>(j) * 0.02f / static_cast<float>(f + 1);
          K[j * d + 2 * f] = 2.0f * std::cos(ang);
          K[j * d + 2 * f + 1] = 2.0f * std::sin(ang);
        }
      }
      // A query at position p of a head of this group.
      auto query_from = [&](Rng& r, float* Q, index_t p) {
        for (index_t x = 0; x < d; ++x)
          Q[x] =
              sharp * (r.normal() * 0.7f + 2.0f * topic[static_cast<std::size_t>(x)] * sd * 0.25f);
        for (index_t f = 0; f < pos_dims; ++f) {
          const float ang = static_cast<float>(p) * 0.02f / static_cast<float>(f + 1);
          Q[2 * f] = sharp * 2.0f * std::cos(ang);
          Q[2 * f + 1] = sharp * 2.0f * std::sin(ang);
        }
      };
      auto query = [&](float* Q, index_t p) { query_from(rng, Q, p); };
      for (index_t r = 0; r < n; ++r) {
        const index_t h = g * n + r;
        for (index_t i = 0; i < w; ++i)
          query(in.q_window.data() + ((b * H + h) * w + i) * d, S - w + i);
        for (index_t i = 0; i < nq; ++i)
          query(in.q_held.data() + ((b * H + h) * nq + i) * d, S + i);
      }
      // Chunked prefill reads a query at every position: drawn from their own
      // generator (the data above stays that of the whole-prompt workload), the
      // last w being the window's.
      if (o.chunk > 0) {
        if (in.q_all.empty()) in.q_all.resize(static_cast<std::size_t>(B * H * S * d));
        Rng qrng{(o.seed * 1000003ull + static_cast<std::uint64_t>(layer)) ^ 0x5eed5eedull};
        for (index_t r = 0; r < n; ++r) {
          const index_t h = g * n + r;
          float* Q = in.q_all.data() + (b * H + h) * S * d;
          for (index_t p = 0; p < S - w; ++p) query_from(qrng, Q + p * d, p);
          std::copy_n(in.q_window.data() + ((b * H + h) * w) * d, w * d, Q + (S - w) * d);
        }
      }
    }
  return in;
}

inline Workload synthetic_workload(const SyntheticOptions& o) {
  Workload w;
  w.name = "synthetic";
  w.held_source = "synthetic queries at positions S.." + std::to_string(o.seq_len + o.queries - 1);
  w.batch = o.batch;
  w.layers = o.layers;
  w.q_heads = o.heads;
  w.kv_heads = o.kv_heads;
  w.head_dim = o.head_dim;
  w.seq_len = o.seq_len;
  w.window = o.window;
  w.held_queries = o.queries;
  w.tau1 = o.tau1;
  w.tau2 = o.tau2;
  w.gamma = o.gamma;
  w.cascade = o.cascade;
  w.chunk = o.chunk;
  w.chunking = o.chunking;
  if (o.chunk > 0)
    w.name += ", chunks of " + std::to_string(o.chunk) +
              (o.chunking == cake::chunk_eviction::exact ? " (exact)" : " (bounded)");
  w.layer = [o](index_t l) { return synthesise(o, l); };
  return w;
}

}  // namespace cake_eval
