// window_stats against a naive double-precision reference that materialises the
// [B, H, w, S] window attention (spec sections 1-3).
#include <doctest/doctest.h>

#include <cake/cake.hpp>

#include <cmath>
#include <cstring>
#include <limits>
#include <random>
#include <vector>

using cake::index_t;

namespace ws_test {

struct Shape {
  index_t B, H, Hkv, w, S, d;
  index_t P() const { return S - w; }
};

struct Ref {
  std::vector<double> attention;  // (B, H, w, S)
  std::vector<double> indicator;  // (B, Hkv, S - w)
  double entropy = 0, variance = 0;
};

inline std::vector<float> random_floats(std::size_t n, unsigned seed, float scale = 1.0f) {
  std::mt19937 gen(seed);
  std::normal_distribution<float> dist(0.0f, scale);
  std::vector<float> v(n);
  for (auto& x : v) x = dist(gen);
  return v;
}

// Spec sections 1-3, written out loop by loop in double.
inline Ref reference(const Shape& s, const std::vector<float>& q, const std::vector<float>& k,
                     double gamma, int kernel, bool use_variance) {
  const index_t n = s.H / s.Hkv, P = s.P();
  Ref r;
  r.attention.assign(static_cast<std::size_t>(s.B * s.H * s.w * s.S), 0.0);
  std::vector<double> ind_heads(static_cast<std::size_t>(s.B * s.H * P));
  for (index_t b = 0; b < s.B; ++b)
    for (index_t h = 0; h < s.H; ++h) {
      const index_t g = h / n;
      double* A = r.attention.data() + (b * s.H + h) * s.w * s.S;
      for (index_t i = 0; i < s.w; ++i) {
        std::vector<double> z(static_cast<std::size_t>(s.S));
        double mx = -std::numeric_limits<double>::infinity();
        for (index_t j = 0; j < s.S; ++j) {
          if (j >= P && j - P > i) {  // causal mask inside the window
            z[static_cast<std::size_t>(j)] = -std::numeric_limits<double>::infinity();
            continue;
          }
          double dot = 0;
          for (index_t x = 0; x < s.d; ++x)
            dot += static_cast<double>(
                       q[static_cast<std::size_t>(((b * s.H + h) * s.w + i) * s.d + x)]) *
                   static_cast<double>(
                       k[static_cast<std::size_t>(((b * s.Hkv + g) * s.S + j) * s.d + x)]);
          z[static_cast<std::size_t>(j)] = dot / std::sqrt(static_cast<double>(s.d));
          mx = std::max(mx, z[static_cast<std::size_t>(j)]);
        }
        double sum = 0;
        for (index_t j = 0; j < s.S; ++j) sum += std::exp(z[static_cast<std::size_t>(j)] - mx);
        for (index_t j = 0; j < s.S; ++j)
          A[i * s.S + j] = std::exp(z[static_cast<std::size_t>(j)] - mx) / sum;
      }
      for (index_t j = 0; j < P; ++j) {
        double mean = 0;
        for (index_t i = 0; i < s.w; ++i) mean += A[i * s.S + j];
        mean /= static_cast<double>(s.w);
        double var = 0;
        for (index_t i = 0; i < s.w; ++i) var += (A[i * s.S + j] - mean) * (A[i * s.S + j] - mean);
        var /= static_cast<double>(s.w - 1);
        r.variance += var;
        for (index_t i = 0; i < s.w; ++i)
          r.entropy -= A[i * s.S + j] * std::log(A[i * s.S + j] + 1e-10);
        ind_heads[static_cast<std::size_t>((b * s.H + h) * P + j)] =
            mean + (use_variance ? gamma * var : 0.0);
      }
    }
  r.indicator.assign(static_cast<std::size_t>(s.B * s.Hkv * P), 0.0);
  const index_t half = kernel / 2;
  for (index_t b = 0; b < s.B; ++b)
    for (index_t g = 0; g < s.Hkv; ++g)
      for (index_t j = 0; j < P; ++j) {
        double acc = 0;
        for (index_t rr = 0; rr < n; ++rr) {
          const double* src = ind_heads.data() + (b * s.H + g * n + rr) * P;
          double pooled = 0;
          for (index_t t = j - half; t <= j + half; ++t)
            if (t >= 0 && t < P) pooled += src[t];
          acc += pooled / kernel;
        }
        r.indicator[static_cast<std::size_t>((b * s.Hkv + g) * P + j)] =
            acc / static_cast<double>(n);
      }
  return r;
}

struct Out {
  std::vector<float> indicator;
  std::array<float, 2> stats{};
};

template <class Ind>
Out run(const Shape& s, const std::vector<float>& q, const std::vector<float>& k, const Ind& ind,
        cake::host_policy exec = cake::host, cake::StatsRequest req = {}) {
  Out o;
  o.indicator.assign(static_cast<std::size_t>(s.B * s.Hkv * s.P()), -1.0f);
  cake::window_stats(exec, cake::make_view(q.data(), std::array<index_t, 4>{s.B, s.H, s.w, s.d}),
                     cake::make_view(k.data(), std::array<index_t, 4>{s.B, s.Hkv, s.S, s.d}), ind,
                     cake::make_view(o.indicator.data(), std::array<index_t, 3>{s.B, s.Hkv, s.P()}),
                     cake::make_view(o.stats.data(), std::array<index_t, 1>{2}), req);
  return o;
}

inline bool close(double got, double want, double rel = 1e-4, double abs = 1e-6) {
  return std::abs(got - want) <= abs + rel * std::abs(want);
}

inline void check_against(const Out& o, const Ref& r, double rel = 1e-4, double abs = 1e-6) {
  index_t bad = 0, first = -1;
  for (std::size_t i = 0; i < r.indicator.size(); ++i)
    if (!close(o.indicator[i], r.indicator[i], rel, abs)) {
      if (first < 0) first = static_cast<index_t>(i);
      ++bad;
    }
  INFO("first mismatch at flat index ", first);
  CHECK(bad == 0);
  CHECK(o.stats[0] == doctest::Approx(r.entropy).epsilon(rel));
  CHECK(o.stats[1] == doctest::Approx(r.variance).epsilon(rel));
}

}  // namespace ws_test

