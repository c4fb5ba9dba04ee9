// KvCache properties on synthetic workloads: budgets, cascading vs one-shot,
// bounded memory, the window, one-in-one-out decoding, position order, reset.
#include "kv_workload.hpp"

#include <algorithm>
#include <cmath>
#include <functional>
#include <random>
#include <set>
#include <vector>

using cake::index_t;

using namespace kv_test;

TEST_CASE("KvCache: budgets sum to T and each <= S - w after prefill (cascade and one-shot)") {
  for (bool cascade : {true, false})
    for (unsigned seed : {1u, 2u, 3u, 4u}) {
      CAPTURE(cascade);
      CAPTURE(seed);
      const auto cfg = small_config(cascade);
      const auto wl = make_workload(cfg, 64, seed);
      cake::KvCache<> c(cfg);
      CHECK(c.total_budget() == 48);
      prefill_all(c, wl);
      CHECK(c.prefilled());
      CHECK(c.prompt_length() == 64);
      CHECK(sum(c.budgets()) == c.total_budget());
      for (index_t l = 0; l < cfg.layers; ++l) {
        CHECK(c.budget(l) >= 0);
        CHECK(c.budget(l) <= 64 - cfg.window);
        CHECK(c.tokens_held(l) == c.budget(l) + cfg.window);
        CHECK(c.preference(l) > 0.0);
      }
      // Not all equal: the layers really differ in preference.
      CHECK(*std::max_element(c.budgets().begin(), c.budgets().end()) >
            *std::min_element(c.budgets().begin(), c.budgets().end()));
      check_layer_contents(c, wl, 63);
      if (cascade) {
        REQUIRE(c.stage_budgets().size() == static_cast<std::size_t>(cfg.layers));
        for (std::size_t m = 0; m < c.stage_budgets().size(); ++m) {
          CHECK(c.stage_budgets()[m].size() == m + 1);
          for (auto b : c.stage_budgets()[m]) CHECK(b <= 64 - cfg.window);
        }
        CHECK(std::equal(c.budgets().begin(), c.budgets().end(), c.stage_budgets().back().begin()));
      } else {
        CHECK(c.stage_budgets().empty());
      }
    }
}

TEST_CASE("KvCache: cascading equals one-shot when no stage budget grows") {
  SUBCASE("UniformPreference + ProportionalBudget: budgets T, T/2, T/3, T/4 only shrink") {
    for (unsigned seed : {10u, 11u, 12u}) {
      CAPTURE(seed);
      const auto wl = make_workload(small_config(true), 64, seed);
      cake::KvCache<cake::UniformPreference> cas(small_config(true)), one(small_config(false));
      prefill_all(cas, wl);
      prefill_all(one, wl);
      // The precondition holds (asserted, so the test cannot pass vacuously).
      REQUIRE(stage_budgets_non_increasing(cas));
      REQUIRE(cas.stage_budgets().front() == std::vector<index_t>{48});
      REQUIRE(cas.stage_budgets().back() == std::vector<index_t>{12, 12, 12, 12});
      CHECK(std::equal(cas.budgets().begin(), cas.budgets().end(), one.budgets().begin()));
      CHECK(same_kept(cas, one, wl.cfg));
      // Position order: also identical in storage, values included.
      for (index_t l = 0; l < wl.cfg.layers; ++l)
        for (index_t b = 0; b < wl.cfg.batch; ++b)
          for (index_t g = 0; g < wl.cfg.kv_heads; ++g)
            for (index_t t = 0; t < cas.tokens_held(l); ++t) {
              REQUIRE(cas.positions(l)(b, g, t) == one.positions(l)(b, g, t));
              for (index_t x = 0; x < wl.cfg.head_dim; ++x) {
                REQUIRE(cas.values(l)(b, g, t, x) == one.values(l)(b, g, t, x));
                REQUIRE(cas.keys(l)(b, g, t, x) == one.keys(l)(b, g, t, x));
              }
            }
    }
  }
  SUBCASE("CakePreference: equal whenever the precondition holds") {
    int held = 0;
    for (unsigned seed = 20; seed < 32; ++seed) {
      CAPTURE(seed);
      const auto wl = make_workload(small_config(true), 64, seed);
      cake::KvCache<> cas(small_config(true)), one(small_config(false));
      prefill_all(cas, wl);
      prefill_all(one, wl);
      CHECK(std::equal(cas.budgets().begin(), cas.budgets().end(), one.budgets().begin()));
      if (stage_budgets_non_increasing(cas)) {
        ++held;
        CHECK(same_kept(cas, one, wl.cfg));
      }
    }
    CHECK(held > 0);
  }
}

