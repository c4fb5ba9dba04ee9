// cake_demo: CAKE on a synthetic prompt at Llama-3.1-8B head shapes.
//
// The workload has the structure real models show: attention sinks (the first
// tokens draw attention from every query), locality (queries favour recent
// keys), heavy hitters (a few tokens every query attends to), and a sharpness
// that changes with depth, so that layers differ in preference. Prints per layer
// the preference, budget, tokens kept and bytes saved; --json writes the same.
#include <cake/cake.hpp>
#include <eval/synthetic.hpp>

#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <stdexcept>
#include <string>
#include <vector>

namespace {

using cake::index_t;

struct Options {
  index_t layers = 32, heads = 32, kv_heads = 8, head_dim = 128, seq_len = 8192, batch = 1;
  index_t window = 32, cache_size = 512;
  float tau1 = 1.6f, tau2 = 0.4f, gamma = 200.0f;  // the paper's Llama-3.1-8B temperatures
  bool cascade = true;
  unsigned seed = 42;
  std::string json;
};

[[noreturn]] void usage(const char* msg) {
  std::fprintf(stderr,
               "%s\nusage: cake_demo [--layers N] [--heads N] [--kv-heads N] [--head-dim N]\n"
               "                 [--seq-len N] [--batch N] [--window N] [--cache-size N]\n"
               "                 [--tau1 X] [--tau2 X] [--gamma X] [--no-cascade] [--seed N]\n"
               "                 [--json FILE]\n",
               msg);
  std::exit(2);
}

Options parse(int argc, char** argv) {
  Options o;
  for (int i = 1; i < argc; ++i) {
    const std::string a = argv[i];
    auto next = [&]() -> std::string {
      if (i + 1 >= argc) usage(("missing value after " + a).c_str());
      return argv[++i];
    };
    auto integer = [&]() -> index_t {
      const std::string v = next();
      char* end = nullptr;
      const long long x = std::strtoll(v.c_str(), &end, 10);
      if (end == v.c_str() || *end != '\0')
        usage((a + " expects an integer, got '" + v + "'").c_str());
      return static_cast<index_t>(x);
    };
    auto real = [&]() -> float {
      const std::string v = next();
      char* end = nullptr;
      const float x = std::strtof(v.c_str(), &end);
      if (end == v.c_str() || *end != '\0')
        usage((a + " expects a number, got '" + v + "'").c_str());
      return x;
    };
    if (a == "--layers")
      o.layers = integer();
    else if (a == "--heads")
      o.heads = integer();
    else if (a == "--kv-heads")
      o.kv_heads = integer();
    else if (a == "--head-dim")
      o.head_dim = integer();
    else if (a == "--seq-len")
      o.seq_len = integer();
    else if (a == "--batch")
      o.batch = integer();
    else if (a == "--window")
      o.window = integer();
    else if (a == "--cache-size")
      o.cache_size = integer();
    else if (a == "--tau1")
      o.tau1 = real();
    else if (a == "--tau2")
      o.tau2 = real();
    else if (a == "--gamma")
      o.gamma = real();
    else if (a == "--no-cascade")
      o.cascade = false;
    else if (a == "--seed")
      o.seed = static_cast<unsigned>(integer());
    else if (a == "--json")
      o.json = next();
    else if (a == "--help" || a == "-h")
      usage("cake_demo: CAKE KV-cache eviction on a synthetic prompt");
    else
      usage(("unknown argument " + a).c_str());
  }
  return o;
}

// The synthetic prompt, shared with cake_eval (tools/eval/synthetic.hpp).
cake_eval::SyntheticOptions workload(const Options& o) {
  cake_eval::SyntheticOptions w;
  w.layers = o.layers;
  w.heads = o.heads;
  w.kv_heads = o.kv_heads;
  w.head_dim = o.head_dim;
  w.seq_len = o.seq_len;
  w.batch = o.batch;
  w.window = o.window;
  w.queries = 0;  // the demo needs no held-out queries
  w.seed = o.seed;
  return w;
}

}  // namespace

