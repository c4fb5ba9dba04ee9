// cake: the three policy concepts. Each is small on purpose: a policy is a value
// type whose hyperparameters are public data members, with a validate() that
// reports bad hyperparameters as a cake::status.
#pragma once

#include <concepts>
#include <span>
#include <type_traits>

#include "../error.hpp"
#include "../execution.hpp"
#include "types.hpp"
#include "view.hpp"

namespace cake {

// How much cache a layer wants, from its window statistics (spec section 2).
// needs_entropy / needs_variance let the statistics pass skip what is not read.
template <class P>
concept PreferencePolicy = std::is_trivially_copyable_v<P> && requires(const P p, LayerStats s) {
  { p(s) } -> std::convertible_to<double>;
  { P::needs_entropy } -> std::convertible_to<bool>;
  { P::needs_variance } -> std::convertible_to<bool>;
  { p.validate() } -> std::same_as<status>;
};

// How one global budget is sliced across layers (spec section 4).
// Called with the preferences of the layers seen so far (layers 0..m); writes
// budgets[0..m]. num_layers is the model's layer count (a pyramid needs it),
// total the budget T of all layers, ceiling the per-layer cap R = S - w.
// A budget policy with a static member `headwise = true` also slices each layer's
// budget across its KV heads (see policy/budget/headwise.hpp).
template <class P>
concept BudgetPolicy = std::is_trivially_copyable_v<P> &&
    requires(const P p, std::span<const float> prefs, index_t n, std::span<index_t> out) {
  { p(prefs, n, n, n, out) } -> std::same_as<void>;
  { p.validate() } -> std::same_as<status>;
};

// An indicator that scores tokens from their attention (spec section 3): a per-key
// score from the mean and unbiased variance of its attention over the rows the
// source names, then an average pool along the keys (pool_kernel, odd; 1 = none)
// and the mean over each GQA group. score() runs on the host and in CUDA epilogues
// alike, hence CAKE_HOST_DEVICE. The functional core (window_stats, decode_scores)
// takes these.
template <class P>
concept AttentionIndicator = std::is_trivially_copyable_v<P> && requires(const P p, float x) {
  { p.score(x, x) } -> std::convertible_to<float>;
  { p.pool_kernel } -> std::convertible_to<int>;
  { P::needs_variance } -> std::convertible_to<bool>;
  { p.validate() } -> std::same_as<status>;
};

// An indicator that scores a token from its position alone (StreamingLLM's sinks
// plus recency); the cache then needs no attention to choose what to keep.
template <class P>
concept PositionIndicator = std::is_trivially_copyable_v<P> && requires(const P p, index_t j) {
  { p.score_position(j) } -> std::convertible_to<float>;
  { p.validate() } -> std::same_as<status>;
};

// An indicator that is a source of its own: it scores tokens itself, on the backend
// the cache runs on (views in that backend's memory), through two hooks:
//   prefill_scores(exec, q_window, keys, out)  q_window (batch, q_heads, w, head_dim),
//                                              keys (batch, kv_heads, S, head_dim),
//                                              out (batch, kv_heads, S - w): the prefix
//   decode_scores(exec, q, keys, out)          q (batch, q_heads, head_dim), keys
//                                              (batch, kv_heads, held, head_dim), out
//                                              (batch, kv_heads, c): the first c held
// Higher scores are kept. The cache needs nothing else (examples/custom_source.cpp);
// the check below is the host, float form of the hooks.
template <class P>
concept SourceIndicator = std::is_trivially_copyable_v<P> &&
    requires(const P p, host_view<const float, 4> q4, host_view<const float, 3> q3,
             host_view<const float, 4> k, host_view<float, 3> out) {
  p.prefill_scores(host_policy{}, q4, k, out);
  p.decode_scores(host_policy{}, q3, k, out);
  { p.validate() } -> std::same_as<status>;
};

// Which tokens a layer keeps: higher score, kept first.
template <class P>
concept IndicatorPolicy = AttentionIndicator<P> || PositionIndicator<P> || SourceIndicator<P>;

// What head-wise budgets need of a budget policy: it says so (`headwise = true`) and
// gives the floor of tokens every head keeps of a layer budget b; the cache then
// splits each layer's budget across its rows from their scores (allocate_heads).
template <class P>
concept HeadwiseBudgetPolicy = BudgetPolicy<P> && requires(const P p, index_t b) {
  requires P::headwise;
  { p.head_floor(b) } -> std::convertible_to<index_t>;
};

// The source an indicator scores from (types.hpp): `custom` for a source indicator,
// `position` for a position indicator, else its static member `source`, else `window`.
template <IndicatorPolicy P>
inline constexpr indicator_source indicator_source_of = [] {
  if constexpr (SourceIndicator<P>)
    return indicator_source::custom;
  else if constexpr (PositionIndicator<P>)
    return indicator_source::position;
  else if constexpr (requires { P::source; })
    return static_cast<indicator_source>(P::source);
  else
    return indicator_source::window;
}();

}  // namespace cake
