// Head-wise allocation inside a layer (Ada-KV: Feng et al., 2024, "Ada-KV: Optimizing
// KV Cache Eviction by Adaptive Budget Allocation"), on top of any layer allocation.
// The layer policy slices the total across layers as usual; within a layer the
// budget of b tokens per (batch, kv-head) row becomes b * kv_heads tokens per batch
// entry, shared by its KV heads: every head keeps its floor(min_share * b) best
// tokens, and the rest go to the best remaining tokens of any head (see
// cake::allocate_heads). Rows then hold different numbers of tokens; KvCache stores
// them padded to the longest row and reports each row's length (row_lengths()).
//
//   HeadwiseBudget<ProportionalBudget>  CAKE's layer budgets x Ada-KV's head budgets
//   HeadwiseBudget<UniformBudget>       Ada-SnapKV
#pragma once

#include <cmath>

#include "proportional.hpp"

namespace cake {

template <BudgetPolicy Layer = ProportionalBudget>
struct HeadwiseBudget {
  Layer layer{};           // the allocation across layers
  float min_share = 0.2f;  // each head keeps at least floor(min_share * b) tokens
  static constexpr bool headwise = true;

  void operator()(std::span<const float> prefs, index_t num_layers, index_t total, index_t ceiling,
                  std::span<index_t> out) const {
    layer(prefs, num_layers, total, ceiling, out);
  }
  // The per-head floor for a layer budget b. In float, so that min_share = 0.7f of 10 is 7 (0.7f
  // widened to double is 0.69999998..., whose product with 10 floors to 6).
  index_t head_floor(index_t b) const {
    return static_cast<index_t>(std::floor(min_share * static_cast<float>(b)));
  }
  status validate() const {
    CAKE_TRY(layer.validate());
    CAKE_CHECK(std::isfinite(min_share) && min_share >= 0.0f && min_share <= 1.0f,
               "cake.budget.min_share", "min_share must be in [0, 1], got ", min_share);
    return status::success();
  }
};

static_assert(HeadwiseBudgetPolicy<HeadwiseBudget<>>);

// Whether a budget policy slices each layer across its heads.
template <class B>
inline constexpr bool is_headwise_budget = HeadwiseBudgetPolicy<B>;

}  // namespace cake
