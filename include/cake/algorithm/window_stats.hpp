// cake::window_stats: from the last w query rows and all keys of one layer,
// the eviction indicator of every prefix key and the layer's entropy and
// variance sums (spec sections 1-3), without materialising the [B,H,w,S]
// attention. cake::window_stats_from_attention does the same from attention
// weights a caller already has.
#pragma once

#include <cmath>

#include "../core/concepts.hpp"
#include "../core/tensor_traits.hpp"
#include "../execution.hpp"

namespace cake {

// Which layer statistics to compute; a preference policy that reads neither
// lets the pass skip the logarithms and the variance reduction.
struct StatsRequest {
  bool entropy = true;
  bool variance = true;
  template <PreferencePolicy P>
  static constexpr StatsRequest for_preference() {
    return {P::needs_entropy, P::needs_variance};
  }
};

// Implemented per backend: window_stats_backend<host_policy> below,
// window_stats_backend<cuda_policy> in cake.cuh.
template <class Exec>
struct window_stats_backend {
  static_assert(sizeof(Exec) == 0,
                "cake: no window_stats for this execution policy (include <cake/cake.cuh> "
                "for cake::cuda)");
};

template <class TQ, class TK, class Space>
status validate_window_stats(view<TQ, 4, Space> q_window, view<TK, 4, Space> keys,
                             view<float, 3, Space> indicator_out, view<float, 1, Space> stats_out) {
  const index_t B = q_window.extent(0), H = q_window.extent(1), w = q_window.extent(2),
                d = q_window.extent(3);
  const index_t Hkv = keys.extent(1), S = keys.extent(2);
  CAKE_CHECK(keys.extent(0) == B, "cake.keys.batch", "keys must have batch = ", B,
             " (from q_window), got ", keys.extent(0));
  CAKE_CHECK(keys.extent(3) == d, "cake.keys.head_dim", "keys must have head_dim = ", d,
             " (from q_window), got ", keys.extent(3));
  CAKE_CHECK(B >= 1 && H >= 1 && d >= 1, "cake.q_window.shape",
             "q_window (batch, q_heads, window, head_dim) must be non-empty, got (", B, ", ", H,
             ", ", w, ", ", d, ")");
  CAKE_CHECK(Hkv >= 1 && H % Hkv == 0, "cake.keys.kv_heads",
             "q_heads must be a multiple of kv_heads: q_heads = ", H, ", kv_heads = ", Hkv);
  CAKE_CHECK(w >= 2 && w <= S, "cake.q_window.window", "window must be in [2, S = ", S, "], got ",
             w);
  CAKE_CHECK(inner_contiguous(q_window), "cake.q_window.layout",
             "q_window must have unit stride along head_dim, got stride ", q_window.stride(3));
  CAKE_CHECK(inner_contiguous(keys), "cake.keys.layout",
             "keys must have unit stride along head_dim, got stride ", keys.stride(3));
  CAKE_CHECK(indicator_out.extent(0) == B && indicator_out.extent(1) == Hkv &&
                 indicator_out.extent(2) == S - w,
             "cake.indicator_out.shape", "indicator_out must be (batch, kv_heads, S - window) = (",
             B, ", ", Hkv, ", ", S - w, "), got (", indicator_out.extent(0), ", ",
             indicator_out.extent(1), ", ", indicator_out.extent(2), ")");
  CAKE_CHECK(indicator_out.extent(2) <= 1 || indicator_out.stride(2) == 1,
             "cake.indicator_out.layout", "indicator_out must have unit stride along tokens");
  CAKE_CHECK(stats_out.extent(0) >= 2, "cake.stats_out.shape",
             "stats_out must hold 2 values (entropy, variance), got ", stats_out.extent(0));
  return status::success();
}

namespace detail {
// The checks every window_stats entry point makes (both backends, with or without a
// workspace or log-sum-exp): memory spaces, the indicator's hyperparameters, shapes.
template <class Exec, class Ind, class QV, class KV, class IOV, class SOV>
void check_window_stats_args(const Ind& indicator, const QV& q, const KV& k, const IOV& io,
                             const SOV& so) {
  require_space<Exec, QV, KV, IOV, SOV>();
  indicator.validate().throw_if_error();
  validate_window_stats<const typename QV::element_type, const typename KV::element_type,
                        typename Exec::memory_space>(q, k, io, so)
      .throw_if_error();
}
}  // namespace detail

// q_window:      (batch, q_heads, window, head_dim), rotary embedding applied
// keys:          (batch, kv_heads, tokens, head_dim), any strides with unit head_dim stride
// indicator_out: (batch, kv_heads, tokens - window)
// stats_out:     (2) = {entropy, variance} of the layer, summed over batch and heads
template <class Exec, tensor_like Q, tensor_like K, AttentionIndicator Ind, tensor_like IO,
          tensor_like SO>
void window_stats(const Exec& exec, Q&& q_window, K&& keys, const Ind& indicator,
                  IO&& indicator_out, SO&& stats_out, StatsRequest request = {}) {
  auto q = as_view(q_window);
  auto k = as_view(keys);
  auto io = as_view(indicator_out);
  auto so = as_view(stats_out);
  detail::check_window_stats_args<Exec>(indicator, q, k, io, so);
  window_stats_backend<Exec>::run(exec, q, k, indicator, io, so, request);
}

// The checks of window_stats_from_attention (shared by every backend's entry points).
template <class VA, class VO, class VS>
status validate_window_stats_from_attention(const VA& a, const VO& io, const VS& so) {
  const index_t B = a.extent(0), H = a.extent(1), w = a.extent(2), S = a.extent(3);
  const index_t Hkv = io.extent(1);
  CAKE_CHECK(Hkv >= 1 && H % Hkv == 0, "cake.attention.kv_heads",
             "q_heads must be a multiple of kv_heads (indicator_out extent 1): q_heads = ", H,
             ", kv_heads = ", Hkv);
  CAKE_CHECK(w >= 2 && w <= S, "cake.attention.window", "window must be in [2, S = ", S, "], got ",
             w);
  CAKE_CHECK(inner_contiguous(a), "cake.attention.layout",
             "attention must have unit stride along tokens, got stride ", a.stride(3));
  CAKE_CHECK(io.extent(0) == B && io.extent(2) == S - w, "cake.indicator_out.shape",
             "indicator_out must be (batch, kv_heads, S - window) = (", B, ", ", Hkv, ", ", S - w,
             "), got (", io.extent(0), ", ", io.extent(1), ", ", io.extent(2), ")");
  CAKE_CHECK(io.extent(2) <= 1 || io.stride(2) == 1, "cake.indicator_out.layout",
             "indicator_out must have unit stride along tokens");
  CAKE_CHECK(so.extent(0) >= 2, "cake.stats_out.shape",
             "stats_out must hold 2 values (entropy, variance), got ", so.extent(0));
  return status::success();
}

// attention: (batch, q_heads, window, tokens), softmax rows as the model computed
// them (causal mask inside the window already applied). kv_heads comes from
// indicator_out's extent 1.
template <class Exec, tensor_like A, AttentionIndicator Ind, tensor_like IO, tensor_like SO>
void window_stats_from_attention(const Exec& exec, A&& attention, const Ind& indicator,
                                 IO&& indicator_out, SO&& stats_out, StatsRequest request = {}) {
  auto a = as_view(attention);
  auto io = as_view(indicator_out);
  auto so = as_view(stats_out);
  require_space<Exec, decltype(a), decltype(io), decltype(so)>();
  indicator.validate().throw_if_error();
  validate_window_stats_from_attention(a, io, so).throw_if_error();
  window_stats_backend<Exec>::run_from_attention(exec, a, indicator, io, so, request);
}

}  // namespace cake

#include "../backend/host/window_stats.hpp"
