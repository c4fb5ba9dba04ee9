// compact: gather the kept token rows of one layer's K (B, Hkv, S, d) into
// (B, Hkv, m, d), m = cache size (kept prefix + window), indices ascending.
//   cake:     cake::compact, dense, out of place
//   in_place: cake::compact, dense, in place (dst = the first m rows of src)
//   paged:    cake::compact on a paged pool (vLLM layout [blocks, 16, Hkv, d], each
//             sequence's blocks scattered over the pool), in place, the same rows kept
//   memcpy:   a contiguous memcpy of the same bytes over the same threads (the ceiling)
//   triad:    a STREAM triad a = b + s*c moving the same number of bytes
// The in-place cases move the same rows at every iteration (the indices stay valid and
// ascending), so their bytes per iteration are the dense case's.
#include "common/common.hpp"
#include "host/suites.hpp"

namespace cake_bench {

namespace {

// Sorted random prefix positions plus the window, per (b, kv-head) row.
std::vector<index_t> keep_rows(index_t rows, index_t S, index_t m, std::uint64_t seed) {
  std::vector<index_t> keep(static_cast<std::size_t>(rows * m));
  const index_t P = S - window, kp = m - window;
  std::vector<char> take(static_cast<std::size_t>(P));
  for (index_t r = 0; r < rows; ++r) {
    Rng g(seed + static_cast<std::uint64_t>(r));
    std::fill(take.begin(), take.end(), 0);
    index_t got = 0;
    while (got < kp) {
      const index_t j = static_cast<index_t>(g.next() % static_cast<std::uint64_t>(P));
      if (!take[static_cast<std::size_t>(j)]) take[static_cast<std::size_t>(j)] = 1, ++got;
    }
    index_t t = 0;
    for (index_t j = 0; j < P; ++j)
      if (take[static_cast<std::size_t>(j)]) keep[static_cast<std::size_t>(r * m + t++)] = j;
    for (index_t j = P; j < S; ++j) keep[static_cast<std::size_t>(r * m + t++)] = j;
  }
  return keep;
}

void add_case(const Shape& sh, index_t B, index_t S, index_t m) {
  const std::string args = shape_args(sh, B, S) + "/m:" + std::to_string(m);
  const index_t rows = B * sh.kv_heads, d = sh.head_dim;
  const double bytes = 2.0 * static_cast<double>(rows * m * d) * sizeof(float);
  add(name("compact", "cake", args),
      [=](benchmark::State& st) {
        const LayerInputs& in = layer_inputs(sh, B, S);
        const auto keep = keep_rows(rows, S, m, 5);
        std::vector<float> dst(static_cast<std::size_t>(rows * m * d));
        auto kv = cake::make_view(keep.data(), std::array<index_t, 3>{B, sh.kv_heads, m});
        auto dv = cake::make_view(dst.data(), std::array<index_t, 4>{B, sh.kv_heads, m, d});
        for (auto _ : st) {
          cake::compact(cake::host, in.kv(), kv, dv);
          benchmark::DoNotOptimize(dst.data());
          benchmark::ClobberMemory();
        }
        set_bandwidth(st, bytes);
      })
      ->MinTime(0.2)
      ->Unit(benchmark::kMicrosecond);
  add(name("compact", "in_place", args),
      [=](benchmark::State& st) {
        std::vector<float> buf = layer_inputs(sh, B, S).k;
        const auto keep = keep_rows(rows, S, m, 5);
        auto kv = cake::make_view(keep.data(), std::array<index_t, 3>{B, sh.kv_heads, m});
        auto src = cake::make_view(buf.data(), std::array<index_t, 4>{B, sh.kv_heads, S, d});
        auto dv = cake::make_view(buf.data(), std::array<index_t, 4>{B, sh.kv_heads, m, d},
                                  std::array<index_t, 4>{sh.kv_heads * S * d, S * d, d, 1});
        for (auto _ : st) {
          cake::compact(cake::host, src, kv, dv);
          benchmark::DoNotOptimize(buf.data());
          benchmark::ClobberMemory();
        }
        set_bandwidth(st, bytes);
      })
      ->MinTime(0.2)
      ->Unit(benchmark::kMicrosecond);
  add(name("compact", "paged", args + "/block:16"),
      [=](benchmark::State& st) {
        constexpr index_t bs = 16;
        const index_t Hkv = sh.kv_heads, per_seq = (S + bs - 1) / bs, N = B * per_seq;
        // Every sequence's blocks at random places of the pool, as after a while of
        // continuous batching.
        std::vector<std::int32_t> ids(static_cast<std::size_t>(N)), indptr, lens;
        for (index_t i = 0; i < N; ++i)
          ids[static_cast<std::size_t>(i)] = static_cast<std::int32_t>(i);
        Rng g(11);
        for (index_t i = N - 1; i > 0; --i)
          std::swap(ids[static_cast<std::size_t>(i)],
                    ids[static_cast<std::size_t>(g.next() % static_cast<std::uint64_t>(i + 1))]);
        for (index_t b = 0; b <= B; ++b) indptr.push_back(static_cast<std::int32_t>(b * per_seq));
        lens.assign(static_cast<std::size_t>(B), static_cast<std::int32_t>(S));
        std::vector<float> pool(static_cast<std::size_t>(N * bs * Hkv * d), 1.0f);
        const auto keep = keep_rows(rows, S, m, 5);
        const std::vector<std::int32_t> keep_lens(static_cast<std::size_t>(rows),
                                                  static_cast<std::int32_t>(m));
        const auto table = cake::make_block_table(indptr.data(), ids.data(), lens.data(), B);
        auto pv = cake::make_view(pool.data(), std::array<index_t, 4>{N, Hkv, bs, d},
                                  std::array<index_t, 4>{bs * Hkv * d, d, Hkv * d, 1});
        auto kv = cake::make_view(keep.data(), std::array<index_t, 3>{B, Hkv, m});
        auto lv = cake::make_view(keep_lens.data(), std::array<index_t, 2>{B, Hkv});
        for (auto _ : st) {
          cake::compact(cake::host, pv, table, kv, lv);
          benchmark::DoNotOptimize(pool.data());
          benchmark::ClobberMemory();
        }
        set_bandwidth(st, bytes);
      })
      ->MinTime(0.2)
      ->Unit(benchmark::kMicrosecond);
  add(name("compact", "memcpy", args),
      [=](benchmark::State& st) {
        const std::size_t n = static_cast<std::size_t>(rows * m * d);
        std::vector<float> src(n, 1.0f), dst(n);
        const int nt = threads();
        for (auto _ : st) {
#pragma omp parallel for schedule(static) num_threads(nt)
          for (int t = 0; t < nt; ++t) {
            const std::size_t lo = n * static_cast<std::size_t>(t) / static_cast<std::size_t>(nt);
            const std::size_t hi =
                n * static_cast<std::size_t>(t + 1) / static_cast<std::size_t>(nt);
            std::memcpy(dst.data() + lo, src.data() + lo, (hi - lo) * sizeof(float));
          }
          benchmark::DoNotOptimize(dst.data());
          benchmark::ClobberMemory();
        }
        set_bandwidth(st, bytes);
      })
      ->MinTime(0.2)
      ->Unit(benchmark::kMicrosecond);
  add(name("compact", "triad", args),
      [=](benchmark::State& st) {
        const index_t n = static_cast<index_t>(bytes / (3.0 * sizeof(float)));
        // unique_ptr rather than vector: GCC 12 warns falsely (free-nonheap-object) here.
        std::unique_ptr<float[]> a(new float[static_cast<std::size_t>(n)]),
            b(new float[static_cast<std::size_t>(n)]), c(new float[static_cast<std::size_t>(n)]);
        std::fill(a.get(), a.get() + n, 0.0f);
        std::fill(b.get(), b.get() + n, 1.0f);
        std::fill(c.get(), c.get() + n, 2.0f);
        const float s = 3.0f;
        float* CAKE_RESTRICT pa = a.get();
        const float* CAKE_RESTRICT pb = b.get();
        const float* CAKE_RESTRICT pc = c.get();
        for (auto _ : st) {
#pragma omp parallel for simd schedule(static)
          for (index_t i = 0; i < n; ++i) pa[i] = pb[i] + s * pc[i];
          benchmark::DoNotOptimize(pa);
          benchmark::ClobberMemory();
        }
        set_bandwidth(st, bytes);
      })
      ->MinTime(0.2)
      ->Unit(benchmark::kMicrosecond);
}

}  // namespace

void register_compact() {
  if (full_matrix()) {
    for (const Shape& sh : all_shapes)
      for (index_t B : {1, 4})
        for (index_t S : {4096, 16384, 32768})
          for (index_t m : {128, 1024, 2048}) add_case(sh, B, S, m);
    return;
  }
  for (index_t S : {4096, 16384, 32768})
    for (index_t m : {128, 1024, 2048}) add_case(llama, 1, S, m);
  add_case(qwen, 1, 32768, 1024);
  add_case(small, 1, 32768, 1024);
  add_case(llama, 4, 16384, 1024);
}

}  // namespace cake_bench
