// Runtime instruction-set dispatch of the host kernels: every path this CPU can run
// keeps the same tokens as the portable path on randomized inputs, with indicators
// and layer statistics within stated tolerances; forcing a path works and an
// unsupported one is refused.
#include <doctest/doctest.h>

#include <cake/cake.hpp>

#include <algorithm>
#include <array>
#include <cmath>
#include <random>
#include <vector>

using cake::index_t;

namespace dispatch_test {

// Restores the path that was active when the test started.
struct IsaGuard {
  cake::host_isa saved = cake::active_host_isa();
  ~IsaGuard() { cake::force_host_isa(saved); }
};

std::vector<cake::host_isa> simd_paths() {
  std::vector<cake::host_isa> v;
  for (cake::host_isa i : {cake::host_isa::avx2, cake::host_isa::avx512})
    if (cake::host_isa_supported(i)) v.push_back(i);
  return v;
}

template <class T>
std::vector<T> random_values(std::size_t n, unsigned seed, float scale) {
  std::mt19937 gen(seed);
  std::normal_distribution<float> dist(0.0f, scale);
  std::vector<T> v(n);
  for (auto& x : v) x = static_cast<T>(dist(gen));
  return v;
}

struct Shape {
  index_t B, H, Hkv, w, S, d;
};

struct Result {
  std::vector<float> indicator;  // (B, Hkv, S - w)
  std::array<float, 2> stats{};
  std::vector<std::int32_t> kept;  // (B * Hkv, c): select_k of the indicator
};

template <class T>
Result run(const Shape& s, const std::vector<T>& q, const std::vector<T>& k, index_t c,
           cake::StatsRequest req = {}) {
  Result r;
  const index_t P = s.S - s.w;
  r.indicator.assign(static_cast<std::size_t>(s.B * s.Hkv * P), -1.0f);
  cake::window_stats(cake::host,
                     cake::make_view(q.data(), std::array<index_t, 4>{s.B, s.H, s.w, s.d}),
                     cake::make_view(k.data(), std::array<index_t, 4>{s.B, s.Hkv, s.S, s.d}),
                     cake::MeanVarianceIndicator{},
                     cake::make_view(r.indicator.data(), std::array<index_t, 3>{s.B, s.Hkv, P}),
                     cake::make_view(r.stats.data(), std::array<index_t, 1>{2}), req);
  r.kept.assign(static_cast<std::size_t>(s.B * s.Hkv * c), -1);
  cake::select_k(cake::host,
                 cake::make_view(static_cast<const float*>(r.indicator.data()),
                                 std::array<index_t, 2>{s.B * s.Hkv, P}),
                 cake::make_view(r.kept.data(), std::array<index_t, 2>{s.B * s.Hkv, c}),
                 cake::select_order::position);
  return r;
}

// Indicator tolerance: relative 1e-5 of the value plus 1e-5 of the row's largest
// value (tiny scores carry the absolute error of the large ones they are normalised by).
void check_same(const Result& got, const Result& want, index_t rows, index_t P) {
  index_t bad = 0, first = -1;
  for (index_t r = 0; r < rows; ++r) {
    float mx = 0;
    for (index_t j = 0; j < P; ++j) mx = std::max(mx, std::abs(want.indicator[r * P + j]));
    for (index_t j = 0; j < P; ++j) {
      const float a = got.indicator[r * P + j], b = want.indicator[r * P + j];
      if (!(std::abs(a - b) <= 1e-5f * std::abs(b) + 1e-5f * mx)) {
        if (first < 0) first = r * P + j;
        ++bad;
      }
    }
  }
  INFO("first indicator mismatch at flat index ", first);
  CHECK(bad == 0);
  CHECK(got.stats[0] == doctest::Approx(want.stats[0]).epsilon(1e-5));
  CHECK(got.stats[1] == doctest::Approx(want.stats[1]).epsilon(1e-5));
  CHECK(got.kept == want.kept);
}

}  // namespace dispatch_test

using namespace dispatch_test;

TEST_CASE("host ISA: forcing a path; an unsupported path is refused") {
  IsaGuard guard;
  cake::force_host_isa(cake::host_isa::portable);
  CHECK(cake::active_host_isa() == cake::host_isa::portable);
  CHECK(cake::host_isa_supported(cake::host_isa_best()));
  for (cake::host_isa i : {cake::host_isa::avx2, cake::host_isa::avx512}) {
    if (cake::host_isa_supported(i)) {
      cake::force_host_isa(i);
      CHECK(cake::active_host_isa() == i);
    } else {
      CHECK_THROWS_AS(cake::force_host_isa(i), cake::invalid_argument);
      CHECK(cake::active_host_isa() != i);
    }
  }
}

