// How a select_k call on CUDA is cut into blocks and what its kernel sees: pure host
// functions shared by the launcher, the workspace-size query and the kernel emulation
// tests (tests/cuda/emulation). No launches here: host compilers parse it.
#pragma once

#include <algorithm>
#include <bit>
#include <cstddef>
#include <cstdint>

#include "../../../algorithm/select_k.hpp"
#include "../../../core/types.hpp"
#include "../../../core/view.hpp"
#include "dispatch.cuh"
#include "kernels/select_k.cuh"
#include "tuning.cuh"

namespace cake::cuda_detail {

struct SelectPlan {
  int cluster = 1;
  int slice = 0;
  bool cached = false;
  bool block_sort = false;   // descending, sorted inside the kernel
  bool device_sort = false;  // descending, sorted by cub::DeviceSegmentedRadixSort
  int sort_items = 1;        // keys per thread of the in-kernel sort (k <= threads: one)
  int idx_bits = 1;
  std::size_t smem = 0;
  std::size_t sort_temp = 0;
  std::size_t workspace = 0;
};

inline bool device_has_clusters() { return device_compute_major() >= 9; }

// Shared memory a select block may use for its slice: at most 160 KiB, and on this
// device what is left of the opt-in maximum after the histogram and the kernel's static
// shared memory (scan / block sort, up to ~37 KiB): 99 KiB GPUs cache shorter slices.
inline constexpr std::size_t select_cache_cap = 160 * 1024;
inline std::size_t select_cache_budget_here() {
  return shared_memory_budget(select_cache_cap, tuning::select_bins * sizeof(unsigned) + 40 * 1024);
}

// Everything of the plan but the device-wide sort's scratch. `cache_budget`: bytes of
// shared memory a slice may be cached in (the workspace does not depend on it).
inline SelectPlan plan_select_blocks(index_t n, index_t k, select_order order, bool clusters,
                                     std::size_t cache_budget = select_cache_cap) {
  SelectPlan pl;
  // Long rows are spread over a cluster of 8 SMs (portable cluster size) on sm_90+.
  pl.cluster = (clusters && n > 16384) ? 8 : 1;
  // Slices start on 16-byte boundaries (4 keys), so that aligned rows load as float4.
  pl.slice = static_cast<int>((n + pl.cluster - 1) / pl.cluster);
  if (pl.cluster > 1) pl.slice = (pl.slice + 3) / 4 * 4;
  pl.cached = static_cast<std::size_t>(pl.slice) * sizeof(unsigned) <= cache_budget;
  pl.smem = (tuning::select_bins + (pl.cached ? static_cast<std::size_t>(pl.slice) : 0)) *
            sizeof(unsigned);
  pl.idx_bits = std::max(1, static_cast<int>(std::bit_width(static_cast<std::uint64_t>(n))));
  const bool desc = order == select_order::descending && k > 1;
  pl.block_sort = desc && k <= tuning::select_block_sort_max;
  pl.sort_items = k <= tuning::select_threads ? 1 : tuning::select_sort_items;
  pl.device_sort = desc && !pl.block_sort;
  return pl;
}

// The kernel's view of one call (rows of `scores` with unit stride along the keys).
template <class TI>
SelectParams<TI> select_params(device_view<const float, 2> scores, device_view<TI, 2> out,
                               const SelectPlan& pl) {
  SelectParams<TI> p{};
  p.scores = scores.data_handle();
  p.s_row = scores.stride(0);
  p.out = out.data_handle();
  p.o_row = out.stride(0);
  p.n = static_cast<int>(scores.extent(1));
  p.k = static_cast<int>(out.extent(1));
  p.slice = pl.slice;
  p.idx_bits = pl.idx_bits;
  p.cached = pl.cached;
  p.vec4 = reinterpret_cast<std::uintptr_t>(p.scores) % 16 == 0 &&
           (scores.extent(0) == 1 || p.s_row % 4 == 0) && (pl.cluster == 1 || pl.slice % 4 == 0);
  return p;
}

}  // namespace cake::cuda_detail
