// The baseline methods as policies (issue: StreamingLLM, TOVA, H2O): hand-computed
// cases on one-head, head_dim-1 prompts (attention = softmax(q * k), so every
// expected set below was worked out from the numbers in the test), and property
// checks on the shared synthetic workload.
#include "kv_workload.hpp"

#include <cmath>

namespace methods_test {

using kv_test::row_positions;

// One layer, one head, head_dim 1: q_window (1,1,w,1), keys and values (1,1,S,1).
struct Tiny {
  std::vector<float> q, k, v;
  index_t w;
  auto qv() const { return cake::make_view(q.data(), std::array<index_t, 4>{1, 1, w, 1}); }
  auto kv() const {
    return cake::make_view(k.data(),
                           std::array<index_t, 4>{1, 1, static_cast<index_t>(k.size()), 1});
  }
  auto vv() const {
    return cake::make_view(v.data(),
                           std::array<index_t, 4>{1, 1, static_cast<index_t>(v.size()), 1});
  }
};

inline Tiny tiny(std::vector<float> q, std::vector<float> k) {
  Tiny t{std::move(q), std::move(k), {}, 0};
  t.w = static_cast<index_t>(t.q.size());
  for (std::size_t j = 0; j < t.k.size(); ++j) t.v.push_back(static_cast<float>(j));
  return t;
}

inline cake::CacheConfig tiny_config(index_t w, index_t C, cake::token_order order) {
  cake::CacheConfig c;
  c.layers = 1;
  c.q_heads = c.kv_heads = c.head_dim = 1;
  c.window = w;
  c.cache_size = C;
  c.order = order;
  return c;
}

// Decodes one token (q, k scalars) at layer 0 of a head_dim-1 cache; v = position.
template <class Cache>
void decode1(Cache& c, float q, float k, index_t position) {
  const float v = static_cast<float>(position);
  c.decode(0, cake::make_view(&q, std::array<index_t, 3>{1, 1, 1}),
           cake::make_view(&k, std::array<index_t, 3>{1, 1, 1}),
           cake::make_view(&v, std::array<index_t, 3>{1, 1, 1}));
}

template <class Cache>
std::vector<index_t> kept(const Cache& c, index_t l = 0, index_t b = 0, index_t g = 0) {
  auto p = row_positions(c, l, b, g);
  std::sort(p.begin(), p.end());
  return p;
}

using Streaming =
    cake::KvCache<cake::UniformPreference, cake::UniformBudget, cake::SinkRecencyIndicator>;
using Tova = cake::KvCache<cake::UniformPreference, cake::UniformBudget, cake::LastQueryIndicator>;
using H2o = cake::KvCache<cake::UniformPreference, cake::UniformBudget, cake::AccumulatedIndicator>;
using SnapKv =
    cake::KvCache<cake::UniformPreference, cake::UniformBudget, cake::WindowMeanIndicator>;

constexpr cake::token_order both_orders[] = {cake::token_order::position,
                                             cake::token_order::reference};

}  // namespace methods_test

using namespace methods_test;

static_assert(cake::PositionIndicator<cake::SinkRecencyIndicator>);
static_assert(cake::IndicatorPolicy<cake::SinkRecencyIndicator>);
static_assert(!cake::AttentionIndicator<cake::SinkRecencyIndicator>);
static_assert(cake::AttentionIndicator<cake::LastQueryIndicator>);
static_assert(cake::AttentionIndicator<cake::AccumulatedIndicator>);
static_assert(cake::indicator_source_of<cake::MeanVarianceIndicator> ==
              cake::indicator_source::window);
static_assert(cake::indicator_source_of<cake::SinkRecencyIndicator> ==
              cake::indicator_source::position);
static_assert(cake::indicator_source_of<cake::LastQueryIndicator> ==
              cake::indicator_source::last_query);
static_assert(cake::indicator_source_of<cake::AccumulatedIndicator> ==
              cake::indicator_source::accumulated);

TEST_CASE("SinkRecencyIndicator (StreamingLLM): sinks, then recency") {
  const cake::SinkRecencyIndicator s{3};
  CHECK(s.score_position(0) == s.score_position(2));
  CHECK(s.score_position(2) > s.score_position(1000000));
  CHECK(s.score_position(3) == 3.0f);
  CHECK(s.score_position(10) > s.score_position(9));
  CHECK(cake::SinkRecencyIndicator{-1}.validate().id == std::string("cake.indicator.sinks"));
  CHECK(cake::SinkRecencyIndicator{0}.validate().ok());
}