TEST_CASE("window_stats: every SIMD path keeps the portable path's tokens (randomized)") {
  IsaGuard guard;
  const Shape shapes[] = {
      {1, 32, 8, 32, 1500, 128},  // Llama-3.1-8B heads
      {2, 8, 2, 13, 517, 72},     // window not a multiple of 8, S not of 32, d of 8
      {1, 3, 3, 5, 97, 7},        // MHA, d below one vector
      {1, 4, 1, 40, 300, 64},     // window beyond a key tile's last row block
      {1, 2, 1, 150, 420, 16},    // whole key tiles some rows cannot see (w > a tile)
  };
  unsigned seed = 100;
  for (const Shape& s : shapes) {
    for (float scale : {0.5f, 2.5f}) {  // flat and peaked attention
      const auto q =
          random_values<float>(static_cast<std::size_t>(s.B * s.H * s.w * s.d), ++seed, scale);
      const auto k =
          random_values<float>(static_cast<std::size_t>(s.B * s.Hkv * s.S * s.d), ++seed, 1.0f);
      const index_t P = s.S - s.w, c = P / 4;
      cake::force_host_isa(cake::host_isa::portable);
      const Result want = run(s, q, k, c);
      for (cake::host_isa isa : simd_paths()) {
        CAPTURE(cake::host_isa_name(isa));
        CAPTURE(s.S);
        CAPTURE(scale);
        cake::force_host_isa(isa);
        check_same(run(s, q, k, c), want, s.B * s.Hkv, P);
        // the statistics a preference policy may skip leave the indicator as it was
        const Result lean = run(s, q, k, c, cake::StatsRequest{false, false});
        CHECK(lean.kept == want.kept);
      }
    }
  }
}

namespace dispatch_test {
// Every path, the portable one first.
std::vector<cake::host_isa> all_paths() {
  std::vector<cake::host_isa> v{cake::host_isa::portable};
  for (cake::host_isa i : simd_paths()) v.push_back(i);
  return v;
}

// 16-bit queries and keys (T) against the same values as float on the portable path:
// the indicator within check_same's tolerance and the same kept tokens, on every path.
template <class T>
void check_16bit_window(const Shape& s, unsigned seed) {
  const auto q = random_values<T>(static_cast<std::size_t>(s.B * s.H * s.w * s.d), seed, 1.5f);
  const auto k =
      random_values<T>(static_cast<std::size_t>(s.B * s.Hkv * s.S * s.d), seed + 1, 1.0f);
  std::vector<float> qf(q.size()), kf(k.size());
  for (std::size_t i = 0; i < q.size(); ++i) qf[i] = static_cast<float>(q[i]);
  for (std::size_t i = 0; i < k.size(); ++i) kf[i] = static_cast<float>(k[i]);
  const index_t P = s.S - s.w, c = P / 4;
  cake::force_host_isa(cake::host_isa::portable);
  const Result want = run(s, qf, kf, c);  // the same values, as float
  for (cake::host_isa isa : all_paths()) {
    CAPTURE(cake::host_isa_name(isa));
    CAPTURE(s.S);
    cake::force_host_isa(isa);
    check_same(run(s, q, k, c), want, s.B * s.Hkv, P);
  }
}
}  // namespace dispatch_test

TEST_CASE("window_stats: 16-bit queries and keys take every path with float accumulation") {
  IsaGuard guard;
  const Shape shapes[] = {
      {1, 8, 2, 16, 700, 64},
      {1, 32, 8, 32, 1100, 128},  // Llama-3.1-8B heads
      {2, 6, 3, 13, 301, 24},     // window not a multiple of 8, d not of 16
  };
  unsigned seed = 7;
  for (const Shape& s : shapes) {
    check_16bit_window<cake::bfloat16>(s, seed += 2);
#if defined(__FLT16_MAX__)  // the compiler has _Float16
    check_16bit_window<_Float16>(s, seed += 2);
#endif
  }
}

TEST_CASE("bfloat16: exact to float, round to nearest even from float") {
  CHECK(static_cast<float>(cake::bfloat16(1.0f)) == 1.0f);
  CHECK(static_cast<float>(cake::bfloat16(-2.5f)) == -2.5f);
  // 1 + 2^-8 is halfway between 1 and 1 + 2^-7: ties to the even mantissa (1)
  CHECK(static_cast<float>(cake::bfloat16(1.0f + 0.00390625f)) == 1.0f);
  // 1 + 3 * 2^-8 is halfway between 1 + 2^-7 and 1 + 2^-6: ties to even (1 + 2^-6)
  CHECK(static_cast<float>(cake::bfloat16(1.0f + 3 * 0.00390625f)) == 1.0f + 0.015625f);
  CHECK(static_cast<float>(cake::bfloat16(1.0f + 0.0048828125f)) ==
        1.0f + 0.0078125f);                       // above half
  CHECK(cake::bfloat16(3.0e38f).bits == 0x7f62);  // 0x7f61b1e6: the low half is above a tie
  CHECK(std::isinf(static_cast<float>(cake::bfloat16(3.4e38f))));  // rounds past the largest
  CHECK(std::isnan(static_cast<float>(cake::bfloat16(std::nanf("")))));
  CHECK(cake::bfloat16::from_bits(0x3f80).bits == 0x3f80);
  CHECK(static_cast<float>(cake::bfloat16::from_bits(0x3f80)) == 1.0f);
}

