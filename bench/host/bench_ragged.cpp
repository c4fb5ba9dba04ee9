// ragged_serve: four sequences of different prompt lengths served together, every
// layer's prefill then decode steps, from FlashAttention-varlen packed K/V
// (tokens, kv_heads, head_dim) with cu_seqlens.
//   cake:   cake::RaggedKvCache, one call per layer for all sequences; each sequence
//           reads its part of the packed tensors through a strided view
//   alone:  the same schedule (every sequence at each layer and step), a KvCache per
//           sequence fed the same strided views by hand: what RaggedKvCache does, so
//           the ratio is the cost of its bookkeeping
//   naive:  one sequence at a time (prefill and all its steps, then the next), each
//           sequence's K/V first copied out of the packed tensors into a dense
//           (1, kv_heads, S, head_dim) buffer, as a KvCache taking only dense batches
//           would need; one sequence's cache is live at a time (a smaller working set)
#include "common/common.hpp"
#include "host/suites.hpp"

namespace cake_bench {

namespace {

constexpr index_t kSteps = 8;  // decode steps per iteration

struct Packed {
  index_t L, H, Hkv, d, total = 0;
  std::vector<index_t> S;
  std::vector<std::int32_t> cu{0};
  std::vector<cake::sequence_id> ids;
  std::vector<std::vector<float>> k, v;  // per layer: (total, Hkv, d)
  std::vector<float> qw;                 // (num_seqs, H, w, d), shared by the layers
  std::vector<float> dq, dk, dv;         // (num_seqs, H, d), (num_seqs, Hkv, d) x2