TEST_CASE("StreamingLLM: the first `sinks` tokens plus the most recent, also while decoding") {
  // 2 layers, T = (10 - 4) * 2 = 12, uniform: 6 prefix tokens per layer.
  for (bool cascade : {true, false})
    for (auto order : both_orders) {
      CAPTURE(cascade);
      CAPTURE(static_cast<int>(order));
      cake::CacheConfig cfg;
      cfg.layers = 2;
      cfg.q_heads = 2;
      cfg.kv_heads = 1;
      cfg.head_dim = 4;
      cfg.window = 4;
      cfg.cache_size = 10;
      cfg.cascade = cascade;
      cfg.order = order;
      const auto wl = kv_test::make_workload(cfg, 32, 7, 3);
      Streaming c(cfg, {}, {}, cake::SinkRecencyIndicator{2});
      kv_test::prefill_all(c, wl);
      for (index_t l = 0; l < 2; ++l) {
        CHECK(c.budget(l) == 6);
        // No attention pass: the preference reads no statistics and the indicator none.
        CHECK(c.stats(l).entropy == 0.0);
        CHECK(c.stats(l).variance == 0.0);
        CHECK(kept(c, l) == std::vector<index_t>{0, 1, 24, 25, 26, 27, 28, 29, 30, 31});
      }
      kv_test::check_layer_contents(c, wl, 31, order == cake::token_order::position);
      for (std::size_t t = 0; t < 3; ++t) {
        kv_test::decode_step(c, wl, t);
        const auto tt = static_cast<index_t>(t);
        std::vector<index_t> want{0, 1};
        for (index_t p = 25 + tt; p <= 32 + tt; ++p) want.push_back(p);
        for (index_t l = 0; l < 2; ++l) CHECK(kept(c, l) == want);
      }
    }
  // More sinks than budget: the sinks fill it, lowest positions first.
  cake::CacheConfig cfg = tiny_config(2, 5, cake::token_order::position);
  const auto t = tiny({0.0f, 0.0f}, std::vector<float>(12, 0.0f));
  Streaming c(cfg, {}, {}, cake::SinkRecencyIndicator{8});
  c.prefill(0, t.qv(), t.kv(), t.vv());
  CHECK(kept(c) == std::vector<index_t>{0, 1, 2, 10, 11});
}

TEST_CASE("TOVA: the last window query's attention at prefill, the new query's while decoding") {
  // k = {3, -3, 2, -2, 1, -1, 0, 0.5 | 0.2, 0.1}, window queries {-4, 1}, budget 4 - 2 = 2.
  // Last row (q = 1): attention ~ e^k, largest at k = 3 (token 0) and k = 2 (token 2).
  // The window mean is dominated by row 0 (q = -4: 0.98 on token 1) and row 1's 0.56 on
  // token 0, so SnapKV keeps {0, 1} where TOVA keeps {0, 2}.
  const auto t = tiny({-4.0f, 1.0f}, {3, -3, 2, -2, 1, -1, 0, 0.5f, 0.2f, 0.1f});
  for (auto order : both_orders) {
    CAPTURE(static_cast<int>(order));
    const auto cfg = tiny_config(2, 4, order);
    Tova tova(cfg);
    tova.prefill(0, t.qv(), t.kv(), t.vv());
    CHECK(kept(tova) == std::vector<index_t>{0, 2, 8, 9});
    SnapKv snap(cfg, {}, {}, cake::WindowMeanIndicator{1});
    snap.prefill(0, t.qv(), t.kv(), t.vv());
    CHECK(kept(snap) == std::vector<index_t>{0, 1, 8, 9});
    // Decode token 10 (k = 5) with q = -1: candidates {0, 2, 8} score ~ e^{-k}:
    // e^-3 < e^-2 < e^-0.2, so token 0 goes.
    decode1(tova, -1.0f, 5.0f, 10);
    CHECK(kept(tova) == std::vector<index_t>{2, 8, 9, 10});
    CHECK(tova.values(0)(0, 0, 0, 0) == static_cast<float>(tova.positions(0)(0, 0, 0)));
  }
}

TEST_CASE("H2O: attention accumulated over the window rows, then over every decoded query") {
  // k = {1, -0.5, 0.3, -1, 0.8 | 2, -2}, window queries {1.5, -1}, budget 2.
  // Row 0 sees tokens 0..5, row 1 tokens 0..6. Sums (softmax worked out by hand):
  //   {0.1760, 0.1383, 0.1071, 0.2095, 0.1435 | 0.6762, 0.5494} -> prefix keeps {0, 3}.
  // Decode (q, k) = (0.5, 0), (-1, 1), (2, -0.5): held after each step
  //   {0, 5, 6, 7}, {5, 6, 7, 8}, {5, 6, 8, 9}.
  // Token 0 leaves at step 1 only because tokens 5 and 6 carry their window-row sums
  // (without them it would be {0, 6, 7, 8}).
  const auto t = tiny({1.5f, -1.0f}, {1.0f, -0.5f, 0.3f, -1.0f, 0.8f, 2.0f, -2.0f});
  const std::vector<std::vector<index_t>> want{{0, 5, 6, 7}, {5, 6, 7, 8}, {5, 6, 8, 9}};
  const float dq[] = {0.5f, -1.0f, 2.0f}, dk[] = {0.0f, 1.0f, -0.5f};
  for (auto order : both_orders) {
    CAPTURE(static_cast<int>(order));
    H2o c(tiny_config(2, 4, order));
    c.prefill(0, t.qv(), t.kv(), t.vv());
    CHECK(kept(c) == std::vector<index_t>{0, 3, 5, 6});
    for (int s = 0; s < 3; ++s) {
      CAPTURE(s);
      decode1(c, dq[s], dk[s], 7 + s);
      CHECK(kept(c) == want[static_cast<std::size_t>(s)]);
      auto p = c.positions(0);
      for (index_t j = 0; j < p.extent(2); ++j)
        CHECK(c.values(0)(0, 0, j, 0) == static_cast<float>(p(0, 0, j)));
    }
  }
}

