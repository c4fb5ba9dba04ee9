// What one KvCache::prefill call does, decided before any tensor moves: the layers'
// budgets and, per layer, an action. Pure host code over integers (no tensors), so
// every branch of the cascade is testable on its own (tests/host/test_cache_plan.cpp);
// the cache then allocates everything the plan needs and commits it.
#pragma once

#include <algorithm>
#include <functional>
#include <span>
#include <vector>

#include "../algorithm/allocate_budgets.hpp"
#include "../core/concepts.hpp"
#include "../policy/budget/headwise.hpp"

namespace cake::detail {

enum class layer_action : unsigned char {
  keep,      // untouched
  copy_all,  // (the new layer) every prompt token, uncut
  select,    // the top `prefix` scored tokens and the window, into a new layer; the
             // new layer's source, or (one-shot) layer l's full copy
  truncate,  // a cut layer keeps the first `prefix` of its prefix (descending
             // indicator order) and its window, in place
};

struct layer_plan {
  layer_action action = layer_action::keep;
  index_t prefix = 0;               // select / truncate: prefix tokens every row keeps
  std::vector<index_t> row_prefix;  // head-wise: the same per (batch, kv-head) row
  bool to_position = false;         // select: write in position order; truncate: then reorder
  bool keep_scores = false;         // copy_all / select: the new layer keeps its tokens' scores
};

// Prefix tokens row r keeps.
inline index_t row_prefix(const layer_plan& lp, index_t r) {
  return lp.row_prefix.empty() ? lp.prefix : lp.row_prefix[static_cast<std::size_t>(r)];
}

// What the plan reads of a stored layer.
struct layer_state {
  index_t held = 0;           // tokens of its longest row, the window included
  bool cut = false;           // selected (prefix in indicator or position order)
  bool by_indicator = false;  // prefix in descending-indicator order
};

struct prefill_request {
  index_t layer = 0;   // m: the layer being prefilled (layers 0..m-1 are stored)
  index_t layers = 0;  // L
  index_t prompt = 0;  // S
  index_t window = 0;  // w
  index_t cache_size = 0;
  index_t total = 0;  // T = (C - w) * L
  bool cascade = true;
  bool position_order = true;  // token_order::position
  bool accumulates = false;    // the indicator's scores live on while decoding
};

struct prefill_plan {
  std::vector<index_t> budgets;    // (m + 1) budgets of layers 0..m after this call
  std::vector<layer_plan> layers;  // (m + 1) what happens to each
  bool record_budgets = false;     // the budgets become the layers' budgets
  bool record_stage = false;       // ... and a cascade stage
};

// Head-wise lengths: (layer, layer budget) -> (rows) prefix tokens of each row. The
// cache reads the scores for it; tests pass any function.
using row_lengths_fn = std::function<std::vector<index_t>(index_t, index_t)>;

// A budget policy's output, checked before it is used: each budget in [0, ceiling],
// their sum at most the total. A policy is user code: a wrong budget would make the
// stores write out of bounds, so it is an error naming the policy's output.
inline void check_budgets(std::span<const index_t> budgets, index_t ceiling, index_t total) {
  index_t sum = 0;
  for (std::size_t l = 0; l < budgets.size(); ++l) {
    CAKE_EXPECTS(budgets[l] >= 0 && budgets[l] <= ceiling, "cake.budget.output",
                 "the budget policy's output must be in [0, ceiling = ", ceiling,
                 "] for every layer, got ", budgets[l], " for layer ", l);
    sum += budgets[l];
  }
  CAKE_EXPECTS(sum <= total, "cake.budget.output",
               "the budget policy's output must sum to at most the total budget T = ", total,
               ", got ", sum, " over ", budgets.size(), " layers");
}

// prefs: (m + 1) preferences of layers 0..m; state: (m) layers 0..m-1 as stored.
// Throws (cake::error) before anything is decided when a policy misbehaves.
template <BudgetPolicy Budget>
prefill_plan plan_prefill(const Budget& budget, const prefill_request& rq,
                          std::span<const float> prefs, std::span<const layer_state> state,
                          const row_lengths_fn& row_lengths = {}) {
  constexpr bool headwise = is_headwise_budget<Budget>;
  const auto m = static_cast<std::size_t>(rq.layer);
  const index_t w = rq.window, P = rq.prompt - w;
  const bool last = rq.layer == rq.layers - 1;
  prefill_plan plan;
  plan.budgets.assign(m + 1, 0);
  plan.layers.resize(m + 1);
  layer_plan& fresh = plan.layers[m];

  const auto allocate = [&] {
    allocate_budgets(budget, prefs, rq.layers, rq.total, P, plan.budgets);
    check_budgets(plan.budgets, P, rq.total);
  };
  // A select of layer l: every row keeps min(budget, P) tokens, or what the head
  // allocation gives it.
  const auto select = [&](std::size_t l, bool to_position, bool keep_scores) {
    layer_plan& lp = plan.layers[l];
    lp.action = layer_action::select;
    lp.prefix = std::min(plan.budgets[l], P);
    if constexpr (headwise) lp.row_prefix = row_lengths(static_cast<index_t>(l), lp.prefix);
    lp.to_position = to_position;
    lp.keep_scores = keep_scores;
  };

  if (rq.prompt <= rq.cache_size + w) {
    // The prompt already fits: nothing is cut, every budget is C - w (spec section 5).
    std::fill(plan.budgets.begin(), plan.budgets.end(), rq.cache_size - w);
    fresh.action = layer_action::copy_all;
    fresh.keep_scores = rq.accumulates;
    plan.record_budgets = true;
    plan.record_stage = rq.cascade;
  } else if (rq.cascade) {
    allocate();
    const bool to_position = last && rq.position_order;
    select(m, to_position, rq.accumulates || !to_position);
    for (std::size_t l = 0; l < m; ++l) {
      // Prefixes are in descending-indicator order: a smaller budget is a truncation
      // (head-wise: of each row, to the length the head allocation gives it now).
      const layer_state& s = state[l];
      if (!s.cut) continue;  // an uncut layer is never re-cut
      layer_plan& lp = plan.layers[l];
      lp.action = layer_action::truncate;
      lp.prefix = std::min(plan.budgets[l], s.held - w);
      if constexpr (headwise) lp.row_prefix = row_lengths(static_cast<index_t>(l), plan.budgets[l]);
      lp.to_position = to_position && s.by_indicator;
    }
    plan.record_budgets = plan.record_stage = true;
  } else if (!last) {
    // One-shot: layers are stored whole, with their scores, until the last one.
    fresh.action = layer_action::copy_all;
    fresh.keep_scores = true;
  } else {
    // One-shot: every layer is cut once, now; the last one straight from the caller.
    allocate();
    const bool keep_scores = rq.accumulates || !rq.position_order;
    for (std::size_t l = 0; l <= m; ++l) select(l, rq.position_order, keep_scores);
    plan.record_budgets = true;
  }
  return plan;
}

}  // namespace cake::detail
