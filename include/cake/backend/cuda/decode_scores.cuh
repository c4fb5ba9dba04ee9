// CUDA backend of cake::decode_scores, plus for cake::cuda:
//   decode_scores_workspace_size(batch, q_heads, kv_heads, held)  bytes of scratch
//   decode_scores(exec, q, keys, indicator, scores, workspace)    the allocation-free call
#pragma once

#include <cmath>

#include "../../algorithm/decode_scores.hpp"
#include "detail/decode_plan.cuh"
#include "detail/dispatch.cuh"
#include "detail/kernels/decode_scores.cuh"

namespace cake {
namespace cuda_detail {

template <class TQ, class TK, class Ind>
void launch_decode_scores(const cuda_policy& exec, device_view<TQ, 3> q, device_view<TK, 4> k,
                          const Ind& indicator, device_view<float, 3> out, cuda_workspace given) {
  using Q = std::remove_const_t<TQ>;
  using K = std::remove_const_t<TK>;
  const index_t B = q.extent(0), H = q.extent(1), d = q.extent(2);
  const index_t Hkv = k.extent(1), held = k.extent(2), c = out.extent(2);
  if (B * Hkv == 0 || c == 0) return;
  const int half = indicator.pool_kernel / 2;
  CAKE_EXPECTS(half < tuning::decode_threads, "cake.indicator.pool_kernel",
               "the CUDA decode scores support pool_kernel < ", 2 * tuning::decode_threads,
               ", got ", indicator.pool_kernel);
  CAKE_EXPECTS(B * Hkv <= 65535, "cake.decode.keys",
               "the CUDA decode scores support batch * kv_heads <= 65535, got ", B * Hkv);
  // The group's queries and a tile of keys, as float, must fit one block's shared memory
  // on this device.
  const std::size_t smem_budget = shared_memory_budget(200 * 1024, 4096);
  CAKE_EXPECTS(
      static_cast<std::size_t>(decode_logits_smem(static_cast<int>(H / Hkv), static_cast<int>(d),
                                                  static_cast<int>(d | 1))) <= smem_budget,
      "cake.decode.keys", "the CUDA decode scores need (q_heads / kv_heads) * head_dim",
      " small enough for shared memory (", smem_budget, " bytes here with a tile of ",
      tuning::decode_tile, " keys), got ", H / Hkv, " * ", d);
  const DecodePlan pl = plan_decode(B, H, held);
  const cudaStream_t stream = stream_of(exec);
  scoped_workspace ws(given, pl.workspace, exec, "decode_scores");
  workspace_carver carve(ws.get());

  const DecodeParams<Q, K> p = decode_params(q, k, out, carve, pl);

  const auto smem = static_cast<std::size_t>(decode_logits_smem(p.group, p.d, p.ld));
  auto* logits_kernel = &decode_logits_kernel<Q, K>;
  allow_shared_memory(logits_kernel, smem, "decode_logits_kernel");
  const auto rows = static_cast<unsigned>(B * Hkv);
  logits_kernel<<<dim3(static_cast<unsigned>(pl.tiles), rows), tuning::decode_threads, smem,
                  stream>>>(p);
  check_launch("decode_logits_kernel");
  const auto finish_smem = static_cast<std::size_t>(decode_finish_smem(p.group, half));
  auto* finish_kernel = &decode_finish_kernel<Q, K, Ind>;
  allow_shared_memory(finish_kernel, finish_smem, "decode_finish_kernel");
  finish_kernel<<<dim3(grid_dim(c, tuning::decode_chunk), rows), tuning::decode_threads,
                  finish_smem, stream>>>(p, indicator);
  check_launch("decode_finish_kernel");
}

}  // namespace cuda_detail

template <>
struct decode_scores_backend<cuda_policy> {
  template <class TQ, class TK, class Ind>
  static void run(const cuda_policy& exec, device_view<TQ, 3> q, device_view<TK, 4> k,
                  const Ind& indicator, device_view<float, 3> out, cuda_workspace ws = {}) {
    cuda_detail::launch_decode_scores(exec, q, k, indicator, out, ws);
  }
};

// Bytes of scratch cake::decode_scores on cake::cuda needs: the group's logits of
// every held key and one normaliser per tile of keys.
inline std::size_t decode_scores_workspace_size(index_t batch, index_t q_heads, index_t kv_heads,
                                                index_t held) {
  if (batch * kv_heads == 0) return 0;
  return cuda_detail::plan_decode(batch, q_heads, held).workspace;
}

// The allocation-free call: as cake::decode_scores, with a workspace of at least
// decode_scores_workspace_size(...) bytes (an empty one allocates, stream-ordered).
template <tensor_like Q, tensor_like K, AttentionIndicator Ind, tensor_like Out>
void decode_scores(const cuda_policy& exec, Q&& q, K&& keys, const Ind& indicator, Out&& scores,
                   cuda_workspace workspace) {
  auto qv = as_view(q);
  auto kv = as_view(keys);
  auto so = as_view(scores);
  detail::check_decode_scores_args<cuda_policy>(indicator, qv, kv, so);
  decode_scores_backend<cuda_policy>::run(exec, qv, kv, indicator, so, workspace);
}

}  // namespace cake