namespace dispatch_test {

struct DecodeResult {
  std::vector<float> scores;       // (B, Hkv, c)
  std::vector<std::int32_t> kept;  // (B * Hkv, c - 1): all candidates but the lowest
};

// Scores within 1e-5 (relative) of the reference's, and the same kept tokens.
inline void check_same(const DecodeResult& got, const DecodeResult& want) {
  index_t bad = 0;
  for (std::size_t i = 0; i < want.scores.size(); ++i)
    if (!(std::abs(got.scores[i] - want.scores[i]) <= 1e-5f * std::abs(want.scores[i]) + 1e-9f))
      ++bad;
  CHECK(bad == 0);
  CHECK(got.kept == want.kept);
}

template <class T, class TQ = float>
DecodeResult decode(index_t B, index_t H, index_t Hkv, index_t n, index_t d, index_t c,
                    const std::vector<TQ>& q, const std::vector<T>& k,
                    const cake::host_policy& exec = cake::host) {
  DecodeResult r;
  r.scores.assign(static_cast<std::size_t>(B * Hkv * c), -1.0f);
  cake::decode_scores(exec, cake::make_view(q.data(), std::array<index_t, 3>{B, H, d}),
                      cake::make_view(k.data(), std::array<index_t, 4>{B, Hkv, n, d}),
                      cake::MeanVarianceIndicator{},
                      cake::make_view(r.scores.data(), std::array<index_t, 3>{B, Hkv, c}));
  r.kept.assign(static_cast<std::size_t>(B * Hkv * (c - 1)), -1);
  cake::select_k(exec,
                 cake::make_view(static_cast<const float*>(r.scores.data()),
                                 std::array<index_t, 2>{B * Hkv, c}),
                 cake::make_view(r.kept.data(), std::array<index_t, 2>{B * Hkv, c - 1}),
                 cake::select_order::position);
  return r;
}

template <class T>
void check_decode_paths(index_t B, index_t H, index_t Hkv, index_t n, index_t d, unsigned seed) {
  const index_t c = n - 3;
  const auto q = random_values<float>(static_cast<std::size_t>(B * H * d), seed, 1.5f);
  const auto k = random_values<T>(static_cast<std::size_t>(B * Hkv * n * d), seed + 1, 1.0f);
  const std::vector<float> kf(k.begin(), k.end());
  cake::force_host_isa(cake::host_isa::portable);
  const DecodeResult want = decode(B, H, Hkv, n, d, c, q, kf);  // the same keys, as float
  for (cake::host_isa isa : all_paths()) {
    CAPTURE(cake::host_isa_name(isa));
    CAPTURE(n);
    CAPTURE(d);
    cake::force_host_isa(isa);
    const DecodeResult got = decode(B, H, Hkv, n, d, c, q, k);
    check_same(got, want);
  }
}

}  // namespace dispatch_test

TEST_CASE("decode_scores: every SIMD path keeps the portable path's tokens (randomized)") {
  IsaGuard guard;
  check_decode_paths<float>(1, 32, 8, 1057, 128, 201);  // Llama-3.1-8B heads, odd held count
  check_decode_paths<float>(2, 6, 2, 300, 64, 203);     // group of 3 (padded to 4), B = 2
  check_decode_paths<float>(1, 4, 4, 50, 40, 205);      // head_dim not a whole vector: portable
  check_decode_paths<cake::bfloat16>(1, 32, 8, 1057, 128, 209);  // bf16 keys, widened by shifts
  check_decode_paths<cake::bfloat16>(2, 6, 2, 300, 64, 211);
#if defined(__FLT16_MAX__)
  check_decode_paths<_Float16>(1, 8, 2, 513, 128, 207);  // half keys through F16C
  check_decode_paths<_Float16>(1, 32, 8, 1057, 128, 213);
#endif
}

TEST_CASE(
    "decode_scores: 16-bit queries and keys on every path equal float holding the same values") {
  IsaGuard guard;
  const index_t B = 1, H = 32, Hkv = 8, n = 1057, d = 128, c = n - 3;
  const auto run16 = [&](auto tag, unsigned seed) {
    using T = decltype(tag);
    const auto q = random_values<T>(static_cast<std::size_t>(B * H * d), seed, 1.5f);
    const auto k = random_values<T>(static_cast<std::size_t>(B * Hkv * n * d), seed + 1, 1.0f);
    std::vector<float> qf(q.size()), kf(k.size());
    for (std::size_t i = 0; i < q.size(); ++i) qf[i] = static_cast<float>(q[i]);
    for (std::size_t i = 0; i < k.size(); ++i) kf[i] = static_cast<float>(k[i]);
    cake::force_host_isa(cake::host_isa::portable);
    const DecodeResult want = decode(B, H, Hkv, n, d, c, qf, kf);
    for (cake::host_isa isa : all_paths()) {
      CAPTURE(cake::host_isa_name(isa));
      cake::force_host_isa(isa);
      const DecodeResult got = decode(B, H, Hkv, n, d, c, q, k);
      check_same(got, want);
    }
  };
  run16(cake::bfloat16{}, 501);
#if defined(__FLT16_MAX__)
  run16(_Float16{}, 503);
#endif
}

