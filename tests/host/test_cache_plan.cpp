// The prefill plan (detail/prefill_plan.hpp) without tensors: budgets and per-layer
// actions for every branch of the cascade, and a budget policy's output checked.
#include <doctest/doctest.h>

#include <cake/cake.hpp>

#include <numeric>
#include <string>
#include <vector>

using cake::index_t;
using cake::detail::layer_action;

namespace plan_test {

constexpr index_t L = 4, w = 4, C = 20, S = 100, P = S - w, T = (C - w) * L;

inline cake::detail::prefill_request request(index_t layer, bool cascade = true,
                                             index_t prompt = S) {
  cake::detail::prefill_request rq;
  rq.layer = layer;
  rq.layers = L;
  rq.prompt = prompt;
  rq.window = w;
  rq.cache_size = C;
  rq.total = T;
  rq.cascade = cascade;
  return rq;
}

// Layers 0..m-1 as a cascade leaves them: cut, prefix by indicator, held budget + w.
inline std::vector<cake::detail::layer_state> cut_layers(const std::vector<index_t>& budgets) {
  std::vector<cake::detail::layer_state> s;
  for (index_t b : budgets) s.push_back({b + w, true, true});
  return s;
}

// A budget policy returning fixed numbers, whatever it is asked.
struct FixedBudget {
  index_t value = 0;
  index_t last = 0;  // the budget of the newest layer
  void operator()(std::span<const float> prefs, index_t, index_t, index_t,
                  std::span<index_t> out) const {
    for (std::size_t l = 0; l < prefs.size(); ++l) out[l] = value;
    out[prefs.size() - 1] = last;
  }
  cake::status validate() const { return cake::status::success(); }
};
static_assert(cake::BudgetPolicy<FixedBudget>);

}  // namespace plan_test

using namespace plan_test;

TEST_CASE("plan: a prompt that fits is copied whole with budgets C - w") {
  const std::vector<float> prefs{1.0f, 2.0f};
  const auto st = cut_layers({});
  std::vector<cake::detail::layer_state> one{{C, false, false}};
  const auto plan =
      cake::detail::plan_prefill(cake::ProportionalBudget{}, request(1, true, C + w), prefs, one);
  CHECK(plan.budgets == std::vector<index_t>{C - w, C - w});
  CHECK(plan.layers[0].action == layer_action::keep);
  CHECK(plan.layers[1].action == layer_action::copy_all);
  CHECK(!plan.layers[1].keep_scores);
  CHECK(plan.record_budgets);
  CHECK(plan.record_stage);
  (void)st;
}

TEST_CASE("plan: cascading cuts the new layer and truncates the earlier ones") {
  const std::vector<float> prefs{1.0f, 1.0f, 2.0f};
  // Stage 1 gave layers 0 and 1 half the total each (T / 2 = 32).
  const auto state = cut_layers({T / 2, T / 2});
  const auto plan =
      cake::detail::plan_prefill(cake::ProportionalBudget{}, request(2), prefs, state);
  REQUIRE(plan.budgets.size() == 3);
  // Proportional to 1 : 1 : 2 of T = 64.
  CHECK(plan.budgets == std::vector<index_t>{16, 16, 32});
  CHECK(std::accumulate(plan.budgets.begin(), plan.budgets.end(), index_t{0}) == T);
  CHECK(plan.layers[2].action == layer_action::select);
  CHECK(plan.layers[2].prefix == 32);
  CHECK(!plan.layers[2].to_position);  // not the last layer: kept by indicator
  CHECK(plan.layers[2].keep_scores);   // a later stage may truncate it
  for (int l = 0; l < 2; ++l) {
    CHECK(plan.layers[static_cast<std::size_t>(l)].action == layer_action::truncate);
    CHECK(plan.layers[static_cast<std::size_t>(l)].prefix == 16);
    CHECK(!plan.layers[static_cast<std::size_t>(l)].to_position);
  }
  CHECK(plan.record_budgets);
  CHECK(plan.record_stage);
}

TEST_CASE("plan: the last cascading layer puts every layer in position order") {
  const std::vector<float> prefs{1.0f, 1.0f, 1.0f, 1.0f};
  auto state = cut_layers({T / 3, T / 3, T / 3});
  state[1].by_indicator = false;  // (a layer already in position order needs no reorder)
  auto rq = request(L - 1);
  const auto plan = cake::detail::plan_prefill(cake::ProportionalBudget{}, rq, prefs, state);
  CHECK(plan.budgets == std::vector<index_t>{16, 16, 16, 16});
  CHECK(plan.layers[3].action == layer_action::select);
  CHECK(plan.layers[3].to_position);
  CHECK(!plan.layers[3].keep_scores);  // nothing ranks it again
  CHECK(plan.layers[0].to_position);
  CHECK(!plan.layers[1].to_position);
  CHECK(plan.layers[2].to_position);

  SUBCASE("reference order keeps the indicator order and the scores") {
    rq.position_order = false;
    const auto p2 = cake::detail::plan_prefill(cake::ProportionalBudget{}, rq, prefs, state);
    CHECK(!p2.layers[3].to_position);
    CHECK(p2.layers[3].keep_scores);
    CHECK(!p2.layers[0].to_position);
  }
  SUBCASE("an accumulating indicator keeps its sums") {
    rq.accumulates = true;
    const auto p2 = cake::detail::plan_prefill(cake::ProportionalBudget{}, rq, prefs, state);
    CHECK(p2.layers[3].keep_scores);
  }
}

