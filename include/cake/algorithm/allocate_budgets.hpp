// cake::allocate_budgets: slice the total budget across the layers seen so far
// with a budget policy, after checking the inputs. Host only: budgets are L
// integers that the host needs anyway.
#pragma once

#include <span>

#include "../core/concepts.hpp"
#include "../policy/budget/proportional.hpp"

namespace cake {

// preferences: (layers seen); budgets: (>= layers seen), written for those layers.
template <BudgetPolicy Budget>
void allocate_budgets(const Budget& policy, std::span<const float> preferences, index_t num_layers,
                      index_t total, index_t ceiling, std::span<index_t> budgets) {
  policy.validate().throw_if_error();
  detail::validate_allocation(preferences, num_layers, total, ceiling, budgets).throw_if_error();
  policy(preferences, num_layers, total, ceiling, budgets);
}

}  // namespace cake