TEST_CASE("window_stats and decode_scores read keys through strided views on every path") {
  IsaGuard guard;
  // keys in a buffer of capacity 1.5 S rows per head and a row pitch of d + 8, as a
  // cache with spare capacity holds them; the same values packed are the reference
  const Shape s{1, 8, 2, 16, 300, 64};
  const index_t pitch = s.d + 8, cap = s.S + s.S / 2, P = s.S - s.w, c = 64;
  const auto q = random_values<float>(static_cast<std::size_t>(s.B * s.H * s.w * s.d), 301, 1.5f);
  const auto k = random_values<float>(static_cast<std::size_t>(s.B * s.Hkv * s.S * s.d), 302, 1.0f);
  std::vector<float> big(static_cast<std::size_t>(s.B * s.Hkv * cap * pitch), 1e30f);
  for (index_t g = 0; g < s.B * s.Hkv; ++g)
    for (index_t j = 0; j < s.S; ++j)
      for (index_t x = 0; x < s.d; ++x)
        big[static_cast<std::size_t>((g * cap + j) * pitch + x)] =
            k[static_cast<std::size_t>((g * s.S + j) * s.d + x)];
  const auto kview = cake::make_view(
      static_cast<const float*>(big.data()), std::array<index_t, 4>{s.B, s.Hkv, s.S, s.d},
      std::array<index_t, 4>{s.Hkv * cap * pitch, cap * pitch, pitch, 1});
  cake::force_host_isa(cake::host_isa::portable);
  const Result want = run(s, q, k, c);
  std::vector<float> qd(static_cast<std::size_t>(s.B * s.H * s.d));
  for (std::size_t i = 0; i < qd.size(); ++i) qd[i] = q[i * static_cast<std::size_t>(s.w)];
  std::vector<float> dwant(static_cast<std::size_t>(s.B * s.Hkv * P));
  const auto qdv =
      cake::make_view(static_cast<const float*>(qd.data()), std::array<index_t, 3>{s.B, s.H, s.d});
  cake::decode_scores(cake::host, qdv,
                      cake::make_view(k.data(), std::array<index_t, 4>{s.B, s.Hkv, s.S, s.d}),
                      cake::MeanVarianceIndicator{},
                      cake::make_view(dwant.data(), std::array<index_t, 3>{s.B, s.Hkv, P}));
  for (cake::host_isa isa : simd_paths()) {
    CAPTURE(cake::host_isa_name(isa));
    cake::force_host_isa(isa);
    Result got;
    got.indicator.assign(static_cast<std::size_t>(s.B * s.Hkv * P), -1.0f);
    cake::window_stats(cake::host,
                       cake::make_view(q.data(), std::array<index_t, 4>{s.B, s.H, s.w, s.d}), kview,
                       cake::MeanVarianceIndicator{},
                       cake::make_view(got.indicator.data(), std::array<index_t, 3>{s.B, s.Hkv, P}),
                       cake::make_view(got.stats.data(), std::array<index_t, 1>{2}));
    got.kept.assign(static_cast<std::size_t>(s.B * s.Hkv * c), -1);
    cake::select_k(cake::host,
                   cake::make_view(static_cast<const float*>(got.indicator.data()),
                                   std::array<index_t, 2>{s.B * s.Hkv, P}),
                   cake::make_view(got.kept.data(), std::array<index_t, 2>{s.B * s.Hkv, c}),
                   cake::select_order::position);
    check_same(got, want, s.B * s.Hkv, P);
    std::vector<float> dgot(dwant.size(), -1.0f);
    cake::decode_scores(cake::host, qdv, kview, cake::MeanVarianceIndicator{},
                        cake::make_view(dgot.data(), std::array<index_t, 3>{s.B, s.Hkv, P}));
    for (std::size_t i = 0; i < dwant.size(); ++i) {
      INFO("decode score ", i);
      REQUIRE(std::abs(dgot[i] - dwant[i]) <= 1e-5f * std::abs(dwant[i]) + 1e-9f);
    }
  }
}

TEST_CASE("host_workspace: decode_scores and select_k reuse it on every path, results unchanged") {
  IsaGuard guard;
  const index_t B = 1, H = 8, Hkv = 2, n = 200, d = 64, c = 150;
  const auto q = random_values<float>(static_cast<std::size_t>(B * H * d), 401, 1.0f);
  const auto k = random_values<float>(static_cast<std::size_t>(B * Hkv * n * d), 402, 1.0f);
  std::vector<cake::host_isa> paths = simd_paths();
  paths.push_back(cake::host_isa::portable);
  for (cake::host_isa isa : paths) {
    CAPTURE(cake::host_isa_name(isa));
    cake::force_host_isa(isa);
    const DecodeResult want = decode(B, H, Hkv, n, d, c, q, k);  // call-local scratch
    cake::host_workspace ws;
    const cake::host_policy exec = cake::host.from(ws).parallel_from(0);
    DecodeResult got = decode(B, H, Hkv, n, d, c, q, k, exec);
    CHECK(got.scores == want.scores);
    CHECK(got.kept == want.kept);
    const std::size_t grown = ws.bytes();
    CHECK(grown >= static_cast<std::size_t>(H / Hkv * n + d) * sizeof(float));
    got = decode(B, H, Hkv, n, d, c, q, k, exec);
    CHECK(ws.bytes() == grown);  // steady state: nothing grown
    CHECK(got.scores == want.scores);
    CHECK(got.kept == want.kept);
  }
}

