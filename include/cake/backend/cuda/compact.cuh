// CUDA backend of cake::compact: 16-byte vectorised row gathers when the layout
// allows (head_dim * sizeof(T) a multiple of 16, 16-byte aligned rows), element-wise
// otherwise. In place (dst == src) needs strictly ascending keep rows, as on the
// host; the device cannot check that (or index ranges) without a synchronisation,
// so out-of-range indices are skipped rather than reported.
#pragma once

#include <cstdint>

#include "../../algorithm/compact.hpp"
#include "detail/dispatch.cuh"
#include "detail/kernels/compact.cuh"

namespace cake {
namespace cuda_detail {

template <class V, class T, class TI>
void launch_compact_as(const CompactParams<TI>& base, index_t B, index_t Hkv, index_t m, index_t d,
                       bool in_place, cudaStream_t stream) {
  CompactParams<TI> p = base;
  p.vecs = static_cast<int>(d * static_cast<index_t>(sizeof(T)) / static_cast<index_t>(sizeof(V)));
  if (in_place) {
    compact_in_place_kernel<V, TI, 4>
        <<<static_cast<unsigned>(B * Hkv), tuning::compact_threads, 0, stream>>>(p);
    check_launch("compact_in_place_kernel");
  } else {
    const std::int64_t total = B * Hkv * m * p.vecs;
    compact_kernel<V, TI>
        <<<grid_dim(total, tuning::compact_threads), tuning::compact_threads, 0, stream>>>(p,
                                                                                           total);
    check_launch("compact_kernel");
  }
}

template <class T, class TI>
void launch_compact(const cuda_policy& exec, device_view<const T, 4> src,
                    device_view<const TI, 3> keep, device_view<T, 4> dst) {
  const index_t B = src.extent(0), Hkv = src.extent(1), S = src.extent(2), d = src.extent(3);
  const index_t m = keep.extent(2);
  if (B * Hkv * m * d == 0) return;
  constexpr std::int64_t E = sizeof(T);
  CompactParams<TI> p{};
  p.src = reinterpret_cast<const char*>(src.data_handle());
  p.s_b = src.stride(0) * E, p.s_g = src.stride(1) * E, p.s_t = src.stride(2) * E;
  p.dst = reinterpret_cast<char*>(dst.data_handle());
  p.d_b = dst.stride(0) * E, p.d_g = dst.stride(1) * E, p.d_t = dst.stride(2) * E;
  p.keep = keep.data_handle();
  p.k_b = keep.stride(0), p.k_g = keep.stride(1), p.k_t = keep.stride(2);
  p.Hkv = static_cast<int>(Hkv), p.S = static_cast<int>(S), p.m = static_cast<int>(m);
  const bool in_place = static_cast<const void*>(p.src) == static_cast<const void*>(p.dst);
  const auto aligned16 = [](std::int64_t x) { return x % 16 == 0; };
  const bool vec16 = aligned16(d * E) && aligned16(reinterpret_cast<std::intptr_t>(p.src)) &&
                     aligned16(reinterpret_cast<std::intptr_t>(p.dst)) && aligned16(p.s_b) &&
                     aligned16(p.s_g) && aligned16(p.s_t) && aligned16(p.d_b) && aligned16(p.d_g) &&
                     aligned16(p.d_t);
  const cudaStream_t stream = stream_of(exec);
  if (vec16)
    launch_compact_as<uint4, T>(p, B, Hkv, m, d, in_place, stream);
  else
    launch_compact_as<T, T>(p, B, Hkv, m, d, in_place, stream);
}

}  // namespace cuda_detail

template <>
struct compact_backend<cuda_policy> {
  template <class T, class TI>
  static void run(const cuda_policy& exec, device_view<const T, 4> src,
                  device_view<const TI, 3> keep, device_view<T, 4> dst) {
    cuda_detail::launch_compact(exec, src, keep, dst);
  }
};

}  // namespace cake
