// paged_cache: one prompt through cake::KvCache, every layer prefilled (cascading)
// then kDecode decoding steps of every layer, on an engine's paged pools next to the
// dense cache, same inputs, same kept tokens.
//   cake:  KvCache on paged pools (paged_kv; vLLM NHD layout, blocks of 16 scattered
//          over the pool): the prompt is read where the engine wrote it, kept tokens
//          compacted in place, the blocks freed go back to the engine's free list
//   dense: KvCache on its own memory: the prompt copied in (selected), decode in place
// The paged case restores the pools' prompt before each iteration, untimed (the
// engine writes it there during its forward pass, which is not the cache's work).
// paged_prefill: the same for one layer's prefill alone (Llama-3.1-8B heads).
#include <chrono>
#include <random>

#include "common/common.hpp"
#include "host/suites.hpp"

namespace cake_bench {

namespace {

constexpr index_t kDecode = 16;  // decoding steps per iteration
constexpr index_t kBlock = 16;   // tokens per block

cake::CacheConfig paged_config(const Shape& sh, index_t B, index_t C) {
  cake::CacheConfig cfg{};
  cfg.layers = sh.layers;
  cfg.batch = B;
  cfg.q_heads = sh.q_heads;
  cfg.kv_heads = sh.kv_heads;
  cfg.head_dim = sh.head_dim;
  cfg.window = window;
  cfg.cache_size = C;
  return cfg;
}

// Per-layer queries, and decode tokens shared by both caches.
struct Inputs {
  std::vector<std::vector<float>> q;  // [layer] (B, H, w, d)
  std::vector<float> dq, dk, dv;      // (kDecode, B, H, d), (kDecode, B, Hkv, d) x2
  Inputs(const Shape& sh, index_t B) : q(static_cast<std::size_t>(sh.layers)) {
    for (index_t l = 0; l < sh.layers; ++l)
      fill_queries(q[static_cast<std::size_t>(l)], B, sh.q_heads, window, sh.head_dim,
                   100 + static_cast<std::uint64_t>(l),
                   0.4f + 1.2f * static_cast<float>(l % 7) / 6.0f);
    Rng g(78);
    dq.resize(static_cast<std::size_t>(kDecode * B * sh.q_heads * sh.head_dim));
    dk.resize(static_cast<std::size_t>(kDecode * B * sh.kv_heads * sh.head_dim));
    dv.resize(dk.size());
    for (auto& x : dq) x = g.normal();
    for (auto& x : dk) x = g.normal();
    for (auto& x : dv) x = g.normal();
  }
};

// An engine's paged memory for every layer: pools in NHD layout, one free list.
struct PagedEngine {
  index_t L, B, Hkv, d, S, N;
  std::vector<std::vector<float>> prompt_k, prompt_v;  // [layer] pools as the prompt left them
  std::vector<std::vector<float>> k, v;                // [layer] the live pools
  std::vector<std::vector<std::vector<std::int32_t>>> blocks, start;  // [layer][seq]
  std::vector<std::vector<std::int32_t>> lens;
  std::vector<std::int32_t> free_list, free_start;
  std::vector<std::int32_t> indptr, ids, seq_lens;  // the table lent