namespace dispatch_test {

// Decoding steps through a KvCache: per step and layer, the positions held; the
// values' first element carries each token's position, so the K/V rows can be
// checked against them. Paged: the same through an engine's pools.
struct DecodeRun {
  std::vector<std::vector<index_t>> held;  // (steps * layers) positions, row-major
};

// The default indicator's scores as a custom source: the cache then takes its generic
// decoding path (K/V rows shifted or gathered, scores from a dense view of the keys),
// the one every step took before the slot map.
struct GenericPath {
  cake::MeanVarianceIndicator base{};
  template <class Exec, class Q, class K, class O>
  void prefill_scores(const Exec& exec, const Q& q, const K& keys, const O& out) const {
    std::array<float, 2> st{};
    cake::window_stats(exec, q, keys, base, out,
                       cake::make_view(st.data(), std::array<index_t, 1>{2}));
  }
  template <class Exec, class Q, class K, class O>
  void decode_scores(const Exec& exec, const Q& q, const K& keys, const O& out) const {
    cake::decode_scores(exec, q, keys, base, out);
  }
  cake::status validate() const { return cake::status::success(); }
};

template <class Ind = cake::MeanVarianceIndicator>
DecodeRun decode_run(cake::token_order order, index_t C, unsigned seed, int steps,
                     cake::host_policy exec = {}) {
  const index_t B = 1, H = 8, Hkv = 2, d = 128, w = 8, S = 3 * C, L = 2;
  cake::CacheConfig cfg{};
  cfg.layers = L;
  cfg.batch = B;
  cfg.q_heads = H;
  cfg.kv_heads = Hkv;
  cfg.head_dim = d;
  cfg.window = w;
  cfg.cache_size = C;
  cfg.order = order;
  cake::KvCache<cake::CakePreference, cake::ProportionalBudget, Ind> cache(cfg, {}, {}, {}, exec);
  // keys of token p: random; values: p, then random
  const auto kp =
      random_values<float>(static_cast<std::size_t>(B * Hkv * (S + steps) * d), seed, 1.0f);
  auto vp = random_values<float>(kp.size(), seed + 1, 1.0f);
  for (index_t g = 0; g < Hkv; ++g)
    for (index_t p = 0; p < S + steps; ++p)
      vp[static_cast<std::size_t>((g * (S + steps) + p) * d)] = static_cast<float>(p);
  const auto strides = std::array<index_t, 4>{Hkv * (S + steps) * d, (S + steps) * d, d, 1};
  for (index_t l = 0; l < L; ++l) {
    const auto q =
        random_values<float>(static_cast<std::size_t>(B * H * w * d), seed + 2 + l, 1.5f);
    cache.prefill(l, cake::make_view(q.data(), std::array<index_t, 4>{B, H, w, d}),
                  cake::make_view(kp.data(), std::array<index_t, 4>{B, Hkv, S, d}, strides),
                  cake::make_view(vp.data(), std::array<index_t, 4>{B, Hkv, S, d}, strides));
  }
  DecodeRun out;
  std::vector<float> k1(static_cast<std::size_t>(Hkv * d)), v1(k1.size());
  for (int t = 0; t < steps; ++t) {
    const index_t p = S + t;
    for (index_t g = 0; g < Hkv; ++g)
      for (index_t x = 0; x < d; ++x) {
        k1[static_cast<std::size_t>(g * d + x)] =
            kp[static_cast<std::size_t>((g * (S + steps) + p) * d + x)];
        v1[static_cast<std::size_t>(g * d + x)] =
            vp[static_cast<std::size_t>((g * (S + steps) + p) * d + x)];
      }
    for (index_t l = 0; l < L; ++l) {
      const auto q =
          random_values<float>(static_cast<std::size_t>(B * H * d), seed + 100 * t + l, 1.5f);
      cache.decode(l, cake::make_view(q.data(), std::array<index_t, 3>{B, H, d}),
                   cake::make_view(k1.data(), std::array<index_t, 3>{B, Hkv, d}),
                   cake::make_view(v1.data(), std::array<index_t, 3>{B, Hkv, d}));
      const auto pos = cache.positions(l);
      std::vector<index_t> h;
      for (index_t g = 0; g < Hkv; ++g)
        for (index_t j = 0; j < pos.extent(2); ++j) h.push_back(pos(0, g, j));
      out.held.push_back(std::move(h));
      if (t % 7 == 3) {  // K/V read back (in token order) every few steps, then decoding goes on
        const auto keys = cache.keys(l);
        const auto vals = cache.values(l);
        index_t bad = 0;
        for (index_t g = 0; g < Hkv; ++g)
          for (index_t j = 0; j < pos.extent(2); ++j) {
            const index_t at = pos(0, g, j);
            bad += vals(0, g, j, 0) != static_cast<float>(at);
            for (index_t x = 0; x < d; x += 17)
              bad +=
                  keys(0, g, j, x) != kp[static_cast<std::size_t>((g * (S + steps) + at) * d + x)];
          }
        CHECK(bad == 0);
      }
    }
  }
  return out;
}

}  // namespace dispatch_test

TEST_CASE("KvCache decode: every path keeps the portable path's tokens (randomized)") {
  // Position order. In reference order the paths' rounding (fused multiply-adds, the
  // softmax sum by vectors) may swap near-equal scores in the descending prefix, and
  // the pooling in cache order then differs: that order is compared within a path below.
  IsaGuard guard;
  for (index_t C : {48, 100}) {
    CAPTURE(C);
    cake::force_host_isa(cake::host_isa::portable);
    const DecodeRun want =
        decode_run(cake::token_order::position, C, 600 + static_cast<unsigned>(C), 30);
    REQUIRE(want.held.size() == 60);
    for (cake::host_isa isa : simd_paths()) {
      CAPTURE(cake::host_isa_name(isa));
      cake::force_host_isa(isa);
      CHECK(decode_run(cake::token_order::position, C, 600 + static_cast<unsigned>(C), 30).held ==
            want.held);
    }
  }
}