TEST_CASE(
    "KvCache: cascading keeps memory within T + L*w (plus one layer in flight) at every stage") {
  // Spec section 5: with cascading, memory never exceeds T + L*w tokens plus one
  // layer's uncut cache. peak_tokens_held() counts the layer being cut while the
  // older layers still exist (at most S tokens); what is held after each stage is
  // within T + (m+1)*w.
  for (unsigned seed : {30u, 31u, 32u}) {
    CAPTURE(seed);
    auto cfg = small_config(true);
    cfg.layers = 6;
    const index_t S = 80;
    const auto wl = make_workload(cfg, S, seed);
    cake::KvCache<> c(cfg);
    const index_t bound = c.total_budget() + cfg.layers * cfg.window;
    prefill_all(c, wl, [&](index_t m) {
      CAPTURE(m);
      CHECK(c.tokens_held() <= c.total_budget() + (m + 1) * cfg.window);
      CHECK(c.tokens_held() <= bound);
      CHECK(c.peak_tokens_held() <= bound + S);
      CHECK(c.peak_tokens_held() >= c.tokens_held());
      for (index_t l = 0; l <= m; ++l)
        CHECK(c.tokens_held(l) <=
              c.stage_budgets().back()[static_cast<std::size_t>(l)] + cfg.window);
    });
    // One-shot holds every layer uncut until the last one: its peak is far larger.
    cfg.cascade = false;
    cake::KvCache<> one(cfg);
    prefill_all(one, wl, [&](index_t m) {
      if (m + 1 < cfg.layers) CHECK(one.tokens_held() == (m + 1) * S);
    });
    CHECK(one.peak_tokens_held() >= (cfg.layers - 1) * S);
    CHECK(one.peak_tokens_held() > bound + S);
    CHECK(one.tokens_held() <= bound);
  }
}

TEST_CASE("KvCache: decoding is one-in-one-out, keeps the window and position order") {
  for (bool cascade : {true, false}) {
    CAPTURE(cascade);
    const auto cfg = small_config(cascade);
    const int steps = 12;
    const auto wl = make_workload(cfg, 64, 40 + cascade, steps);
    cake::KvCache<> c(cfg);
    prefill_all(c, wl);
    check_layer_contents(c, wl, 63);
    for (int t = 0; t < steps; ++t) {
      CAPTURE(t);
      std::vector<index_t> held_before;
      std::vector<std::vector<std::set<index_t>>> before(static_cast<std::size_t>(cfg.layers));
      for (index_t l = 0; l < cfg.layers; ++l) {
        held_before.push_back(c.tokens_held(l));
        for (index_t b = 0; b < cfg.batch; ++b)
          for (index_t g = 0; g < cfg.kv_heads; ++g) {
            auto p = row_positions(c, l, b, g);
            before[static_cast<std::size_t>(l)].emplace_back(p.begin(), p.end());
          }
      }
      decode_step(c, wl, static_cast<std::size_t>(t));
      const index_t newpos = 64 + t;
      for (index_t l = 0; l < cfg.layers; ++l) {
        CAPTURE(l);
        CHECK(c.tokens_held(l) == held_before[static_cast<std::size_t>(l)]);
        CHECK(c.tokens_held(l) == c.budget(l) + cfg.window);
        std::size_t r = 0;
        for (index_t b = 0; b < cfg.batch; ++b)
          for (index_t g = 0; g < cfg.kv_heads; ++g, ++r) {
            auto p = row_positions(c, l, b, g);
            std::set<index_t> now(p.begin(), p.end());
            REQUIRE(now.count(newpos) == 1);
            const auto& old = before[static_cast<std::size_t>(l)][r];
            index_t left = 0;
            for (auto x : old) left += now.count(x) == 0;
            CHECK(left == 1);
            for (auto x : now) CHECK((old.count(x) == 1 || x == newpos));
          }
      }
      check_layer_contents(c, wl, newpos);
      CHECK(c.peak_tokens_held() >= c.tokens_held());
    }
  }
}

