// Decode soak: a 32-layer cache (small heads) prefilled once, then STEPS tokens
// decoded through every layer. At every step every layer must hold exactly what
// its budget says (the window included) once it has filled up; every CHECK_EVERY
// steps all held keys, values and positions are read back (finite, unique, in
// range, the newest window present) and resident memory is sampled from
// /proc/self/statm. After warm-up (the first tenth of the steps) resident memory
// must stay flat.
//
//   cake_soak [STEPS] [METHOD]      STEPS default 100000; METHOD cake (default), h2o, cake_adakv
//
// Prints one summary line; exits 1 on any failed check.
#include <cake/cake.hpp>
#include <cake/methods.hpp>

#include <unistd.h>

#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <set>
#include <string>
#include <vector>

namespace {

using cake::index_t;

long resident_kib() {
  std::ifstream f("/proc/self/statm");
  long size = 0, resident = 0;
  f >> size >> resident;
  return resident * (sysconf(_SC_PAGESIZE) / 1024);
}

int failures = 0;
void check(bool ok, const char* what, long step, long layer) {
  if (ok) return;
  if (++failures <= 10)
    std::fprintf(stderr, "cake_soak: %s at step %ld, layer %ld\n", what, step, layer);
}

// A cheap deterministic generator: the soak measures the cache, not the RNG.
struct Xorshift {
  std::uint64_t s = 0x9e3779b97f4a7c15ull;
  float next() {
    s ^= s << 13;
    s ^= s >> 7;
    s ^= s << 17;
    return static_cast<float>(static_cast<std::int64_t>(s >> 11) % 20001 - 10000) * 1e-4f;
  }
  void fill(std::vector<float>& v) {
    for (auto& x : v) x = next();
  }
};

template <class Cache>
int soak(const char* name, long steps) {
  cake::CacheConfig cfg{.layers = 32,
                        .batch = 1,
                        .q_heads = 4,
                        .kv_heads = 2,
                        .head_dim = 16,
                        .window = 8,
                        .cache_size = 64};
  const index_t L = cfg.layers, B = cfg.batch, H = cfg.q_heads, Hkv = cfg.kv_heads,
                d = cfg.head_dim, w = cfg.window, S = 512;
  const bool headwise = cake::is_headwise_budget<typename Cache::budget_policy>;
  // One thread: a decode step of these small heads is microseconds of work, which
  // OpenMP's fork and join would dwarf on a shared machine.
  Cache c(cfg, {}, {}, {}, cake::host_policy{}.threads(1));
  Xorshift rng;
  {
    std::vector<float> q(static_cast<std::size_t>(B * H * w * d)),
        k(static_cast<std::size_t>(B * Hkv * S * d)), v(k.size());
    for (index_t l = 0; l < L; ++l) {
      rng.fill(q);
      rng.fill(k);
      rng.fill(v);
      c.prefill(l, cake::make_view(q.data(), std::array<index_t, 4>{B, H, w, d}),
                cake::make_view(k.data(), std::array<index_t, 4>{B, Hkv, S, d}),
                cake::make_view(v.data(), std::array<index_t, 4>{B, Hkv, S, d}));
    }
  }
  std::vector<std::vector<index_t>> lengths(static_cast<std::size_t>(L));
  for (index_t l = 0; l < L; ++l) lengths[static_cast<std::size_t>(l)] = c.row_lengths(l);

  std::vector<float> q(static_cast<std::size_t>(B * H * d)),
      k(static_cast<std::size_t>(B * Hkv * d)), v(k.size());
  const long check_every = 500, warm = std::max<long>(steps / 10, 1);
  long rss_warm = -1, rss_min = 0, rss_max = 0, samples = 0, full_checks = 0;
  const auto t0 = std::chrono::steady_clock::now();
  for (long t = 0; t < steps; ++t) {
    for (index_t l = 0; l < L; ++l) {
      rng.fill(q);
      rng.fill(k);
      rng.fill(v);
      c.decode(l, cake::make_view(q.data(), std::array<index_t, 3>{B, H, d}),
               cake::make_view(k.data(), std::array<index_t, 3>{B, Hkv, d}),
               cake::make_view(v.data(), std::array<index_t, 3>{B, Hkv, d}));
      // Held tokens: append one, evict one once over budget + window (head-wise
      // rows keep their own lengths).
      auto& len = lengths[static_cast<std::size_t>(l)];
      const auto now = c.row_lengths(l);
      for (std::size_t r = 0; r < len.size(); ++r)
        if (!headwise) len[r] = std::min(len[r] + 1, c.budget(l) + w);
      check(now == len, "row lengths differ from the budget", t, l);
      if (!headwise && t >= w)  // every layer has filled up to its budget by now
        check(c.tokens_held(l) == c.budget(l) + w, "tokens held != budget + window", t, l);
    }
    if ((t + 1) % check_every == 0 || t + 1 == steps) {
      ++full_checks;
      const index_t newest = S + t;  // position of this step's token
      for (index_t l = 0; l < L; ++l) {
        auto kv = c.keys(l);
        auto vv = c.values(l);
        auto pv = c.positions(l);
        const auto len = c.row_lengths(l);
        for (index_t g = 0; g < Hkv; ++g) {
          std::set<index_t> seen;
          for (index_t x = 0; x < len[static_cast<std::size_t>(g)]; ++x) {
            const index_t p = pv(0, g, x);
            check(p >= 0 && p <= newest && seen.insert(p).second,
                  "position out of range or repeated", t, l);
            for (index_t y = 0; y < d; ++y)
              check(std::isfinite(kv(0, g, x, y)) && std::isfinite(vv(0, g, x, y)),
                    "NaN or Inf held", t, l);
          }
          for (index_t p = newest - w + 1; p <= newest; ++p)
            check(seen.count(p) == 1, "window token missing", t, l);
        }
      }
      const long rss = resident_kib();
      ++samples;
      if (t + 1 >= warm) {
        if (rss_warm < 0) rss_warm = rss_min = rss_max = rss;
        rss_min = std::min(rss_min, rss);
        rss_max = std::max(rss_max, rss);
      }
    }
  }
  const double secs = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  const long growth = rss_max - rss_warm;
  // Flat: no more than 256 KiB of drift (allocator bookkeeping) after warm-up. Not
  // under AddressSanitizer: its quarantine keeps freed memory (up to 256 MiB) resident
  // on purpose, so resident memory says nothing there; LeakSanitizer checks leaks.
#if defined(__SANITIZE_ADDRESS__)
  constexpr bool rss_meaningful = false;
#elif defined(__has_feature)
#if __has_feature(address_sanitizer)
  constexpr bool rss_meaningful = false;
#else
  constexpr bool rss_meaningful = true;
#endif
#else
  constexpr bool rss_meaningful = true;
#endif
  if (rss_meaningful) check(growth <= 256, "resident memory grew after warm-up", steps, -1);
  std::printf(
      "cake_soak %s: %ld decode steps x %ld layers in %.1f s (%.2f us per layer step); tokens held "
      "%ld (budgets + windows); resident memory after warm-up %ld KiB, min %ld, max %ld: growth "
      "%ld "
      "KiB over %ld samples; %ld full checks; %d failures\n",
      name, steps, static_cast<long>(L), secs, secs * 1e6 / static_cast<double>(steps * L),
      static_cast<long>(c.tokens_held()), rss_warm, rss_min, rss_max, growth, samples, full_checks,
      failures);
  return failures == 0 ? 0 : 1;
}

}  // namespace

int main(int argc, char** argv) {
  const long steps = argc > 1 ? std::atol(argv[1]) : 100000;
  const std::string method = argc > 2 ? argv[2] : "cake";
  if (steps < 1) {
    std::fprintf(stderr, "usage: cake_soak [STEPS >= 1] [cake|h2o|cake_adakv]\n");
    return 2;
  }
  namespace m = cake::methods;
  if (method == "cake") return soak<m::Cake<>>("cake", steps);
  if (method == "h2o") return soak<m::H2o<>>("h2o", steps);
  if (method == "cake_adakv") return soak<m::CakeAdaKv<>>("cake_adakv", steps);
  std::fprintf(stderr, "cake_soak: unknown method %s\n", method.c_str());
  return 2;
}