TEST_CASE("KvCache decode over the slot map equals the generic path, both orders, every path") {
  IsaGuard guard;
  for (cake::host_isa isa : all_paths()) {
    cake::force_host_isa(isa);
    for (cake::token_order order : {cake::token_order::position, cake::token_order::reference})
      for (index_t C : {48, 100}) {
        CAPTURE(cake::host_isa_name(isa));
        CAPTURE(static_cast<int>(order));
        CAPTURE(C);
        const unsigned seed = 650 + static_cast<unsigned>(C);
        const DecodeRun want = decode_run<GenericPath>(order, C, seed, 30);
        REQUIRE(want.held.size() == 60);
        CHECK(decode_run(order, C, seed, 30).held == want.held);  // positions in cache order
      }
  }
}

// A policy that splits every call (parallel_from(0)) over two threads scores each KV
// head on one worker, with the same arithmetic: the same scores, bit for bit, and the
// same kept tokens as one thread. (Without OpenMP both run on one thread.)
TEST_CASE("decode split over two threads equals one thread, bit for bit, on every path") {
  IsaGuard guard;
  const auto two = cake::host.threads(2).parallel_from(0), one = cake::host.threads(1);
  const index_t B = 2, H = 8, Hkv = 4, n = 301, d = 128, c = n - 16;
  const auto q = random_values<float>(static_cast<std::size_t>(B * H * d), 711, 1.0f);
  const auto k = random_values<float>(static_cast<std::size_t>(B * Hkv * n * d), 712, 1.0f);
  std::vector<const float*> rows(static_cast<std::size_t>(B * Hkv * n));
  for (std::size_t i = 0; i < rows.size(); ++i) rows[i] = k.data() + i * d;
  for (cake::host_isa isa : all_paths()) {
    CAPTURE(cake::host_isa_name(isa));
    cake::force_host_isa(isa);
    const auto qv = cake::make_view(q.data(), std::array<index_t, 3>{B, H, d});
    const auto kv = cake::make_view(k.data(), std::array<index_t, 4>{B, Hkv, n, d});
    std::vector<float> want(static_cast<std::size_t>(B * Hkv * c), -1.0f), got(want.size(), -2.0f),
        listed(want.size(), -3.0f);
    const auto out = [&](std::vector<float>& o) {
      return cake::make_view(o.data(), std::array<index_t, 3>{B, Hkv, c});
    };
    cake::decode_scores(one, qv, kv, cake::MeanVarianceIndicator{}, out(want));
    cake::decode_scores(two, qv, kv, cake::MeanVarianceIndicator{}, out(got));
    cake::decode_scores_backend<cake::host_policy>::run_listed(
        two, qv, static_cast<const float* const*>(rows.data()), n, Hkv, n,
        cake::MeanVarianceIndicator{}, out(listed));
    CHECK(got == want);
    CHECK(listed == want);
    for (cake::token_order order : {cake::token_order::position, cake::token_order::reference}) {
      CAPTURE(static_cast<int>(order));
      const DecodeRun a = decode_run(order, 100, 750, 20, one);
      CHECK(decode_run(order, 100, 750, 20, two).held == a.held);
    }
  }
}

TEST_CASE("decode scores over listed key rows equal the dense view's, bit for bit, on every path") {
  IsaGuard guard;
  const index_t B = 2, H = 8, Hkv = 2, n = 301, d = 128, c = n - 16;
  const auto q = random_values<float>(static_cast<std::size_t>(B * H * d), 701, 1.0f);
  const auto k = random_values<float>(static_cast<std::size_t>(B * Hkv * n * d), 702, 1.0f);
  // the same key rows scattered in a pool, in a shuffled order
  std::vector<index_t> perm(static_cast<std::size_t>(B * Hkv * n));
  for (std::size_t i = 0; i < perm.size(); ++i) perm[i] = static_cast<index_t>(i);
  std::shuffle(perm.begin(), perm.end(), std::mt19937(703));
  std::vector<float> pool(k.size());
  std::vector<const float*> rows(perm.size());
  for (std::size_t i = 0; i < perm.size(); ++i) {
    const auto at = static_cast<std::size_t>(perm[i]);
    std::copy_n(k.data() + i * d, d, pool.data() + at * d);
    rows[i] = pool.data() + at * d;
  }
  for (cake::host_isa isa : all_paths()) {
    CAPTURE(cake::host_isa_name(isa));
    cake::force_host_isa(isa);
    std::vector<float> want(static_cast<std::size_t>(B * Hkv * c), -1.0f), got(want.size(), -2.0f);
    const auto qv = cake::make_view(q.data(), std::array<index_t, 3>{B, H, d});
    cake::decode_scores(cake::host, qv,
                        cake::make_view(k.data(), std::array<index_t, 4>{B, Hkv, n, d}),
                        cake::MeanVarianceIndicator{},
                        cake::make_view(want.data(), std::array<index_t, 3>{B, Hkv, c}));
    cake::decode_scores_backend<cake::host_policy>::run_listed(
        cake::host, qv, static_cast<const float* const*>(rows.data()), n, Hkv, n,
        cake::MeanVarianceIndicator{},
        cake::make_view(got.data(), std::array<index_t, 3>{B, Hkv, c}));
    CHECK(got == want);
  }
}

