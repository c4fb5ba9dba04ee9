// Bad input at the public boundary: the right exception, a message with the id,
// the expected and the actual value, and a cache left exactly as it was.
#include <doctest/doctest.h>

#include <cake/cake.hpp>

#include <cmath>
#include <initializer_list>
#include <limits>
#include <random>
#include <string>
#include <vector>

#include "../support/kv_snapshot.hpp"

using cake::index_t;

namespace err_test {

constexpr index_t B = 2, H = 4, Hkv = 2, d = 8, w = 4, C = 16, L = 3, S = 40;

inline cake::CacheConfig config() {
  cake::CacheConfig c;
  c.layers = L;
  c.batch = B;
  c.q_heads = H;
  c.kv_heads = Hkv;
  c.head_dim = d;
  c.window = w;
  c.cache_size = C;
  return c;
}

inline std::vector<float> randn(std::size_t n, unsigned seed) {
  std::mt19937 gen(seed);
  std::normal_distribution<float> nd(0.0f, 1.0f);
  std::vector<float> v(n);
  for (auto& x : v) x = nd(gen);
  return v;
}

// Tensors with arbitrary shapes, owned.
struct T4 {
  std::array<index_t, 4> shape;
  std::vector<float> data;
  T4(std::array<index_t, 4> s, unsigned seed)
      : shape(s), data(randn(static_cast<std::size_t>(s[0] * s[1] * s[2] * s[3]), seed)) {}
  auto view() { return cake::make_view(data.data(), shape); }
  float& at(index_t a, index_t b, index_t c, index_t e) {
    return data[static_cast<std::size_t>(((a * shape[1] + b) * shape[2] + c) * shape[3] + e)];
  }
};
struct T3 {
  std::array<index_t, 3> shape;
  std::vector<float> data;
  T3(std::array<index_t, 3> s, unsigned seed)
      : shape(s), data(randn(static_cast<std::size_t>(s[0] * s[1] * s[2]), seed)) {}
  auto view() { return cake::make_view(data.data(), shape); }
  float& at(index_t a, index_t b, index_t c) {
    return data[static_cast<std::size_t>((a * shape[1] + b) * shape[2] + c)];
  }
};

using cake_test::Snapshot;
using cake_test::snapshot;

inline void check_message(const cake::error& e, const std::string& id,
                          std::initializer_list<std::string> parts) {
  const std::string msg = e.what();
  INFO("message: ", msg);
  CHECK(e.id() == id);
  CHECK(msg.rfind("[" + id + "]", 0) == 0);
  for (const auto& p : parts) {
    INFO("expected to contain: ", p);
    CHECK(msg.find(p) != std::string::npos);
  }
}

// Runs f, requires an exception of type E with the id and parts in its message.
template <class E, class F>
void expect_throw(F&& f, const std::string& id, std::initializer_list<std::string> parts) {
  bool thrown = false;
  try {
    f();
  } catch (const E& e) {
    thrown = true;
    check_message(e, id, parts);
  }
  INFO("expected an exception with id ", id);
  CHECK(thrown);
}

// A cache with layer 0 prefilled (a non-trivial state to preserve).
struct Fixture {
  cake::KvCache<> cache{config()};
  T4 q{{B, H, w, d}, 1}, k{{B, Hkv, S, d}, 2}, v{{B, Hkv, S, d}, 3};
  Fixture() { cache.prefill(0, q.view(), k.view(), v.view()); }
  void prefill_rest() {
    for (index_t l = 1; l < L; ++l) cache.prefill(l, q.view(), k.view(), v.view());
  }
};

}  // namespace err_test

using namespace err_test;

