// CUDA backend of cake::decode_scores.
#pragma once

#include <cmath>

#include "../../algorithm/decode_scores.hpp"
#include "detail/dispatch.cuh"
#include "detail/kernels/decode_scores.cuh"

namespace cake {

template <>
struct decode_scores_backend<cuda_policy> {
  template <class TQ, class TK, class Ind>
  static void run(const cuda_policy& exec, device_view<TQ, 3> q, device_view<TK, 4> k,
                  const Ind& indicator, device_view<float, 3> out) {
    using Q = std::remove_const_t<TQ>;
    using K = std::remove_const_t<TK>;
    const index_t B = q.extent(0), H = q.extent(1), d = q.extent(2);
    const index_t Hkv = k.extent(1), held = k.extent(2), c = out.extent(2);
    if (B * Hkv == 0 || c == 0) return;
    const int half = indicator.pool_kernel / 2;
    CAKE_EXPECTS(half < cuda_detail::tuning::decode_threads, "cake.indicator.pool_kernel",
                 "the CUDA decode scores support pool_kernel < ",
                 2 * cuda_detail::tuning::decode_threads, ", got ", indicator.pool_kernel);
    cuda_detail::DecodeParams<Q, K> p{};
    p.q = q.data_handle(), p.q_b = q.stride(0), p.q_h = q.stride(1);
    p.k = k.data_handle(), p.k_b = k.stride(0), p.k_g = k.stride(1), p.k_j = k.stride(2);
    p.out = out.data_handle(), p.o_b = out.stride(0), p.o_g = out.stride(1);
    p.Hkv = static_cast<int>(Hkv), p.group = static_cast<int>(H / Hkv);
    p.held = static_cast<int>(held), p.c = static_cast<int>(c), p.d = static_cast<int>(d);
    p.sqrt_d = static_cast<float>(std::sqrt(static_cast<double>(d)));
    std::size_t smem = static_cast<std::size_t>(d + half) * sizeof(float);
    const std::size_t with_cache = smem + static_cast<std::size_t>(held) * sizeof(float);
    p.cache_scores = with_cache <= 160 * 1024;
    if (p.cache_scores) smem = with_cache;
    auto* kernel = &cuda_detail::decode_scores_kernel<Q, K, Ind>;
    cuda_detail::allow_shared_memory(kernel, smem, "decode_scores_kernel");
    kernel<<<static_cast<unsigned>(B * Hkv), cuda_detail::tuning::decode_threads, smem,
             cuda_detail::stream_of(exec)>>>(p, indicator);
    cuda_detail::check_launch("decode_scores_kernel");
  }
};

}  // namespace cake
