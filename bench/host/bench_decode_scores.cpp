// decode_scores: one decoding step's eviction scores of the held tokens of one layer
// (the new query's attention over C + window held keys, softmax, pooled per group).
//   cake:      cake::decode_scores on the kernel path picked at run time
//   portable, avx2: the same call forced onto that path (cake::force_host_isa)
//   half_keys: cake with the keys stored as IEEE half (_Float16), same values
// The keys stay in cache between iterations (one layer's 4.3 MiB at C = 1024): this
// times the scoring, not a cold read of the cache.
#include "common/common.hpp"
#include "host/suites.hpp"

namespace cake_bench {

namespace {

template <class T>
void run_scores(benchmark::State& st, const Shape& sh, index_t C) {
  const index_t B = 1, H = sh.q_heads, Hkv = sh.kv_heads, d = sh.head_dim, n = C + window;
  Rng g(91);
  std::vector<float> q(static_cast<std::size_t>(B * H * d)), out(static_cast<std::size_t>(B * Hkv * C));
  std::vector<T> k(static_cast<std::size_t>(B * Hkv * n * d));
  for (auto& x : q) x = g.normal();
  for (auto& x : k) x = static_cast<T>(g.normal());
  const cake::MeanVarianceIndicator indicator{};
  for (auto _ : st) {
    cake::decode_scores(cake::host, cake::make_view(static_cast<const float*>(q.data()), std::array<index_t, 3>{B, H, d}),
                        cake::make_view(static_cast<const T*>(k.data()), std::array<index_t, 4>{B, Hkv, n, d}),
                        indicator, cake::make_view(out.data(), std::array<index_t, 3>{B, Hkv, C}));
    benchmark::DoNotOptimize(out.data());
    benchmark::ClobberMemory();
  }
  st.SetBytesProcessed(static_cast<std::int64_t>(k.size() * sizeof(T)) * st.iterations());
}

void add_case(const Shape& sh, index_t C) {
  const std::string args = std::string(sh.name) + "/C:" + std::to_string(C);
  auto micro = [](benchmark::internal::Benchmark* b) { b->Unit(benchmark::kMicrosecond)->MinTime(0.2); };
  micro(add(name("decode_scores", "cake", args),
            [sh, C](benchmark::State& st) { run_scores<float>(st, sh, C); }));
  for (cake::host_isa isa : {cake::host_isa::portable, cake::host_isa::avx2}) {
    if (!cake::host_isa_supported(isa) || isa == cake::host_isa_best()) continue;
    micro(add(name("decode_scores", cake::host_isa_name(isa), args), [sh, C, isa](benchmark::State& st) {
      const cake::host_isa saved = cake::active_host_isa();
      cake::force_host_isa(isa);
      run_scores<float>(st, sh, C);
      cake::force_host_isa(saved);
    }));
  }
#if defined(__FLT16_MAX__)
  micro(add(name("decode_scores", "half_keys", args),
            [sh, C](benchmark::State& st) { run_scores<_Float16>(st, sh, C); }));
#endif
}

}  // namespace

void register_decode_scores() {
  add_case(llama, 1024);
  if (full_matrix()) {
    add_case(llama, 4096);
    add_case(qwen, 1024);
  }
}

}  // namespace cake_bench