TEST_CASE("prefill: shape mismatches") {
  Fixture f;
  const Snapshot before = snapshot(f.cache);
  REQUIRE(before.prefilled == 1);
  REQUIRE(before.layer_tokens[0] > 0);

  SUBCASE("keys batch") {
    T4 k{{3, Hkv, S, d}, 4};
    REQUIRE_THROWS_AS(f.cache.prefill(1, f.q.view(), k.view(), f.v.view()), cake::invalid_argument);
    expect_throw<cake::invalid_argument>(
        [&] { f.cache.prefill(1, f.q.view(), k.view(), f.v.view()); }, "cake.prefill.keys",
        {"(2, 2, S, 8)", "(3, 2, 40, 8)"});
    CHECK(f.cache.validate_prefill(1, f.q.view(), k.view(), f.v.view()).id == "cake.prefill.keys");
  }
  SUBCASE("keys kv_heads") {
    T4 k{{B, 4, S, d}, 4};
    REQUIRE_THROWS_AS(f.cache.prefill(1, f.q.view(), k.view(), f.v.view()), cake::invalid_argument);
    expect_throw<cake::invalid_argument>(
        [&] { f.cache.prefill(1, f.q.view(), k.view(), f.v.view()); }, "cake.prefill.keys",
        {"(2, 2, S, 8)", "(2, 4, 40, 8)"});
  }
  SUBCASE("keys head_dim") {
    T4 k{{B, Hkv, S, 6}, 4};
    REQUIRE_THROWS_AS(f.cache.prefill(1, f.q.view(), k.view(), f.v.view()), cake::invalid_argument);
    expect_throw<cake::invalid_argument>(
        [&] { f.cache.prefill(1, f.q.view(), k.view(), f.v.view()); }, "cake.prefill.keys",
        {"(2, 2, S, 8)", "(2, 2, 40, 6)"});
  }
  SUBCASE("q_window heads and head_dim") {
    T4 q{{B, 3, w, d}, 4};
    REQUIRE_THROWS_AS(f.cache.prefill(1, q.view(), f.k.view(), f.v.view()), cake::invalid_argument);
    expect_throw<cake::invalid_argument>(
        [&] { f.cache.prefill(1, q.view(), f.k.view(), f.v.view()); }, "cake.prefill.q_window",
        {"(2, 4, 4, 8)", "(2, 3, 4, 8)"});
    T4 q2{{B, H, w, 16}, 5};
    expect_throw<cake::invalid_argument>(
        [&] { f.cache.prefill(1, q2.view(), f.k.view(), f.v.view()); }, "cake.prefill.q_window",
        {"(2, 4, 4, 8)", "(2, 4, 4, 16)"});
  }
  SUBCASE("values differ from keys") {
    T4 v{{B, Hkv, S - 1, d}, 4};
    REQUIRE_THROWS_AS(f.cache.prefill(1, f.q.view(), f.k.view(), v.view()), cake::invalid_argument);
    expect_throw<cake::invalid_argument>(
        [&] { f.cache.prefill(1, f.q.view(), f.k.view(), v.view()); }, "cake.prefill.values",
        {"(2, 2, 40, 8)", "(2, 2, 39, 8)"});
  }
  SUBCASE("S differs from layer 0") {
    T4 k{{B, Hkv, S + 5, d}, 4}, v{{B, Hkv, S + 5, d}, 5};
    REQUIRE_THROWS_AS(f.cache.prefill(1, f.q.view(), k.view(), v.view()), cake::invalid_argument);
    expect_throw<cake::invalid_argument>(
        [&] { f.cache.prefill(1, f.q.view(), k.view(), v.view()); }, "cake.prefill.keys",
        {"S = 40", "got 45"});
    const auto st = f.cache.validate_prefill(1, f.q.view(), k.view(), v.view());
    CHECK(st.id == "cake.prefill.keys");
    CHECK(!st.is_logic);
    CHECK(st.message.find("got 45") != std::string::npos);
  }
  CHECK(snapshot(f.cache) == before);
  // The cache still works after the rejected calls.
  f.prefill_rest();
  CHECK(f.cache.prefilled());
}

