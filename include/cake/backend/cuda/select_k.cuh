// CUDA backend of cake::select_k, plus for cake::cuda:
//   select_k_workspace_size(rows, n, k, order)      bytes of scratch a call needs
//   select_k(exec, scores, out, order, workspace)   the allocation-free call
// Only descending order with k > 4096 needs scratch (a device-wide segmented sort
// of the winners); every other call needs none.
#pragma once

#include <cub/device/device_segmented_radix_sort.cuh>

#include <algorithm>
#include <bit>
#include <climits>

#include "../../algorithm/select_k.hpp"
#include "detail/dispatch.cuh"
#include "detail/kernels/select_k.cuh"
#include "detail/select_plan.cuh"

namespace cake {
namespace cuda_detail {

inline SelectPlan plan_select(index_t rows, index_t n, index_t k, select_order order, bool clusters,
                              std::size_t cache_budget = select_cache_cap) {
  SelectPlan pl = plan_select_blocks(n, k, order, clusters, cache_budget);
  if (pl.device_sort) {
    CAKE_EXPECTS(rows * k <= INT_MAX, "cake.select_k.k", "descending order with k > ",
                 tuning::select_block_sort_max, " on CUDA needs rows * k <= ", INT_MAX, ", got ",
                 rows * k);
    const int items = static_cast<int>(rows * k);
    check(cub::DeviceSegmentedRadixSort::SortKeysDescending(
              nullptr, pl.sort_temp, static_cast<const std::uint64_t*>(nullptr),
              static_cast<std::uint64_t*>(nullptr), items, static_cast<int>(rows),
              static_cast<const int*>(nullptr), static_cast<const int*>(nullptr), 0,
              32 + pl.idx_bits),
          "cub::DeviceSegmentedRadixSort (size query)");
    workspace_carver c;
    c.take<std::uint64_t>(static_cast<std::size_t>(items));
    c.take<std::uint64_t>(static_cast<std::size_t>(items));
    c.take<int>(static_cast<std::size_t>(rows + 1));
    c.take<char>(pl.sort_temp);
    pl.workspace = c.bytes();
  }
  return pl;
}

template <class TI, int CLUSTER, int SORT_ITEMS>
void launch_select_kernel(const SelectParams<TI>& p, index_t rows, std::size_t smem,
                          cudaStream_t stream) {
  auto* kernel = &select_k_kernel<TI, CLUSTER, SORT_ITEMS>;
  allow_shared_memory(kernel, smem, "select_k_kernel");
  cudaLaunchConfig_t cfg{};
  cfg.gridDim = dim3(static_cast<unsigned>(rows * CLUSTER));
  cfg.blockDim = dim3(tuning::select_threads);
  cfg.dynamicSmemBytes = smem;
  cfg.stream = stream;
  cudaLaunchAttribute attr[1];
  attr[0].id = cudaLaunchAttributeClusterDimension;
  attr[0].val.clusterDim.x = CLUSTER;
  attr[0].val.clusterDim.y = 1;
  attr[0].val.clusterDim.z = 1;
  cfg.attrs = attr;
  cfg.numAttrs = CLUSTER > 1 ? 1 : 0;
  check(cudaLaunchKernelEx(&cfg, kernel, p), "select_k_kernel");
}

template <class TI>
void launch_select_k(const cuda_policy& exec, device_view<const float, 2> scores,
                     device_view<TI, 2> out, select_order order, cuda_workspace given) {
  const index_t rows = scores.extent(0), n = scores.extent(1), k = out.extent(1);
  if (rows == 0 || k == 0) return;
  CAKE_EXPECTS(n < (index_t{1} << 31), "cake.select_k.n",
               "rows on CUDA must hold fewer than 2^31 keys, got ", n);
  const SelectPlan pl =
      plan_select(rows, n, k, order, device_has_clusters(), select_cache_budget_here());
  const cudaStream_t stream = stream_of(exec);
  scoped_workspace ws(given, pl.workspace, exec, "select_k");
  workspace_carver c(ws.get());

  SelectParams<TI> p = select_params(scores, out, pl);
  std::uint64_t* sorted = nullptr;
  void* sort_temp = nullptr;
  if (pl.device_sort) {
    p.keys = c.take<std::uint64_t>(static_cast<std::size_t>(rows * k));
    sorted = c.take<std::uint64_t>(static_cast<std::size_t>(rows * k));
    p.offsets = c.take<int>(static_cast<std::size_t>(rows + 1));
    sort_temp = c.take<char>(pl.sort_temp);
  }
  constexpr int SORT = tuning::select_sort_items;
  const auto launch = [&]<int CLUSTER>() {
    if (!pl.block_sort)
      launch_select_kernel<TI, CLUSTER, 0>(p, rows, pl.smem, stream);
    else if (pl.sort_items == 1)
      launch_select_kernel<TI, CLUSTER, 1>(p, rows, pl.smem, stream);
    else
      launch_select_kernel<TI, CLUSTER, SORT>(p, rows, pl.smem, stream);
  };
  if (pl.cluster > 1)
    launch.template operator()<8>();
  else
    launch.template operator()<1>();
  if (pl.device_sort) {
    std::size_t temp = pl.sort_temp;
    const int items = static_cast<int>(rows * k);
    check(cub::DeviceSegmentedRadixSort::SortKeysDescending(
              sort_temp, temp, p.keys, sorted, items, static_cast<int>(rows), p.offsets,
              p.offsets + 1, 0, 32 + pl.idx_bits, stream),
          "cub::DeviceSegmentedRadixSort::SortKeysDescending");
    unpack_indices_kernel<TI><<<grid_dim(items, 256), 256, 0, stream>>>(
        sorted, static_cast<int>(rows), static_cast<int>(k), pl.idx_bits, p.out, p.o_row);
    check_launch("unpack_indices_kernel");
  }
}

}  // namespace cuda_detail

template <>
struct select_k_backend<cuda_policy> {
  template <class TS, class TI>
  static void run(const cuda_policy& exec, device_view<TS, 2> scores, device_view<TI, 2> out,
                  select_order order, cuda_workspace ws = {}) {
    device_view<const float, 2> s(scores.data_handle(), scores.mapping());
    cuda_detail::launch_select_k(exec, s, out, order, ws);
  }
};

// Bytes of scratch cake::select_k on cake::cuda needs (0 for most calls).
inline std::size_t select_k_workspace_size(index_t rows, index_t n, index_t k,
                                           select_order order = select_order::descending) {
  if (rows == 0 || k == 0) return 0;
  return cuda_detail::plan_select(rows, n, k, order, cuda_detail::device_has_clusters()).workspace;
}

// The allocation-free call: as cake::select_k, with a workspace of at least
// select_k_workspace_size(...) bytes (an empty one allocates when needed).
template <tensor_like Scores, tensor_like Out>
void select_k(const cuda_policy& exec, Scores&& scores, Out&& out, select_order order,
              cuda_workspace workspace) {
  auto s = as_view(scores);
  auto o = as_view(out);
  require_space<cuda_policy, decltype(s), decltype(o)>();
  static_assert(std::is_same_v<std::remove_const_t<typename decltype(s)::element_type>, float>,
                "cake::select_k: scores must be float");
  static_assert(std::is_integral_v<typename decltype(o)::element_type>,
                "cake::select_k: out must hold integer indices");
  validate_select_k(s, o).throw_if_error();
  select_k_backend<cuda_policy>::run(exec, s, o, order, workspace);
}

}  // namespace cake