  PagedEngine(const Shape& sh, index_t B_, index_t S_, const LayerInputs& in)
      : L(sh.layers), B(B_), Hkv(sh.kv_heads), d(sh.head_dim), S(S_) {
    const index_t per_seq = (S + kDecode + kBlock - 1) / kBlock + 1;
    N = L * B * per_seq;
    std::vector<std::int32_t> order(static_cast<std::size_t>(N));
    for (index_t i = 0; i < N; ++i)
      order[static_cast<std::size_t>(i)] = static_cast<std::int32_t>(i);
    std::mt19937 gen(7);
    std::shuffle(order.begin(), order.end(), gen);
    const auto size = static_cast<std::size_t>(N * kBlock * Hkv * d);
    prompt_k.assign(static_cast<std::size_t>(L), std::vector<float>(size, 0.0f));
    prompt_v = prompt_k;
    start.assign(static_cast<std::size_t>(L),
                 std::vector<std::vector<std::int32_t>>(static_cast<std::size_t>(B)));
    std::size_t next = 0;
    for (index_t l = 0; l < L; ++l)
      for (index_t s = 0; s < B; ++s) {
        auto& b = start[static_cast<std::size_t>(l)][static_cast<std::size_t>(s)];
        for (index_t i = 0; i < (S + kBlock - 1) / kBlock; ++i) b.push_back(order[next++]);
        // Every layer's prompt is the same synthetic keys (as in the prefill benches).
        for (index_t h = 0; h < Hkv; ++h)
          for (index_t t = 0; t < S; ++t) {
            const auto src = static_cast<std::size_t>(((s * Hkv + h) * S + t) * d);
            const auto o = static_cast<std::size_t>(
                (b[static_cast<std::size_t>(t / kBlock)] * kBlock + t % kBlock) * Hkv * d + h * d);
            std::memcpy(prompt_k[static_cast<std::size_t>(l)].data() + o, in.k.data() + src,
                        static_cast<std::size_t>(d) * sizeof(float));
            std::memcpy(prompt_v[static_cast<std::size_t>(l)].data() + o, in.v.data() + src,
                        static_cast<std::size_t>(d) * sizeof(float));
          }
      }
    free_start.assign(order.begin() + static_cast<std::ptrdiff_t>(next), order.end());
    k = prompt_k;
    v = prompt_v;
  }
  // Back to the state after the engine's prefill forward pass (untimed).
  void restore() {
    for (index_t l = 0; l < L; ++l) {
      std::memcpy(k[static_cast<std::size_t>(l)].data(),
                  prompt_k[static_cast<std::size_t>(l)].data(),
                  prompt_k[static_cast<std::size_t>(l)].size() * sizeof(float));
      std::memcpy(v[static_cast<std::size_t>(l)].data(),
                  prompt_v[static_cast<std::size_t>(l)].data(),
                  prompt_v[static_cast<std::size_t>(l)].size() * sizeof(float));
    }
    blocks = start;
    lens.assign(
        static_cast<std::size_t>(L),
        std::vector<std::int32_t>(static_cast<std::size_t>(B), static_cast<std::int32_t>(S)));
    free_list = free_start;
  }
  cake::block_table<> table(index_t l) {
    indptr.assign(1, 0);
    ids.clear();
    seq_lens.clear();
    for (index_t s = 0; s < B; ++s) {
      const auto& b = blocks[static_cast<std::size_t>(l)][static_cast<std::size_t>(s)];
      ids.insert(ids.end(), b.begin(), b.end());
      indptr.push_back(static_cast<std::int32_t>(ids.size()));
      seq_lens.push_back(lens[static_cast<std::size_t>(l)][static_cast<std::size_t>(s)]);
    }
    return cake::make_block_table(indptr.data(), ids.data(), seq_lens.data(), B);
  }
  cake::paged_kv<float> kv(index_t l) {
    const std::array<index_t, 4> ext{N, Hkv, kBlock, d}, st{kBlock * Hkv * d, d, Hkv * d, 1};
    return {cake::make_view(k[static_cast<std::size_t>(l)].data(), ext, st),
            cake::make_view(v[static_cast<std::size_t>(l)].data(), ext, st), table(l)};
  }
  // The blocks a call released go back to the free list.
  template <class Cache>
  void take_back(const Cache& c, index_t l) {
    const auto fr = c.freed(l);
    for (index_t s = 0; s < B; ++s) {
      auto& b = blocks[static_cast<std::size_t>(l)][static_cast<std::size_t>(s)];
      for (std::int32_t i = 0; i < fr[static_cast<std::size_t>(s)]; ++i) {
        free_list.push_back(b.back());
        b.pop_back();
      }
      lens[static_cast<std::size_t>(l)][static_cast<std::size_t>(s)] = c.table(l).seq_lens(s);
    }
  }
  void give_room(index_t l) {
    for (index_t s = 0; s < B; ++s) {
      auto& b = blocks[static_cast<std::size_t>(l)][static_cast<std::size_t>(s)];
      if (static_cast<index_t>(b.size()) * kBlock <
          lens[static_cast<std::size_t>(l)][static_cast<std::size_t>(s)] + 1) {
        b.push_back(free_list.back());
        free_list.pop_back();
      }
    }
  }
};

// Where the time goes: prefill_ms (every layer) and decode_ms (every step of every
// layer) per iteration.
struct Split {
  using clock = std::chrono::steady_clock;
  double prefill = 0, decode = 0;
  void add(clock::time_point a, clock::time_point b, clock::time_point c) {
    prefill += std::chrono::duration<double>(b - a).count();
    decode += std::chrono::duration<double>(c - b).count();
  }
  void report(benchmark::State& st) const {
    const double it = static_cast<double>(st.iterations());
    st.counters["prefill_ms"] = 1e3 * prefill / it;
    st.counters["decode_ms"] = 1e3 * decode / it;
  }
};

auto decode_views(const Inputs& in, const Shape& sh, index_t B, index_t t) {
  const index_t H = sh.q_heads, Hkv = sh.kv_heads, d = sh.head_dim;
  return std::tuple{
      cake::make_view(in.dq.data() + t * B * H * d, std::array<index_t, 3>{B, H, d}),
      cake::make_view(in.dk.data() + t * B * Hkv * d, std::array<index_t, 3>{B, Hkv, d}),
      cake::make_view(in.dv.data() + t * B * Hkv * d, std::array<index_t, 3>{B, Hkv, d})};
}

void add_case(const Shape& sh, index_t B, index_t S, index_t C) {
  const std::string args = shape_args(sh, B, S) + "/C:" + std::to_string(C) +
                           "/block:" + std::to_string(kBlock) +
                           "/decode:" + std::to_string(kDecode);
  const auto qv = [sh, B](const Inputs& in, index_t l) {
    return cake::make_view(in.q[static_cast<std::size_t>(l)].data(),
                           std::array<index_t, 4>{B, sh.q_heads, window, sh.head_dim});
  };
  add(name("paged_cache", "dense", args), [=](benchmark::State& st) {
    const LayerInputs& li = layer_inputs(sh, B, S);
    const Inputs in(sh, B);
    cake::KvCache<> cache(paged_config(sh, B, C));
    Split split;
    for (auto _ : st) {
      const auto t0 = Split::clock::now();
      cache.reset();
      for (index_t l = 0; l < sh.layers; ++l) cache.prefill(l, qv(in, l), li.kv(), li.vv());
      const auto t1 = Split::clock::now();
      for (index_t t = 0; t < kDecode; ++t)
        for (index_t l = 0; l < sh.layers; ++l) {
          const auto [q, k, v] = decode_views(in, sh, B, t);
          cache.decode(l, q, k, v);
        }
      benchmark::DoNotOptimize(cache.tokens_held());
      split.add(t0, t1, Split::clock::now());
    }
    split.report(st);
  })->MinTime(0.5);
  add(name("paged_cache", "cake", args), [=](benchmark::State& st) {
    const LayerInputs& li = layer_inputs(sh, B, S);
    const Inputs in(sh, B);
    PagedEngine eng(sh, B, S, li);
    cake::KvCache<> cache(paged_config(sh, B, C));
    Split split;
    for (auto _ : st) {
      st.PauseTiming();
      eng.restore();
      st.ResumeTiming();
      const auto t0 = Split::clock::now();
      cache.reset();
      for (index_t l = 0; l < sh.layers; ++l) {
        cache.prefill(l, qv(in, l), eng.kv(l));
        for (index_t j = 0; j <= l; ++j) eng.take_back(cache, j);  // cascading frees earlier ones
      }
      const auto t1 = Split::clock::now();
      for (index_t t = 0; t < kDecode; ++t)
        for (index_t l = 0; l < sh.layers; ++l) {
          const auto [q, k, v] = decode_views(in, sh, B, t);
          eng.give_room(l);
          cache.decode(l, q, k, v, eng.table(l));
          eng.take_back(cache, l);
        }
      benchmark::DoNotOptimize(cache.tokens_held());
      split.add(t0, t1, Split::clock::now());
    }
    split.report(st);
    st.counters["free_blocks"] = static_cast<double>(eng.free_list.size());
  })->MinTime(0.5);
}

// One layer's prefill eviction (statistics, top-k, the kept tokens moved), the first
// layer of a cache, dense next to paged: the dense cache scores its caller's K and
// gathers the kept tokens into its own memory; the paged one scores the keys in the
// pools through the block table and compacts the kept tokens there.
void add_prefill_case(const Shape& shape, index_t B, index_t S, index_t C) {
  Shape sh = shape;
  sh.layers = 1;
  const std::string args =
      shape_args(sh, B, S) + "/C:" + std::to_string(C) + "/block:" + std::to_string(kBlock);
  const auto qv = [sh, B](const Inputs& in) {
    return cake::make_view(in.q[0].data(),
                           std::array<index_t, 4>{B, sh.q_heads, window, sh.head_dim});
  };
  add(name("paged_prefill", "dense", args), [=](benchmark::State& st) {
    const LayerInputs& li = layer_inputs(sh, B, S);
    const Inputs in(sh, B);
    cake::KvCache<> cache(paged_config(sh, B, C));
    for (auto _ : st) {
      cache.reset();
      cache.prefill(0, qv(in), li.kv(), li.vv());
      benchmark::DoNotOptimize(cache.tokens_held());
    }
  })->MinTime(0.3);
  add(name("paged_prefill", "cake", args), [=](benchmark::State& st) {
    const LayerInputs& li = layer_inputs(sh, B, S);
    const Inputs in(sh, B);
    PagedEngine eng(sh, B, S, li);
    cake::KvCache<> cache(paged_config(sh, B, C));
    for (auto _ : st) {
      st.PauseTiming();
      eng.restore();
      st.ResumeTiming();
      cache.reset();
      cache.prefill(0, qv(in), eng.kv(0));
      eng.take_back(cache, 0);
      benchmark::DoNotOptimize(cache.tokens_held());
    }
  })->MinTime(0.3);
}

}  // namespace

void register_paged_cache() {
  add_prefill_case(llama, 1, 4096, 1024);
  add_prefill_case(llama, 1, 16384, 1024);
  add_case(small, 1, 4096, 1024);
  add_case(small, 1, 4096, 256);
  if (full_matrix()) {
    add_case(llama, 1, 4096, 1024);
    add_case(small, 4, 4096, 1024);
  }
}

}  // namespace cake_bench
