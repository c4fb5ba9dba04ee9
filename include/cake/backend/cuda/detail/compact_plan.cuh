// Host-side planning of cake::compact on CUDA: the kernels' parameters from the views,
// and whether 16-byte accesses are allowed. Compiles with the host compiler, so the
// emulation tests launch the kernels with exactly the launchers' parameters.
#pragma once

#include <cstdint>

#include "../../../core/paged.hpp"
#include "../../../core/view.hpp"
#include "kernels/compact.cuh"

namespace cake::cuda_detail {

inline bool aligned16(std::int64_t x) { return x % 16 == 0; }

// The kernel parameters of a dense compaction (also what the emulation tests launch).
template <class T, class TI>
CompactParams<TI> compact_params(device_view<const T, 4> src, device_view<const TI, 3> keep,
                                 device_view<T, 4> dst, IndexGuardRecord* guard) {
  constexpr std::int64_t E = sizeof(T);
  CompactParams<TI> p{};
  p.src = reinterpret_cast<const char*>(src.data_handle());
  p.s_b = src.stride(0) * E, p.s_g = src.stride(1) * E, p.s_t = src.stride(2) * E;
  p.dst = reinterpret_cast<char*>(dst.data_handle());
  p.d_b = dst.stride(0) * E, p.d_g = dst.stride(1) * E, p.d_t = dst.stride(2) * E;
  p.keep.keep = keep.data_handle();
  p.keep.k_b = keep.stride(0), p.keep.k_g = keep.stride(1), p.keep.k_t = keep.stride(2);
  p.keep.heads = static_cast<int>(src.extent(1)), p.keep.S = static_cast<int>(src.extent(2));
  p.keep.m = static_cast<int>(keep.extent(2));
  // validate_compact admits an overlap only as the row prefix (same start and strides).
  p.keep.ascending = static_cast<const void*>(p.src) == static_cast<const void*>(p.dst);
  p.guard = guard;
  return p;
}

template <class T, class TI>
bool compact_vec16(const CompactParams<TI>& p, index_t d) {
  return aligned16(d * static_cast<index_t>(sizeof(T))) &&
         aligned16(reinterpret_cast<std::intptr_t>(p.src)) &&
         aligned16(reinterpret_cast<std::intptr_t>(p.dst)) && aligned16(p.s_b) &&
         aligned16(p.s_g) && aligned16(p.s_t) && aligned16(p.d_b) && aligned16(p.d_g) &&
         aligned16(p.d_t);
}

// The kernel parameters of a paged compaction; vecs is set for access unit V by the
// launcher (paged_vec16 says whether uint4 is allowed).
template <class T, class TI>
PagedCompactParams<TI> paged_params(device_view<T, 4> pool, const block_table<device_space>& table,
                                    device_view<const TI, 3> keep,
                                    device_view<const std::int32_t, 2> keep_lens,
                                    IndexGuardRecord* guard) {
  constexpr std::int64_t E = sizeof(T);
  PagedCompactParams<TI> p{};
  p.pool = reinterpret_cast<char*>(pool.data_handle());
  p.p_n = pool.stride(0) * E, p.p_h = pool.stride(1) * E, p.p_t = pool.stride(2) * E;
  p.indptr = table.indptr.data_handle();
  p.ids = table.ids.data_handle();
  p.keep.keep = keep.data_handle();
  p.keep.k_b = keep.stride(0), p.keep.k_g = keep.stride(1), p.keep.k_t = keep.stride(2);
  p.keep.lens = keep_lens.data_handle();
  p.keep.l_b = keep_lens.stride(0), p.keep.l_g = keep_lens.stride(1);
  p.keep.bounds = table.seq_lens.data_handle();
  p.keep.heads = static_cast<int>(pool.extent(1));
  p.keep.m = static_cast<int>(keep.extent(2));
  p.keep.ascending = true;
  p.num_blocks = static_cast<int>(pool.extent(0));
  p.block_size = static_cast<int>(pool.extent(2));
  p.vecs = static_cast<int>(pool.extent(3));
  p.guard = guard;
  return p;
}

template <class T, class TI>
bool paged_vec16(const PagedCompactParams<TI>& p, index_t d) {
  return aligned16(d * static_cast<index_t>(sizeof(T))) &&
         aligned16(reinterpret_cast<std::intptr_t>(p.pool)) && aligned16(p.p_n) &&
         aligned16(p.p_h) && aligned16(p.p_t);
}

}  // namespace cake::cuda_detail
