// decode_step: one generated token through every layer: append its K and V and
// evict one token when the layer is over budget.
//   cake:  cake::KvCache::decode per layer (in-place slot reuse)
//   naive: the reference route: concatenate (rewrite) the cache, score all held
//          keys with a materialised softmax, pool, full std::sort of the
//          candidates, gather the kept rows into a fresh cache
// decode_layer: one layer's step at Llama-3.1-8B heads holding C tokens (its 4.3 MiB
// of float K at C = 1024 stays in L3 between steps), position and reference order,
// dense and paged (an engine's pools, NHD blocks of 16 scattered, lent back each step;
// paged_any: the same with CacheConfig::paged_slots = slot_order::any, the held tokens
// in a row's first slots in any order, so a step moves one K/V row, not those after
// the evicted token):
//   cake:     KvCache::decode: the new token into a free K/V row (slot map), the
//             held keys scored where they lie (paged: through the block table), one
//             eviction by argmin (position order) or a counting sort (reference order)
//   shifting: the same cache and the same scores from a custom (source) indicator,
//             which takes the cache's generic path, the one every step took before the
//             slot map: scores from a dense view (paged: a copy of the keys), select_k,
//             K/V rows shifted down in place (position) or gathered and copied back
//             (reference)
//   naive:    naive_step above on one layer (reference order)
//   cake_split (dense, C = 1024): cake with a policy that splits the step's scoring over
//             the threads, its KV heads on both cores (kSplitWork below)
//
// The machine's limit for decode_layer at C = 1024 (1025 keys held after the append,
// 32 query heads, 8 KV heads, head_dim 128): the scores are 32 x 1025 x 128 = 4.2 M
// multiply-adds (8.4 MFLOP) and read K once, 8 x 1025 x 128 x 4 B = 4.2 MB, more than a
// core's L2, so each step streams it from L3. On the 2-core Zen 3 (AVX2, 2 x 256-bit FMA
// per cycle) this was measured on: FMA peak about 7.8 G vector FMA/s per core (125
// GFLOP/s), so 67 us on one core and 34 us on two; a streaming read of 4 MB from L3 at
// 35-43 GB/s per core, so 100-120 us on one core and about 55 us on two. The bound is
// the read: under 100 us per step takes both cores (or 16-bit keys, half the bytes).
// Where the time goes now (perf, cpu-clock, one thread, position order, Zen 3): the dot
// products 63% (4 query rows x 3 keys per block, the next block's keys prefetched; in
// a scratch loop with K in L1 they run at 71% of the FMA peak, from L3 about 10-25%
// slower), softmax 8%, listing the keys and the group's queries 7%, pooling 3%, the
// step's own work (append, argmin, the map's erase) 5-8%. Before this round the products
// ran 4 rows x 2 keys (8 FMA chains: the FMA latency showed) and the commit gathered
// every token's map entry, position and score through a selection.
#include <algorithm>
#include <random>

#include "common/common.hpp"
#include "host/suites.hpp"