TEST_CASE("config errors") {
  auto expect_config = [](cake::CacheConfig c, const std::string& id,
                          std::initializer_list<std::string> parts) {
    REQUIRE_THROWS_AS(cake::KvCache<>{c}, cake::invalid_argument);
    expect_throw<cake::invalid_argument>([&] { cake::KvCache<> cache(c); }, id, parts);
    CHECK(c.validate().id == id);
  };
  SUBCASE("H not a multiple of Hkv") {
    auto c = config();
    c.q_heads = 6;
    c.kv_heads = 4;
    expect_config(c, "cake.config.kv_heads", {"q_heads = 6", "got 4"});
  }
  SUBCASE("window < 2") {
    auto c = config();
    c.window = 1;
    expect_config(c, "cake.config.window", {">= 2", "got 1"});
  }
  SUBCASE("cache_size <= window") {
    auto c = config();
    c.cache_size = 4;
    expect_config(c, "cake.config.cache_size", {"window = 4", "got 4"});
    c.cache_size = 2;
    expect_config(c, "cake.config.cache_size", {"window = 4", "got 2"});
  }
  SUBCASE("layers, batch, head_dim") {
    auto c = config();
    c.layers = 0;
    expect_config(c, "cake.config.layers", {"got 0"});
    c = config();
    c.batch = -1;
    expect_config(c, "cake.config.batch", {"got -1"});
    c = config();
    c.head_dim = 0;
    expect_config(c, "cake.config.head_dim", {"got 0"});
  }
  SUBCASE("paged_slots outside slot_order") {
    auto c = config();
    c.paged_slots = static_cast<cake::slot_order>(7);
    expect_config(c, "cake.config.paged_slots", {"slot_order::token or ::any", "got 7"});
  }
  SUBCASE("token_slots: only a paged layer in slot_order::any has them") {
    cake::KvCache<> dense(config());
    expect_throw<cake::logic_error>([&] { (void)dense.token_slots(0); }, "cake.paged.layer",
                                    {"layer 0 is not paged"});
  }
  SUBCASE("tau <= 0 and bad indicator in the cache's policies") {
    REQUIRE_THROWS_AS(cake::KvCache<>(config(), cake::CakePreference{0.0f, 1.0f}),
                      cake::invalid_argument);
    expect_throw<cake::invalid_argument>(
        [] {
          cake::KvCache<> c(config(), cake::CakePreference{-2.0f, 1.0f});
        },
        "cake.preference.tau1", {"> 0", "got -2"});
    expect_throw<cake::invalid_argument>(
        [] {
          cake::KvCache<> c(config(), cake::CakePreference{1.0f, 0.0f});
        },
        "cake.preference.tau2", {"> 0", "got 0"});
    expect_throw<cake::invalid_argument>(
        [] {
          cake::KvCache<> c(config(), {}, {}, cake::MeanVarianceIndicator{200.0f, 4});
        },
        "cake.indicator.pool_kernel", {"odd", "got 4"});
    CHECK(cake::CacheConfig{}.validate().id == "cake.config.layers");
    CHECK(config().validate().ok());
  }
}

TEST_CASE("prefill: window > S") {
  cake::KvCache<> c(config());
  const Snapshot before = snapshot(c);
  T4 q{{B, H, w, d}, 1}, k{{B, Hkv, 3, d}, 2}, v{{B, Hkv, 3, d}, 3};
  REQUIRE_THROWS_AS(c.prefill(0, q.view(), k.view(), v.view()), cake::invalid_argument);
  expect_throw<cake::invalid_argument>([&] { c.prefill(0, q.view(), k.view(), v.view()); },
                                       "cake.prefill.keys", {"window = 4", "S = 3"});
  CHECK(c.validate_prefill(0, q.view(), k.view(), v.view()).id == "cake.prefill.keys");
  CHECK(snapshot(c) == before);
}

TEST_CASE("prefill: NaN and Inf in q, k, v name the id and the coordinates") {
  Fixture f;
  const Snapshot before = snapshot(f.cache);
  const float nan = std::numeric_limits<float>::quiet_NaN();
  const float inf = std::numeric_limits<float>::infinity();
  SUBCASE("NaN in q_window") {
    T4 q = f.q;
    q.at(1, 2, 3, 4) = nan;
    REQUIRE_THROWS_AS(f.cache.prefill(1, q.view(), f.k.view(), f.v.view()), cake::invalid_argument);
    expect_throw<cake::invalid_argument>(
        [&] { f.cache.prefill(1, q.view(), f.k.view(), f.v.view()); }, "cake.prefill.q_window",
        {"nan", "(1, 2, 3, 4)"});
  }
  SUBCASE("Inf in keys") {
    T4 k = f.k;
    k.at(0, 1, 17, 5) = inf;
    REQUIRE_THROWS_AS(f.cache.prefill(1, f.q.view(), k.view(), f.v.view()), cake::invalid_argument);
    expect_throw<cake::invalid_argument>(
        [&] { f.cache.prefill(1, f.q.view(), k.view(), f.v.view()); }, "cake.prefill.keys",
        {"inf", "(0, 1, 17, 5)"});
  }
  SUBCASE("-Inf and NaN in values: the first one is reported") {
    T4 v = f.v;
    v.at(1, 0, 39, 7) = nan;
    v.at(1, 0, 2, 0) = -inf;
    REQUIRE_THROWS_AS(f.cache.prefill(1, f.q.view(), f.k.view(), v.view()), cake::invalid_argument);
    expect_throw<cake::invalid_argument>(
        [&] { f.cache.prefill(1, f.q.view(), f.k.view(), v.view()); }, "cake.prefill.values",
        {"-inf", "(1, 0, 2, 0)"});
    const auto st = f.cache.validate_prefill(1, f.q.view(), f.k.view(), v.view());
    CHECK(st.id == "cake.prefill.values");
  }
  CHECK(snapshot(f.cache) == before);
}

