// cake: CAKE KV-cache eviction (Cascading and Adaptive KV cache Eviction with
// Layer Preferences, ICLR 2025). Umbrella header of the host library; compiles
// with a host C++20 compiler and the CCCL headers alone.
#pragma once

#include "algorithm/allocate_budgets.hpp"
#include "algorithm/compact.hpp"
#include "algorithm/decode_scores.hpp"
#include "algorithm/select_k.hpp"
#include "algorithm/window_stats.hpp"
#include "config.hpp"
#include "core/concepts.hpp"
#include "core/tensor_traits.hpp"
#include "core/types.hpp"
#include "core/view.hpp"
#include "error.hpp"
#include "execution.hpp"
#include "kv_cache.hpp"
#include "policy/budget/proportional.hpp"
#include "policy/budget/pyramid.hpp"
#include "policy/budget/uniform.hpp"
#include "policy/indicator/accumulated.hpp"
#include "policy/indicator/last_query.hpp"
#include "policy/indicator/mean_variance.hpp"
#include "policy/indicator/sink_recency.hpp"
#include "policy/indicator/window_mean.hpp"
#include "policy/preference/cake.hpp"
#include "policy/preference/uniform.hpp"
