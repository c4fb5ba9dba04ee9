// decode_scores: one decoding step's eviction scores of the held tokens of one layer
// (the new query's attention over C + window held keys, softmax, pooled per group).
// Every case reuses one cake::host_workspace, as a KvCache does.
//   cake:      cake::decode_scores on the kernel path picked at run time, default
//              policy (below min_parallel_work, 2^25 multiply-adds, on the calling thread)
//   split:     the same call always split over the OpenMP threads (parallel_from(0))
//   serial:    the same call on one thread (threads(1)); split and serial over C
//              show where splitting starts to pay, which sets the threshold
//   portable, avx2: the same call forced onto that path (cake::force_host_isa)
//   half_keys, bf16_keys: cake with the keys stored as _Float16 / cake::bfloat16,
//              the same values (bytes per second counts the bytes of the stored keys)
// The keys stay in cache between iterations (one layer's 4.3 MiB at C = 1024): this
// times the scoring, not a cold read of the cache.
#include "common/common.hpp"
#include "host/suites.hpp"

namespace cake_bench {

namespace {

template <class T>
void run_scores(benchmark::State& st, const Shape& sh, index_t C,
                cake::host_policy policy = cake::host) {
  const index_t B = 1, H = sh.q_heads, Hkv = sh.kv_heads, d = sh.head_dim, n = C + window;
  Rng g(91);
  std::vector<float> q(static_cast<std::size_t>(B * H * d)),
      out(static_cast<std::size_t>(B * Hkv * C));
  std::vector<T> k(static_cast<std::size_t>(B * Hkv * n * d));
  for (auto& x : q) x = g.normal();
  for (auto& x : k) x = static_cast<T>(g.normal());
  const cake::MeanVarianceIndicator indicator{};
  cake::host_workspace ws;
  const cake::host_policy exec = policy.from(ws);
  for (auto _ : st) {
    cake::decode_scores(
        exec, cake::make_view(static_cast<const float*>(q.data()), std::array<index_t, 3>{B, H, d}),
        cake::make_view(static_cast<const T*>(k.data()), std::array<index_t, 4>{B, Hkv, n, d}),
        indicator, cake::make_view(out.data(), std::array<index_t, 3>{B, Hkv, C}));
    benchmark::DoNotOptimize(out.data());
    benchmark::ClobberMemory();
  }
  st.SetBytesProcessed(static_cast<std::int64_t>(k.size() * sizeof(T)) * st.iterations());
}

void add_case(const Shape& sh, index_t C, bool variants) {
  const std::string args = std::string(sh.name) + "/C:" + std::to_string(C);
  auto micro = [](benchmark::internal::Benchmark* b) {
    b->Unit(benchmark::kMicrosecond)->MinTime(0.2);
  };
  micro(add(name("decode_scores", "cake", args),
            [sh, C](benchmark::State& st) { run_scores<float>(st, sh, C); }));
  micro(add(name("decode_scores", "split", args), [sh, C](benchmark::State& st) {
    run_scores<float>(st, sh, C, cake::host.parallel_from(0));
  }));
  micro(add(name("decode_scores", "serial", args), [sh, C](benchmark::State& st) {
    run_scores<float>(st, sh, C, cake::host.threads(1));
  }));
  if (!variants) return;
  for (cake::host_isa isa : {cake::host_isa::portable, cake::host_isa::avx2}) {
    if (!cake::host_isa_supported(isa) || isa == cake::host_isa_best()) continue;
    micro(add(name("decode_scores", cake::host_isa_name(isa), args),
              [sh, C, isa](benchmark::State& st) {
                const cake::host_isa saved = cake::active_host_isa();
                cake::force_host_isa(isa);
                run_scores<float>(st, sh, C);
                cake::force_host_isa(saved);
              }));
  }
  micro(add(name("decode_scores", "bf16_keys", args),
            [sh, C](benchmark::State& st) { run_scores<cake::bfloat16>(st, sh, C); }));
#if defined(__FLT16_MAX__)
  micro(add(name("decode_scores", "half_keys", args),
            [sh, C](benchmark::State& st) { run_scores<_Float16>(st, sh, C); }));
#endif
}

}  // namespace

void register_decode_scores() {
  add_case(llama, 1024, true);
  for (index_t C : {256, 4096, 16384}) add_case(llama, C, false);
  if (full_matrix()) add_case(qwen, 1024, true);
}

}  // namespace cake_bench