TEST_CASE("state errors are cake::logic_error") {
  SUBCASE("layers out of order") {
    Fixture f;
    const Snapshot before = snapshot(f.cache);
    REQUIRE_THROWS_AS(f.cache.prefill(2, f.q.view(), f.k.view(), f.v.view()), cake::logic_error);
    expect_throw<cake::logic_error>([&] { f.cache.prefill(2, f.q.view(), f.k.view(), f.v.view()); },
                                    "cake.prefill.layer", {"expected layer 1", "got 2"});
    expect_throw<cake::logic_error>([&] { f.cache.prefill(0, f.q.view(), f.k.view(), f.v.view()); },
                                    "cake.prefill.layer", {"expected layer 1", "got 0"});
    const auto st = f.cache.validate_prefill(2, f.q.view(), f.k.view(), f.v.view());
    CHECK(st.id == "cake.prefill.layer");
    CHECK(st.is_logic);
    CHECK(snapshot(f.cache) == before);
    f.prefill_rest();
    expect_throw<cake::logic_error>([&] { f.cache.prefill(0, f.q.view(), f.k.view(), f.v.view()); },
                                    "cake.prefill.layer", {"all 3 layers"});
  }
  SUBCASE("decode before prefill") {
    Fixture f;  // 1 of 3 layers prefilled
    const Snapshot before = snapshot(f.cache);
    T3 q{{B, H, d}, 7}, k{{B, Hkv, d}, 8}, v{{B, Hkv, d}, 9};
    REQUIRE_THROWS_AS(f.cache.decode(0, q.view(), k.view(), v.view()), cake::logic_error);
    expect_throw<cake::logic_error>([&] { f.cache.decode(0, q.view(), k.view(), v.view()); },
                                    "cake.decode.state", {"1 of 3"});
    const auto st = f.cache.validate_decode(0, q.view(), k.view(), v.view());
    CHECK(st.id == "cake.decode.state");
    CHECK(st.is_logic);
    CHECK(snapshot(f.cache) == before);
    cake::KvCache<> fresh(config());
    CHECK_THROWS_AS(fresh.decode(0, q.view(), k.view(), v.view()), cake::logic_error);
  }
}

TEST_CASE("prefill: wrong layout (non-unit head_dim stride)") {
  Fixture f;
  const Snapshot before = snapshot(f.cache);
  // Keys interleaved with junk: head_dim stride 2.
  std::vector<float> wide(static_cast<std::size_t>(B * Hkv * S * d * 2), 0.5f);
  auto k = cake::make_view(wide.data(), std::array<index_t, 4>{B, Hkv, S, d},
                           std::array<index_t, 4>{Hkv * S * d * 2, S * d * 2, d * 2, 2});
  REQUIRE_THROWS_AS(f.cache.prefill(1, f.q.view(), k, f.v.view()), cake::invalid_argument);
  expect_throw<cake::invalid_argument>([&] { f.cache.prefill(1, f.q.view(), k, f.v.view()); },
                                       "cake.prefill.keys", {"unit stride", "got 2"});
  auto q = cake::make_view(wide.data(), std::array<index_t, 4>{B, H, w, d},
                           std::array<index_t, 4>{H * w * d * 3, w * d * 3, d * 3, 3});
  expect_throw<cake::invalid_argument>([&] { f.cache.prefill(1, q, f.k.view(), f.v.view()); },
                                       "cake.prefill.q_window", {"unit stride", "got 3"});
  CHECK(f.cache.validate_prefill(1, f.q.view(), k, f.v.view()).id == "cake.prefill.keys");
  CHECK(snapshot(f.cache) == before);
}

