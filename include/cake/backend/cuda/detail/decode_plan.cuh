// How a decode_scores call on CUDA is cut into blocks and what its kernels see: pure
// host functions shared by the launcher, the workspace-size query and the kernel
// emulation tests (tests/cuda/emulation). No launches here: host compilers parse it.
#pragma once

#include <cmath>
#include <cstdint>
#include <type_traits>

#include "../../../core/types.hpp"
#include "../../../core/view.hpp"
#include "dispatch.cuh"
#include "kernels/decode_scores.cuh"
#include "tuning.cuh"

namespace cake::cuda_detail {

struct DecodePlan {
  int tiles = 0;
  std::size_t workspace = 0;
};

inline DecodePlan plan_decode(index_t B, index_t H, index_t held) {
  DecodePlan pl;
  pl.tiles = static_cast<int>((held + tuning::decode_tile - 1) / tuning::decode_tile);
  workspace_carver c;
  c.take<float>(static_cast<std::size_t>(B * H * held));       // logits
  c.take<float2>(static_cast<std::size_t>(B * H * pl.tiles));  // per-tile normalisers
  pl.workspace = c.bytes();
  return pl;
}

// The kernels' view of one call, its scratch carved from `carve` (strides in elements).
template <class TQ, class TK>
DecodeParams<std::remove_const_t<TQ>, std::remove_const_t<TK>> decode_params(
    device_view<TQ, 3> q, device_view<TK, 4> k, device_view<float, 3> out, workspace_carver& carve,
    const DecodePlan& pl) {
  using K = std::remove_const_t<TK>;
  const index_t B = q.extent(0), H = q.extent(1), d = q.extent(2);
  const index_t Hkv = k.extent(1), held = k.extent(2);
  DecodeParams<std::remove_const_t<TQ>, K> p{};
  p.q = q.data_handle(), p.q_b = q.stride(0), p.q_h = q.stride(1);
  p.k = k.data_handle(), p.k_b = k.stride(0), p.k_g = k.stride(1), p.k_j = k.stride(2);
  p.out = out.data_handle(), p.o_b = out.stride(0), p.o_g = out.stride(1);
  p.logits = carve.take<float>(static_cast<std::size_t>(B * H * held));
  p.part = carve.take<float2>(static_cast<std::size_t>(B * H * pl.tiles));
  p.Hkv = static_cast<int>(Hkv), p.group = static_cast<int>(H / Hkv);
  p.held = static_cast<int>(held), p.c = static_cast<int>(out.extent(2)), p.d = static_cast<int>(d);
  p.tiles = pl.tiles;
  p.ld = static_cast<int>(d | 1);
  const auto aligned = [](std::int64_t elements) {
    return (elements * static_cast<std::int64_t>(sizeof(K))) % 16 == 0;
  };
  p.k_vec16 = reinterpret_cast<std::uintptr_t>(p.k) % 16 == 0 && aligned(k.stride(0)) &&
              aligned(k.stride(1)) && aligned(k.stride(2)) && aligned(d);
  p.sqrt_d = static_cast<float>(std::sqrt(static_cast<double>(d)));
  return p;
}

}  // namespace cake::cuda_detail