TEST_CASE(
    "decode selection: the radix sort and the select_k route choose as select_k does, ties "
    "included") {
  using Store = cake::detail::layer_store<float, cake::host_policy>;
  std::mt19937 gen(801);
  for (int trial = 0; trial < 40; ++trial) {
    const index_t rows = 3, cand = 1 + static_cast<index_t>(gen() % 300);
    // odd trials: few distinct values (many ties), signed zeros and negatives among them;
    // the sort's paths: trial % 8 == 0, spread values (its counting pass, then the
    // insertion pass); 2, values near 1 and one far below, which crowds them into one
    // bucket (its radix fallback once cand passes a few dozen); 4, values within 16
    // ulps of 1 (buckets one key wide: no insertion); 6, any
    std::vector<float> x(static_cast<std::size_t>(rows * cand));
    const float vals[] = {0.0f, -0.0f, 1.5f, -2.0f, 3.25f, 1e-30f, 7.0f};
    std::uniform_real_distribution<float> any(-1.0f, 1.0f);
    const auto near1 = [&](int bits) {
      return 1.0f + std::ldexp(static_cast<float>(gen() % (1u << bits)), -23);
    };
    for (auto& v : x)
      v = trial % 2        ? vals[gen() % 7]
          : trial % 8 == 0 ? std::ldexp(static_cast<float>(gen() % 1000), -10)
          : trial % 8 == 2 ? near1(18)
          : trial % 8 == 4 ? near1(4)
                           : std::ldexp(any(gen), -static_cast<int>(gen() % 20));
    if (trial % 8 == 2)
      for (index_t r = 0; r < rows; ++r)
        x[static_cast<std::size_t>(r * cand) + gen() % cand] = 1e-30f;
    for (index_t keep : {cand - 1, cand / 2, cand}) {
      if (keep < 0) continue;
      for (cake::select_order order :
           {cake::select_order::position, cake::select_order::descending}) {
        CAPTURE(cand);
        CAPTURE(keep);
        std::vector<index_t> want(static_cast<std::size_t>(rows * std::max<index_t>(keep, 1)), -1),
            got(want.size(), -2);
        if (keep > 0)
          cake::select_k(cake::host,
                         cake::make_view(static_cast<const float*>(x.data()),
                                         std::array<index_t, 2>{rows, cand}),
                         cake::make_view(want.data(), std::array<index_t, 2>{rows, keep}), order);
        // one thread, and the rows split over the threads (each its own scratch); a
        // split call with scratch sized for one worker sorts on one (ASan: in bounds)
        for (const cake::host_policy exec : {cake::host, cake::host.parallel_from(1)})
          for (const cake::host_policy sized : {exec, cake::host}) {
            std::vector<char> scratch(
                static_cast<std::size_t>(Store::decode_bytes(sized, rows, cand + 1)));
            std::fill(got.begin(), got.end(), -2);
            Store::select_decode(exec, x.data(), cand, rows, cand, keep, got.data(), keep, order,
                                 scratch);
            if (keep > 0) CHECK(got == want);
          }
      }
    }
  }
}

TEST_CASE(
    "decode selection: every path's descending sort (the AVX-512 sorting network from 129 "
    "keys) gives select_k's order") {
  using Store = cake::detail::layer_store<float, cake::host_policy>;
  using dispatch_test::all_paths;
  IsaGuard guard;
  std::mt19937 gen(907);
  // the network's edges (129, 8192), its power-of-two padding (255-257, 1025), every
  // padded size from 256 to 8192, past its range (8193: the counting sort), and a decode
  // step's 993
  const index_t sizes[] = {128,  129,  130,  255,  256,  257,  500, 993,
                           1024, 1025, 2047, 3000, 4100, 8192, 8193};
  const float vals[] = {0.0f, -0.0f, 1.5f, -2.0f, 3.25f, 1e-30f, 7.0f, -1e-30f};
  std::lognormal_distribution<float> lognormal(0.0f, 1.0f);
  std::uniform_real_distribution<float> any(-1.0f, 1.0f);
  for (const index_t cand : sizes)
    for (int kind = 0; kind < 4; ++kind) {
      // 0: a step's scores (means of 20 lognormals); 1: few values (ties, signed zeros,
      // negatives); 2: within 16 ulps of 1; 3: any sign over 20 binades
      std::vector<float> x(static_cast<std::size_t>(cand));
      for (auto& v : x) {
        if (kind == 0) {
          float s = 0;
          for (int i = 0; i < 20; ++i) s += lognormal(gen);
          v = s / 20;
        } else if (kind == 1) {
          v = vals[gen() % 8];
        } else if (kind == 2) {
          v = 1.0f + std::ldexp(static_cast<float>(gen() % 16), -23);
        } else {
          v = std::ldexp(any(gen), -static_cast<int>(gen() % 20));
        }
      }
      for (const index_t keep : {cand, cand - 1, cand / 2, index_t{1}}) {
        CAPTURE(cand);
        CAPTURE(kind);
        CAPTURE(keep);
        std::vector<index_t> want(static_cast<std::size_t>(keep));
        cake::select_k(
            cake::host,
            cake::make_view(static_cast<const float*>(x.data()), std::array<index_t, 2>{1, cand}),
            cake::make_view(want.data(), std::array<index_t, 2>{1, keep}),
            cake::select_order::descending);
        for (cake::host_isa isa : all_paths()) {
          CAPTURE(cake::host_isa_name(isa));
          cake::force_host_isa(isa);
          // the scratch exactly as sized, from an odd address (the network aligns it)
          std::vector<std::uint32_t> scratch(static_cast<std::size_t>(Store::sort_words(cand)) + 1);
          std::vector<index_t> got(static_cast<std::size_t>(keep) + 1, -2);
          Store::sort_descending(x.data(), cand, keep, got.data(), scratch.data() + 1);
          CHECK(got.back() == -2);  // nothing written past keep
          got.pop_back();
          CHECK(got == want);
        }
      }
    }
}