TEST_CASE("KvCache: token_order::reference keeps the same sets, values follow positions") {
  auto cfg = small_config(true);
  const auto wl = make_workload(cfg, 64, 50, 4);
  cake::KvCache<> pos(cfg);
  cfg.order = cake::token_order::reference;
  cake::KvCache<> ref(cfg);
  prefill_all(pos, wl);
  prefill_all(ref, wl);
  CHECK(same_kept(pos, ref, cfg));
  check_layer_contents(ref, wl, 63, /*sorted=*/false);
  // The window is stored last, in position order.
  for (index_t l = 0; l < cfg.layers; ++l) {
    auto p = row_positions(ref, l, 1, 1);
    for (index_t t = 0; t < cfg.window; ++t)
      CHECK(p[p.size() - static_cast<std::size_t>(cfg.window - t)] == 64 - cfg.window + t);
  }
  for (std::size_t t = 0; t < 4; ++t) {
    decode_step(ref, wl, t);
    check_layer_contents(ref, wl, 64 + static_cast<index_t>(t), /*sorted=*/false);
  }
}

TEST_CASE("KvCache: an uncut prompt (S <= C + w) keeps everything with budgets C - w") {
  for (bool cascade : {true, false}) {
    CAPTURE(cascade);
    const auto cfg = small_config(cascade);  // C = 16, w = 4: S <= 20 is uncut
    const auto wl = make_workload(cfg, 20, 60, 3);
    cake::KvCache<> c(cfg);
    prefill_all(c, wl);
    for (index_t l = 0; l < cfg.layers; ++l) {
      CHECK(c.budget(l) == cfg.cache_size - cfg.window);
      CHECK(c.tokens_held(l) == 20);
      for (index_t b = 0; b < cfg.batch; ++b)
        for (index_t g = 0; g < cfg.kv_heads; ++g) {
          auto p = row_positions(c, l, b, g);
          for (index_t t = 0; t < 20; ++t) CHECK(p[static_cast<std::size_t>(t)] == t);
        }
    }
    check_layer_contents(c, wl, 19);
    // Decoding trims to C: 21 > 12 + 4, so the first step keeps budget + w = 16.
    decode_step(c, wl, 0);
    for (index_t l = 0; l < cfg.layers; ++l) CHECK(c.tokens_held(l) == cfg.cache_size);
    check_layer_contents(c, wl, 20);
    decode_step(c, wl, 1);
    for (index_t l = 0; l < cfg.layers; ++l) CHECK(c.tokens_held(l) == cfg.cache_size);
    check_layer_contents(c, wl, 21);
  }
  SUBCASE("a prompt shorter than C grows until it reaches C") {
    const auto cfg = small_config(true);
    const auto wl = make_workload(cfg, 14, 61, 4);
    cake::KvCache<> c(cfg);
    prefill_all(c, wl);
    for (std::size_t t = 0; t < 4; ++t) {
      decode_step(c, wl, t);
      for (index_t l = 0; l < cfg.layers; ++l)
        CHECK(c.tokens_held(l) ==
              std::min<index_t>(14 + static_cast<index_t>(t) + 1, cfg.cache_size));
      check_layer_contents(c, wl, 14 + static_cast<index_t>(t));
    }
  }
}