namespace cake_bench {

namespace {

constexpr index_t kTokens = 16;  // distinct decode tokens, cycled
// cake_split: a cache whose policy splits calls of 1 M multiply-adds and more over the
// threads (host_policy::parallel_from), so that a step's scoring at C = 1024 (4.3 M)
// runs its KV heads on both cores; the default policy (2^25) keeps it on one.
constexpr std::int64_t kSplitWork = std::int64_t{1} << 20;

struct DecodeTokens {
  index_t B, H, Hkv, d;
  std::vector<float> q, k, v;  // (kTokens, B, H, d), (kTokens, B, Hkv, d) x2
  DecodeTokens(const Shape& sh, index_t B_)
      : B(B_), H(sh.q_heads), Hkv(sh.kv_heads), d(sh.head_dim) {
    Rng g(77);
    q.resize(static_cast<std::size_t>(kTokens * B * H * d));
    k.resize(static_cast<std::size_t>(kTokens * B * Hkv * d));
    v.resize(k.size());
    for (auto& x : q) x = g.normal();
    for (auto& x : k) x = g.normal();
    for (auto& x : v) x = g.normal();
  }
  const float* qp(index_t t) const { return q.data() + (t % kTokens) * B * H * d; }
  const float* kp(index_t t) const { return k.data() + (t % kTokens) * B * Hkv * d; }
  const float* vp(index_t t) const { return v.data() + (t % kTokens) * B * Hkv * d; }
};

// One naive layer: rows of `held` tokens, rewritten at every step.
struct NaiveLayer {
  index_t rows, held, d;
  std::vector<float> k, v;
};

void naive_step(NaiveLayer& ly, const float* q, const float* kn, const float* vn, index_t H,
                index_t Hkv, index_t budget) {
  const index_t rows = ly.rows, n = ly.held + 1, d = ly.d, grp = H / Hkv;
  const index_t cand = n - window, keep = std::min(budget, cand), m = keep + window;
  // torch.cat: a new cache with the token appended
  std::vector<float> k2(static_cast<std::size_t>(rows * n * d)), v2(k2.size());
  std::vector<float> k3(static_cast<std::size_t>(rows * m * d)), v3(k3.size());
  const float inv_sqrt_d = 1.0f / std::sqrt(static_cast<float>(d));
#pragma omp parallel for schedule(dynamic, 1)
  for (index_t r = 0; r < rows; ++r) {
    std::memcpy(k2.data() + r * n * d, ly.k.data() + r * ly.held * d,
                static_cast<std::size_t>(ly.held * d) * sizeof(float));
    std::memcpy(v2.data() + r * n * d, ly.v.data() + r * ly.held * d,
                static_cast<std::size_t>(ly.held * d) * sizeof(float));
    std::memcpy(k2.data() + (r * n + n - 1) * d, kn + r * d,
                static_cast<std::size_t>(d) * sizeof(float));
    std::memcpy(v2.data() + (r * n + n - 1) * d, vn + r * d,
                static_cast<std::size_t>(d) * sizeof(float));
    // attention of each query head of the group over all held keys
    std::vector<float> a(static_cast<std::size_t>(grp * n)), sc(static_cast<std::size_t>(cand));
    const index_t b = r / Hkv, g = r % Hkv;
    for (index_t h = 0; h < grp; ++h) {
      const float* qr = q + (b * H + g * grp + h) * d;
      float* ar = a.data() + h * n;
      for (index_t j = 0; j < n; ++j) {
        const float* kr = k2.data() + (r * n + j) * d;
        float part[8] = {};
        for (index_t x = 0; x + 8 <= d; x += 8)
          for (int l = 0; l < 8; ++l) part[l] += qr[x + l] * kr[x + l];
        float s = 0;
        for (int l = 0; l < 8; ++l) s += part[l];
        ar[j] = s * inv_sqrt_d;
      }
      float mx = std::numeric_limits<float>::lowest(), sum = 0;
      for (index_t j = 0; j < n; ++j) mx = std::max(mx, ar[j]);
      for (index_t j = 0; j < n; ++j) sum += (ar[j] = naive_exp(ar[j] - mx));
      for (index_t j = 0; j < n; ++j) ar[j] /= sum;
    }
    // pool (kernel 5) each head's candidate scores, then the group mean
    for (index_t j = 0; j < cand; ++j) {
      float acc = 0;
      for (index_t h = 0; h < grp; ++h)
        for (index_t t = -2; t <= 2; ++t)
          if (j + t >= 0 && j + t < cand) acc += a[static_cast<std::size_t>(h * n + j + t)];
      sc[static_cast<std::size_t>(j)] = acc / (5.0f * static_cast<float>(grp));
    }
    std::vector<index_t> idx(static_cast<std::size_t>(cand));
    for (index_t j = 0; j < cand; ++j) idx[static_cast<std::size_t>(j)] = j;
    std::sort(idx.begin(), idx.end(), [&](index_t x, index_t y) {
      return sc[static_cast<std::size_t>(x)] > sc[static_cast<std::size_t>(y)] ||
             (sc[static_cast<std::size_t>(x)] == sc[static_cast<std::size_t>(y)] && x < y);
    });
    for (index_t t = 0; t < m; ++t) {
      const index_t j = t < keep ? idx[static_cast<std::size_t>(t)] : cand + (t - keep);
      std::memcpy(k3.data() + (r * m + t) * d, k2.data() + (r * n + j) * d,
                  static_cast<std::size_t>(d) * sizeof(float));
      std::memcpy(v3.data() + (r * m + t) * d, v2.data() + (r * n + j) * d,
                  static_cast<std::size_t>(d) * sizeof(float));
    }
  }
  ly.k.swap(k3);
  ly.v.swap(v3);
  ly.held = m;
}

void add_case(const Shape& sh, index_t B, index_t C) {
  const std::string args =
      std::string(sh.name) + "/B:" + std::to_string(B) + "/C:" + std::to_string(C);
  const index_t S = 2 * C + 64;  // prompt longer than the cache, so prefill cuts
  const index_t H = sh.q_heads, Hkv = sh.kv_heads, d = sh.head_dim, L = sh.layers;
  auto counters = [=](benchmark::State& st) {
    st.SetItemsProcessed(st.iterations() * L);  // layers stepped
    // bytes the step must read at least: every held key once
    st.SetBytesProcessed(st.iterations() * L * B * Hkv * C * d *
                         static_cast<index_t>(sizeof(float)));
  };
  add(name("decode_step", "cake", args),
      [=](benchmark::State& st) {
        const LayerInputs& in = layer_inputs(sh, B, S);
        cake::CacheConfig cfg{};
        cfg.layers = L;
        cfg.batch = B;
        cfg.q_heads = H;
        cfg.kv_heads = Hkv;
        cfg.head_dim = d;
        cfg.window = window;
        cfg.cache_size = C;
        cake::KvCache<> cache(cfg);
        for (index_t l = 0; l < L; ++l) cache.prefill(l, in.qv(), in.kv(), in.vv());
        const DecodeTokens tok(sh, B);
        index_t t = 0;
        for (auto _ : st) {
          for (index_t l = 0; l < L; ++l)
            cache.decode(l, cake::make_view(tok.qp(t), std::array<index_t, 3>{B, H, d}),
                         cake::make_view(tok.kp(t), std::array<index_t, 3>{B, Hkv, d}),
                         cake::make_view(tok.vp(t), std::array<index_t, 3>{B, Hkv, d}));
          ++t;
          benchmark::DoNotOptimize(cache.tokens_held(L - 1));
        }
        counters(st);
      })
      ->MinTime(0.3)
      ->Unit(benchmark::kMicrosecond);
  add(name("decode_step", "naive", args),
      [=](benchmark::State& st) {
        const LayerInputs& in = layer_inputs(sh, B, S);
        std::vector<NaiveLayer> layers(static_cast<std::size_t>(L));
        for (auto& ly : layers) {  // C tokens held per layer: the last C of the prompt
          ly.rows = B * Hkv;
          ly.held = C;
          ly.d = d;
          ly.k.resize(static_cast<std::size_t>(ly.rows * C * d));
          ly.v.resize(ly.k.size());
          for (index_t r = 0; r < ly.rows; ++r) {
            std::memcpy(ly.k.data() + r * C * d, in.k.data() + (r * S + S - C) * d,
                        static_cast<std::size_t>(C * d) * sizeof(float));
            std::memcpy(ly.v.data() + r * C * d, in.v.data() + (r * S + S - C) * d,
                        static_cast<std::size_t>(C * d) * sizeof(float));
          }
        }
        const DecodeTokens tok(sh, B);
        index_t t = 0;
        for (auto _ : st) {
          for (auto& ly : layers)
            naive_step(ly, tok.qp(t), tok.kp(t), tok.vp(t), H, Hkv, C - window);
          ++t;
          benchmark::DoNotOptimize(layers.back().k.data());
        }
        counters(st);
      })
      ->MinTime(0.3)
      ->Unit(benchmark::kMicrosecond);
}

// The default indicator's scores as a custom source: the cache's generic path.
struct ShiftingIndicator {
  cake::MeanVarianceIndicator base{};
  template <class Exec, class Q, class K, class O>
  void prefill_scores(const Exec& exec, const Q& q, const K& keys, const O& out) const {
    std::array<float, 2> st{};
    cake::window_stats(exec, q, keys, base, out,
                       cake::make_view(st.data(), std::array<index_t, 1>{2}));
  }
  template <class Exec, class Q, class K, class O>
  void decode_scores(const Exec& exec, const Q& q, const K& keys, const O& out) const {
    cake::decode_scores(exec, q, keys, base, out);
  }
  cake::status validate() const { return cake::status::success(); }
};

// One layer's K/V pools in NHD blocks of 16, scattered, and the table lent each step.
struct OneLayerPool {
  static constexpr index_t bs = 16;
  index_t Hkv, d, nblocks;
  std::vector<float> k, v;
  std::vector<std::int32_t> blocks, free_list, indptr, lens;
  OneLayerPool(const LayerInputs& in, index_t S) : Hkv(in.Hkv), d(in.d) {
    nblocks = (S + bs - 1) / bs + 8;
    std::vector<std::int32_t> order(static_cast<std::size_t>(nblocks));
    for (index_t i = 0; i < nblocks; ++i)
      order[static_cast<std::size_t>(i)] = static_cast<std::int32_t>(i);
    std::shuffle(order.begin(), order.end(), std::mt19937(5));
    k.assign(static_cast<std::size_t>(nblocks * bs * Hkv * d), 0.0f);
    v = k;
    const index_t used = (S + bs - 1) / bs;
    blocks.assign(order.begin(), order.begin() + used);
    free_list.assign(order.begin() + used, order.end());
    for (index_t h = 0; h < Hkv; ++h)
      for (index_t t = 0; t < S; ++t) {
        const auto src = static_cast<std::size_t>((h * S + t) * d);
        const auto o = static_cast<std::size_t>(
            (blocks[static_cast<std::size_t>(t / bs)] * bs + t % bs) * Hkv * d + h * d);
        std::memcpy(k.data() + o, in.k.data() + src, static_cast<std::size_t>(d) * sizeof(float));
        std::memcpy(v.data() + o, in.v.data() + src, static_cast<std::size_t>(d) * sizeof(float));
      }
    lens.assign(1, static_cast<std::int32_t>(S));
  }
  cake::block_table<> table() {
    indptr = {0, static_cast<std::int32_t>(blocks.size())};
    return cake::make_block_table(indptr.data(), blocks.data(), lens.data(), 1);
  }
  cake::paged_kv<float> kv() {
    const std::array<index_t, 4> ext{nblocks, Hkv, bs, d}, st{bs * Hkv * d, d, Hkv * d, 1};
    return {cake::make_view(k.data(), ext, st), cake::make_view(v.data(), ext, st), table()};
  }
  template <class Cache>
  void take_back(const Cache& c) {
    for (std::int32_t i = 0; i < c.freed(0)[0]; ++i) {
      free_list.push_back(blocks.back());
      blocks.pop_back();
    }
    lens[0] = c.table(0).seq_lens(0);
  }
  void give_room() {
    if (static_cast<index_t>(blocks.size()) * bs < lens[0] + 1) {
      blocks.push_back(free_list.back());
      free_list.pop_back();
    }
  }
};

enum class layout { dense, paged, paged_any };

template <class Ind>
void run_layer(benchmark::State& st, index_t C, cake::token_order order, layout lay,
               cake::host_policy exec = {}) {
  const bool paged = lay != layout::dense;
  const Shape& sh = llama;
  const index_t B = 1, S = 2 * C + 64, H = sh.q_heads, Hkv = sh.kv_heads, d = sh.head_dim;
  const LayerInputs& in = layer_inputs(sh, B, S);
  cake::CacheConfig cfg{};
  cfg.layers = 1;
  cfg.batch = B;
  cfg.q_heads = H;
  cfg.kv_heads = Hkv;
  cfg.head_dim = d;
  cfg.window = window;
  cfg.cache_size = C;
  cfg.order = order;
  cfg.paged_slots = lay == layout::paged_any ? cake::slot_order::any : cake::slot_order::token;
  cake::KvCache<cake::CakePreference, cake::ProportionalBudget, Ind> cache(cfg, {}, {}, {}, exec);
  OneLayerPool pool(in, S);
  if (paged) {
    cache.prefill(0, in.qv(), pool.kv());
    pool.take_back(cache);
  } else {
    cache.prefill(0, in.qv(), in.kv(), in.vv());
  }
  const DecodeTokens tok(sh, B);
  index_t t = 0;
  const auto step = [&] {
    const auto q = cake::make_view(tok.qp(t), std::array<index_t, 3>{B, H, d});
    const auto k = cake::make_view(tok.kp(t), std::array<index_t, 3>{B, Hkv, d});
    const auto v = cake::make_view(tok.vp(t), std::array<index_t, 3>{B, Hkv, d});
    if (paged) {
      pool.give_room();
      cache.decode(0, q, k, v, pool.table());
      pool.take_back(cache);
    } else {
      cache.decode(0, q, k, v);
    }
    ++t;
  };
  for (int i = 0; i < 4; ++i) step();  // the workspace has grown, rows at budget + w
  for (auto _ : st) {
    step();
    benchmark::DoNotOptimize(cache.tokens_held(0));
  }
  st.SetItemsProcessed(st.iterations());  // layer steps
  st.SetBytesProcessed(st.iterations() * B * Hkv * C * d * static_cast<index_t>(sizeof(float)));
}

void add_layer_cases(index_t C) {
  for (cake::token_order order : {cake::token_order::position, cake::token_order::reference})
    for (layout lay : {layout::dense, layout::paged, layout::paged_any}) {
      const std::string args = std::string(llama.name) + "/C:" + std::to_string(C) + "/" +
                               (order == cake::token_order::position ? "position" : "reference") +
                               "/" +
                               (lay == layout::dense   ? "dense"
                                : lay == layout::paged ? "paged"
                                                       : "paged_any");
      add(name("decode_layer", "cake", args),
          [=](benchmark::State& st) { run_layer<cake::MeanVarianceIndicator>(st, C, order, lay); })
          ->MinTime(0.3)
          ->Unit(benchmark::kMicrosecond);
      // (a custom indicator keeps a paged layer in token order, paged_any or not)
      add(name("decode_layer", "shifting", args),
          [=](benchmark::State& st) { run_layer<ShiftingIndicator>(st, C, order, lay); })
          ->MinTime(0.3)
          ->Unit(benchmark::kMicrosecond);
      if (C >= 1024 && lay != layout::paged)  // the step's 4.3 M multiply-adds over the threads
        add(name("decode_layer", "cake_split", args),
            [=](benchmark::State& st) {
              run_layer<cake::MeanVarianceIndicator>(st, C, order, lay,
                                                     cake::host.parallel_from(kSplitWork));
            })
            ->MinTime(0.3)
            ->Unit(benchmark::kMicrosecond);
    }
  add(name("decode_layer", "naive", std::string(llama.name) + "/C:" + std::to_string(C)),
      [=](benchmark::State& st) {
        const Shape& sh = llama;
        const index_t S = 2 * C + 64, d = sh.head_dim;
        const LayerInputs& in = layer_inputs(sh, 1, S);
        NaiveLayer ly{sh.kv_heads, C, d, {}, {}};
        ly.k.resize(static_cast<std::size_t>(ly.rows * C * d));
        ly.v.resize(ly.k.size());
        for (index_t r = 0; r < ly.rows; ++r) {
          std::memcpy(ly.k.data() + r * C * d, in.k.data() + (r * S + S - C) * d,
                      static_cast<std::size_t>(C * d) * sizeof(float));
          std::memcpy(ly.v.data() + r * C * d, in.v.data() + (r * S + S - C) * d,
                      static_cast<std::size_t>(C * d) * sizeof(float));
        }
        const DecodeTokens tok(sh, 1);
        index_t t = 0;
        for (auto _ : st) {
          naive_step(ly, tok.qp(t), tok.kp(t), tok.vp(t), sh.q_heads, sh.kv_heads, C - window);
          ++t;
          benchmark::DoNotOptimize(ly.k.data());
        }
        st.SetItemsProcessed(st.iterations());
        st.SetBytesProcessed(st.iterations() * sh.kv_heads * C * d *
                             static_cast<index_t>(sizeof(float)));
      })
      ->MinTime(0.3)
      ->Unit(benchmark::kMicrosecond);
}

}  // namespace

void register_decode() {
  for (index_t C : {1024, 256}) add_layer_cases(C);
  if (full_matrix()) {
    for (const Shape& sh : all_shapes)
      for (index_t B : {1, 4})
        for (index_t C : {128, 1024, 2048}) add_case(sh, B, C);
    return;
  }
  for (index_t C : {128, 1024, 2048}) add_case(llama, 1, C);
  add_case(llama, 4, 1024);
  add_case(qwen, 1, 1024);
  add_case(small, 1, 1024);
}

}  // namespace cake_bench
