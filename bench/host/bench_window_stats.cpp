// window_stats: the layer's eviction indicator and entropy/variance sums from the
// window queries and all keys.
//   cake:  cake::window_stats (blocked, never materialises the attention)
//   naive: repeat K per query head, materialise [B,H,w,S] scores, softmax, then stats
//   portable, avx2: cake forced onto that kernel path (cake::force_host_isa); "cake"
//          is the path picked at run time (AVX-512 where the CPU has it). The portable
//          path is the blocked implementation before runtime dispatch, compiled here
//          with -march=native (a build without it runs it at SSE2 width).
//   bf16_qk, half_qk: cake with the window queries and keys stored as cake::bfloat16 /
//          _Float16 (the float inputs rounded; float accumulation)
// Every cake case reuses one cake::host_workspace, as a KvCache does.
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
  // The score products' share of the threads' measured FMA peak (fma_peak_flops).
  st.counters["fma_peak_fraction"] = benchmark::Counter(
      flops / fma_peak_flops() * static_cast<double>(st.iterations()), benchmark::Counter::kIsRate);
}

template <class QV, class KV>
void run_views(benchmark::State& st, const LayerInputs& in, index_t B, index_t S, QV qv, KV kv) {
  std::vector<float> ind(static_cast<std::size_t>(B * in.Hkv * (S - in.w)));
  std::array<float, 2> stats{};
  const cake::MeanVarianceIndicator indicator{};
  cake::host_workspace ws;
  for (auto _ : st) {
    cake::window_stats(cake::host.from(ws), qv, kv, indicator,
                       cake::make_view(ind.data(), std::array<index_t, 3>{B, in.Hkv, S - in.w}),
                       cake::make_view(stats.data(), std::array<index_t, 1>{2}));
    benchmark::DoNotOptimize(ind.data());
    benchmark::ClobberMemory();
  }
  stats_counters(st, in);
}

void run_cake(benchmark::State& st, const LayerInputs& in, index_t B, index_t S) {
  run_views(st, in, B, S, in.qv(), in.kv());
}

// cake on 16-bit copies of the same inputs.
template <class T>
void add_16bit(const Shape& sh, index_t B, index_t S, const char* impl) {
  add(name("window_stats", impl, shape_args(sh, B, S)), [sh, B, S](benchmark::State& st) {
    const LayerInputs& in = layer_inputs(sh, B, S);
    const std::vector<T> q(in.q.begin(), in.q.end()), k(in.k.begin(), in.k.end());
    run_views(st, in, B, S, cake::make_view(q.data(), std::array<index_t, 4>{B, in.H, in.w, in.d}),
              cake::make_view(k.data(), std::array<index_t, 4>{B, in.Hkv, S, in.d}));
  })->MinTime(0.3);
}

// cake on a forced kernel path (restored afterwards).
void add_forced(const Shape& sh, index_t B, index_t S, cake::host_isa isa) {
  if (!cake::host_isa_supported(isa) || isa == cake::host_isa_best()) return;
  add(name("window_stats", cake::host_isa_name(isa), shape_args(sh, B, S)),
      [sh, B, S, isa](benchmark::State& st) {
        const LayerInputs& in = layer_inputs(sh, B, S);
        const cake::host_isa saved = cake::active_host_isa();
        cake::force_host_isa(isa);
        run_cake(st, in, B, S);
        cake::force_host_isa(saved);
      })
      ->MinTime(0.3);
}

void add_case(const Shape& sh, index_t B, index_t S) {
  const std::string args = shape_args(sh, B, S);
  add(name("window_stats", "cake", args), [sh, B, S](benchmark::State& st) {
    run_cake(st, layer_inputs(sh, B, S), B, S);
  })->MinTime(0.3);
  add_forced(sh, B, S, cake::host_isa::portable);
  add_forced(sh, B, S, cake::host_isa::avx2);
  add_16bit<cake::bfloat16>(sh, B, S, "bf16_qk");
#if defined(__FLT16_MAX__)
  add_16bit<_Float16>(sh, B, S, "half_qk");
#endif
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