TEST_CASE("KvCache: bytes_held") {
  const auto cfg = small_config(true);
  const auto wl = make_workload(cfg, 64, 70, 1);
  cake::KvCache<> c(cfg);
  CHECK(c.bytes_held() == 0);
  prefill_all(c, wl);
  decode_step(c, wl, 0);
  std::size_t total = 0;
  for (index_t l = 0; l < cfg.layers; ++l) {
    const auto want =
        static_cast<std::size_t>(2 * cfg.batch * cfg.kv_heads * c.tokens_held(l) * cfg.head_dim) *
        sizeof(float);
    CHECK(c.bytes_held(l) == want);
    total += want;
  }
  CHECK(c.bytes_held() == total);
  CHECK(total == static_cast<std::size_t>(2 * 2 * 2 * (48 + 4 * 4) * 8) * sizeof(float));
  // A double cache (fed double tensors: prefill compacts the caller's tensors directly).
  cake::KvCache<cake::CakePreference, cake::ProportionalBudget, cake::MeanVarianceIndicator, double>
      cd(cfg);
  for (index_t l = 0; l < cfg.layers; ++l) {
    const auto& fq = wl.q[static_cast<std::size_t>(l)];
    const auto& fk = wl.k[static_cast<std::size_t>(l)];
    const auto& fv = wl.v[static_cast<std::size_t>(l)];
    std::vector<double> q(fq.begin(), fq.end()), k(fk.begin(), fk.end()), v(fv.begin(), fv.end());
    cd.prefill(l, cake::make_view(q.data(), std::array<index_t, 4>{2, 4, 4, 8}),
               cake::make_view(k.data(), std::array<index_t, 4>{2, 2, 64, 8}),
               cake::make_view(v.data(), std::array<index_t, 4>{2, 2, 64, 8}));
  }
  CHECK(sum(cd.budgets()) == cd.total_budget());
  for (index_t l = 0; l < cfg.layers; ++l)
    CHECK(cd.bytes_held(l) ==
          static_cast<std::size_t>(2 * 2 * 2 * cd.tokens_held(l) * 8) * sizeof(double));
}

TEST_CASE("KvCache: reset() returns to the initial state") {
  const auto cfg = small_config(true);
  const auto wl = make_workload(cfg, 64, 80, 2);
  cake::KvCache<> c(cfg);
  prefill_all(c, wl);
  std::vector<std::vector<index_t>> first;
  for (index_t l = 0; l < cfg.layers; ++l) first.push_back(row_positions(c, l, 1, 0));
  const std::vector<index_t> budgets(c.budgets().begin(), c.budgets().end());
  decode_step(c, wl, 0);
  c.reset();
  CHECK(c.layers_prefilled() == 0);
  CHECK(!c.prefilled());
  CHECK(c.prompt_length() == -1);
  CHECK(c.tokens_held() == 0);
  CHECK(c.peak_tokens_held() == 0);
  CHECK(c.bytes_held() == 0);
  CHECK(c.stage_budgets().empty());
  for (index_t l = 0; l < cfg.layers; ++l) {
    CHECK(c.tokens_held(l) == 0);
    CHECK(c.budget(l) == 0);
  }
  CHECK_THROWS_AS(c.decode(0, wl.dqv(0, 0), wl.dkv(0, 0), wl.dvv(0, 0)), cake::logic_error);
  // The same prompt again gives the same result.
  prefill_all(c, wl);
  CHECK(std::equal(budgets.begin(), budgets.end(), c.budgets().begin()));
  for (index_t l = 0; l < cfg.layers; ++l)
    CHECK(row_positions(c, l, 1, 0) == first[static_cast<std::size_t>(l)]);
  // A different prompt length is fine after reset.
  c.reset();
  const auto wl2 = make_workload(cfg, 50, 81);
  prefill_all(c, wl2);
  CHECK(c.prompt_length() == 50);
  check_layer_contents(c, wl2, 49);
}