TEST_CASE("decode errors leave the cache unchanged") {
  Fixture f;
  f.prefill_rest();
  T3 q{{B, H, d}, 7}, k{{B, Hkv, d}, 8}, v{{B, Hkv, d}, 9};
  f.cache.decode(0, q.view(), k.view(), v.view());  // a valid step first
  const Snapshot before = snapshot(f.cache);
  SUBCASE("q shape") {
    T3 bad{{B, H + 1, d}, 10};
    REQUIRE_THROWS_AS(f.cache.decode(1, bad.view(), k.view(), v.view()), cake::invalid_argument);
    expect_throw<cake::invalid_argument>([&] { f.cache.decode(1, bad.view(), k.view(), v.view()); },
                                         "cake.decode.q", {"(2, 4, 8)", "(2, 5, 8)"});
  }
  SUBCASE("k head_dim, v batch") {
    T3 bk{{B, Hkv, d + 1}, 10}, bv{{B + 1, Hkv, d}, 11};
    expect_throw<cake::invalid_argument>([&] { f.cache.decode(1, q.view(), bk.view(), v.view()); },
                                         "cake.decode.k", {"(2, 2, 8)", "(2, 2, 9)"});
    expect_throw<cake::invalid_argument>([&] { f.cache.decode(1, q.view(), k.view(), bv.view()); },
                                         "cake.decode.v", {"(2, 2, 8)", "(3, 2, 8)"});
    CHECK(f.cache.validate_decode(1, q.view(), k.view(), bv.view()).id == "cake.decode.v");
  }
  SUBCASE("layer out of range") {
    expect_throw<cake::invalid_argument>([&] { f.cache.decode(3, q.view(), k.view(), v.view()); },
                                         "cake.decode.layer", {"[0, 3)", "got 3"});
    expect_throw<cake::invalid_argument>([&] { f.cache.decode(-1, q.view(), k.view(), v.view()); },
                                         "cake.decode.layer", {"got -1"});
  }
  SUBCASE("NaN in k, Inf in q") {
    T3 bk = k;
    bk.at(1, 1, 6) = std::numeric_limits<float>::quiet_NaN();
    REQUIRE_THROWS_AS(f.cache.decode(0, q.view(), bk.view(), v.view()), cake::invalid_argument);
    expect_throw<cake::invalid_argument>([&] { f.cache.decode(0, q.view(), bk.view(), v.view()); },
                                         "cake.decode.k", {"nan", "(1, 1, 6)"});
    T3 bq = q;
    bq.at(0, 3, 2) = std::numeric_limits<float>::infinity();
    expect_throw<cake::invalid_argument>([&] { f.cache.decode(0, bq.view(), k.view(), v.view()); },
                                         "cake.decode.q", {"inf", "(0, 3, 2)"});
    const auto st = f.cache.validate_decode(0, bq.view(), k.view(), v.view());
    CHECK(st.id == "cake.decode.q");
    CHECK(!st.ok());
  }
  SUBCASE("layout") {
    std::vector<float> wide(static_cast<std::size_t>(B * Hkv * d * 2), 0.25f);
    auto bk = cake::make_view(wide.data(), std::array<index_t, 3>{B, Hkv, d},
                              std::array<index_t, 3>{Hkv * d * 2, d * 2, 2});
    expect_throw<cake::invalid_argument>([&] { f.cache.decode(0, q.view(), bk, v.view()); },
                                         "cake.decode.layout", {"unit stride"});
  }
  CHECK(snapshot(f.cache) == before);
  CHECK(f.cache.validate_decode(0, q.view(), k.view(), v.view()).ok());
}

TEST_CASE("queries with a bad layer index") {
  cake::KvCache<> c(config());
  expect_throw<cake::invalid_argument>([&] { (void)c.tokens_held(3); }, "cake.layer",
                                       {"[0, 3)", "got 3"});
  expect_throw<cake::invalid_argument>([&] { (void)c.positions(-1); }, "cake.layer", {"got -1"});
}

