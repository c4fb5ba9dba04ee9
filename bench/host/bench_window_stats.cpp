// window_stats: the layer's eviction indicator and entropy/variance sums from the
// window queries and all keys.
//   cake:  cake::window_stats (blocked, never materialises the attention)
//   naive: repeat K per query head, materialise [B,H,w,S] scores, softmax, then stats
#include "common/common.hpp"
#include "host/suites.hpp"

namespace cake_bench {

namespace {

void stats_counters(benchmark::State& st, const LayerInputs& in) {
  const double flops = 2.0 * static_cast<double>(in.B * in.H * in.w * in.S * in.d);
  st.SetItemsProcessed(st.iterations() * in.B * in.H * in.w * in.S);  // attention weights
  st.SetBytesProcessed(static_cast<std::int64_t>(in.kv_bytes()) * st.iterations());  // K read
  st.counters["GFLOPS"] = benchmark::Counter(flops * 1e-9 * static_cast<double>(st.iterations()),
                                             benchmark::Counter::kIsRate);
}

void add_case(const Shape& sh, index_t B, index_t S) {
  const std::string args = shape_args(sh, B, S);
  add(name("window_stats", "cake", args), [sh, B, S](benchmark::State& st) {
    const LayerInputs& in = layer_inputs(sh, B, S);
    std::vector<float> ind(static_cast<std::size_t>(B * in.Hkv * (S - in.w)));
    std::array<float, 2> stats{};
    const cake::MeanVarianceIndicator indicator{};
    for (auto _ : st) {
      cake::window_stats(cake::host, in.qv(), in.kv(), indicator,
                         cake::make_view(ind.data(), std::array<index_t, 3>{B, in.Hkv, S - in.w}),
                         cake::make_view(stats.data(), std::array<index_t, 1>{2}));
      benchmark::DoNotOptimize(ind.data());
      benchmark::ClobberMemory();
    }
    stats_counters(st, in);
  })->MinTime(0.3);
  add(name("window_stats", "naive", args), [sh, B, S](benchmark::State& st) {
    const LayerInputs& in = layer_inputs(sh, B, S);
    NaiveStats naive;
    std::vector<float> ind;
    double stats[2];
    for (auto _ : st) {
      naive.run(in, 200.0f, 5, ind, stats);
      benchmark::DoNotOptimize(ind.data());
      benchmark::ClobberMemory();
    }
    stats_counters(st, in);
  })->MinTime(0.3);
}

}  // namespace

void register_window_stats() {
  if (full_matrix()) {
    for (const Shape& sh : all_shapes)
      for (index_t B : {1, 4})
        for (index_t S : {4096, 16384, 32768}) add_case(sh, B, S);
    return;
  }
  for (const Shape& sh : all_shapes) add_case(sh, 1, 4096);
  add_case(llama, 1, 16384);
  add_case(llama, 4, 4096);
}

}  // namespace cake_bench