TEST_CASE("KvCache: policies swapped (UniformPreference, UniformBudget, WindowMeanIndicator)") {
  const auto cfg = small_config(true);
  const auto wl = make_workload(cfg, 64, 90, 3);
  cake::KvCache<cake::UniformPreference, cake::UniformBudget, cake::WindowMeanIndicator> c(cfg);
  prefill_all(c, wl, [&](index_t m) {
    for (auto b : c.stage_budgets().back()) CHECK(b == c.total_budget() / cfg.layers);
    (void)m;
  });
  for (index_t l = 0; l < cfg.layers; ++l) {
    CHECK(c.budget(l) == 12);
    CHECK(c.tokens_held(l) == 16);
  }
  check_layer_contents(c, wl, 63);
  for (std::size_t t = 0; t < 3; ++t) {
    decode_step(c, wl, t);
    check_layer_contents(c, wl, 64 + static_cast<index_t>(t));
  }
}

TEST_CASE("KvCache: results do not depend on the thread count") {
  const auto cfg = small_config(true);
  const auto wl = make_workload(cfg, 64, 100, 3);
  cake::KvCache<> a(cfg, {}, {}, {}, cake::host.threads(1)),
      b(cfg, {}, {}, {}, cake::host.threads(2).parallel_from(0));
  prefill_all(a, wl);
  prefill_all(b, wl);
  for (std::size_t t = 0; t < 3; ++t) {
    decode_step(a, wl, t);
    decode_step(b, wl, t);
  }
  for (index_t l = 0; l < cfg.layers; ++l) {
    CHECK(a.preference(l) == b.preference(l));
    for (index_t bb = 0; bb < cfg.batch; ++bb)
      for (index_t g = 0; g < cfg.kv_heads; ++g)
        CHECK(row_positions(a, l, bb, g) == row_positions(b, l, bb, g));
  }
}

namespace kv_test {
// Engine tensors with adapters of each shape: a counting one taking T&, a read-only
// one taking const T&, and one taking only T& (not readable when const).
struct Counted {
  std::vector<float>* data;
  std::array<index_t, 4> shape;
  static inline int views = 0;
};
struct ReadOnly {
  const std::vector<float>* data;
  std::array<index_t, 4> shape;
};
struct MutableOnly {
  std::vector<float>* data;
  std::array<index_t, 4> shape;
};
}  // namespace kv_test

template <>
struct cake::tensor_traits<kv_test::Counted> {
  static constexpr std::size_t rank = 4;
  static auto view(kv_test::Counted& t) {
    ++kv_test::Counted::views;
    return cake::make_view(t.data->data(), t.shape);
  }
};
template <>
struct cake::tensor_traits<kv_test::ReadOnly> {
  static constexpr std::size_t rank = 4;
  static auto view(const kv_test::ReadOnly& t) { return cake::make_view(t.data->data(), t.shape); }
};
template <>
struct cake::tensor_traits<kv_test::MutableOnly> {
  static auto view(kv_test::MutableOnly& t) { return cake::make_view(t.data->data(), t.shape); }
};