namespace methods_test {

// H2O in double on one (batch, kv-head) row of the synthetic workload: window-row
// sums with the causal mask, then each decode query's attention added (GQA: mean over
// the group's query heads), evicting the lowest sum among all but the last w.
inline std::vector<std::vector<index_t>> h2o_reference(const kv_test::Workload& wl, index_t l,
                                                       index_t b, index_t g, index_t budget,
                                                       int steps) {
  const auto& cfg = wl.cfg;
  const index_t S = wl.S, w = cfg.window, P = S - w, d = cfg.head_dim,
                n = cfg.q_heads / cfg.kv_heads;
  const double scale = 1.0 / std::sqrt(static_cast<double>(d));
  std::vector<double> acc;  // by position
  auto add_attention = [&](const std::vector<index_t>& held, auto query_of) {
    for (index_t r = 0; r < n; ++r) {
      const float* q = query_of(g * n + r);
      std::vector<double> s;
      double mx = -1e300;
      for (index_t j : held) {
        const float* k = wl.key_of(l, b, g, j);
        double dot = 0;
        for (index_t x = 0; x < d; ++x) dot += static_cast<double>(q[x]) * k[x];
        s.push_back(dot * scale);
        mx = std::max(mx, dot * scale);
      }
      double sum = 0;
      for (auto& e : s) sum += (e = std::exp(e - mx));
      for (std::size_t i = 0; i < held.size(); ++i)
        acc[static_cast<std::size_t>(held[i])] += s[i] / sum / static_cast<double>(n);
    }
  };
  acc.assign(static_cast<std::size_t>(S + steps), 0.0);
  const auto& qw = wl.q[static_cast<std::size_t>(l)];
  for (index_t i = 0; i < w; ++i) {
    std::vector<index_t> seen(static_cast<std::size_t>(P + i + 1));
    std::iota(seen.begin(), seen.end(), index_t{0});
    add_attention(seen, [&](index_t h) { return qw.data() + ((b * cfg.q_heads + h) * w + i) * d; });
  }
  std::vector<index_t> prefix(static_cast<std::size_t>(P));
  std::iota(prefix.begin(), prefix.end(), index_t{0});
  std::stable_sort(prefix.begin(), prefix.end(), [&](index_t a, index_t c) {
    return acc[static_cast<std::size_t>(a)] > acc[static_cast<std::size_t>(c)];
  });
  prefix.resize(static_cast<std::size_t>(std::min(budget, P)));
  std::sort(prefix.begin(), prefix.end());
  std::vector<index_t> held = prefix;
  for (index_t t = P; t < S; ++t) held.push_back(t);
  std::vector<std::vector<index_t>> out{held};
  for (int t = 0; t < steps; ++t) {
    held.push_back(S + t);
    const auto& dq = wl.dq[static_cast<std::size_t>(t)][static_cast<std::size_t>(l)];
    add_attention(held, [&](index_t h) { return dq.data() + (b * cfg.q_heads + h) * d; });
    if (static_cast<index_t>(held.size()) > budget + w) {
      const index_t cand = static_cast<index_t>(held.size()) - w;
      std::vector<index_t> slots(static_cast<std::size_t>(cand));
      std::iota(slots.begin(), slots.end(), index_t{0});
      std::stable_sort(slots.begin(), slots.end(), [&](index_t a, index_t c) {
        return acc[static_cast<std::size_t>(held[static_cast<std::size_t>(a)])] >
               acc[static_cast<std::size_t>(held[static_cast<std::size_t>(c)])];
      });
      slots.resize(static_cast<std::size_t>(budget));
      std::sort(slots.begin(), slots.end());
      std::vector<index_t> next;
      for (index_t s : slots) next.push_back(held[static_cast<std::size_t>(s)]);
      for (index_t s = cand; s < static_cast<index_t>(held.size()); ++s)
        next.push_back(held[static_cast<std::size_t>(s)]);
      held = next;
    }
    auto sorted = held;
    std::sort(sorted.begin(), sorted.end());
    out.push_back(sorted);
  }
  return out;
}

}  // namespace methods_test