using namespace ws_test;

TEST_CASE("window_stats: tiny hand-computed case (w=2, S=3, d=1, pool_kernel=1)") {
  // q = [1, 1] (window rows at positions 1 and 2), k = [ln 3, 0, 0], d = 1.
  // Row 0 (position 1) sees keys 0..1: scores [ln 3, 0]     -> softmax [3/4, 1/4]   (key 2 masked)
  // Row 1 (position 2) sees keys 0..2: scores [ln 3, 0, 0]  -> softmax [3/5, 1/5, 1/5]
  // Prefix = key 0 only (P = S - w = 1): column [0.75, 0.6]
  //   mean = 0.675, unbiased var = (0.075^2 + 0.075^2) / 1 = 0.01125
  //   indicator (gamma = 2) = 0.675 + 2 * 0.01125 = 0.6975
  //   entropy = -(0.75 ln 0.75 + 0.6 ln 0.6) = 0.215762 + 0.306495 = 0.5222569
  //   variance = 0.01125
  const Shape s{1, 1, 1, 2, 3, 1};
  std::vector<float> q{1.0f, 1.0f};
  std::vector<float> k{std::log(3.0f), 0.0f, 0.0f};
  auto o = run(s, q, k, cake::MeanVarianceIndicator{2.0f, 1});
  REQUIRE(o.indicator.size() == 1);
  CHECK(o.indicator[0] == doctest::Approx(0.6975).epsilon(1e-5));
  CHECK(o.stats[0] == doctest::Approx(0.5222569).epsilon(1e-5));
  CHECK(o.stats[1] == doctest::Approx(0.01125).epsilon(1e-5));
  // Mean only: 0.675.
  auto m = run(s, q, k, cake::WindowMeanIndicator{1});
  CHECK(m.indicator[0] == doctest::Approx(0.675).epsilon(1e-5));
}