TEST_CASE("tensor adapters: T& or const T& adapters are found, each runs once per call") {
  // Detection follows the adapter's parameter: a const tensor needs view(const T&).
  CHECK(cake::tensor_like<kv_test::ReadOnly>);
  CHECK(cake::tensor_like<const kv_test::ReadOnly>);
  CHECK(cake::tensor_like<const kv_test::ReadOnly&>);
  CHECK(cake::tensor_like<kv_test::MutableOnly&>);
  CHECK(!cake::tensor_like<const kv_test::MutableOnly>);
  CHECK(!cake::tensor_like<const kv_test::MutableOnly&>);

  cake::CacheConfig cfg;
  cfg.layers = 2;
  cfg.batch = 1;
  cfg.q_heads = 2;
  cfg.kv_heads = 1;
  cfg.head_dim = 8;
  cfg.window = 4;
  cfg.cache_size = 12;
  const index_t S = 30;
  const Workload wl = make_workload(cfg, S, 5);
  auto q = wl.q[0], k = wl.k[0], v = wl.v[0];
  kv_test::Counted cq{&q, {1, 2, 4, 8}}, ck{&k, {1, 1, S, 8}}, cv{&v, {1, 1, S, 8}};
  cake::KvCache<> a(cfg), b(cfg);
  kv_test::Counted::views = 0;
  a.prefill(0, cq, ck, cv);
  CHECK(kv_test::Counted::views == 3);  // once per tensor, validation included
  CHECK(a.validate_prefill(1, cq, ck, cv).ok());
  CHECK(kv_test::Counted::views == 6);

  // Const tensors through the const adapter hold the same tokens as plain views.
  const kv_test::ReadOnly rq{&q, {1, 2, 4, 8}}, rk{&k, {1, 1, S, 8}}, rv{&v, {1, 1, S, 8}};
  b.prefill(0, rq, rk, rv);
  REQUIRE(a.tokens_held(0) == b.tokens_held(0));
  const auto pa = a.positions(0), pb = b.positions(0);
  for (index_t t = 0; t < pa.extent(2); ++t) CHECK(pa(0, 0, t) == pb(0, 0, t));
}

TEST_CASE("KvCache: a copy prefills and decodes like the original; its commit needs no growth") {
  for (bool cascade : {true, false}) {
    CAPTURE(cascade);
    const auto cfg = small_config(cascade);
    const int steps = 6;
    const auto wl = make_workload(cfg, 64, 70 + cascade, steps);
    cake::KvCache<> a(cfg);
    a.prefill(0, wl.qv(0), wl.kv(0), wl.vv(0));
    cake::KvCache<> b = a;  // vectors copied with capacity == size
    for (index_t l = 1; l < cfg.layers; ++l) {
      a.prefill(l, wl.qv(l), wl.kv(l), wl.vv(l));
      b.prefill(l, wl.qv(l), wl.kv(l), wl.vv(l));
      // The commit moves in bookkeeping prepared before the first write, sized for
      // every layer: nothing is appended to a copied vector's exhausted capacity.
      if (cascade) CHECK(b.stage_budgets().capacity() >= static_cast<std::size_t>(cfg.layers));
    }
    REQUIRE(b.prefilled());
    CHECK(b.stage_budgets() == a.stage_budgets());
    CHECK(std::equal(a.budgets().begin(), a.budgets().end(), b.budgets().begin()));
    for (int t = 0; t < steps; ++t) {
      decode_step(a, wl, static_cast<std::size_t>(t));
      decode_step(b, wl, static_cast<std::size_t>(t));
    }
    for (index_t l = 0; l < cfg.layers; ++l) {
      CHECK(a.preference(l) == b.preference(l));
      REQUIRE(a.tokens_held(l) == b.tokens_held(l));
      for (index_t x = 0; x < cfg.batch; ++x)
        for (index_t g = 0; g < cfg.kv_heads; ++g) {
          CHECK(row_positions(a, l, x, g) == row_positions(b, l, x, g));
          for (index_t t = 0; t < a.tokens_held(l); ++t)
            for (index_t e = 0; e < cfg.head_dim; ++e)
              REQUIRE(a.keys(l)(x, g, t, e) == b.keys(l)(x, g, t, e));
        }
    }
    check_layer_contents(b, wl, 64 + steps - 1);
  }
}