namespace methods_test {
// Decodes `steps` tokens into a prefilled H2O cache and checks, before and after each
// step, every row's kept tokens against h2o_reference with that row's prefix budget
// (budget_of(l, row) = tokens it holds outside the window).
template <class Cache, class BudgetOf>
void check_against_h2o_model(Cache& c, const kv_test::Workload& wl, int steps, BudgetOf budget_of) {
  const auto& cfg = wl.cfg;
  for (int t = 0; t <= steps; ++t) {
    CAPTURE(t);
    if (t > 0) kv_test::decode_step(c, wl, static_cast<std::size_t>(t - 1));
    for (index_t l = 0; l < cfg.layers; ++l)
      for (index_t b = 0; b < cfg.batch; ++b)
        for (index_t g = 0; g < cfg.kv_heads; ++g) {
          CAPTURE(l);
          CAPTURE(b);
          CAPTURE(g);
          const auto ref = h2o_reference(wl, l, b, g, budget_of(l, b * cfg.kv_heads + g), steps);
          auto got = kept(c, l, b, g);
          got.erase(std::remove(got.begin(), got.end(), index_t{-1}), got.end());  // padding
          CHECK(got == ref[static_cast<std::size_t>(t)]);
        }
  }
}
}  // namespace methods_test

TEST_CASE("H2O on a GQA workload equals a float64 model of H2O, cascading and one-shot") {
  const int steps = 6;
  for (bool cascade : {true, false}) {
    CAPTURE(cascade);
    const auto cfg = kv_test::small_config(cascade);
    const auto wl = kv_test::make_workload(cfg, 48, 90 + cascade, steps);
    H2o c(cfg);
    kv_test::prefill_all(c, wl);
    kv_test::check_layer_contents(c, wl, 47);
    check_against_h2o_model(c, wl, steps, [&](index_t l, index_t) { return c.budget(l); });
  }
}

TEST_CASE("TOVA, H2O and StreamingLLM compose with CAKE's layer budgets") {
  // The preference still reads the window statistics when the indicator does not.
  const auto cfg = kv_test::small_config(true);
  const auto wl = kv_test::make_workload(cfg, 64, 5, 2);
  cake::KvCache<> ref(cfg);
  cake::KvCache<cake::CakePreference, cake::ProportionalBudget, cake::LastQueryIndicator> tova(cfg);
  cake::KvCache<cake::CakePreference, cake::ProportionalBudget, cake::AccumulatedIndicator> h2o(
      cfg);
  cake::KvCache<cake::CakePreference, cake::ProportionalBudget, cake::SinkRecencyIndicator> stream(
      cfg);
  kv_test::prefill_all(ref, wl);
  kv_test::prefill_all(tova, wl);
  kv_test::prefill_all(h2o, wl);
  kv_test::prefill_all(stream, wl);
  for (index_t l = 0; l < cfg.layers; ++l) {
    CAPTURE(l);
    CHECK(tova.budget(l) == ref.budget(l));
    CHECK(h2o.budget(l) == ref.budget(l));
    CHECK(stream.budget(l) == ref.budget(l));
    CHECK(tova.stats(l).entropy == doctest::Approx(ref.stats(l).entropy).epsilon(1e-6));
    CHECK(stream.stats(l).variance == doctest::Approx(ref.stats(l).variance).epsilon(1e-6));
  }
  kv_test::check_layer_contents(tova, wl, 63);
  kv_test::check_layer_contents(h2o, wl, 63);
  kv_test::check_layer_contents(stream, wl, 63);
  for (std::size_t t = 0; t < 2; ++t) {
    kv_test::decode_step(tova, wl, t);
    kv_test::decode_step(h2o, wl, t);
    kv_test::decode_step(stream, wl, t);
  }
  kv_test::check_layer_contents(tova, wl, 65);
  kv_test::check_layer_contents(h2o, wl, 65);
  kv_test::check_layer_contents(stream, wl, 65);
}

// ---- head-wise allocation (Ada-KV) -----------------------------------------------

TEST_CASE("allocate_heads: per-head floor, then the best remaining tokens of any head") {
  // Batch 0: row 0 has one strong token, row 1 many, row 2 none; batch 1 reversed.
  const std::vector<float> s{9,    1,    1,    1,    1,    8,    7,    6,    5,    0,
                             0.5f, 0.4f, 0.3f, 0.2f, 0.1f, 0.5f, 0.4f, 0.3f, 0.2f, 0.1f,
                             8,    7,    6,    5,    0,    9,    1,    1,    1,    1};
  const auto sv = cake::make_view(s.data(), std::array<index_t, 3>{2, 3, 5});
  std::vector<index_t> len(6);
  const auto lv = cake::make_view(len.data(), std::array<index_t, 2>{2, 3});
  // budget 2 per row: 6 tokens per batch entry. Floor 1: {9}, {8}, {0.5}; then 7, 6, 5.
  cake::allocate_heads(cake::host, sv, 2, 1, lv);
  CHECK(len == std::vector<index_t>{1, 4, 1, 1, 4, 1});
  // No floor: 9, 8, 7, 6, 5, then the tie at 1 goes to row 0's lowest token.
  cake::allocate_heads(cake::host, sv, 2, 0, lv);
  CHECK(len == std::vector<index_t>{2, 4, 0, 0, 4, 2});
  // Floor = budget: uniform.
  cake::allocate_heads(cake::host, sv, 2, 2, lv);
  CHECK(len == std::vector<index_t>{2, 2, 2, 2, 2, 2});
  // Everything fits.
  cake::allocate_heads(cake::host, sv, 5, 0, lv);
  CHECK(len == std::vector<index_t>{5, 5, 5, 5, 5, 5});
  CHECK_THROWS_WITH_AS(cake::allocate_heads(cake::host, sv, 6, 0, lv),
                       doctest::Contains("[cake.heads.budget]"), cake::invalid_argument);
  CHECK_THROWS_WITH_AS(cake::allocate_heads(cake::host, sv, 2, 3, lv),
                       doctest::Contains("[cake.heads.floor]"), cake::invalid_argument);
  CHECK(cake::HeadwiseBudget<>{{}, 1.5f}.validate().id == std::string("cake.budget.min_share"));
  CHECK(cake::HeadwiseBudget<>{}.head_floor(10) == 2);
  CHECK(cake::HeadwiseBudget<>{{}, 0.7f}.head_floor(10) == 7);  // not 6: 0.7f is 0.69999998
  CHECK(cake::HeadwiseBudget<>{{}, 0.9f}.head_floor(10) == 9);
}

