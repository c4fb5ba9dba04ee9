// The window statistics on CUDA (exact and tensor-core kernels) run here on the CPU,
// from their real source, under tests/cuda/emulation/emulator.hpp: the plan, the grid
// and the kernels the launcher uses (row normaliser, lse combine, statistics, pooling,
// layer sums) against the host backend. This is what CI checks of those kernels on a
// machine without a GPU; the GPU tests (label gpu) check the same on the hardware.
#include <cake/cake.hpp>

#include "data.hpp"
#include "emulator.hpp"

#include <doctest/doctest.h>
#include <cake/backend/cuda/detail/window_stats_plan.cuh>

#include <array>
#include <cmath>
#include <cstdint>
#include <random>
#include <vector>

namespace {

using cake::index_t;
namespace cd = cake::cuda_detail;
namespace emu = cake_emulation;
using cake_emulation_tests::random_values;

struct Shape {
  index_t B, H, Hkv, w, S, d;
};

struct Options {
  int sms = 40;              // enough for several blocks per row, few enough to loop
  bool multi_block = false;  // require more than one block per row in every kernel
  bool lse = false;          // the caller passes each row's log-sum-exp
  bool lse_strided = false;  // ... laid out (batch, window, q_heads)
  bool chunked = false;      // the exact kernels must stream the queries in row chunks
  cake::StatsRequest request{};
};

template <class T>
std::vector<float> as_float(const std::vector<T>& v) {
  std::vector<float> o(v.size());
  for (std::size_t i = 0; i < v.size(); ++i) o[i] = static_cast<float>(v[i]);
  return o;
}

// ln sum_j exp(q_i . k_j / sqrt(d)) over the keys window row i sees, in double.
double row_lse(const float* q, const std::vector<float>& k, index_t key0, index_t last, index_t d) {
  std::vector<double> s(static_cast<std::size_t>(last + 1));
  double m = -1e300;
  for (index_t j = 0; j <= last; ++j) {
    double acc = 0;
    for (index_t x = 0; x < d; ++x)
      acc += double(q[x]) * double(k[static_cast<std::size_t>((key0 + j) * d + x)]);
    s[static_cast<std::size_t>(j)] = acc / std::sqrt(double(d));
    m = std::max(m, s[static_cast<std::size_t>(j)]);
  }
  double sum = 0;
  for (double v : s) sum += std::exp(v - m);
  return m + std::log(sum);
}

bool close(double a, double b, double rel, double abs) {
  return std::abs(a - b) <= abs + rel * std::max(std::abs(a), std::abs(b));
}

// One call through the tensor-core path, the launcher's steps with the emulator's
// launches, compared with cake::window_stats on the host.
template <class Sh, class Q, class K, class Ind>
void check(const Shape& sh, const Ind& indicator, const Options& opt, std::uint32_t seed) {
  const auto [B, H, Hkv, w, S, d] = sh;
  const index_t P = S - w, group = H / Hkv;
  CAPTURE(H);
  CAPTURE(Hkv);
  CAPTURE(w);
  CAPTURE(S);
  CAPTURE(d);
  std::mt19937 rng(seed);
  const std::vector<Q> q = random_values<Q>(static_cast<std::size_t>(B * H * w * d), 1.5f, rng);
  const std::vector<K> k = random_values<K>(static_cast<std::size_t>(B * Hkv * S * d), 1.0f, rng);
  std::vector<float> qf = as_float(q), kf = as_float(k);  // the host sees the same values

  const std::array<index_t, 4> qe{B, H, w, d}, ke{B, Hkv, S, d};
  const std::array<index_t, 3> ie{B, Hkv, P};
  std::vector<float> ind_host(static_cast<std::size_t>(B * Hkv * P)), st_host(2);
  cake::window_stats(cake::host, cake::make_view(qf.data(), qe), cake::make_view(kf.data(), ke),
                     indicator, cake::make_view(ind_host.data(), ie),
                     cake::make_view(st_host.data(), std::array<index_t, 1>{2}), opt.request);

  // The caller's log-sum-exp, when given: (B, H, w) or (B, w, H).
  std::vector<float> lse;
  std::int64_t l_b = 0, l_h = 0, l_i = 0;
  if (opt.lse) {
    lse.resize(static_cast<std::size_t>(B * H * w));
    l_b = H * w, l_h = opt.lse_strided ? 1 : w, l_i = opt.lse_strided ? H : 1;
    for (index_t b = 0; b < B; ++b)
      for (index_t h = 0; h < H; ++h)
        for (index_t i = 0; i < w; ++i)
          lse[static_cast<std::size_t>(b * l_b + h * l_h + i * l_i)] =
              static_cast<float>(row_lse(&qf[static_cast<std::size_t>(((b * H + h) * w + i) * d)],
                                         kf, (b * Hkv + h / group) * S, P + i, d));
  }

  // Sh = void: the exact kernels (float products in the host's order); else the
  // tensor-core kernels of that register shape.
  constexpr bool exact = std::is_void_v<Sh>;
  const int planes = std::is_same_v<Q, K> ? 1 : 2;
  const std::size_t budget = static_cast<std::size_t>(cd::tuning::stats_smem_budget);
  if constexpr (!exact) REQUIRE(cd::mma_stats_fits(group, w, d, planes, budget));
  const cd::StatsPlan pl = cd::plan_stats(B, H, Hkv, w, S, d, opt.lse, !exact, planes, budget);
  if constexpr (exact)
    if (opt.chunked) REQUIRE(pl.rows < group * w);  // row chunks, not resident queries
  // Scratch starts as NaN, as nothing may be read before it is written.
  std::vector<unsigned char> workspace(pl.workspace + 256, 0xFF);
  void* base = workspace.data() + (256 - reinterpret_cast<std::uintptr_t>(workspace.data()) % 256);
  cd::workspace_carver carver(base);
  const cd::StatsBuffers buf = cd::carve_stats(carver, pl, B, H, Hkv, w, P, opt.lse);

  const auto qv = cake::make_view<cake::device_space>(q.data(), qe);
  const auto kv = cake::make_view<cake::device_space>(k.data(), ke);
  cd::StatsParams<Q, K> p =
      cd::stats_params(qv, kv, opt.lse ? lse.data() : nullptr, l_b, l_h, l_i, pl);
  const int rows = static_cast<int>(B * Hkv);
  const auto urows = static_cast<unsigned>(rows);
  int stats_blocks = 0;
  const auto normaliser_done = [&](int splits) {
    const int lse_rows = rows * p.group * p.w;
    emu::launch({static_cast<unsigned>((lse_rows + 255) / 256), 1, 1}, {256, 1, 1}, 0,
                [&] { cd::lse_combine_kernel(buf.part, lse_rows, splits, buf.lse); });
  };
  if constexpr (exact) {
    const cd::ExactStatsGrid gr = cd::exact_stats_grid(rows, opt.sms, pl);
    p.splits = gr.splits;
    stats_blocks = gr.stats_blocks;
    if (opt.multi_block) {
      REQUIRE(gr.splits > 1);
      REQUIRE(stats_blocks > 1);
    }
    const unsigned threads = cd::tuning::stats_threads;
    if (!opt.lse) {
      emu::launch({static_cast<unsigned>(gr.splits), urows, 1}, {threads, 1, 1}, pl.smem_norm,
                  [&] { cd::row_normaliser_kernel<Q, K>(p, buf.part); });
      normaliser_done(gr.splits);
    }
    emu::launch({static_cast<unsigned>(stats_blocks), urows, 1}, {threads, 1, 1}, pl.smem_stats,
                [&] {
                  cd::window_stats_kernel<Q, K, Ind>(p, buf.lse, indicator, opt.request.entropy,
                                                     opt.request.variance, buf.raw, buf.partial);
                });
  } else {
    REQUIRE(cd::rows_16_byte_aligned(kv));
    // One resident block per SM, as on an H200 for these kernels.
    const cd::MmaStatsGrid gr = cd::mma_stats_grid<Sh>(p, rows, opt.sms, 1, 1, pl);
    stats_blocks = gr.stats_blocks;
    if (opt.multi_block) {
      REQUIRE(stats_blocks > 1);
      if (!opt.lse) REQUIRE(gr.norm_blocks > 1);
    }
    if (!opt.lse) {
      emu::launch({static_cast<unsigned>(gr.norm_blocks), urows, 1},
                  {static_cast<unsigned>(cd::mma_norm_threads(p.group)), 1, 1}, pl.smem_norm, [&] {
                    cd::mma_row_normaliser_kernel<Q, K, Sh>(p, planes, gr.streams_per_block,
                                                            buf.part);
                  });
      normaliser_done(gr.streams());
    }
    emu::launch({static_cast<unsigned>(stats_blocks), urows, 1},
                {static_cast<unsigned>(cd::tuning::mma_threads), 1, 1}, pl.smem_stats, [&] {
                  cd::mma_window_stats_kernel<Q, K, Sh, Ind>(
                      p, planes, buf.lse, indicator, opt.request.entropy, opt.request.variance,
                      buf.raw, buf.partial);
                });
  }
  std::vector<float> ind(ind_host.size(), NAN), st(2, NAN);
  const float inv = 1.0f / (static_cast<float>(indicator.pool_kernel) * static_cast<float>(group));
  emu::launch({static_cast<unsigned>((P + 255) / 256), urows, 1}, {256, 1, 1}, 0, [&] {
    cd::pool_groups_kernel(buf.raw, p.Hkv, p.P, indicator.pool_kernel, inv, ind.data(), Hkv * P, P);
  });
  emu::launch({1, 1, 1}, {static_cast<unsigned>(cd::tuning::column_threads), 1, 1}, 0,
              [&] { cd::layer_stats_kernel(buf.partial, stats_blocks * rows, st.data(), 1); });

  // Exact kernels: the host's products in the host's order (only exp / log may differ
  // in the last bit); tensor cores: two planes of Q, other sums.
  const double rel = exact ? 1e-5 : 2e-4;
  int wrong = 0;
  for (std::size_t i = 0; i < ind.size(); ++i)
    if (!close(ind[i], ind_host[i], rel, 1e-8) && wrong++ < 3)
      FAIL_CHECK("indicator " << i << ": emulated " << ind[i] << ", host " << ind_host[i]);
  CHECK(wrong == 0);
  if (opt.request.entropy) CHECK(close(st[0], st_host[0], exact ? 1e-5 : 1e-4, 1e-6));
  if (opt.request.variance || Ind::needs_variance)
    CHECK(close(st[1], st_host[1], exact ? 1e-5 : 2e-4, 1e-9));
}

}  // namespace