  Packed(const Shape& sh, std::vector<index_t> lengths)
      : L(sh.layers), H(sh.q_heads), Hkv(sh.kv_heads), d(sh.head_dim), S(std::move(lengths)) {
    for (std::size_t i = 0; i < S.size(); ++i) {
      total += S[i];
      cu.push_back(static_cast<std::int32_t>(total));
      ids.push_back(static_cast<cake::sequence_id>(i));
    }
    const auto n = static_cast<index_t>(S.size());
    Rng g(91);
    for (index_t l = 0; l < L; ++l) {
      std::vector<float> kk, vv;
      fill_keys(kk, 1, 1, total * Hkv, d, 11 + static_cast<std::uint64_t>(l), false);
      fill_keys(vv, 1, 1, total * Hkv, d, 12 + static_cast<std::uint64_t>(l), true);
      k.push_back(std::move(kk));
      v.push_back(std::move(vv));
    }
    fill_queries(qw, n, H, window, d, 13, 1.0f);
    for (auto* x : {&dq, &dk, &dv}) {
      x->resize(static_cast<std::size_t>(n * (x == &dq ? H : Hkv) * d));
      for (auto& e : *x) e = g.normal();
    }
  }
  index_t n() const { return static_cast<index_t>(S.size()); }
  auto keys(index_t l) const {
    return cake::make_view(k[static_cast<std::size_t>(l)].data(),
                           std::array<index_t, 3>{total, Hkv, d});
  }
  auto values(index_t l) const {
    return cake::make_view(v[static_cast<std::size_t>(l)].data(),
                           std::array<index_t, 3>{total, Hkv, d});
  }
  auto q_window() const {
    return cake::make_view(qw.data(), std::array<index_t, 4>{n(), H, window, d});
  }
  // Sequence i's part of a packed tensor as (1, Hkv, S_i, d).
  auto part(const std::vector<float>& x, std::size_t i) const {
    return cake::make_view(x.data() + cu[i] * Hkv * d, std::array<index_t, 4>{1, Hkv, S[i], d},
                           std::array<index_t, 4>{S[i] * Hkv * d, d, Hkv * d, 1});
  }
};

void add_case(const Shape& sh, index_t C) {
  const std::vector<index_t> lengths{512, 1000, 1536, 2100};
  const std::string args = std::string(sh.name) + "/seqs:4/C:" + std::to_string(C);
  cake::CacheConfig cfg{};
  cfg.layers = sh.layers;
  cfg.q_heads = sh.q_heads;
  cfg.kv_heads = sh.kv_heads;
  cfg.head_dim = sh.head_dim;
  cfg.window = window;
  cfg.cache_size = C;
  auto counters = [=](benchmark::State& st, const Packed& p) {
    st.SetItemsProcessed(st.iterations() * p.total * p.L);  // prompt tokens x layers
    st.SetBytesProcessed(st.iterations() * 2 * p.total * p.L * p.Hkv * p.d *
                         static_cast<index_t>(sizeof(float)));
  };
  using A3 = std::array<index_t, 3>;
  using A4 = std::array<index_t, 4>;
  add(name("ragged_serve", "cake", args), [=](benchmark::State& st) {
    const Packed p(sh, lengths);
    for (auto _ : st) {
      cake::RaggedKvCache<> batch(cfg);
      for (auto id : p.ids) batch.add(id);
      for (index_t l = 0; l < p.L; ++l)
        batch.prefill(l, p.ids, p.q_window(), p.keys(l), p.values(l), p.cu);
      for (index_t t = 0; t < kSteps; ++t)
        for (index_t l = 0; l < p.L; ++l)
          batch.decode(l, p.ids, cake::make_view(p.dq.data(), A3{p.n(), p.H, p.d}),
                       cake::make_view(p.dk.data(), A3{p.n(), p.Hkv, p.d}),
                       cake::make_view(p.dv.data(), A3{p.n(), p.Hkv, p.d}));
      benchmark::DoNotOptimize(batch.tokens_held());
    }
    counters(st, p);
  });
  add(name("ragged_serve", "alone", args), [=](benchmark::State& st) {
    const Packed p(sh, lengths);
    for (auto _ : st) {
      std::vector<std::unique_ptr<cake::KvCache<>>> caches;
      for (std::size_t i = 0; i < p.S.size(); ++i)
        caches.push_back(std::make_unique<cake::KvCache<>>(cfg));
      for (index_t l = 0; l < p.L; ++l)
        for (std::size_t i = 0; i < p.S.size(); ++i) {
          const auto ii = static_cast<index_t>(i);
          caches[i]->prefill(
              l, cake::make_view(p.qw.data() + ii * p.H * window * p.d, A4{1, p.H, window, p.d}),
              p.part(p.k[static_cast<std::size_t>(l)], i),
              p.part(p.v[static_cast<std::size_t>(l)], i));
        }
      for (index_t t = 0; t < kSteps; ++t)
        for (index_t l = 0; l < p.L; ++l)
          for (std::size_t i = 0; i < p.S.size(); ++i) {
            const auto ii = static_cast<index_t>(i);
            caches[i]->decode(l, cake::make_view(p.dq.data() + ii * p.H * p.d, A3{1, p.H, p.d}),
                              cake::make_view(p.dk.data() + ii * p.Hkv * p.d, A3{1, p.Hkv, p.d}),
                              cake::make_view(p.dv.data() + ii * p.Hkv * p.d, A3{1, p.Hkv, p.d}));
          }
      index_t held = 0;
      for (const auto& c : caches) held += c->tokens_held();
      benchmark::DoNotOptimize(held);
    }
    counters(st, p);
  });
  add(name("ragged_serve", "naive", args), [=](benchmark::State& st) {
    const Packed p(sh, lengths);
    std::vector<float> kd, vd;
    for (auto _ : st) {
      index_t held = 0;
      for (std::size_t i = 0; i < p.S.size(); ++i) {
        cake::KvCache<> cache(cfg);
        const index_t S = p.S[i], ii = static_cast<index_t>(i);
        const auto q =
            cake::make_view(p.qw.data() + ii * p.H * window * p.d, A4{1, p.H, window, p.d});
        for (index_t l = 0; l < p.L; ++l) {
          const auto& k = p.k[static_cast<std::size_t>(l)];
          const auto& v = p.v[static_cast<std::size_t>(l)];
          kd.resize(static_cast<std::size_t>(p.Hkv * S * p.d));
          vd.resize(kd.size());
          for (index_t g = 0; g < p.Hkv; ++g)
            for (index_t t = 0; t < S; ++t) {
              const std::size_t from = static_cast<std::size_t>(((p.cu[i] + t) * p.Hkv + g) * p.d);
              std::memcpy(kd.data() + (g * S + t) * p.d, k.data() + from,
                          static_cast<std::size_t>(p.d) * sizeof(float));
              std::memcpy(vd.data() + (g * S + t) * p.d, v.data() + from,
                          static_cast<std::size_t>(p.d) * sizeof(float));
            }
          cache.prefill(l, q, cake::make_view(kd.data(), A4{1, p.Hkv, S, p.d}),
                        cake::make_view(vd.data(), A4{1, p.Hkv, S, p.d}));
        }
        for (index_t t = 0; t < kSteps; ++t)
          for (index_t l = 0; l < p.L; ++l)
            cache.decode(l, cake::make_view(p.dq.data() + ii * p.H * p.d, A3{1, p.H, p.d}),
                         cake::make_view(p.dk.data() + ii * p.Hkv * p.d, A3{1, p.Hkv, p.d}),
                         cake::make_view(p.dv.data() + ii * p.Hkv * p.d, A3{1, p.Hkv, p.d}));
        held += cache.tokens_held();
      }
      benchmark::DoNotOptimize(held);
    }
    counters(st, p);
  });
}

}  // namespace

void register_ragged() {
  if (full_matrix()) {
    for (const Shape& sh : all_shapes)
      for (index_t C : {128, 1024}) add_case(sh, C);
    return;
  }
  add_case(small, 256);
  add_case(llama, 1024);
}

}  // namespace cake_bench
