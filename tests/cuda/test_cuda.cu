// CUDA backend tests: every algorithm on cake::cuda against the host backend
// (kept sets and compactions exactly, scores within 1e-5 relative), and the golden
// cases of the reference implementation. Label gpu; on a machine without a GPU the
// binary says so in one line and exits 0 (CTest reports the test as skipped).
#define DOCTEST_CONFIG_IMPLEMENT
#include <doctest/doctest.h>

#include <cake/cake.cuh>
#include <cake_tools/json.hpp>
#include <cake_tools/npy.hpp>

#include <algorithm>
#include <array>
#include <cmath>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <numeric>
#include <random>
#include <sstream>
#include <string>
#include <vector>

#include "device_buffer.cuh"

namespace {

using namespace cake_cuda_test;

template <class T, std::size_t R>
cake::host_view<T, R> hview(std::vector<T>& v, const std::array<index_t, R>& ext) {
  return cake::make_view(v.data(), ext);
}

bool close(double a, double b, double rel, double abs) {
  return std::abs(a - b) <= abs + rel * std::max(std::abs(a), std::abs(b));
}

// Index of the first element that differs beyond tolerance, or -1.
index_t first_mismatch(const std::vector<float>& a, const std::vector<float>& b, double rel,
                       double abs) {
  if (a.size() != b.size()) return 0;
  for (std::size_t i = 0; i < a.size(); ++i)
    if (!close(a[i], b[i], rel, abs)) return static_cast<index_t>(i);
  return -1;
}

#define CHECK_CLOSE_VEC(dev, host, rel, abs)                                                   \
  do {                                                                                         \
    const index_t at_ = first_mismatch(dev, host, rel, abs);                                   \
    if (at_ >= 0)                                                                              \
      FAIL_CHECK("mismatch at " << at_ << ": cuda " << (dev)[at_] << " host " << (host)[at_]); \
  } while (0)

std::vector<float> normal(std::size_t n, float scale, std::mt19937& rng) {
  std::normal_distribution<float> dist(0.0f, scale);
  std::vector<float> v(n);
  for (auto& x : v) x = dist(rng);
  return v;
}

// Per-row log-sum-exp of the window scores, computed on the host in double.
std::vector<float> host_lse(const std::vector<float>& q, const std::vector<float>& k, index_t B,
                            index_t H, index_t Hkv, index_t w, index_t S, index_t d) {
  std::vector<float> lse(static_cast<std::size_t>(B * H * w));
  const index_t n = H / Hkv, P = S - w;
  for (index_t b = 0; b < B; ++b)
    for (index_t h = 0; h < H; ++h)
      for (index_t i = 0; i < w; ++i) {
        const float* qr = &q[static_cast<std::size_t>(((b * H + h) * w + i) * d)];
        std::vector<double> s(static_cast<std::size_t>(P + i + 1));
        double m = -1e300;
        for (index_t j = 0; j <= P + i; ++j) {
          const float* kr = &k[static_cast<std::size_t>(((b * Hkv + h / n) * S + j) * d)];
          double acc = 0;
          for (index_t x = 0; x < d; ++x) acc += double(qr[x]) * double(kr[x]);
          s[static_cast<std::size_t>(j)] = acc / std::sqrt(double(d));
          m = std::max(m, s[static_cast<std::size_t>(j)]);
        }
        double sum = 0;
        for (double v : s) sum += std::exp(v - m);
        lse[static_cast<std::size_t>((b * H + h) * w + i)] = static_cast<float>(m + std::log(sum));
      }
  return lse;
}

struct StatsShape {
  index_t B, H, Hkv, w, S, d;
};

// Host vs CUDA window statistics for one shape, K of type TK; also the lse path and
// the caller-provided workspace path.
template <class TK, class Ind>
void check_window_stats(const StatsShape& sh, const Ind& ind, cake::StatsRequest req,
                        std::uint32_t seed) {
  const auto [B, H, Hkv, w, S, d] = sh;
  const index_t P = S - w;
  std::mt19937 rng(seed);
  std::vector<float> q = normal(static_cast<std::size_t>(B * H * w * d), 1.5f, rng);
  std::vector<float> kf = normal(static_cast<std::size_t>(B * Hkv * S * d), 1.0f, rng);
  std::vector<TK> k = convert<TK>(kf);
  for (std::size_t i = 0; i < kf.size(); ++i) kf[i] = static_cast<float>(k[i]);  // as rounded
  const std::array<index_t, 4> qe{B, H, w, d}, ke{B, Hkv, S, d};
  const std::array<index_t, 3> ie{B, Hkv, P};

  std::vector<float> ind_host(static_cast<std::size_t>(B * Hkv * P)), st_host(2);
  cake::window_stats(cake::host, hview(q, qe), hview(k, ke), ind, hview(ind_host, ie),
                     hview(st_host, std::array<index_t, 1>{2}), req);

  DeviceBuffer<float> dq(q), dind(ind_host.size()), dst(2),
      dlse(static_cast<std::size_t>(B * H * w));
  DeviceBuffer<TK> dk(k);
  cake::window_stats(cake::cuda, dq.view(qe), dk.view(ke), ind, dind.view(ie),
                     dst.view(std::array<index_t, 1>{2}), req);
  const std::vector<float> ind_dev = dind.download(), st_dev = dst.download();
  CHECK_CLOSE_VEC(ind_dev, ind_host, 1e-5, 1e-7);
  CHECK(close(st_dev[0], st_host[0], 1e-5, 1e-6));
  CHECK(close(st_dev[1], st_host[1], 1e-5, 1e-9));

  // Allocation-free call with the queried workspace.
  const std::size_t bytes = cake::window_stats_workspace_size(B, H, Hkv, w, S, d);
  DeviceBuffer<char> ws(bytes);
  cuda_ok(cudaMemset(dind.get(), 0, ind_host.size() * sizeof(float)), "memset");
  cake::window_stats(cake::cuda, dq.view(qe), dk.view(ke), ind, dind.view(ie),
                     dst.view(std::array<index_t, 1>{2}), req,
                     cake::cuda_workspace{ws.get(), bytes});
  CHECK_CLOSE_VEC(dind.download(), ind_host, 1e-5, 1e-7);

  // One pass over K with the caller's log-sum-exp.
  dlse.upload(host_lse(q, kf, B, H, Hkv, w, S, d));
  cake::window_stats_lse(cake::cuda, dq.view(qe), dk.view(ke),
                         dlse.view(std::array<index_t, 3>{B, H, w}), ind, dind.view(ie),
                         dst.view(std::array<index_t, 1>{2}), req);
  CHECK_CLOSE_VEC(dind.download(), ind_host, 1e-5, 1e-7);
  const std::vector<float> st_lse = dst.download();
  CHECK(close(st_lse[0], st_host[0], 1e-5, 1e-6));
  CHECK(close(st_lse[1], st_host[1], 1e-5, 1e-9));
}

std::string read_text(const std::string& path) {
  std::ifstream f(path);
  std::stringstream ss;
  ss << f.rdbuf();
  return ss.str();
}

std::vector<std::string> golden_cases() {
  std::vector<std::string> out;
  for (const auto& e : std::filesystem::directory_iterator(CAKE_GOLDEN_DIR))
    if (e.is_directory()) out.push_back(e.path().string());
  std::sort(out.begin(), out.end());
  return out;
}

}  // namespace