TEST_CASE("KvCache: head-wise rows keep their lengths over many decode steps (one row)") {
  for (auto order : {cake::token_order::position, cake::token_order::reference}) {
    CAPTURE(static_cast<int>(order));
    auto cfg = small_config(true);
    cfg.batch = 1;
    cfg.kv_heads = 1;
    cfg.order = order;
    const int steps = 8;
    const auto wl = make_workload(cfg, 64, 90, steps);
    cake::KvCache<cake::CakePreference, cake::HeadwiseBudget<cake::ProportionalBudget>> c(cfg);
    prefill_all(c, wl);
    std::vector<std::vector<index_t>> lengths;
    for (index_t l = 0; l < cfg.layers; ++l) lengths.push_back(c.row_lengths(l));
    for (int t = 0; t < steps; ++t) {
      CAPTURE(t);
      decode_step(c, wl, static_cast<std::size_t>(t));
      for (index_t l = 0; l < cfg.layers; ++l) {
        CHECK(c.row_lengths(l) == lengths[static_cast<std::size_t>(l)]);
        CHECK(c.row_lengths(l)[0] <= c.budget(l) + cfg.window);
        const auto p = row_positions(c, l, 0, 0);
        CHECK(std::count(p.begin(), p.end(), 64 + t) == 1);
      }
    }
  }
}

// S == w: no prefix (P = 0), so every score view is empty; the Debug/sanitize build
// checks layout_stride's precondition (strides >= 1) on each of them.
template <class Cache>
void prompt_of_the_window(const cake::CacheConfig& cfg) {
  const int steps = 5;
  const auto wl = make_workload(cfg, cfg.window, 110, steps);
  Cache c(cfg);
  prefill_all(c, wl);
  for (index_t l = 0; l < cfg.layers; ++l) {
    CHECK(c.tokens_held(l) == cfg.window);
    const auto p = row_positions(c, l, 0, 0);
    CHECK(p.front() == 0);
    CHECK(p.back() == cfg.window - 1);
  }
  for (int t = 0; t < steps; ++t) decode_step(c, wl, static_cast<std::size_t>(t));
  for (index_t l = 0; l < cfg.layers; ++l)
    for (index_t b = 0; b < cfg.batch; ++b)
      for (index_t g = 0; g < cfg.kv_heads; ++g) {
        // Each held token is decoded or prompt, and the newest is held.
        const auto p = row_positions(c, l, b, g);
        CHECK(std::count(p.begin(), p.end(), cfg.window + steps - 1) == 1);
        CHECK(static_cast<index_t>(p.size()) <= c.budget(l) + cfg.window);
      }
  check_layer_contents(c, wl, cfg.window + steps - 1);
}

TEST_CASE("KvCache: a prompt of exactly the window (S == w) prefills and decodes") {
  auto cfg = small_config(true);
  SUBCASE("uniform, mean-variance") { prompt_of_the_window<cake::KvCache<>>(cfg); }
  SUBCASE("uniform, accumulated") {
    prompt_of_the_window<cake::KvCache<cake::UniformPreference, cake::ProportionalBudget,
                                       cake::AccumulatedIndicator>>(cfg);
  }
  SUBCASE("uniform, last query") {
    prompt_of_the_window<
        cake::KvCache<cake::UniformPreference, cake::ProportionalBudget, cake::LastQueryIndicator>>(
        cfg);
  }
  SUBCASE("head-wise: rows hold only their window, selections of zero tokens") {
    prompt_of_the_window<
        cake::KvCache<cake::CakePreference, cake::HeadwiseBudget<cake::ProportionalBudget>>>(cfg);
    cfg.batch = 1;
    cfg.kv_heads = 1;
    cfg.order = cake::token_order::reference;
    prompt_of_the_window<
        cake::KvCache<cake::CakePreference, cake::HeadwiseBudget<cake::ProportionalBudget>>>(cfg);
  }
}