TEST_CASE("window_stats: pooling and GQA on a hand-checkable case") {
  // All scores zero (q = 0): row i sees P + i + 1 keys uniformly. S = 6, w = 2, P = 4.
  // Row 0: 1/5 on keys 0..4; row 1: 1/6 on keys 0..5. Each prefix column: [1/5, 1/6].
  //   mean = 11/60; deviations are +-1/60, so unbiased var = 2 * (1/60)^2 / (w - 1) = 1/1800.
  // gamma = 0: indicator = mean = 11/60 per key; pooled with k=3 zero padding /3:
  //   ends: 2/3 * 11/60, middle: 11/60. Two query heads share one KV head: mean is the same.
  const Shape s{1, 2, 1, 2, 6, 3};
  std::vector<float> q(2 * 2 * 3, 0.0f), k(6 * 3);
  for (std::size_t i = 0; i < k.size(); ++i) k[i] = static_cast<float>(i) * 0.1f;
  auto o = run(s, q, k, cake::MeanVarianceIndicator{0.0f, 3});
  REQUIRE(o.indicator.size() == 4);
  CHECK(o.indicator[0] == doctest::Approx(2.0 / 3.0 * 11.0 / 60.0).epsilon(1e-5));
  CHECK(o.indicator[1] == doctest::Approx(11.0 / 60.0).epsilon(1e-5));
  CHECK(o.indicator[2] == doctest::Approx(11.0 / 60.0).epsilon(1e-5));
  CHECK(o.indicator[3] == doctest::Approx(2.0 / 3.0 * 11.0 / 60.0).epsilon(1e-5));
  // variance: 2 heads * 4 keys * 1/1800
  CHECK(o.stats[1] == doctest::Approx(8.0 / 1800.0).epsilon(1e-5));
  // entropy: 2 heads * 4 keys * (1/5 ln 5 + 1/6 ln 6)
  CHECK(o.stats[0] ==
        doctest::Approx(8.0 * (std::log(5.0) / 5.0 + std::log(6.0) / 6.0)).epsilon(1e-5));
}

TEST_CASE("window_stats vs the naive double reference (random, GQA)") {
  SUBCASE("B=2, H=8, Hkv=2, w=8, S=200, d=16") {
    const Shape s{2, 8, 2, 8, 200, 16};
    auto q = random_floats(static_cast<std::size_t>(s.B * s.H * s.w * s.d), 11, 1.5f);
    auto k = random_floats(static_cast<std::size_t>(s.B * s.Hkv * s.S * s.d), 12);
    check_against(run(s, q, k, cake::MeanVarianceIndicator{}), reference(s, q, k, 200.0, 5, true));
    check_against(run(s, q, k, cake::MeanVarianceIndicator{0.5f, 3}),
                  reference(s, q, k, 0.5, 3, true));
  }
  SUBCASE("B=1, H=4, Hkv=2, w=16, S=1000, d=128") {
    const Shape s{1, 4, 2, 16, 1000, 128};
    auto q = random_floats(static_cast<std::size_t>(s.B * s.H * s.w * s.d), 21);
    auto k = random_floats(static_cast<std::size_t>(s.B * s.Hkv * s.S * s.d), 22);
    check_against(run(s, q, k, cake::MeanVarianceIndicator{}), reference(s, q, k, 200.0, 5, true));
  }
  SUBCASE("MHA, odd sizes: B=1, H=3, Hkv=3, w=5, S=37, d=7") {
    const Shape s{1, 3, 3, 5, 37, 7};
    auto q = random_floats(static_cast<std::size_t>(s.B * s.H * s.w * s.d), 31, 2.0f);
    auto k = random_floats(static_cast<std::size_t>(s.B * s.Hkv * s.S * s.d), 32);
    check_against(run(s, q, k, cake::MeanVarianceIndicator{}), reference(s, q, k, 200.0, 5, true));
  }
  SUBCASE("S == w (no prefix)") {
    const Shape s{1, 2, 1, 4, 4, 8};
    auto q = random_floats(static_cast<std::size_t>(s.B * s.H * s.w * s.d), 41);
    auto k = random_floats(static_cast<std::size_t>(s.B * s.Hkv * s.S * s.d), 42);
    auto o = run(s, q, k, cake::MeanVarianceIndicator{});
    CHECK(o.indicator.empty());
    CHECK(o.stats[0] == 0.0f);
    CHECK(o.stats[1] == 0.0f);
  }
}