TEST_CASE("functional core errors") {
  std::vector<float> q(static_cast<std::size_t>(1 * 4 * 4 * 8)),
      k(static_cast<std::size_t>(1 * 3 * 20 * 8)), ind(static_cast<std::size_t>(3 * 16), 7.0f);
  std::array<float, 2> st{};
  SUBCASE("window_stats: heads not a multiple of kv_heads") {
    expect_throw<cake::invalid_argument>(
        [&] {
          cake::window_stats(cake::host,
                             cake::make_view(q.data(), std::array<index_t, 4>{1, 4, 4, 8}),
                             cake::make_view(k.data(), std::array<index_t, 4>{1, 3, 20, 8}),
                             cake::MeanVarianceIndicator{},
                             cake::make_view(ind.data(), std::array<index_t, 3>{1, 3, 16}),
                             cake::make_view(st.data(), std::array<index_t, 1>{2}));
        },
        "cake.keys.kv_heads", {"q_heads = 4", "kv_heads = 3"});
  }
  SUBCASE("window_stats: indicator_out shape") {
    expect_throw<cake::invalid_argument>(
        [&] {
          cake::window_stats(cake::host,
                             cake::make_view(q.data(), std::array<index_t, 4>{1, 4, 4, 8}),
                             cake::make_view(k.data(), std::array<index_t, 4>{1, 2, 20, 8}),
                             cake::MeanVarianceIndicator{},
                             cake::make_view(ind.data(), std::array<index_t, 3>{1, 2, 15}),
                             cake::make_view(st.data(), std::array<index_t, 1>{2}));
        },
        "cake.indicator_out.shape", {"(1, 2, 16)", "(1, 2, 15)"});
    for (float x : ind) CHECK(x == 7.0f);
  }
  SUBCASE("window_stats: bad indicator policy") {
    expect_throw<cake::invalid_argument>(
        [&] {
          cake::window_stats(cake::host,
                             cake::make_view(q.data(), std::array<index_t, 4>{1, 4, 4, 8}),
                             cake::make_view(k.data(), std::array<index_t, 4>{1, 2, 20, 8}),
                             cake::MeanVarianceIndicator{-1.0f, 5},
                             cake::make_view(ind.data(), std::array<index_t, 3>{1, 2, 16}),
                             cake::make_view(st.data(), std::array<index_t, 1>{2}));
        },
        "cake.indicator.gamma", {"got -1"});
  }
}

TEST_CASE("prefill: a budget policy's output out of range is an error, the cache unchanged") {
  T4 q{{B, H, w, d}, 1}, k{{B, Hkv, S, d}, 2}, v{{B, Hkv, S, d}, 3};
  const index_t P = S - w;
  // A stand-in for a buggy user policy: fair shares, except that from layer 1 on
  // the newest layer gets `newest`.
  struct LaterRogue {
    index_t newest = 0;
    void operator()(std::span<const float> prefs, index_t layers, index_t total, index_t,
                    std::span<index_t> out) const {
      for (std::size_t l = 0; l < prefs.size(); ++l) out[l] = total / layers;
      if (prefs.size() > 1) out[prefs.size() - 1] = newest;
    }
    cake::status validate() const { return cake::status::success(); }
  };
  const auto check = [&](index_t newest, std::initializer_list<std::string> parts) {
    cake::KvCache<cake::CakePreference, LaterRogue> c(config(), {}, LaterRogue{newest});
    c.prefill(0, q.view(), k.view(), v.view());
    const Snapshot before = snapshot(c);
    expect_throw<cake::invalid_argument>([&] { c.prefill(1, q.view(), k.view(), v.view()); },
                                         "cake.budget.output", parts);
    CHECK(snapshot(c) == before);
  };
  SUBCASE("negative") { check(-5, {"budget policy", "[0, ceiling = 36]", "got -5 for layer 1"}); }
  SUBCASE("over the ceiling S - w") { check(P + 3, {"got 39 for layer 1"}); }
  SUBCASE("sum over the total") {
    // Layer 0 gets T / L = 12, layer 1 the ceiling 36: 48 > T = 36.
    check(P, {"total budget T = 36", "got 48"});
  }
}

TEST_CASE("stats() and preference() of a layer not prefilled yet are cake errors") {
  Fixture f;  // layer 0 of 3 prefilled
  CHECK(f.cache.stats(0).entropy > 0);
  CHECK(f.cache.preference(0) > 0);
  expect_throw<cake::logic_error>([&] { (void)f.cache.stats(1); }, "cake.layer",
                                  {"layer 1 is not prefilled", "1 of 3"});
  expect_throw<cake::logic_error>([&] { (void)f.cache.preference(2); }, "cake.layer",
                                  {"layer 2 is not prefilled"});
  expect_throw<cake::invalid_argument>([&] { (void)f.cache.stats(3); }, "cake.layer",
                                       {"[0, 3)", "got 3"});
  expect_throw<cake::invalid_argument>([&] { (void)f.cache.budget(-1); }, "cake.layer", {"got -1"});
  expect_throw<cake::invalid_argument>([&] { (void)f.cache.keys(3); }, "cake.layer", {"got 3"});
  // Layers not prefilled yet hold nothing (documented, not an error).
  CHECK(f.cache.tokens_held(1) == 0);
  CHECK(f.cache.budget(2) == 0);
  CHECK(f.cache.keys(2).extent(2) == 0);
}