namespace methods_test {
using AdaSnapKv = cake::KvCache<cake::UniformPreference, cake::HeadwiseBudget<cake::UniformBudget>,
                                cake::WindowMeanIndicator>;
using CakeAda = cake::KvCache<cake::CakePreference, cake::HeadwiseBudget<cake::ProportionalBudget>,
                              cake::MeanVarianceIndicator>;

// Row lengths, padding and contents of a head-wise layer.
template <class Cache>
void check_ragged(const Cache& c, const kv_test::Workload& wl, index_t last) {
  const auto& cfg = wl.cfg;
  for (index_t l = 0; l < cfg.layers; ++l) {
    CAPTURE(l);
    const auto len = c.row_lengths(l);
    auto pos = c.positions(l);
    auto keys = c.keys(l);
    auto vals = c.values(l);
    index_t longest = 0;
    for (index_t b = 0; b < cfg.batch; ++b) {
      index_t sum = 0;
      for (index_t g = 0; g < cfg.kv_heads; ++g) {
        const index_t n = len[static_cast<std::size_t>(b * cfg.kv_heads + g)];
        sum += n;
        longest = std::max(longest, n);
        CHECK(n >= cfg.window);
      }
      // The heads of a batch entry share the layer's budget exactly.
      CHECK(sum == cfg.kv_heads * (c.budget(l) + cfg.window));
    }
    REQUIRE(pos.extent(2) == longest);
    CHECK(c.tokens_held(l) == c.budget(l) + cfg.window);
    for (index_t b = 0; b < cfg.batch; ++b)
      for (index_t g = 0; g < cfg.kv_heads; ++g) {
        const index_t n = len[static_cast<std::size_t>(b * cfg.kv_heads + g)];
        std::set<index_t> seen;
        for (index_t t = 0; t < longest; ++t) {
          if (t >= n) {  // padding
            CHECK(pos(b, g, t) == -1);
            CHECK(keys(b, g, t, 0) == 0.0f);
            CHECK(vals(b, g, t, 0) == 0.0f);
            continue;
          }
          CHECK(seen.insert(pos(b, g, t)).second);
          CHECK(vals(b, g, t, 0) == static_cast<float>(pos(b, g, t)));
          CHECK(keys(b, g, t, 1) == wl.key_of(l, b, g, pos(b, g, t))[1]);
        }
        for (index_t t = last - cfg.window + 1; t <= last; ++t) CHECK(seen.count(t) == 1);
      }
  }
}
}  // namespace methods_test