TEST_CASE("decode commit: one eviction drops the last of the lowest scores, at every length") {
  using Store = cake::detail::layer_store<float, cake::host_policy>;
  std::mt19937 gen(4242);
  // few distinct values, so that most lowest values are tied; -0 and +0 tie
  const float vals[] = {0.0f, -0.0f, 2.5f, -1.0f, 1e-30f, -3.0f, 7.0f};
  for (index_t n = 1; n <= 70; ++n)
    for (int trial = 0; trial < 20; ++trial) {
      std::vector<float> x(static_cast<std::size_t>(n));
      for (auto& v : x) v = vals[gen() % (trial % 2 ? 3 : 7)];
      index_t want = 0;  // scalar reference: the last index of the minimum, -0 == +0
      for (index_t j = 1; j < n; ++j)
        if (!(x[static_cast<std::size_t>(j)] > x[static_cast<std::size_t>(want)])) want = j;
      CAPTURE(n);
      CHECK(Store::last_argmin(x.data(), n) == want);
    }
}

TEST_CASE("decode commit: one eviction in position order moves what the selection and commit do") {
  using Store = cake::detail::layer_store<float, cake::host_policy>;
  std::mt19937 gen(811);
  for (int trial = 0; trial < 60; ++trial) {
    const index_t rows = 3, w = 1 + static_cast<index_t>(gen() % 8);
    const index_t N = w + 1 + static_cast<index_t>(gen() % 300), cand = N - w, keep = cand - 1,
                  n = N - 1, cap = N + static_cast<index_t>(gen() % 5);
    const bool with_sums = trial % 3 != 0;
    CAPTURE(N);
    CAPTURE(w);
    std::vector<float> x(static_cast<std::size_t>(rows * N)), sums(x.size());
    const float vals[] = {0.0f, -0.0f, 1.5f, -2.0f, 3.25f, 1e-30f, 7.0f};
    for (auto& v : x)
      v = trial % 2 ? vals[gen() % 7] : std::ldexp(static_cast<float>(gen() % 50), -6);
    for (auto& v : sums) v = static_cast<float>(gen() % 1000);
    // each row's map a permutation of its K/V rows; positions and scores distinct
    std::vector<index_t> map(static_cast<std::size_t>(rows * cap)), pos(map.size());
    std::vector<float> ind(map.size());
    for (index_t r = 0; r < rows; ++r) {
      auto* m = map.data() + r * cap;
      for (index_t t = 0; t < cap; ++t) m[t] = t;
      std::shuffle(m, m + cap, gen);
    }
    for (std::size_t i = 0; i < pos.size(); ++i) {
      pos[i] = static_cast<index_t>(1000 + i);
      ind[i] = -static_cast<float>(i);
    }
    auto map_a = map, map_b = map, pos_a = pos, pos_b = pos;
    auto ind_a = ind, ind_b = ind;
    const auto at = [&](std::vector<index_t>& p, std::vector<float>& s) {
      cake::detail::slots<float> sl;
      sl.pos = p.data();
      sl.ind = s.data();
      sl.rows = rows;
      sl.cap = cap;
      sl.d = 1;
      return sl;
    };
    const float* sp = with_sums ? sums.data() : nullptr;
    const float* score = with_sums ? sums.data() : x.data();
    std::vector<char> scratch(static_cast<std::size_t>(Store::decode_bytes(cake::host, rows, N)));
    std::vector<index_t> sel(static_cast<std::size_t>(rows * n));
    Store::select_decode(cake::host, score, N, rows, cand, keep, sel.data(), n,
                         cake::select_order::position, scratch);
    Store::window_slots(cake::host, sel.data(), rows, n, nullptr, keep, w, nullptr, cand);
    Store::commit_mapped(at(pos_a, ind_a), map_a.data(), sel.data(), n, N, sp, scratch);
    Store::evict_one_mapped(at(pos_b, ind_b), map_b.data(), score, N, cand, N, sp);
    CHECK(map_b == map_a);
    CHECK(pos_b == pos_a);
    CHECK(ind_b == ind_a);
    CHECK(map_b != map);  // something moved (the evicted token's entry went last)
  }
}