// A source indicator whose decode scores are -inf for every third slot (as
// log-probabilities that underflowed): the head-wise rows below differ in length,
// and each must still select among its own candidates. Ranking the rows together
// once let the slots past a shorter row's candidates outrank its -inf tokens: the
// row then held its window twice and lost real tokens.
struct UnderflowIndicator {
  template <class E, class Q, class K, class O>
  void prefill_scores(const E&, const Q&, const K&, const O& out) const {
    for (index_t b = 0; b < out.extent(0); ++b)
      for (index_t h = 0; h < out.extent(1); ++h)
        for (index_t t = 0; t < out.extent(2); ++t)
          // Row (0, 0) scores below every other row, so with no floor the head-wise
          // split leaves it no prefix at all (kr == 0): a row that is just its window.
          out(b, h, t) = b == 0 && h == 0 ? -1000.0f : static_cast<float>((t * 7 + h * 3 + b) % 11);
  }
  template <class E, class Q, class K, class O>
  void decode_scores(const E&, const Q&, const K&, const O& out) const {
    for (index_t b = 0; b < out.extent(0); ++b)
      for (index_t h = 0; h < out.extent(1); ++h)
        for (index_t t = 0; t < out.extent(2); ++t)
          out(b, h, t) = t % 3 == 0 ? -INFINITY : -static_cast<float>(t);
  }
  cake::status validate() const { return cake::status::success(); }
};

TEST_CASE("KvCache: ragged head-wise rows select among their own candidates, -inf included") {
  for (auto order : {cake::token_order::position, cake::token_order::reference}) {
    CAPTURE(static_cast<int>(order));
    auto cfg = small_config(true);
    cfg.order = order;
    const index_t S = 40;
    const int steps = 6;
    const auto wl = make_workload(cfg, S, 120, steps);
    cake::KvCache<cake::CakePreference, cake::HeadwiseBudget<>, UnderflowIndicator> c(
        cfg, {}, cake::HeadwiseBudget<>{{}, 0.0f}, {});
    prefill_all(c, wl);
    bool ragged = false;
    for (index_t l = 0; l < cfg.layers; ++l) {
      const auto len = c.row_lengths(l);
      ragged = ragged || *std::min_element(len.begin(), len.end()) !=
                             *std::max_element(len.begin(), len.end());
    }
    REQUIRE(ragged);  // else this case tests nothing
    // Row (0, 0) keeps no prefix where the layer's budget is shared out before it.
    index_t bare = 0;
    for (index_t l = 0; l < cfg.layers; ++l) bare += c.row_lengths(l)[0] == cfg.window ? 1 : 0;
    REQUIRE(bare >= 1);  // kr == 0 occurs
    for (int t = 0; t < steps; ++t) {
      CAPTURE(t);
      decode_step(c, wl, static_cast<std::size_t>(t));
      const index_t newest = S + t;
      for (index_t l = 0; l < cfg.layers; ++l) {
        const auto len = c.row_lengths(l);
        const auto vals = c.values(l);
        const auto keys = c.keys(l);
        const auto pos = c.positions(l);
        const index_t held = keys.extent(2), d = keys.extent(3);
        REQUIRE(held == *std::max_element(len.begin(), len.end()));
        for (index_t b = 0; b < cfg.batch; ++b)
          for (index_t g = 0; g < cfg.kv_heads; ++g) {
            CAPTURE(l);
            CAPTURE(g);
            const auto n = len[static_cast<std::size_t>(b * cfg.kv_heads + g)];
            // Padding past a short row: position -1 and zero K/V (what attention over
            // the padded view reads, as the reference pads).
            for (index_t x = n; x < held; ++x) {
              CHECK(pos(b, g, x) == -1);
              for (index_t y = 0; y < d; ++y) {
                CHECK(keys(b, g, x, y) == 0.0f);
                CHECK(vals(b, g, x, y) == 0.0f);
              }
            }
            auto p = row_positions(c, l, b, g);
            p.resize(static_cast<std::size_t>(n));
            const std::set<index_t> held(p.begin(), p.end());
            CHECK(static_cast<index_t>(held.size()) == n);  // no token twice
            CHECK(held.count(-1) == 0);                     // no padding inside the row
            for (index_t x = newest - cfg.window + 1; x <= newest; ++x) CHECK(held.count(x) == 1);
            for (index_t x = 0; x < n; ++x)
              CHECK(vals(b, g, x, 0) == static_cast<float>(p[static_cast<std::size_t>(x)]));
          }
      }
    }
  }
}