TEST_CASE("Head-wise (Ada-KV) by hand: a head with one strong token lends its budget") {
  // B = 1, two KV heads (one query head each), head_dim 1, S = 8, w = 2, C = 5: budget
  // 3 per row, 6 per batch entry. Queries 1. Head 0: keys {4, 0, 0, 0, 0, 0 | 0, 0}:
  // token 0 takes ~0.9 of the attention, every other ~0.016. Head 1: keys
  // {1, .9, .8, .7, .6, .5 | 0, 0}: 0.12-0.2 each.
  cake::CacheConfig cfg = tiny_config(2, 5, cake::token_order::position);
  cfg.q_heads = cfg.kv_heads = 2;
  const std::vector<float> q{1, 1, 1, 1};  // (1, 2, 2, 1)
  const std::vector<float> k{4, 0, 0, 0, 0, 0, 0, 0, 1, 0.9f, 0.8f, 0.7f, 0.6f, 0.5f, 0, 0};
  std::vector<float> v(16);
  for (std::size_t i = 0; i < 16; ++i) v[i] = static_cast<float>(i % 8);
  const auto qv = cake::make_view(q.data(), std::array<index_t, 4>{1, 2, 2, 1});
  const auto kv = cake::make_view(k.data(), std::array<index_t, 4>{1, 2, 8, 1});
  const auto vv = cake::make_view(v.data(), std::array<index_t, 4>{1, 2, 8, 1});
  const auto run = [&](float share) {
    AdaSnapKv c(cfg, {}, cake::HeadwiseBudget<cake::UniformBudget>{{}, share},
                cake::WindowMeanIndicator{1});
    c.prefill(0, qv, kv, vv);
    return std::pair{c.row_lengths(0), std::pair{kept(c, 0, 0, 0), kept(c, 0, 0, 1)}};
  };
  // Floor 0 (and floor(0.34 * 3) = 1): head 0 keeps token 0, head 1 tokens 0..4.
  for (float share : {0.0f, 0.34f}) {
    CAPTURE(share);
    const auto [len, sets] = run(share);
    CHECK(len == std::vector<index_t>{3, 7});
    CHECK(sets.first == std::vector<index_t>{-1, -1, -1, -1, 0, 6, 7});
    CHECK(sets.second == std::vector<index_t>{0, 1, 2, 3, 4, 6, 7});
  }
  // Floor 2: head 0 keeps {0, 1} (a tie among its weak tokens: lowest first), head 1 {0..3}.
  const auto [len, sets] = run(0.67f);
  CHECK(len == std::vector<index_t>{4, 6});
  CHECK(sets.first == std::vector<index_t>{-1, -1, 0, 1, 6, 7});
  CHECK(sets.second == std::vector<index_t>{0, 1, 2, 3, 6, 7});
  // Floor = budget: SnapKV's uniform rows.
  const auto [ulen, usets] = run(1.0f);
  CHECK(ulen == std::vector<index_t>{5, 5});
}

TEST_CASE("Head-wise on a GQA workload: one-shot equals the functional core; padding; decode") {
  for (bool cascade : {false, true})
    for (auto order : both_orders) {
      CAPTURE(cascade);
      CAPTURE(static_cast<int>(order));
      auto cfg = kv_test::small_config(cascade);
      cfg.order = order;
      const int steps = 5;
      const auto wl = kv_test::make_workload(cfg, 64, 300 + cascade, steps);
      const cake::HeadwiseBudget<cake::UniformBudget> hb{{}, 0.25f};
      AdaSnapKv c(cfg, {}, hb, cake::WindowMeanIndicator{3});
      kv_test::prefill_all(c, wl);
      check_ragged(c, wl, 63);
      // Uniform layer budgets never change across stages, so cascading cuts each layer
      // once, like one-shot: both equal window_stats -> allocate_heads -> each row's top-k.
      const index_t B = cfg.batch, Hkv = cfg.kv_heads, w = cfg.window, P = 64 - w;
      bool differs = false;
      for (index_t l = 0; l < cfg.layers; ++l) {
        std::vector<float> ind(static_cast<std::size_t>(B * Hkv * P)), st(2);
        cake::window_stats(cake::host, wl.qv(l), wl.kv(l), cake::WindowMeanIndicator{3},
                           cake::make_view(ind.data(), std::array<index_t, 3>{B, Hkv, P}),
                           cake::make_view(st.data(), std::array<index_t, 1>{2}));
        std::vector<index_t> len(static_cast<std::size_t>(B * Hkv));
        const index_t b_l = c.budget(l);
        cake::allocate_heads(cake::host,
                             cake::make_view(static_cast<const float*>(ind.data()),
                                             std::array<index_t, 3>{B, Hkv, P}),
                             b_l, hb.head_floor(b_l),
                             cake::make_view(len.data(), std::array<index_t, 2>{B, Hkv}));
        const auto got = c.row_lengths(l);
        for (index_t r = 0; r < B * Hkv; ++r) {
          const index_t n = len[static_cast<std::size_t>(r)];
          CHECK(got[static_cast<std::size_t>(r)] == n + w);
          differs |= n != b_l;
          std::vector<index_t> top(static_cast<std::size_t>(n));
          cake::select_k(cake::host,
                         cake::make_view(static_cast<const float*>(ind.data()) + r * P,
                                         std::array<index_t, 2>{1, P}),
                         cake::make_view(top.data(), std::array<index_t, 2>{1, n}),
                         cake::select_order::position);
          for (index_t t = P; t < 64; ++t) top.push_back(t);
          auto have = kept(c, l, r / Hkv, r % Hkv);
          have.erase(std::remove(have.begin(), have.end(), index_t{-1}), have.end());
          CHECK(have == top);
        }
      }
      CHECK(differs);  // the heads really did get different budgets
      // Decoding: every row keeps its length, admits the new token, evicts one.
      std::vector<std::vector<index_t>> len0;
      for (index_t l = 0; l < cfg.layers; ++l) len0.push_back(c.row_lengths(l));
      for (int t = 0; t < steps; ++t) {
        kv_test::decode_step(c, wl, static_cast<std::size_t>(t));
        for (index_t l = 0; l < cfg.layers; ++l)
          CHECK(c.row_lengths(l) == len0[static_cast<std::size_t>(l)]);
        check_ragged(c, wl, 64 + t);
      }
    }
}