TEST_CASE("exact window statistics on CUDA, emulated on the CPU, equal the host backend") {
  const cake::MeanVarianceIndicator mv{200.0f, 5};
  SUBCASE("bf16 K, group 4, row normaliser, float4 query rows") {
    Options o;
    o.multi_block = true;  // split-K normaliser, several statistics blocks
    check<void, float, __nv_bfloat16>({1, 8, 2, 32, 150, 128}, mv, o, 11);
  }
  SUBCASE("float K, odd head_dim 7 (the scalar tail), the caller's log-sum-exp") {
    Options o;
    o.sms = 2, o.lse = true;
    check<void, float, float>({2, 4, 2, 5, 90, 7}, cake::WindowMeanIndicator{3}, o, 12);
  }
  SUBCASE("group rows beyond shared memory: row chunks straddle heads") {
    Options o;
    o.sms = 1, o.chunked = true;
    check<void, float, __half>({1, 8, 1, 24, 100, 128}, mv, o, 13);
  }
}

TEST_CASE("tensor-core window statistics, emulated on the CPU, equal the host backend") {
  using bf16 = __nv_bfloat16;
  using cd::MmaShape;
  const cake::MeanVarianceIndicator mv{200.0f, 5};
  SUBCASE("Llama-like group 4, float Q in two planes, row normaliser, several blocks") {
    Options o;
    o.multi_block = true;
    check<MmaShape<32, 128>, float, bf16>({1, 8, 2, 32, 600, 128}, mv, o, 1);
  }
  SUBCASE("bf16 Q (one plane), the caller's log-sum-exp laid out (B, w, H), one SM") {
    Options o;
    o.sms = 1, o.lse = true, o.lse_strided = true;
    check<MmaShape<32, 128>, bf16, bf16>({1, 8, 2, 32, 170, 128}, mv, o, 2);
  }
  SUBCASE("half K, window 48, head_dim 80 (a half chunk), group 3") {
    Options o;
    o.sms = 1;
    check<MmaShape<64, 128>, float, __half>({1, 6, 2, 48, 150, 80}, mv, o, 3);
  }
  SUBCASE("MHA, half Q and bf16 K, head_dim 144, window 8, batch 2, entropy only") {
    Options o;
    o.request = {true, false};
    check<MmaShape<32, 256>, __half, bf16>({2, 4, 4, 8, 90, 144}, cake::WindowMeanIndicator{3}, o,
                                           4);
  }
  SUBCASE("head_dim 256, window 64, variance only, prefix of one key") {
    Options o;
    o.request = {false, true};
    check<MmaShape<64, 256>, float, bf16>({1, 4, 2, 64, 65, 256}, mv, o, 5);
  }
}