TEST_CASE("window_stats_from_attention on the materialised attention equals window_stats") {
  const Shape s{2, 8, 2, 8, 200, 16};
  auto q = random_floats(static_cast<std::size_t>(s.B * s.H * s.w * s.d), 51, 1.5f);
  auto k = random_floats(static_cast<std::size_t>(s.B * s.Hkv * s.S * s.d), 52);
  const auto ref = reference(s, q, k, 200.0, 5, true);
  std::vector<float> a(ref.attention.size());
  for (std::size_t i = 0; i < a.size(); ++i) a[i] = static_cast<float>(ref.attention[i]);
  const cake::MeanVarianceIndicator mv{};
  Out fa;
  fa.indicator.assign(static_cast<std::size_t>(s.B * s.Hkv * s.P()), -1.0f);
  cake::window_stats_from_attention(
      cake::host,
      cake::make_view(static_cast<const float*>(a.data()),
                      std::array<index_t, 4>{s.B, s.H, s.w, s.S}),
      mv, cake::make_view(fa.indicator.data(), std::array<index_t, 3>{s.B, s.Hkv, s.P()}),
      cake::make_view(fa.stats.data(), std::array<index_t, 1>{2}));
  const auto ws = run(s, q, k, mv);
  for (std::size_t i = 0; i < ws.indicator.size(); ++i) {
    INFO("index ", i);
    REQUIRE(close(fa.indicator[i], ws.indicator[i], 1e-5, 1e-7));
  }
  CHECK(fa.stats[0] == doctest::Approx(ws.stats[0]).epsilon(1e-5));
  CHECK(fa.stats[1] == doctest::Approx(ws.stats[1]).epsilon(1e-5));
  check_against(fa, ref);
}

TEST_CASE("window_stats: bit-identical for threads(1) and threads(2)") {
  const Shape s{2, 8, 2, 8, 300, 32};
  auto q = random_floats(static_cast<std::size_t>(s.B * s.H * s.w * s.d), 61);
  auto k = random_floats(static_cast<std::size_t>(s.B * s.Hkv * s.S * s.d), 62);
  const auto o1 = run(s, q, k, cake::MeanVarianceIndicator{}, cake::host.threads(1));
  const auto o2 =
      run(s, q, k, cake::MeanVarianceIndicator{}, cake::host.threads(2).parallel_from(0));
  const auto o0 = run(s, q, k, cake::MeanVarianceIndicator{}, cake::host);
  CHECK(std::memcmp(o1.indicator.data(), o2.indicator.data(),
                    o1.indicator.size() * sizeof(float)) == 0);
  CHECK(std::memcmp(o1.indicator.data(), o0.indicator.data(),
                    o1.indicator.size() * sizeof(float)) == 0);
  CHECK(std::memcmp(o1.stats.data(), o2.stats.data(), sizeof(o1.stats)) == 0);
  CHECK(std::memcmp(o1.stats.data(), o0.stats.data(), sizeof(o1.stats)) == 0);
}

TEST_CASE("WindowMeanIndicator gives the pooled mean") {
  const Shape s{2, 4, 2, 6, 120, 16};
  auto q = random_floats(static_cast<std::size_t>(s.B * s.H * s.w * s.d), 71, 1.5f);
  auto k = random_floats(static_cast<std::size_t>(s.B * s.Hkv * s.S * s.d), 72);
  const auto ref = reference(s, q, k, 0.0, 5, false);
  check_against(run(s, q, k, cake::WindowMeanIndicator{}), ref);
  // And it differs from mean + gamma * var (so the check above is not vacuous).
  const auto mv = run(s, q, k, cake::MeanVarianceIndicator{});
  index_t differ = 0;
  for (std::size_t i = 0; i < ref.indicator.size(); ++i)
    differ += !close(mv.indicator[i], ref.indicator[i]);
  CHECK(differ > 0);
}