TEST_CASE("CAKE x head-wise: CAKE's layer budgets, Ada-KV's head budgets, cascading bounded") {
  const auto cfg = kv_test::small_config(true);
  const auto wl = kv_test::make_workload(cfg, 64, 17, 3);
  cake::KvCache<> cake_only(cfg);
  CakeAda both(cfg);
  kv_test::prefill_all(cake_only, wl);
  kv_test::prefill_all(both, wl, [&](index_t l) {
    // Every stage leaves each earlier layer at its new budget, row lengths summing to it.
    for (index_t m = 0; m <= l; ++m)
      for (index_t b = 0; b < cfg.batch; ++b) {
        const auto len = both.row_lengths(m);
        index_t s = 0;
        for (index_t g = 0; g < cfg.kv_heads; ++g)
          s += len[static_cast<std::size_t>(b * cfg.kv_heads + g)];
        CHECK(s ==
              cfg.kv_heads *
                  (both.stage_budgets()[static_cast<std::size_t>(l)][static_cast<std::size_t>(m)] +
                   cfg.window));
      }
  });
  CHECK(std::vector<index_t>(both.budgets().begin(), both.budgets().end()) ==
        std::vector<index_t>(cake_only.budgets().begin(), cake_only.budgets().end()));
  CHECK(both.tokens_held() == cake_only.tokens_held());
  CHECK(both.bytes_held() == cake_only.bytes_held());
  check_ragged(both, wl, 63);
  for (std::size_t t = 0; t < 3; ++t) kv_test::decode_step(both, wl, t);
  check_ragged(both, wl, 66);
  // min_share = 1 is CAKE itself.
  cake::KvCache<cake::CakePreference, cake::HeadwiseBudget<>, cake::MeanVarianceIndicator> full(
      cfg, {}, cake::HeadwiseBudget<>{{}, 1.0f});
  kv_test::prefill_all(full, wl);
  CHECK(kv_test::same_kept(full, cake_only, cfg));
}

TEST_CASE("Every method: prompts of exactly w tokens, just uncut, just cut; then decoding") {
  namespace m = cake::methods;
  const auto run = [&]<class Cache>(const std::string& name) {
    for (index_t S : {index_t{4}, index_t{20}, index_t{21}, index_t{40}})
      for (bool cascade : {true, false}) {
        CAPTURE(name);
        CAPTURE(S);
        CAPTURE(cascade);
        auto cfg = kv_test::small_config(cascade);  // w = 4, C = 16: uncut up to S = 20
        const auto wl = kv_test::make_workload(cfg, S, 7 + static_cast<unsigned>(S), 3);
        Cache c(cfg);
        kv_test::prefill_all(c, wl);
        for (index_t l = 0; l < cfg.layers; ++l) {
          // An uncut prompt (S <= C + w) is held whole (spec section 5).
          CHECK(c.tokens_held(l) ==
                (S <= cfg.cache_size + cfg.window ? S : c.budget(l) + cfg.window));
          index_t rows_total = 0;
          for (index_t n : c.row_lengths(l)) rows_total += n;
          CHECK(rows_total == c.tokens_held(l) * cfg.batch * cfg.kv_heads);
        }
        for (std::size_t t = 0; t < 3; ++t) {
          kv_test::decode_step(c, wl, t);
          for (index_t l = 0; l < cfg.layers; ++l) {
            // Every step ends at the budget (an uncut prompt is cut at the first step).
            CHECK(c.tokens_held(l) ==
                  std::min(S + static_cast<index_t>(t) + 1, c.budget(l) + cfg.window));
            auto pos = c.positions(l);
            const auto len = c.row_lengths(l);
            for (index_t r = 0; r < cfg.batch * cfg.kv_heads; ++r) {
              std::set<index_t> held;
              for (index_t j = 0; j < len[static_cast<std::size_t>(r)]; ++j)
                held.insert(pos(r / cfg.kv_heads, r % cfg.kv_heads, j));
              CHECK(static_cast<index_t>(held.size()) == len[static_cast<std::size_t>(r)]);
              for (index_t p = S + static_cast<index_t>(t) - cfg.window + 1;
                   p <= S + static_cast<index_t>(t); ++p)
                CHECK(held.count(p) == 1);  // the window is always there
            }
          }
        }
      }
  };
  run.template operator()<m::Cake<>>("cake");
  run.template operator()<m::SnapKv<>>("snapkv");
  run.template operator()<m::PyramidKv<>>("pyramidkv");
  run.template operator()<m::StreamingLlm<>>("streamingllm");
  run.template operator()<m::H2o<>>("h2o");
  run.template operator()<m::Tova<>>("tova");
  run.template operator()<m::AdaSnapKv<>>("ada_snapkv");
  run.template operator()<m::CakeAdaKv<>>("cake_adakv");
}

namespace methods_test {
// Sorted positions of row (b, g), padding dropped.
template <class Cache>
std::vector<index_t> kept_tokens(const Cache& c, index_t l, index_t b, index_t g) {
  auto p = kept(c, l, b, g);
  p.erase(std::remove(p.begin(), p.end(), index_t{-1}), p.end());
  return p;
}
}  // namespace methods_test