TEST_CASE("plan: a truncation never grows a layer past what it holds") {
  // Layer 0 kept 10 of its budget; the new stage would give it 32.
  const std::vector<float> prefs{1.0f, 1.0f};
  const auto state = cut_layers({10});
  const auto plan =
      cake::detail::plan_prefill(cake::ProportionalBudget{}, request(1), prefs, state);
  CHECK(plan.budgets[0] == 32);
  CHECK(plan.layers[0].prefix == 10);
}

TEST_CASE("plan: one-shot copies layers whole, then selects every layer at the last") {
  const std::vector<float> prefs{3.0f, 1.0f};
  std::vector<cake::detail::layer_state> none;
  const auto p0 = cake::detail::plan_prefill(cake::ProportionalBudget{}, request(0, false),
                                             std::span<const float>(prefs).first(1), none);
  CHECK(p0.layers[0].action == layer_action::copy_all);
  CHECK(p0.layers[0].keep_scores);  // the last layer's selection ranks them
  CHECK(!p0.record_budgets);
  CHECK(p0.budgets == std::vector<index_t>{0});

  const std::vector<float> all{1.0f, 1.0f, 1.0f, 1.0f};
  std::vector<cake::detail::layer_state> whole(3, {S, false, false});
  const auto p3 =
      cake::detail::plan_prefill(cake::ProportionalBudget{}, request(3, false), all, whole);
  for (const auto& lp : p3.layers) {
    CHECK(lp.action == layer_action::select);
    CHECK(lp.prefix == 16);
    CHECK(lp.to_position);
  }
  CHECK(p3.record_budgets);
  CHECK(!p3.record_stage);
}

TEST_CASE("plan: head-wise rows come from the row-lengths function, per layer and budget") {
  using Headwise = cake::HeadwiseBudget<cake::ProportionalBudget>;
  const std::vector<float> prefs{1.0f, 1.0f};
  const auto state = cut_layers({T / 2});
  std::vector<std::pair<index_t, index_t>> asked;
  const auto rows = [&](index_t l, index_t budget) {
    asked.emplace_back(l, budget);
    return std::vector<index_t>{budget - l, budget + l};  // two rows
  };
  const auto plan = cake::detail::plan_prefill(Headwise{}, request(1), prefs, state, rows);
  REQUIRE(asked.size() == 2);
  CHECK(asked[0] == std::pair<index_t, index_t>{1, 32});  // the new layer first
  CHECK(asked[1] == std::pair<index_t, index_t>{0, 32});
  CHECK(plan.layers[1].row_prefix == std::vector<index_t>{31, 33});
  CHECK(plan.layers[0].row_prefix == std::vector<index_t>{32, 32});
  CHECK(plan.layers[0].action == layer_action::truncate);
}

TEST_CASE("plan: a budget policy's output is checked (each in [0, S - w], sum <= T)") {
  const std::vector<float> prefs{1.0f, 1.0f};
  const auto state = cut_layers({T / 2});
  const auto expect = [&](FixedBudget b, const std::string& part) {
    bool thrown = false;
    try {
      (void)cake::detail::plan_prefill(b, request(1), prefs, state);
    } catch (const cake::invalid_argument& e) {
      thrown = true;
      CHECK(e.id() == "cake.budget.output");
      const std::string msg = e.what();
      INFO(msg);
      CHECK(msg.find("budget policy") != std::string::npos);
      CHECK(msg.find(part) != std::string::npos);
    }
    CHECK(thrown);
  };
  SUBCASE("negative") { expect({5, -1}, "got -1 for layer 1"); }
  SUBCASE("over the ceiling") { expect({5, P + 1}, "got 97 for layer 1"); }
  SUBCASE("sum over the total") { expect({P, P}, "got 192"); }
  SUBCASE("within bounds passes") {
    const auto plan =
        cake::detail::plan_prefill(FixedBudget{T / 2, T / 2}, request(1), prefs, state);
    CHECK(plan.budgets == std::vector<index_t>{T / 2, T / 2});
  }
}