TEST_CASE("finite queries and keys whose attention scores would overflow float are rejected") {
  // d = 8: the bound is sqrt(FLT_MAX / (1024 d)) = 2.0e17 (detail::score_bound).
  const float bound = cake::detail::score_bound(d);
  CHECK(bound == doctest::Approx(std::sqrt(3.4028234663852886e38 / 8192.0)).epsilon(1e-6));
  const float above = std::nextafter(bound, std::numeric_limits<float>::infinity());
  SUBCASE("prefill: q = 3e38 and one huge key; each named, the cache unchanged") {
    Fixture f;
    const Snapshot before = snapshot(f.cache);
    T4 q = f.q, k = f.k;
    for (auto& x : q.data) x = 3e38f;
    k.at(0, 0, 3, 0) = 3e38f;
    expect_throw<cake::invalid_argument>(
        [&] { f.cache.prefill(1, q.view(), k.view(), f.v.view()); }, "cake.prefill.q_window",
        {"finite with |x| <= ", "attention scores fit in float", "found 3.0",
         "e+38 at (0, 0, 0, 0)"});
    expect_throw<cake::invalid_argument>(
        [&] { f.cache.prefill(1, f.q.view(), k.view(), f.v.view()); }, "cake.prefill.keys",
        {"attention scores fit in float", "found 3.0", "e+38 at (0, 0, 3, 0)"});
    k = f.k;
    k.at(1, 1, 9, 7) = -above;  // just past the bound, negative
    expect_throw<cake::invalid_argument>(
        [&] { f.cache.prefill(1, f.q.view(), k.view(), f.v.view()); }, "cake.prefill.keys",
        {"(1, 1, 9, 7)"});
    CHECK(snapshot(f.cache) == before);
  }
  SUBCASE("values only need to be finite: they never enter a score") {
    Fixture f;
    T4 v = f.v;
    v.at(0, 0, 3, 0) = 3e38f;
    f.cache.prefill(1, f.q.view(), f.k.view(), v.view());
    CHECK(f.cache.layers_prefilled() == 2);
  }
  SUBCASE("queries and keys at the bound pass, with finite statistics") {
    cake::KvCache<> c{config()};
    T4 q{{B, H, w, d}, 1}, k{{B, Hkv, S, d}, 2}, v{{B, Hkv, S, d}, 3};
    // The largest scores possible: every element at +-bound, aligned.
    for (std::size_t i = 0; i < q.data.size(); ++i) q.data[i] = bound;
    for (std::size_t i = 0; i < k.data.size(); ++i) k.data[i] = (i / d) % 3 ? bound : -bound;
    for (index_t l = 0; l < L; ++l) c.prefill(l, q.view(), k.view(), v.view());
    for (index_t l = 0; l < L; ++l) {
      CHECK(std::isfinite(c.stats(l).entropy));
      CHECK(std::isfinite(c.stats(l).variance));
      CHECK(std::isfinite(c.preference(l)));
    }
    T3 dq{{B, H, d}, 7}, dk{{B, Hkv, d}, 8}, dv{{B, Hkv, d}, 9};
    for (auto& x : dq.data) x = bound;
    for (auto& x : dk.data) x = bound;
    for (int t = 0; t < 3; ++t)
      for (index_t l = 0; l < L; ++l) c.decode(l, dq.view(), dk.view(), dv.view());
    CHECK(c.tokens_held(0) == c.budget(0) + w);
    const Snapshot before = snapshot(c);
    dk.at(1, 0, 2) = above;
    expect_throw<cake::invalid_argument>([&] { c.decode(0, dq.view(), dk.view(), dv.view()); },
                                         "cake.decode.k", {"attention scores fit", "(1, 0, 2)"});
    CHECK(snapshot(c) == before);
  }
}