TEST_CASE("Head-wise with min_share = 1: the ragged path equals the uniform one, token for token") {
  // Every row gets the same length, but the cache still stores the layer as ragged and
  // decodes it row by row: the positions, in their stored order, must match.
  const auto run = [&]<class Pref, class Ind>(Ind ind) {
    for (bool cascade : {false, true})
      for (auto order : both_orders) {
        CAPTURE(cascade);
        CAPTURE(static_cast<int>(order));
        auto cfg = kv_test::small_config(cascade);
        cfg.order = order;
        const auto wl = kv_test::make_workload(cfg, 64, 9, 8);
        cake::KvCache<Pref, cake::HeadwiseBudget<>, Ind> a(cfg, {}, {{}, 1.0f}, ind);
        cake::KvCache<Pref, cake::ProportionalBudget, Ind> b(cfg, {}, {}, ind);
        kv_test::prefill_all(a, wl);
        kv_test::prefill_all(b, wl);
        for (int t = 0; t <= 8; ++t) {
          CAPTURE(t);
          if (t > 0) {
            kv_test::decode_step(a, wl, static_cast<std::size_t>(t - 1));
            kv_test::decode_step(b, wl, static_cast<std::size_t>(t - 1));
          }
          for (index_t l = 0; l < cfg.layers; ++l) {
            REQUIRE(a.positions(l).extent(2) == b.positions(l).extent(2));
            for (index_t bb = 0; bb < cfg.batch; ++bb)
              for (index_t g = 0; g < cfg.kv_heads; ++g)
                CHECK(row_positions(a, l, bb, g) == row_positions(b, l, bb, g));
          }
        }
      }
  };
  run.template operator()<cake::CakePreference>(cake::MeanVarianceIndicator{});
  run.template operator()<cake::UniformPreference>(cake::WindowMeanIndicator{});
  run.template operator()<cake::CakePreference>(cake::AccumulatedIndicator{});
  run.template operator()<cake::UniformPreference>(cake::LastQueryIndicator{});
  run.template operator()<cake::UniformPreference>(cake::SinkRecencyIndicator{3});
}

TEST_CASE("H2O x head-wise equals the float64 H2O model row by row, with each row's budget") {
  using H2oHeads = cake::KvCache<cake::UniformPreference, cake::HeadwiseBudget<cake::UniformBudget>,
                                 cake::AccumulatedIndicator>;
  const int steps = 6;
  for (bool cascade : {false, true})
    for (auto order : both_orders) {
      CAPTURE(cascade);
      CAPTURE(static_cast<int>(order));
      auto cfg = kv_test::small_config(cascade);
      cfg.order = order;
      const auto wl = kv_test::make_workload(cfg, 48, 77, steps);
      H2oHeads c(cfg);
      kv_test::prefill_all(c, wl);
      std::vector<std::vector<index_t>> len0;
      for (index_t l = 0; l < cfg.layers; ++l) len0.push_back(c.row_lengths(l));
      check_against_h2o_model(c, wl, steps, [&](index_t l, index_t r) {
        return len0[static_cast<std::size_t>(l)][static_cast<std::size_t>(r)] - cfg.window;
      });
    }
}

TEST_CASE("CAKE x head-wise: position and reference order keep the same tokens") {
  for (unsigned seed : {1u, 2u, 3u}) {
    CAPTURE(seed);
    auto cfg = kv_test::small_config(true);
    const auto wl = kv_test::make_workload(cfg, 64, seed, 4);
    // Pool kernel 1: decode-time pooling runs in cache order, which differs between the
    // two orders by design (spec section 7); without it the kept sets must agree.
    const cake::MeanVarianceIndicator ind{200.0f, 1};
    cfg.order = cake::token_order::position;
    CakeAda a(cfg, {}, {}, ind);
    cfg.order = cake::token_order::reference;
    CakeAda b(cfg, {}, {}, ind);
    kv_test::prefill_all(a, wl);
    kv_test::prefill_all(b, wl);
    for (int t = 0; t <= 4; ++t) {
      if (t > 0) {
        kv_test::decode_step(a, wl, static_cast<std::size_t>(t - 1));
        kv_test::decode_step(b, wl, static_cast<std::size_t>(t - 1));
      }
      for (index_t l = 0; l < cfg.layers; ++l) {
        REQUIRE(a.row_lengths(l) == b.row_lengths(l));
        auto p = a.positions(l);
        const auto len = a.row_lengths(l);
        for (index_t bb = 0; bb < cfg.batch; ++bb)
          for (index_t g = 0; g < cfg.kv_heads; ++g) {
            CHECK(kept_tokens(a, l, bb, g) == kept_tokens(b, l, bb, g));
            for (index_t j = 1; j < len[static_cast<std::size_t>(bb * cfg.kv_heads + g)]; ++j)
              CHECK(p(bb, g, j) > p(bb, g, j - 1));  // position order within the row
          }
      }
    }
  }
}
