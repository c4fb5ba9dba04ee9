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
//   paged:  cake::RaggedKvCache on an engine's paged pools (one K and one V pool per
//           layer shared by the four sequences, vLLM NHD layout, blocks of 16
//           scattered over the pool): the prompts are read where the engine wrote
//           them, the kept tokens compacted in place, the decode tokens written into
//           the pools through the tables, the freed blocks handed back after every
//           call. The pools' prompts are restored before each iteration, untimed (the
//           engine writes them in its forward pass, as it writes the packed tensors
//           the other cases read).
#include <random>

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

constexpr index_t kBlock = 16;

// The engine's paged memory for a Packed batch: per layer a K and a V pool (NHD) with
// every prompt written into its sequence's blocks, one free list per layer.
struct Pools {
  index_t L, Hkv, d, N;
  std::vector<std::vector<float>> prompt_k, prompt_v, k, v;           // [layer]
  std::vector<std::vector<std::vector<std::int32_t>>> start, blocks;  // [layer][seq]
  std::vector<std::vector<std::int32_t>> lens, free_start, free_ids;  // [layer][...]
  std::vector<std::int32_t> indptr, ids, seq_lens;                    // the table lent

  explicit Pools(const Packed& p) : L(p.L), Hkv(p.Hkv), d(p.d) {
    index_t per_layer = 0;
    for (index_t S : p.S) per_layer += (S + kSteps + kBlock - 1) / kBlock + 1;
    N = per_layer;
    const auto size = static_cast<std::size_t>(N * kBlock * Hkv * d);
    prompt_k.assign(static_cast<std::size_t>(L), std::vector<float>(size, 0.0f));
    prompt_v = prompt_k;
    std::mt19937 gen(7);
    for (index_t l = 0; l < L; ++l) {
      std::vector<std::int32_t> order(static_cast<std::size_t>(N));
      for (index_t i = 0; i < N; ++i)
        order[static_cast<std::size_t>(i)] = static_cast<std::int32_t>(i);
      std::shuffle(order.begin(), order.end(), gen);
      std::vector<std::vector<std::int32_t>> seqs(p.S.size());
      for (std::size_t i = 0; i < p.S.size(); ++i) {
        const index_t S = p.S[i];
        for (index_t b = 0; b < (S + kBlock - 1) / kBlock; ++b) {
          seqs[i].push_back(order.back());
          order.pop_back();
        }
        for (index_t t = 0; t < S; ++t) {  // token t of every head: one NHD slot
          const auto o = static_cast<std::size_t>(
              (seqs[i][static_cast<std::size_t>(t / kBlock)] * kBlock + t % kBlock) * Hkv * d);
          const auto from = static_cast<std::size_t>((p.cu[i] + t) * Hkv * d);
          std::memcpy(prompt_k[static_cast<std::size_t>(l)].data() + o,
                      p.k[static_cast<std::size_t>(l)].data() + from,
                      static_cast<std::size_t>(Hkv * d) * sizeof(float));
          std::memcpy(prompt_v[static_cast<std::size_t>(l)].data() + o,
                      p.v[static_cast<std::size_t>(l)].data() + from,
                      static_cast<std::size_t>(Hkv * d) * sizeof(float));
        }
      }
      start.push_back(std::move(seqs));
      free_start.push_back(std::move(order));
    }
    k = prompt_k;
    v = prompt_v;
    restore(p);
  }
  // Back to the state after the engine's prefill forward pass (untimed).
  void restore(const Packed& p) {
    for (index_t l = 0; l < L; ++l) {
      const auto ll = static_cast<std::size_t>(l);
      std::memcpy(k[ll].data(), prompt_k[ll].data(), prompt_k[ll].size() * sizeof(float));
      std::memcpy(v[ll].data(), prompt_v[ll].data(), prompt_v[ll].size() * sizeof(float));
    }
    blocks = start;
    free_ids = free_start;
    lens.assign(static_cast<std::size_t>(L), std::vector<std::int32_t>(p.S.begin(), p.S.end()));
  }
  cake::block_table<> table(index_t l) {
    const auto& b = blocks[static_cast<std::size_t>(l)];
    indptr.assign(1, 0);
    ids.clear();
    seq_lens.clear();
    for (std::size_t i = 0; i < b.size(); ++i) {
      ids.insert(ids.end(), b[i].begin(), b[i].end());
      indptr.push_back(static_cast<std::int32_t>(ids.size()));
      seq_lens.push_back(lens[static_cast<std::size_t>(l)][i]);
    }
    return cake::make_block_table(indptr.data(), ids.data(), seq_lens.data(),
                                  static_cast<index_t>(b.size()));
  }
  cake::paged_kv<float> kv(index_t l) {
    const std::array<index_t, 4> ext{N, Hkv, kBlock, d}, st{kBlock * Hkv * d, d, Hkv * d, 1};
    return {cake::make_view(k[static_cast<std::size_t>(l)].data(), ext, st),
            cake::make_view(v[static_cast<std::size_t>(l)].data(), ext, st), table(l)};
  }
  // The blocks a call released from each sequence's layer go back to the free list.
  template <class Ragged>
  void take_back(const Ragged& r, const std::vector<cake::sequence_id>& seqs, index_t l) {
    for (std::size_t i = 0; i < seqs.size(); ++i) {
      auto& b = blocks[static_cast<std::size_t>(l)][i];
      for (std::int32_t f = r.freed(seqs[i], l); f > 0; --f) {
        free_ids[static_cast<std::size_t>(l)].push_back(b.back());
        b.pop_back();
      }
      lens[static_cast<std::size_t>(l)][i] = r.table(seqs[i], l).seq_lens(0);
    }
  }
  void give_room(index_t l) {
    for (std::size_t i = 0; i < blocks[static_cast<std::size_t>(l)].size(); ++i) {
      auto& b = blocks[static_cast<std::size_t>(l)][i];
      if (static_cast<index_t>(b.size()) * kBlock < lens[static_cast<std::size_t>(l)][i] + 1) {
        b.push_back(free_ids[static_cast<std::size_t>(l)].back());
        free_ids[static_cast<std::size_t>(l)].pop_back();
      }
    }
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
  add(name("ragged_serve", "paged", args + "/block:16"), [=](benchmark::State& st) {
    const Packed p(sh, lengths);
    Pools pools(p);
    for (auto _ : st) {
      st.PauseTiming();
      pools.restore(p);
      st.ResumeTiming();
      cake::RaggedKvCache<> batch(cfg);
      for (auto id : p.ids) batch.add(id);
      for (index_t l = 0; l < p.L; ++l) {
        batch.prefill(l, p.ids, p.q_window(), pools.kv(l));
        for (index_t j = 0; j <= l; ++j) pools.take_back(batch, p.ids, j);  // cascading
      }
      for (index_t t = 0; t < kSteps; ++t)
        for (index_t l = 0; l < p.L; ++l) {
          pools.give_room(l);
          batch.decode(l, p.ids, cake::make_view(p.dq.data(), A3{p.n(), p.H, p.d}),
                       cake::make_view(p.dk.data(), A3{p.n(), p.Hkv, p.d}),
                       cake::make_view(p.dv.data(), A3{p.n(), p.Hkv, p.d}), pools.table(l));
          pools.take_back(batch, p.ids, l);
        }
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
