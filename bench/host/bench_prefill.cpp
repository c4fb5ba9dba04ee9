// prefill_layer: one layer's whole prefill eviction (statistics, top-k, gather of
// the kept K and V rows).
//   cake:  cake::window_stats + cake::select_k (position order) + cake::compact x2,
//          scratch from one cake::host_workspace; counters stats_ms, select_ms and
//          gather_ms say where the time goes
//   naive: the reference route: materialised attention and stats (NaiveStats),
//          full std::sort per row, copy of the kept rows into fresh buffers
// prefill_all: every layer through cake::KvCache::prefill.
//   cake:     cascading (each layer cut as soon as it is scored; the paper's mode)
//   one_shot: cascade = false (every layer held uncut until the last is scored)
// prefill_method: every layer through each cake::methods cache, cascading; CAKE's
//   row of the same run is the baseline (what each method costs next to CAKE).
#include <chrono>

#include "common/common.hpp"
#include "host/suites.hpp"

namespace cake_bench {

namespace {

void layer_counters(benchmark::State& st, const LayerInputs& in) {
  st.SetItemsProcessed(st.iterations() * in.B * in.Hkv * in.S);  // tokens scored
  st.SetBytesProcessed(static_cast<std::int64_t>(2 * in.kv_bytes()) * st.iterations());
}

void add_layer_case(const Shape& sh, index_t B, index_t S, index_t C) {
  const std::string args = shape_args(sh, B, S) + "/C:" + std::to_string(C);
  add(name("prefill_layer", "cake", args), [=](benchmark::State& st) {
    const LayerInputs& in = layer_inputs(sh, B, S);
    const index_t Hkv = in.Hkv, d = in.d, w = in.w, P = S - w, rows = B * Hkv;
    const index_t kp = std::min(C - w, P), m = kp + w;
    std::vector<float> ind(static_cast<std::size_t>(rows * P));
    std::array<float, 2> stats{};
    std::vector<index_t> keep(static_cast<std::size_t>(rows * m));
    std::vector<float> kd(static_cast<std::size_t>(rows * m * d)), vd(kd.size());
    const cake::MeanVarianceIndicator indicator{};
    cake::host_workspace ws;  // as a KvCache holds one
    const cake::host_policy exec = cake::host.from(ws);
    // Where the time goes: seconds per phase, summed over the iterations.
    double t_stats = 0, t_select = 0, t_gather = 0;
    using clock = std::chrono::steady_clock;
    const auto secs = [](clock::time_point a, clock::time_point b) {
      return std::chrono::duration<double>(b - a).count();
    };
    for (auto _ : st) {
      const auto t0 = clock::now();
      cake::window_stats(exec, in.qv(), in.kv(), indicator,
                         cake::make_view(ind.data(), std::array<index_t, 3>{B, Hkv, P}),
                         cake::make_view(stats.data(), std::array<index_t, 1>{2}));
      const auto t1 = clock::now();
      // The top-k indices go straight into the first kp slots of each keep row.
      cake::select_k(exec, cake::make_view(ind.data(), std::array<index_t, 2>{rows, P}),
                     cake::make_view(keep.data(), std::array<index_t, 2>{rows, kp},
                                     std::array<index_t, 2>{m, 1}),
                     cake::select_order::position);
      for (index_t r = 0; r < rows; ++r)
        for (index_t t = 0; t < w; ++t) keep[static_cast<std::size_t>(r * m + kp + t)] = P + t;
      const auto t2 = clock::now();
      auto kv = cake::make_view(keep.data(), std::array<index_t, 3>{B, Hkv, m});
      cake::compact(exec, in.kv(), kv,
                    cake::make_view(kd.data(), std::array<index_t, 4>{B, Hkv, m, d}));
      cake::compact(exec, in.vv(), kv,
                    cake::make_view(vd.data(), std::array<index_t, 4>{B, Hkv, m, d}));
      benchmark::DoNotOptimize(kd.data());
      benchmark::DoNotOptimize(vd.data());
      benchmark::ClobberMemory();
      const auto t3 = clock::now();
      t_stats += secs(t0, t1);
      t_select += secs(t1, t2);
      t_gather += secs(t2, t3);
    }
    layer_counters(st, in);
    const double it = static_cast<double>(st.iterations());
    st.counters["stats_ms"] = 1e3 * t_stats / it;
    st.counters["select_ms"] = 1e3 * t_select / it;
    st.counters["gather_ms"] = 1e3 * t_gather / it;
  })->MinTime(0.3);
  add(name("prefill_layer", "naive", args), [=](benchmark::State& st) {
    const LayerInputs& in = layer_inputs(sh, B, S);
    const index_t Hkv = in.Hkv, d = in.d, w = in.w, P = S - w, rows = B * Hkv;
    const index_t kp = std::min(C - w, P), m = kp + w;
    NaiveStats naive;
    std::vector<float> ind;
    std::vector<index_t> top;
    std::vector<std::vector<index_t>> tmp;
    double stats[2];
    for (auto _ : st) {
      naive.run(in, 200.0f, 5, ind, stats);
      naive_topk_sort(ind.data(), rows, P, kp, top, tmp);
      std::vector<float> kd(static_cast<std::size_t>(rows * m * d)), vd(kd.size());
#pragma omp parallel for schedule(static)
      for (index_t r = 0; r < rows; ++r)
        for (index_t t = 0; t < m; ++t) {
          const index_t j = t < kp ? top[static_cast<std::size_t>(r * kp + t)] : P + (t - kp);
          std::memcpy(kd.data() + (r * m + t) * d, in.k.data() + (r * S + j) * d,
                      static_cast<std::size_t>(d) * sizeof(float));
          std::memcpy(vd.data() + (r * m + t) * d, in.v.data() + (r * S + j) * d,
                      static_cast<std::size_t>(d) * sizeof(float));
        }
      benchmark::DoNotOptimize(kd.data());
      benchmark::DoNotOptimize(vd.data());
      benchmark::ClobberMemory();
    }
    layer_counters(st, in);
  })->MinTime(0.3);
}

// Per-layer window queries: the same keys, but a different sharpness per layer,
// so that preferences (and budgets) differ across layers as in a real model.
std::vector<std::vector<float>> layer_queries(const Shape& sh, index_t B) {
  std::vector<std::vector<float>> qs(static_cast<std::size_t>(sh.layers));
  for (index_t l = 0; l < sh.layers; ++l)
    fill_queries(qs[static_cast<std::size_t>(l)], B, sh.q_heads, window, sh.head_dim,
                 100 + static_cast<std::uint64_t>(l),
                 0.4f + 1.2f * static_cast<float>(l % 7) / 6.0f);
  return qs;
}

cake::CacheConfig cache_config(const Shape& sh, index_t B, index_t C, bool cascade) {
  cake::CacheConfig cfg{};
  cfg.layers = sh.layers;
  cfg.batch = B;
  cfg.q_heads = sh.q_heads;
  cfg.kv_heads = sh.kv_heads;
  cfg.head_dim = sh.head_dim;
  cfg.window = window;
  cfg.cache_size = C;
  cfg.cascade = cascade;
  return cfg;
}

// Every layer of one prompt through cache.prefill, from a fresh cache, per iteration.
template <class Cache>
void prefill_every_layer(benchmark::State& st, Cache& cache, const Shape& sh, index_t B,
                         index_t S) {
  const LayerInputs& in = layer_inputs(sh, B, S);
  const auto qs = layer_queries(sh, B);
  for (auto _ : st) {
    cache.reset();
    for (index_t l = 0; l < sh.layers; ++l)
      cache.prefill(l,
                    cake::make_view(qs[static_cast<std::size_t>(l)].data(),
                                    std::array<index_t, 4>{B, sh.q_heads, window, sh.head_dim}),
                    in.kv(), in.vv());
    benchmark::DoNotOptimize(cache.tokens_held(sh.layers - 1));
  }
  st.SetItemsProcessed(st.iterations() * sh.layers * B * sh.kv_heads * S);
  st.SetBytesProcessed(static_cast<std::int64_t>(2 * in.kv_bytes()) * sh.layers * st.iterations());
}

void add_all_case(const Shape& sh, index_t B, index_t S, index_t C) {
  const std::string args = shape_args(sh, B, S) + "/C:" + std::to_string(C);
  for (bool cascade : {true, false}) {
    add(name("prefill_all", cascade ? "cake" : "one_shot", args), [=](benchmark::State& st) {
      cake::KvCache<> cache(cache_config(sh, B, C, cascade));
      prefill_every_layer(st, cache, sh, B, S);
      st.counters["peak_tokens"] = static_cast<double>(cache.peak_tokens_held());
    })->MinTime(0.5);
  }
}

template <class Cache>
void add_method_case(const char* method, const Shape& sh, index_t B, index_t S, index_t C) {
  const std::string args = shape_args(sh, B, S) + "/C:" + std::to_string(C);
  add(name("prefill_method", method, args), [=](benchmark::State& st) {
    Cache cache(cache_config(sh, B, C, true));
    prefill_every_layer(st, cache, sh, B, S);
  })->MinTime(0.3);
}

void add_methods(const Shape& sh, index_t B, index_t S, index_t C) {
  namespace m = cake::methods;
  add_method_case<m::Cake<>>("cake", sh, B, S, C);
  add_method_case<m::SnapKv<>>("snapkv", sh, B, S, C);
  add_method_case<m::PyramidKv<>>("pyramidkv", sh, B, S, C);
  add_method_case<m::StreamingLlm<>>("streamingllm", sh, B, S, C);
  add_method_case<m::H2o<>>("h2o", sh, B, S, C);
  add_method_case<m::Tova<>>("tova", sh, B, S, C);
  add_method_case<m::AdaSnapKv<>>("ada_snapkv", sh, B, S, C);
  add_method_case<m::CakeAdaKv<>>("cake_adakv", sh, B, S, C);
}

}  // namespace

void register_prefill() {
  if (full_matrix()) {
    for (const Shape& sh : all_shapes)
      for (index_t B : {1, 4})
        for (index_t S : {4096, 16384, 32768})
          for (index_t C : {128, 1024, 2048}) add_layer_case(sh, B, S, C);
    for (const Shape& sh : all_shapes)
      for (index_t B : {1, 4})
        for (index_t S : {4096, 16384, 32768}) add_all_case(sh, B, S, 1024);
    for (const Shape& sh : all_shapes) add_methods(sh, 1, 4096, 256);
    return;
  }
  add_layer_case(llama, 1, 4096, 1024);
  add_layer_case(llama, 1, 16384, 1024);
  add_layer_case(llama, 1, 16384, 128);
  add_layer_case(llama, 1, 16384, 2048);
  add_layer_case(qwen, 1, 4096, 1024);
  add_layer_case(small, 1, 4096, 1024);
  add_all_case(llama, 1, 4096, 1024);
  add_all_case(small, 1, 4096, 1024);
  add_methods(small, 1, 4096, 256);
}

}  // namespace cake_bench