TEST_SUITE("gpu") {
  TEST_CASE("window_stats on CUDA equals the host backend and the golden cases") {
    for (const std::string& dir : golden_cases()) {
      const auto meta = cake_tools::Json::parse(read_text(dir + "/meta.json"));
      const index_t B = meta["batch"].as_int(), H = meta["q_heads"].as_int(),
                    Hkv = meta["kv_heads"].as_int(), S = meta["seq_len"].as_int(),
                    d = meta["head_dim"].as_int(), w = meta["window"].as_int(),
                    L = meta["layers"].as_int(), P = S - w;
      const cake::MeanVarianceIndicator ind{static_cast<float>(meta["gamma"].as_double()), 5};
      for (index_t l = 0; l < L; ++l) {
        CAPTURE(dir);
        CAPTURE(l);
        const std::string pre = dir + "/layer" + std::to_string(l);
        std::vector<float> q = cake_tools::load_npy(pre + "_q_window.npy").as<float>();
        std::vector<float> k = cake_tools::load_npy(pre + "_k.npy").as<float>();
        const std::vector<float> golden = cake_tools::load_npy(pre + "_indicator.npy").as<float>();
        const std::array<index_t, 4> qe{B, H, w, d}, ke{B, Hkv, S, d};
        const std::array<index_t, 3> ie{B, Hkv, P};
        std::vector<float> ind_host(static_cast<std::size_t>(B * Hkv * P)), st_host(2);
        cake::window_stats(cake::host, hview(q, qe), hview(k, ke), ind, hview(ind_host, ie),
                           hview(st_host, std::array<index_t, 1>{2}));
        DeviceBuffer<float> dq(q), dk(k), dind(ind_host.size()), dst(2);
        cake::window_stats(cake::cuda, dq.view(qe), dk.view(ke), ind, dind.view(ie),
                           dst.view(std::array<index_t, 1>{2}));
        const std::vector<float> ind_dev = dind.download(), st_dev = dst.download();
        CHECK_CLOSE_VEC(ind_dev, ind_host, 1e-5, 1e-7);
        CHECK_CLOSE_VEC(ind_dev, golden, 1e-4, 1e-7);
        CHECK(close(st_dev[0], st_host[0], 1e-5, 1e-6));
        CHECK(close(st_dev[1], st_host[1], 1e-5, 1e-9));
        const auto& rec = meta["layer"][static_cast<std::size_t>(l)];
        CHECK(close(st_dev[0], rec["entropy"].as_double(), 1e-4, 1e-6));
        CHECK(close(st_dev[1], rec["variance"].as_double(), 1e-4, 1e-9));

        // The kept set of a one-shot cut: top-k of the indicator, in position order.
        const index_t kept = meta["kept_counts"][static_cast<std::size_t>(l)].as_int();
        std::vector<std::int64_t> sel_host(static_cast<std::size_t>(B * Hkv * kept));
        cake::select_k(cake::host, hview(ind_host, std::array<index_t, 2>{B * Hkv, P}),
                       hview(sel_host, std::array<index_t, 2>{B * Hkv, kept}),
                       cake::select_order::position);
        DeviceBuffer<float> dsc(ind_host);
        DeviceBuffer<std::int64_t> dsel(sel_host.size());
        cake::select_k(cake::cuda, dsc.view(std::array<index_t, 2>{B * Hkv, P}),
                       dsel.view(std::array<index_t, 2>{B * Hkv, kept}),
                       cake::select_order::position);
        CHECK(dsel.download() == sel_host);
        if (!meta["cascading"].as_bool() && S > meta["cache_size"].as_int() + w) {
          const std::vector<std::int64_t> gkept =
              cake_tools::load_npy(pre + "_kept.npy").as<std::int64_t>();
          CHECK(dsel.download() == gkept);
        }
      }
    }
  }

  TEST_CASE("window_stats on CUDA: shapes, key types, indicators") {
    const std::vector<StatsShape> shapes = {
        {1, 4, 4, 8, 100, 16},     // MHA
        {2, 8, 2, 16, 300, 32},    // GQA, batch 2
        {1, 8, 1, 24, 200, 128},   // group rows do not fit: row chunks straddle heads
        {1, 2, 1, 5, 5, 8},        // no prefix keys (S == window)
        {1, 4, 2, 2, 70, 7},       // odd head_dim, window 2
        {1, 32, 8, 32, 1000, 128}  // Llama-3.1-8B heads
    };
    std::uint32_t seed = 1;
    for (const auto& sh : shapes) {
      CAPTURE(sh.S);
      CAPTURE(sh.d);
      CAPTURE(sh.w);
      // Plain calls, not SUBCASEs: doctest subcases inside a loop would run once.
      const cake::MeanVarianceIndicator mv{200.0f, 5};
      {
        INFO("float keys");
        check_window_stats<float>(sh, mv, {}, seed++);
      }
      {
        INFO("half keys");
        check_window_stats<__half>(sh, mv, {}, seed++);
      }
      {
        INFO("bf16 keys");
        check_window_stats<__nv_bfloat16>(sh, mv, {}, seed++);
      }
      {
        INFO("window mean, no variance, pool 3");
        check_window_stats<float>(sh, cake::WindowMeanIndicator{3}, {true, false}, seed++);
      }
      {
        INFO("bf16 keys, no entropy, gamma 50, pool 1");
        check_window_stats<__nv_bfloat16>(sh, cake::MeanVarianceIndicator{50.0f, 1}, {false, true},
                                          seed++);
      }
    }
  }

  // The opt-in tensor-core mode (16-bit K): close to the host, at a looser tolerance.
  // Q of type TQ (K's type: one plane, exact products; float: two planes). Shapes the
  // tensor-core kernels do not take (expect_tc false) must give the exact result.
  template <class TQ, class TK>
  void check_window_stats_tc(const StatsShape& sh, std::uint32_t seed, bool expect_tc = true) {
    const auto [B, H, Hkv, w, S, d] = sh;
    const index_t P = S - w;
    std::mt19937 rng(seed);
    const std::vector<TQ> qt =
        convert<TQ>(normal(static_cast<std::size_t>(B * H * w * d), 1.5f, rng));
    const std::vector<TK> k =
        convert<TK>(normal(static_cast<std::size_t>(B * Hkv * S * d), 1.0f, rng));
    std::vector<float> q(qt.size()), kf(k.size());  // the host sees the same values
    for (std::size_t i = 0; i < q.size(); ++i) q[i] = static_cast<float>(qt[i]);
    for (std::size_t i = 0; i < k.size(); ++i) kf[i] = static_cast<float>(k[i]);
    const std::array<index_t, 4> qe{B, H, w, d}, ke{B, Hkv, S, d};
    const std::array<index_t, 3> ie{B, Hkv, P};
    const std::array<index_t, 1> se{2};
    const cake::MeanVarianceIndicator ind{};
    std::vector<float> ind_host(static_cast<std::size_t>(B * Hkv * P)), st_host(2);
    cake::window_stats(cake::host, hview(q, qe), hview(kf, ke), ind, hview(ind_host, ie),
                       hview(st_host, se));
    DeviceBuffer<TQ> dq(qt);
    DeviceBuffer<float> dind(ind_host.size()), dst(2);
    DeviceBuffer<TK> dk(k);
    cake::window_stats(cake::cuda, dq.view(qe), dk.view(ke), ind, dind.view(ie), dst.view(se), {},
                       {}, cake::cuda_math::tensor_cores);
    const std::vector<float> tc = dind.download();
    CHECK_CLOSE_VEC(tc, ind_host, 2e-3, 1e-7);
    const std::vector<float> st = dst.download();
    CHECK(close(st[0], st_host[0], 1e-3, 1e-6));
    CHECK(close(st[1], st_host[1], 2e-3, 1e-9));
    // The policy's math is the default of every call under it: bit for bit the explicit
    // tensor-core result, and (where the tensor cores take the shape) not the exact one.
    DeviceBuffer<float> dind2(ind_host.size()), dst2(2);
    cake::window_stats(cake::cuda.with(cake::cuda_math::tensor_cores), dq.view(qe), dk.view(ke),
                       ind, dind2.view(ie), dst2.view(se));
    CHECK(dind2.download() == tc);
    cake::window_stats(cake::cuda.with(cake::cuda_math::tensor_cores), dq.view(qe), dk.view(ke),
                       ind, dind2.view(ie), dst2.view(se), {}, {},
                       cake::cuda_math::exact);  // a call's own math wins over the policy's
    const std::vector<float> exact = dind2.download();
    if (expect_tc)
      CHECK(exact != tc);
    else
      CHECK(exact == tc);
    CHECK_CLOSE_VEC(exact, ind_host, 1e-5, 1e-7);

    // One pass over K with the caller's log-sum-exp, into a caller's workspace; then
    // another indicator with only the entropy asked for.
    DeviceBuffer<float> dlse(host_lse(q, kf, B, H, Hkv, w, S, d));
    const std::size_t bytes = cake::window_stats_workspace_size(B, H, Hkv, w, S, d, true);
    DeviceBuffer<char> ws(bytes);
    cake::window_stats_lse(cake::cuda.with(cake::cuda_math::tensor_cores), dq.view(qe), dk.view(ke),
                           dlse.view(std::array<index_t, 3>{B, H, w}), ind, dind2.view(ie),
                           dst2.view(se), {}, cake::cuda_workspace{ws.get(), bytes});
    CHECK_CLOSE_VEC(dind2.download(), ind_host, 2e-3, 1e-7);
    const std::vector<float> st_lse = dst2.download();
    CHECK(close(st_lse[0], st_host[0], 1e-3, 1e-6));
    CHECK(close(st_lse[1], st_host[1], 2e-3, 1e-9));
    const cake::WindowMeanIndicator mean3{3};
    cake::window_stats(cake::host, hview(q, qe), hview(kf, ke), mean3, hview(ind_host, ie),
                       hview(st_host, se), {true, false});
    cake::window_stats(cake::cuda.with(cake::cuda_math::tensor_cores), dq.view(qe), dk.view(ke),
                       mean3, dind2.view(ie), dst2.view(se), {true, false});
    CHECK_CLOSE_VEC(dind2.download(), ind_host, 2e-3, 1e-7);
    CHECK(close(dst2.download()[0], st_host[0], 1e-3, 1e-6));
  }

  TEST_CASE("window_stats on CUDA, tensor-core mode") {
    using bf16 = __nv_bfloat16;
    SUBCASE("bf16, Llama heads") {
      check_window_stats_tc<float, bf16>({1, 32, 8, 32, 1000, 128}, 21);
    }
    SUBCASE("bf16 Q and K, Llama heads: one plane") {
      check_window_stats_tc<bf16, bf16>({1, 32, 8, 32, 1000, 128}, 24);
    }
    SUBCASE("half, group 8, window 24") {
      check_window_stats_tc<float, __half>({1, 8, 1, 24, 300, 128}, 22);
    }
    SUBCASE("bf16, small, batch 2") {
      check_window_stats_tc<float, bf16>({2, 8, 2, 16, 300, 32}, 23);
    }
    SUBCASE("half, window 48, head_dim 80 (a half chunk), group 7") {
      check_window_stats_tc<float, __half>({1, 14, 2, 48, 700, 80}, 25);
    }
    SUBCASE("bf16, head_dim 256, window 64, batch 2") {
      check_window_stats_tc<float, bf16>({2, 4, 2, 64, 500, 256}, 26);
    }
    SUBCASE("bf16, MHA, window 8, key tails") {
      check_window_stats_tc<float, bf16>({1, 4, 4, 8, 333, 64}, 27);
    }
    SUBCASE("half Q, bf16 K, head_dim 144 (window <= 32 over 128), group 3") {
      check_window_stats_tc<__half, bf16>({1, 6, 2, 32, 400, 144}, 29);
    }
    SUBCASE("group 16: not for the tensor cores, the exact kernels run") {
      check_window_stats_tc<float, bf16>({1, 16, 1, 8, 200, 64}, 28, false);
    }
  }

  TEST_CASE("window_stats_from_attention on CUDA equals the host backend") {
    const index_t B = 2, H = 8, Hkv = 2, w = 16, S = 400, P = S - w;
    std::mt19937 rng(7);
    std::vector<float> a = normal(static_cast<std::size_t>(B * H * w * S), 2.0f, rng);
    for (index_t r = 0; r < B * H * w; ++r) {  // causal softmax rows
      const index_t i = r % w;
      float* row = &a[static_cast<std::size_t>(r * S)];
      float m = -1e30f, s = 0;
      for (index_t j = 0; j <= P + i; ++j) m = std::max(m, row[j]);
      for (index_t j = 0; j < S; ++j) {
        row[j] = j <= P + i ? std::exp(row[j] - m) : 0.0f;
        s += row[j];
      }
      for (index_t j = 0; j < S; ++j) row[j] /= s;
    }
    const std::array<index_t, 4> ae{B, H, w, S};
    const std::array<index_t, 3> ie{B, Hkv, P};
    const cake::MeanVarianceIndicator ind{};
    std::vector<float> ind_host(static_cast<std::size_t>(B * Hkv * P)), st_host(2);
    cake::window_stats_from_attention(cake::host, hview(a, ae), ind, hview(ind_host, ie),
                                      hview(st_host, std::array<index_t, 1>{2}));
    DeviceBuffer<float> da(a), dind(ind_host.size()), dst(2);
    cake::window_stats_from_attention(cake::cuda, da.view(ae), ind, dind.view(ie),
                                      dst.view(std::array<index_t, 1>{2}));
    CHECK_CLOSE_VEC(dind.download(), ind_host, 1e-5, 1e-7);
    const std::vector<float> st = dst.download();
    CHECK(close(st[0], st_host[0], 1e-5, 1e-6));
    CHECK(close(st[1], st_host[1], 1e-5, 1e-9));
    const std::size_t bytes = cake::window_stats_from_attention_workspace_size(B, Hkv, w, S);
    DeviceBuffer<char> ws(bytes);
    cake::window_stats_from_attention(cake::cuda, da.view(ae), ind, dind.view(ie),
                                      dst.view(std::array<index_t, 1>{2}), {},
                                      cake::cuda_workspace{ws.get(), bytes});
    CHECK_CLOSE_VEC(dind.download(), ind_host, 1e-5, 1e-7);
  }

  TEST_CASE("select_k on CUDA returns exactly the host's indices, ties included") {
    const std::vector<index_t> lengths = {1, 5, 1000, 4097, 20000, 131072, 400000};
    std::mt19937 rng(11);
    int variant = 0;
    for (const index_t n : lengths) {
      const index_t rows = n > 100000 ? 2 : 3;
      // Few distinct values: many ties at the threshold.
      std::vector<float> sc(static_cast<std::size_t>(rows * n));
      std::uniform_int_distribution<int> level(-40, 40);
      for (auto& x : sc) x = static_cast<float>(level(rng)) * 0.25f;
      if (n >= 1000)  // and one row of distinct values
        for (index_t j = 0; j < n; ++j)
          sc[static_cast<std::size_t>(j)] = std::sin(0.37f * j) * 1e3f;
      DeviceBuffer<float> dsc(sc);
      std::vector<index_t> ks = {0, 1, 7, n / 2, n, 4096, 4097};
      for (const index_t k : ks) {
        if (k > n) continue;
        for (const auto order : {cake::select_order::descending, cake::select_order::position}) {
          CAPTURE(n);
          CAPTURE(k);
          CAPTURE(static_cast<int>(order));
          const std::array<index_t, 2> se{rows, n}, oe{rows, k};
          if (++variant % 2 == 0) {
            std::vector<std::int64_t> h(static_cast<std::size_t>(rows * k));
            cake::select_k(cake::host, hview(sc, se), hview(h, oe), order);
            DeviceBuffer<std::int64_t> d(h.size());
            cake::select_k(cake::cuda, dsc.view(se), d.view(oe), order);
            if (k > 0) CHECK(d.download() == h);
          } else {
            std::vector<int> h(static_cast<std::size_t>(rows * k));
            cake::select_k(cake::host, hview(sc, se), hview(h, oe), order);
            DeviceBuffer<int> d(h.size());
            const std::size_t bytes = cake::select_k_workspace_size(rows, n, k, order);
            DeviceBuffer<char> ws(bytes);
            cake::select_k(cake::cuda, dsc.view(se), d.view(oe), order,
                           cake::cuda_workspace{ws.get(), bytes});
            if (k > 0) CHECK(d.download() == h);
          }
        }
      }
    }
  }

  // Rows of n scores inside a pitch, starting `offset` floats into the buffer: the
  // kernel must honour the row stride, and its 16-byte loads (aligned rows) must
  // cover the scalar tail of each slice; an offset of 1 float turns them off.
  void check_select_strided(index_t rows, index_t n, index_t pitch, index_t offset, index_t k,
                            cake::select_order order, std::uint32_t seed) {
    CAPTURE(n);
    CAPTURE(pitch);
    CAPTURE(offset);
    std::mt19937 rng(seed);
    std::vector<float> buf = normal(static_cast<std::size_t>(offset + rows * pitch), 1.0f, rng);
    auto hv = cake::make_view(buf.data() + offset, std::array<index_t, 2>{rows, n},
                              std::array<index_t, 2>{pitch, 1});
    std::vector<std::int64_t> h(static_cast<std::size_t>(rows * k));
    cake::select_k(cake::host, hv, hview(h, std::array<index_t, 2>{rows, k}), order);
    DeviceBuffer<float> d(buf);
    DeviceBuffer<std::int64_t> o(h.size());
    auto dv = cake::make_view<cake::device_space>(d.get() + offset, std::array<index_t, 2>{rows, n},
                                                  std::array<index_t, 2>{pitch, 1});
    cake::select_k(cake::cuda, dv, o.view(std::array<index_t, 2>{rows, k}), order);
    CHECK(o.download() == h);
  }

  TEST_CASE("select_k on CUDA: strided rows") {
    using O = cake::select_order;
    check_select_strided(4, 300, 320, 0, 37, O::descending, 3);
    check_select_strided(3, 1001, 1004, 0, 100, O::descending, 4);     // one block, tail of 1
    check_select_strided(3, 1001, 1004, 1, 100, O::position, 5);       // unaligned rows
    check_select_strided(2, 20003, 20004, 0, 1500, O::descending, 6);  // cluster, tail of 3
    check_select_strided(2, 20003, 20004, 1, 1500, O::position, 7);
    check_select_strided(1, 20003, 20003, 0, 2000, O::descending, 8);  // one row, odd stride
  }

  template <class T>
  void check_compact(index_t d, bool in_place, std::uint32_t seed) {
    const index_t B = 2, Hkv = 3, S = 50, m = 20;
    std::mt19937 rng(seed);
    std::vector<float> f = normal(static_cast<std::size_t>(B * Hkv * S * d), 1.0f, rng);
    std::vector<T> src = convert<T>(f);
    std::vector<std::int64_t> keep(static_cast<std::size_t>(B * Hkv * m));
    for (index_t r = 0; r < B * Hkv; ++r) {
      std::vector<std::int64_t> all(static_cast<std::size_t>(S));
      std::iota(all.begin(), all.end(), 0);
      std::shuffle(all.begin(), all.end(), rng);
      all.resize(static_cast<std::size_t>(m));
      if (in_place) std::sort(all.begin(), all.end());
      std::copy(all.begin(), all.end(), keep.begin() + r * m);
    }
    const std::array<index_t, 4> se{B, Hkv, S, d}, de{B, Hkv, m, d};
    const std::array<index_t, 3> ke{B, Hkv, m};
    std::vector<T> expect(static_cast<std::size_t>(B * Hkv * m * d));
    cake::compact(cake::host, hview(src, se), hview(keep, ke), hview(expect, de));
    DeviceBuffer<T> dsrc(src);
    DeviceBuffer<std::int64_t> dkeep(keep);
    std::vector<T> got;
    if (in_place) {
      // dst aliases src with the compacted strides of the source buffer: (B, Hkv, m, d)
      // inside (B, Hkv, S, d), as KvCache compacts a layer in place.
      auto dv = cake::make_view<cake::device_space>(
          dsrc.get(), de, std::array<index_t, 4>{Hkv * S * d, S * d, d, 1});
      cake::compact(cake::cuda, dsrc.view(se), dkeep.view(ke), dv);
      const std::vector<T> all = dsrc.download();
      for (index_t r = 0; r < B * Hkv; ++r)
        got.insert(got.end(), all.begin() + r * S * d, all.begin() + r * S * d + m * d);
    } else {
      DeviceBuffer<T> ddst(expect.size());
      cake::compact(cake::cuda, dsrc.view(se), dkeep.view(ke), ddst.view(de));
      got = ddst.download();
    }
    REQUIRE(got.size() == expect.size());
    CHECK(std::memcmp(got.data(), expect.data(), got.size() * sizeof(T)) == 0);
  }

  TEST_CASE("compact on CUDA equals the host backend exactly") {
    SUBCASE("bf16, 16-byte vectors") { check_compact<__nv_bfloat16>(128, false, 1); }
    SUBCASE("float, 16-byte vectors") { check_compact<float>(64, false, 2); }
    SUBCASE("float, head_dim 3 (element-wise)") { check_compact<float>(3, false, 3); }
    SUBCASE("half, in place") { check_compact<__half>(128, true, 4); }
    SUBCASE("float, head_dim 5, in place") { check_compact<float>(5, true, 5); }
    SUBCASE("float, long rows in place") { check_compact<float>(2048, true, 6); }
  }

  // with_workspace: the allocation-free overload, with exactly the queried bytes.
  template <class TK>
  void check_decode(index_t held, index_t c, const cake::MeanVarianceIndicator& ind,
                    std::uint32_t seed, index_t H = 8, index_t Hkv = 2, index_t d = 32,
                    bool with_workspace = false) {
    const index_t B = 2;
    std::mt19937 rng(seed);
    std::vector<float> q = normal(static_cast<std::size_t>(B * H * d), 1.0f, rng);
    std::vector<TK> k =
        convert<TK>(normal(static_cast<std::size_t>(B * Hkv * held * d), 1.0f, rng));
    const std::array<index_t, 3> qe{B, H, d}, oe{B, Hkv, c};
    const std::array<index_t, 4> ke{B, Hkv, held, d};
    std::vector<float> expect(static_cast<std::size_t>(B * Hkv * c));
    cake::decode_scores(cake::host, hview(q, qe), hview(k, ke), ind, hview(expect, oe));
    DeviceBuffer<float> dq(q), dout(expect.size());
    DeviceBuffer<TK> dk(k);
    if (with_workspace) {
      const std::size_t bytes = cake::decode_scores_workspace_size(B, H, Hkv, held);
      REQUIRE(bytes >= static_cast<std::size_t>(B * H * held) * sizeof(float));
      DeviceBuffer<char> ws(bytes);
      cake::decode_scores(cake::cuda, dq.view(qe), dk.view(ke), ind, dout.view(oe),
                          cake::cuda_workspace{ws.get(), bytes});
      CHECK_CLOSE_VEC(dout.download(), expect, 1e-5, 1e-9);
      // One byte short is refused before any launch, naming the workspace.
      DeviceBuffer<float> untouched(std::vector<float>(expect.size(), -1.0f));
      CHECK_THROWS_WITH_AS(
          cake::decode_scores(cake::cuda, dq.view(qe), dk.view(ke), ind, untouched.view(oe),
                              cake::cuda_workspace{ws.get(), bytes - 1}),
          doctest::Contains("workspace"), cake::invalid_argument);
      CHECK(untouched.download() == std::vector<float>(expect.size(), -1.0f));
      return;
    }
    cake::decode_scores(cake::cuda, dq.view(qe), dk.view(ke), ind, dout.view(oe));
    CHECK_CLOSE_VEC(dout.download(), expect, 1e-5, 1e-9);
  }

  TEST_CASE("decode_scores on CUDA equals the host backend") {
    SUBCASE("float keys") { check_decode<float>(300, 284, {200.0f, 5}, 1); }
    SUBCASE("bf16 keys, pool 7") { check_decode<__nv_bfloat16>(1000, 968, {200.0f, 7}, 2); }
    SUBCASE("no pooling") { check_decode<float>(129, 1, {200.0f, 1}, 3); }
    SUBCASE("long row: hundreds of key tiles") {
      check_decode<float>(50000, 49968, {200.0f, 5}, 4);
    }
    SUBCASE("fewer keys than one tile") { check_decode<__half>(37, 5, {200.0f, 3}, 5); }
    // 10 query heads per KV head: more heads than warps in the finishing block.
    SUBCASE("group of 10, bf16 rows of 72 bytes (no 16-byte loads)") {
      check_decode<__nv_bfloat16>(777, 745, {200.0f, 5}, 6, 20, 2, 36);
    }
    SUBCASE("head_dim 256, group 1") { check_decode<float>(130, 98, {200.0f, 7}, 7, 4, 4, 256); }
    SUBCASE("caller's workspace") {
      check_decode<__nv_bfloat16>(2080, 2048, {200.0f, 5}, 8, 32, 8, 128, true);
    }
  }

  TEST_CASE("CUDA entry points check their input with the host's messages") {
    DeviceBuffer<float> sc(100);
    DeviceBuffer<int> out(20);
    try {
      cake::select_k(cake::cuda, sc.view(std::array<index_t, 2>{2, 50}),
                     out.view(std::array<index_t, 2>{2, 60}));
      FAIL("no exception");
    } catch (const cake::invalid_argument& e) {
      CHECK(e.id() == "cake.select_k.k");
    }
    DeviceBuffer<float> q(2 * 4 * 16), k(2 * 100 * 16), ind(2 * 96), st(2);
    char small[1];
    try {
      cake::window_stats(cake::cuda, q.view(std::array<index_t, 4>{1, 2, 4, 16}),
                         k.view(std::array<index_t, 4>{1, 2, 100, 16}),
                         cake::MeanVarianceIndicator{}, ind.view(std::array<index_t, 3>{1, 2, 96}),
                         st.view(std::array<index_t, 1>{2}), {}, cake::cuda_workspace{small, 1});
      FAIL("no exception");
    } catch (const cake::invalid_argument& e) {
      CHECK(e.id() == "cake.cuda.workspace");
    }
  }

}  // TEST_SUITE

int main(int argc, char** argv) {
  int devices = 0;
  if (cudaGetDeviceCount(&devices) != cudaSuccess || devices == 0) {
    std::printf("no CUDA device: skipping %zu CUDA tests\n",
                doctest::detail::getRegisteredTests().size());
    return 0;
  }
  doctest::Context ctx(argc, argv);
  return ctx.run();
}
