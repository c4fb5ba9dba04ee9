// cake_bench: the host benchmark suite. Every case runs next to its baseline.
//   cake_bench [--cake_full] [google-benchmark flags]
// --cake_full (or CAKE_BENCH_FULL=1) runs the whole shape matrix (slow on 2 cores);
// the default set is chosen to finish in a few minutes.
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

  cake_bench::register_window_stats();
  cake_bench::register_select_k();
  cake_bench::register_compact();
  cake_bench::register_allocate_budgets();
  cake_bench::register_prefill();
  cake_bench::register_decode();

  benchmark::RunSpecifiedBenchmarks();
  benchmark::Shutdown();
  return 0;
}