int main(int argc, char** argv) {
  const Options o = parse(argc, argv);
  cake::CacheConfig cfg;
  cfg.layers = o.layers;
  cfg.batch = o.batch;
  cfg.q_heads = o.heads;
  cfg.kv_heads = o.kv_heads;
  cfg.head_dim = o.head_dim;
  cfg.window = o.window;
  cfg.cache_size = o.cache_size;
  cfg.cascade = o.cascade;
  try {
    cake::KvCache<> cache(cfg, cake::CakePreference{o.tau1, o.tau2}, cake::ProportionalBudget{},
                          cake::MeanVarianceIndicator{o.gamma, 5});
    std::printf(
        "cake_demo: L=%lld H=%lld Hkv=%lld d=%lld S=%lld B=%lld w=%lld C=%lld "
        "tau1=%.2f tau2=%.2f gamma=%.0f %s, %d host threads\n",
        (long long)o.layers, (long long)o.heads, (long long)o.kv_heads, (long long)o.head_dim,
        (long long)o.seq_len, (long long)o.batch, (long long)o.window, (long long)o.cache_size,
        o.tau1, o.tau2, o.gamma, o.cascade ? "cascading" : "one-shot",
        cake::detail::host_threads(cake::host));
    std::vector<double> ms(static_cast<std::size_t>(o.layers));
    double total_ms = 0;
    for (index_t l = 0; l < o.layers; ++l) {
      // Not timed: the engine's prefill made these.
      const cake_eval::LayerInput data = cake_eval::synthesise(workload(o), l);
      using A4 = std::array<index_t, 4>;
      const auto t0 = std::chrono::steady_clock::now();
      cache.prefill(l,
                    cake::make_view(static_cast<const float*>(data.q_window.data()),
                                    A4{o.batch, o.heads, o.window, o.head_dim}),
                    cake::make_view(static_cast<const float*>(data.k.data()),
                                    A4{o.batch, o.kv_heads, o.seq_len, o.head_dim}),
                    cake::make_view(static_cast<const float*>(data.v.data()),
                                    A4{o.batch, o.kv_heads, o.seq_len, o.head_dim}));
      const auto t1 = std::chrono::steady_clock::now();
      ms[static_cast<std::size_t>(l)] = std::chrono::duration<double, std::milli>(t1 - t0).count();
      total_ms += ms[static_cast<std::size_t>(l)];
    }
    const double full_bytes =
        2.0 * static_cast<double>(o.batch * o.kv_heads * o.seq_len * o.head_dim) * sizeof(float);
    std::printf("%5s %14s %8s %12s %14s %9s\n", "layer", "preference", "budget", "tokens_kept",
                "bytes_saved", "ms");
    double saved_total = 0;
    for (index_t l = 0; l < o.layers; ++l) {
      const double saved = full_bytes - static_cast<double>(cache.bytes_held(l));
      saved_total += saved;
      std::printf("%5lld %14.6g %8lld %12lld %14.0f %9.2f\n", (long long)l, cache.preference(l),
                  (long long)cache.budget(l), (long long)cache.tokens_held(l), saved,
                  ms[static_cast<std::size_t>(l)]);
    }
    std::printf(
        "kept %lld of %lld tokens per (batch, kv-head) row over all layers (%.2f%%), "
        "saved %.1f MiB of %.1f MiB\n",
        (long long)cache.tokens_held(), (long long)(o.seq_len * o.layers),
        100.0 * static_cast<double>(cache.tokens_held()) /
            static_cast<double>(o.seq_len * o.layers),
        saved_total / 1048576.0, full_bytes * static_cast<double>(o.layers) / 1048576.0);
    std::printf(
        "total %.1f ms (statistics, allocation, selection, compaction; %.2f ms per layer)\n",
        total_ms, total_ms / static_cast<double>(o.layers));
    if (!o.json.empty()) {
      std::ofstream f(o.json);
      if (!f) throw std::runtime_error("cannot write " + o.json);
      f.precision(10);
      f << "{\"total_ms\": " << total_ms << ", \"layers\": [";
      for (index_t l = 0; l < o.layers; ++l) {
        f << (l ? ", " : "") << "{\"layer\": " << l << ", \"preference\": " << cache.preference(l)
          << ", \"budget\": " << cache.budget(l) << ", \"tokens_kept\": " << cache.tokens_held(l)
          << ", \"bytes_saved\": "
          << static_cast<long long>(full_bytes - static_cast<double>(cache.bytes_held(l)))
          << ", \"ms\": " << ms[static_cast<std::size_t>(l)] << "}";
      }
      f << "]}\n";
      std::printf("wrote %s\n", o.json.c_str());
    }
  } catch (const cake::error& e) {
    std::fprintf(stderr, "cake_demo: %s\n", e.what());
    return 1;
  }
  return 0;
}
