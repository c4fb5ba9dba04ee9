// cake::decode_scores: the eviction scores of held tokens for one decoding step
// (spec section 7): the new token's attention over all held keys (softmax in
// float32, no mask), the indicator policy's score with no variance, the average
// pool in cache order over the candidates, and the mean over each GQA group.
#pragma once

#include "../core/concepts.hpp"
#include "../core/tensor_traits.hpp"
#include "../execution.hpp"

namespace cake {

template <class Exec>
struct decode_scores_backend {
  static_assert(sizeof(Exec) == 0,
                "cake: no decode_scores for this execution policy (include <cake/cake.cuh> for "
                "cake::cuda)");
};

namespace detail {

// The checks every backend's decode_scores runs first.
template <class Exec, class Ind, class QV, class KV, class SO>
void check_decode_scores_args(const Ind& indicator, const QV& qv, const KV& kv, const SO& so) {
  require_space<Exec, QV, KV, SO>();
  indicator.validate().throw_if_error();
  const index_t B = qv.extent(0), H = qv.extent(1), d = qv.extent(2);
  const index_t Hkv = kv.extent(1), n = kv.extent(2);
  CAKE_EXPECTS(kv.extent(0) == B && kv.extent(3) == d, "cake.decode.keys",
               "keys must be (batch = ", B, ", kv_heads, held, head_dim = ", d, "), got (",
               kv.extent(0), ", ", Hkv, ", ", n, ", ", kv.extent(3), ")");
  CAKE_EXPECTS(Hkv >= 1 && H % Hkv == 0, "cake.decode.kv_heads",
               "q_heads must be a multiple of kv_heads: q_heads = ", H, ", kv_heads = ", Hkv);
  CAKE_EXPECTS(so.extent(0) == B && so.extent(1) == Hkv && so.extent(2) <= n, "cake.decode.scores",
               "scores must be (", B, ", ", Hkv, ", c <= ", n, "), got (", so.extent(0), ", ",
               so.extent(1), ", ", so.extent(2), ")");
  CAKE_EXPECTS(
      inner_contiguous(qv) && inner_contiguous(kv) && (so.extent(2) <= 1 || so.stride(2) == 1),
      "cake.decode.layout", "q, keys and scores must have unit innermost stride");
}

}  // namespace detail

// q:      (batch, q_heads, head_dim)             the new token's query
// keys:   (batch, kv_heads, held, head_dim)      every held key, the new one included
// scores: (batch, kv_heads, candidates)          candidates = the first held tokens in cache order
template <class Exec, tensor_like Q, tensor_like K, AttentionIndicator Ind, tensor_like Out>
void decode_scores(const Exec& exec, Q&& q, K&& keys, const Ind& indicator, Out&& scores) {
  auto qv = as_view(q);
  auto kv = as_view(keys);
  auto so = as_view(scores);
  detail::check_decode_scores_args<Exec>(indicator, qv, kv, so);
  decode_scores_backend<Exec>::run(exec, qv, kv, indicator, so);
}

}  // namespace cake

#include "../backend/host/decode_scores.hpp"