TEST_CASE("StatsRequest{false, false} gives the same indicator") {
  const Shape s{2, 8, 2, 8, 200, 16};
  auto q = random_floats(static_cast<std::size_t>(s.B * s.H * s.w * s.d), 81, 1.5f);
  auto k = random_floats(static_cast<std::size_t>(s.B * s.Hkv * s.S * s.d), 82);
  for (int which = 0; which < 2; ++which) {
    CAPTURE(which);
    Out full, none;
    if (which == 0) {
      full = run(s, q, k, cake::MeanVarianceIndicator{});
      none =
          run(s, q, k, cake::MeanVarianceIndicator{}, cake::host, cake::StatsRequest{false, false});
    } else {
      full = run(s, q, k, cake::WindowMeanIndicator{});
      none =
          run(s, q, k, cake::WindowMeanIndicator{}, cake::host, cake::StatsRequest{false, false});
    }
    CHECK(std::memcmp(full.indicator.data(), none.indicator.data(),
                      full.indicator.size() * sizeof(float)) == 0);
  }
  // With both requested, entropy and variance are the reference's.
  const auto ref = reference(s, q, k, 200.0, 5, true);
  const auto o =
      run(s, q, k, cake::MeanVarianceIndicator{}, cake::host, cake::StatsRequest{true, true});
  check_against(o, ref);
}

TEST_CASE("host_workspace: window_stats reuses it without growing, results unchanged") {
  const index_t B = 1, H = 4, Hkv = 2, w = 4, S = 300, d = 16;
  std::vector<float> q(static_cast<std::size_t>(B * H * w * d)),
      k(static_cast<std::size_t>(B * Hkv * S * d));
  for (std::size_t i = 0; i < q.size(); ++i) q[i] = std::sin(0.37f * static_cast<float>(i));
  for (std::size_t i = 0; i < k.size(); ++i) k[i] = std::cos(0.11f * static_cast<float>(i));
  std::vector<float> a(static_cast<std::size_t>(B * Hkv * (S - w))), b(a.size()), c(a.size()),
      st(2);
  const auto run = [&](const cake::host_policy& exec, std::vector<float>& out, index_t s) {
    cake::window_stats(
        exec,
        cake::make_view(static_cast<const float*>(q.data()), std::array<index_t, 4>{B, H, w, d}),
        cake::make_view(static_cast<const float*>(k.data()), std::array<index_t, 4>{B, Hkv, s, d}),
        cake::MeanVarianceIndicator{},
        cake::make_view(out.data(), std::array<index_t, 3>{B, Hkv, s - w}),
        cake::make_view(st.data(), std::array<index_t, 1>{2}));
  };
  run(cake::host.threads(1), a, S);  // a call-local workspace
  cake::host_workspace ws;
  CHECK(ws.bytes() == 0);
  // parallel_from(0): the workers' blocks are used even for this small call
  const cake::host_policy exec = cake::host.from(ws).parallel_from(0);
  CHECK(exec.workspace == &ws);
  CHECK(exec.threads(1).workspace == &ws);  // threads() keeps the workspace
  run(exec, b, S);
  CHECK(a == b);
  const std::size_t grown = ws.bytes();
  // at least the per-head indicators and one worker's (n * w_pad, S) score block
  CHECK(grown >= static_cast<std::size_t>(B * H * (S - w) + 2 * 8 * S) * sizeof(float));
  const std::byte* shared = ws.shared();
  run(exec, c, S);  // steady state: same blocks, nothing grown
  CHECK(ws.bytes() == grown);
  CHECK(ws.shared() == shared);
  CHECK(c == a);
  std::vector<float> small(static_cast<std::size_t>(B * Hkv * (S / 2 - w)));
  run(exec, small, S / 2);  // a smaller call fits in what is there
  CHECK(ws.bytes() == grown);
  ws.release();
  CHECK(ws.bytes() == 0);
  std::fill(b.begin(), b.end(), -1.0f);
  run(exec, b, S);
  CHECK(a == b);
  const cake::host_workspace copy(ws);  // a copy starts empty
  CHECK(copy.bytes() == 0);
}
