// cake_bench: the host benchmark suite. Every case runs next to its baseline.
//   cake_bench [--cake_full] [google-benchmark flags]
// --cake_full (or CAKE_BENCH_FULL=1) runs the whole shape matrix (slow on 2 cores);
// the default set is chosen to finish in a few minutes.
#include <immintrin.h>

#include <algorithm>
#include <chrono>
#include <cstdlib>
#include <cstring>
#include <string>
#include <vector>

#include "common/common.hpp"
#include "host/suites.hpp"

namespace cake_bench {

namespace {
bool g_full = false;
}

bool full_matrix() { return g_full; }

double memcpy_bandwidth() {
  static const double bw = [] {
    // 256 MiB, well beyond the last-level cache; one contiguous slice per thread.
    const std::size_t n = std::size_t{256} << 20;
    std::vector<char> a(n, 1), b(n, 2);
    const int nt = threads();
    double best = 0;
    for (int rep = 0; rep < 5; ++rep) {
      const auto t0 = std::chrono::steady_clock::now();
#pragma omp parallel for schedule(static) num_threads(nt)
      for (int t = 0; t < nt; ++t) {
        const std::size_t lo = n * static_cast<std::size_t>(t) / static_cast<std::size_t>(nt);
        const std::size_t hi = n * static_cast<std::size_t>(t + 1) / static_cast<std::size_t>(nt);
        std::memcpy(b.data() + lo, a.data() + lo, hi - lo);
      }
      const double s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
      best = std::max(best, 2.0 * static_cast<double>(n) / s);
      benchmark::DoNotOptimize(b.data());
    }
    return best;
  }();
  return bw;
}

namespace {
// Independent FMAs in registers: 12 chains, enough to cover the latency.
__attribute__((target("avx512f,fma"))) float fma_chains_512(long n) {
  __m512 a[12];
  const __m512 b = _mm512_set1_ps(0.9999f), c = _mm512_set1_ps(1e-6f);
#pragma GCC unroll 12
  for (int i = 0; i < 12; ++i) a[i] = c;
  for (long k = 0; k < n; ++k) {
#pragma GCC unroll 12
    for (int i = 0; i < 12; ++i) a[i] = _mm512_fmadd_ps(a[i], b, c);
  }
  alignas(64) float t[16];
  __m512 s = a[0];
  for (int i = 1; i < 12; ++i) s = _mm512_add_ps(s, a[i]);
  _mm512_store_ps(t, s);
  float r = 0;
  for (float x : t) r += x;
  return r;
}
__attribute__((target("avx2,fma"))) float fma_chains_256(long n) {
  __m256 a[12];
  const __m256 b = _mm256_set1_ps(0.9999f), c = _mm256_set1_ps(1e-6f);
#pragma GCC unroll 12
  for (int i = 0; i < 12; ++i) a[i] = c;
  for (long k = 0; k < n; ++k) {
#pragma GCC unroll 12
    for (int i = 0; i < 12; ++i) a[i] = _mm256_fmadd_ps(a[i], b, c);
  }
  alignas(32) float t[8];
  __m256 s = a[0];
  for (int i = 1; i < 12; ++i) s = _mm256_add_ps(s, a[i]);
  _mm256_store_ps(t, s);
  float r = 0;
  for (float x : t) r += x;
  return r;
}
}  // namespace

double fma_peak_flops() {
  static const double peak = [] {
    const bool w512 = cake::host_isa_supported(cake::host_isa::avx512);
    const bool w256 = cake::host_isa_supported(cake::host_isa::avx2);
    const double lanes = w512 ? 16 : w256 ? 8 : 1;
    const long n = 20'000'000;
    const int nt = threads();
    double best = 0;
    for (int rep = 0; rep < 3; ++rep) {
      float sink = 0;
      const auto t0 = std::chrono::steady_clock::now();
#pragma omp parallel for schedule(static) num_threads(nt) reduction(+ : sink)
      for (int t = 0; t < nt; ++t) {
        if (w512)
          sink += fma_chains_512(n);
        else if (w256)
          sink += fma_chains_256(n);
        else
          sink += 0;  // no FMA unit this code targets: the peak is left unmeasured
      }
      const double s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
      best = std::max(best,
                      (w512 || w256) ? 2.0 * lanes * 12.0 * static_cast<double>(n) * nt / s : 1.0);
      benchmark::DoNotOptimize(sink);
    }
    return best;
  }();
  return peak;
}

}  // namespace cake_bench

int main(int argc, char** argv) {
  std::vector<char*> args;
  bool full = false;
  for (int i = 0; i < argc; ++i) {
    if (std::strcmp(argv[i], "--cake_full") == 0)
      full = true;
    else
      args.push_back(argv[i]);
  }
  if (const char* e = std::getenv("CAKE_BENCH_FULL"); e && *e && std::strcmp(e, "0") != 0)
    full = true;
  cake_bench::g_full = full;
  int n = static_cast<int>(args.size());
  benchmark::Initialize(&n, args.data());
  if (benchmark::ReportUnrecognizedArguments(n, args.data())) return 1;

  const double bw = cake_bench::memcpy_bandwidth();
  benchmark::AddCustomContext("cake.matrix", full ? "full" : "default");
  benchmark::AddCustomContext("cake.threads", std::to_string(cake_bench::threads()));
  benchmark::AddCustomContext("cake.memcpy_bandwidth_GBps", std::to_string(bw / 1e9));
  benchmark::AddCustomContext("cake.fma_peak_GFLOPS",
                              std::to_string(cake_bench::fma_peak_flops() / 1e9));
  benchmark::AddCustomContext("cake.host_isa", cake::host_isa_name(cake::active_host_isa()));

  cake_bench::register_window_stats();
  cake_bench::register_select_k();
  cake_bench::register_compact();
  cake_bench::register_allocate_budgets();
  cake_bench::register_prefill();
  cake_bench::register_decode();
  cake_bench::register_decode_scores();
  cake_bench::register_ragged();
  cake_bench::register_paged_cache();
  cake_bench::register_storage16();

  benchmark::RunSpecifiedBenchmarks();
  benchmark::Shutdown();
  return 0;
}
