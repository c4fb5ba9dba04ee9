// Kernel of cake::select_k on CUDA: a radix select (11 + 11 + 10 bits, MSB first) on
// the order-preserving integer image of the scores, one launch for all rows.
//
// A row is owned by one thread block, or on sm_90+ by a cluster of CLUSTER blocks
// (each holds a contiguous slice; histograms are summed through distributed shared
// memory), so that a long row is spread over several SMs. A slice that fits in
// shared memory is read from global memory once and every later pass runs on chip.
//
// Per pass every block histograms the digit of the keys still tied with the prefix
// found so far, and BlockScan over the (reversed) bins finds the digit holding the
// k-th largest key. After three passes the threshold T is exact; keys above T are
// kept, and of the keys equal to T the `need` lowest indices (the host's tie rule).
// The winners are written in ascending index order with warp ballots (each warp
// owns a contiguous sub-slice), then, for descending order, sorted in the block
// (BlockRadixSort on (key, ~index), k <= SORT capacity) or by the launcher with
// cub::DeviceSegmentedRadixSort.
#pragma once

#ifndef CAKE_CUDA_EMULATION  // the emulator brings its own block primitives, no clusters
#include <cooperative_groups.h>
#include <cub/block/block_radix_sort.cuh>
#include <cub/block/block_scan.cuh>
#endif

#include <cstdint>

#include "../block/common.cuh"
#include "../tuning.cuh"

#if defined(CAKE_CUDA_EMULATION)
#define CAKE_CUDA_CLUSTERS 0
#elif !defined(__CUDA_ARCH__) || __CUDA_ARCH__ >= 900
#define CAKE_CUDA_CLUSTERS 1
#else
#define CAKE_CUDA_CLUSTERS 0
#endif

namespace cake::cuda_detail {

template <class TI>
struct SelectParams {
  const float* scores;  // (rows, n), unit stride along n
  std::int64_t s_row;
  TI* out;  // (rows, k), unit stride along k
  std::int64_t o_row;
  std::uint64_t* keys;  // (rows, k) composite keys for the device-wide sort, or null
  int* offsets;         // (rows + 1) segment offsets for that sort, or null
  int n, k;
  int slice;     // keys per block of a row's cluster
  int idx_bits;  // bits of an index (n <= 2^idx_bits)
  bool cached;   // the slice lives in shared memory
  bool vec4;     // every slice starts 16-byte aligned: the cache is filled with float4 loads
};

// (key, index) as one integer whose descending order is (score desc, index asc).
__device__ __forceinline__ std::uint64_t composite_key(std::uint32_t bits, std::uint32_t idx,
                                                       int idx_bits) {
  const std::uint64_t mask = (std::uint64_t{1} << idx_bits) - 1;
  return (static_cast<std::uint64_t>(bits) << idx_bits) | (mask - idx);
}
__device__ __forceinline__ std::uint32_t composite_index(std::uint64_t key, int idx_bits) {
  const std::uint64_t mask = (std::uint64_t{1} << idx_bits) - 1;
  return static_cast<std::uint32_t>(mask - (key & mask));
}

template <int CLUSTER>
__device__ __forceinline__ void cluster_barrier() {
  if constexpr (CLUSTER > 1) {
#if CAKE_CUDA_CLUSTERS
    cooperative_groups::this_cluster().sync();
#else
    __trap();  // never launched: the launcher uses clusters on sm_90+ only
#endif
  } else {
    __syncthreads();
  }
}

// The same shared variable in block `rank` of this cluster.
template <int CLUSTER, class T>
__device__ __forceinline__ T* cluster_peer(T* p, int rank) {
  if constexpr (CLUSTER > 1) {
#if CAKE_CUDA_CLUSTERS
    return cooperative_groups::this_cluster().map_shared_rank(p, static_cast<unsigned>(rank));
#else
    (void)rank;
    __trap();
    return p;
#endif
  } else {
    (void)rank;
    return p;
  }
}

template <class TI, int CLUSTER, int SORT_ITEMS>
__global__ void __launch_bounds__(tuning::select_threads) select_k_kernel(SelectParams<TI> p) {
  constexpr int THREADS = tuning::select_threads;
  constexpr int BINS = tuning::select_bins;
  constexpr int WARPS = THREADS / 32;
  static_assert(BINS == 2 * THREADS, "each thread scans two bins");
  using Scan = cub::BlockScan<unsigned, THREADS>;
  struct NoSort {
    struct TempStorage {};
  };
  using Sort = std::conditional_t<
      (SORT_ITEMS > 0),
      cub::BlockRadixSort<std::uint64_t, THREADS, (SORT_ITEMS > 0 ? SORT_ITEMS : 1)>, NoSort>;
  __shared__ union {
    typename Scan::TempStorage scan;
    typename Sort::TempStorage sort;
  } tmp;
  __shared__ unsigned warp_gt[WARPS], warp_eq[WARPS];
  __shared__ unsigned block_count[2];  // this block's (above T, equal to T), read by peers
  __shared__ unsigned found_digit, found_need;
  CAKE_DYNAMIC_SHARED(16, dyn_bytes);
  unsigned* dyn = reinterpret_cast<unsigned*>(dyn_bytes);
  unsigned* hist = dyn;          // (BINS)
  unsigned* cache = dyn + BINS;  // (slice) ordered bits, when cached

  const int rank = static_cast<int>(blockIdx.x % CLUSTER);
  const int row = static_cast<int>(blockIdx.x / CLUSTER);
  const float* x = p.scores + row * p.s_row;
  const int lo = min(rank * p.slice, p.n), hi = min(lo + p.slice, p.n);
  if (rank == 0 && p.offsets != nullptr) {
    if (threadIdx.x == 0) p.offsets[row] = row * p.k;
    if (threadIdx.x == 0 && row == static_cast<int>(gridDim.x / CLUSTER) - 1)
      p.offsets[row + 1] = (row + 1) * p.k;
  }
  if (p.cached) {
    // 16-byte loads when the slice is aligned (the launcher checks the row and the
    // slice), unrolled so that each thread has several loads in flight.
    int j = lo;
    if (p.vec4) {
      const int n4 = (hi - lo) / 4;
      const float4* x4 = reinterpret_cast<const float4*>(x + lo);
      uint4* c4 = reinterpret_cast<uint4*>(cache);
#pragma unroll 4
      for (int i = threadIdx.x; i < n4; i += THREADS) {
        const float4 v = x4[i];
        c4[i] = make_uint4(ordered_bits_dev(v.x), ordered_bits_dev(v.y), ordered_bits_dev(v.z),
                           ordered_bits_dev(v.w));
      }
      j = lo + 4 * n4;
    }
    for (j += threadIdx.x; j < hi; j += THREADS) cache[j - lo] = ordered_bits_dev(x[j]);
  }
  const auto bits_at = [&](int j) -> std::uint32_t {
    return p.cached ? cache[j - lo] : ordered_bits_dev(x[j]);
  };

  std::uint32_t prefix = 0;
  unsigned need = static_cast<unsigned>(p.k);
#pragma unroll 1
  for (int pass = 0; pass < 3; ++pass) {
    // Digits of 11, 11 and 10 bits, most significant first.
    const int width = pass < 2 ? 11 : 10;
    const int shift = pass == 0 ? 21 : pass == 1 ? 10 : 0;
    const std::uint32_t mask = (1u << width) - 1;
    for (int b = threadIdx.x; b < BINS; b += THREADS) hist[b] = 0;
    __syncthreads();
    // Scores cluster in few bins (similar exponents), so lanes of a warp that hit
    // the same bin are merged first: one shared atomic per distinct bin and warp.
    for (int base = lo; base < hi; base += THREADS) {
      const int j = base + static_cast<int>(threadIdx.x);
      std::uint32_t bin = 0xffffffffu;  // no bin
      if (j < hi) {
        const std::uint32_t u = bits_at(j);
        if (pass == 0 || (u >> (shift + width)) == prefix) bin = (u >> shift) & mask;
      }
      // After the first pass few keys still match the prefix: most warps have none and
      // skip the (slow) match.
      if (!__any_sync(0xffffffffu, bin != 0xffffffffu)) continue;
      const unsigned peers = __match_any_sync(0xffffffffu, bin);
      if (bin != 0xffffffffu && (threadIdx.x & 31) == static_cast<unsigned>(__ffs(peers) - 1))
        atomicAdd(&hist[bin], static_cast<unsigned>(__popc(peers)));
    }
    cluster_barrier<CLUSTER>();
    // Thread t owns bins b0 = BINS-1-2t and b1 = b0-1 (high to low); an exclusive scan
    // gives the number of tied keys in higher bins.
    const int b0 = BINS - 1 - 2 * static_cast<int>(threadIdx.x), b1 = b0 - 1;
    unsigned h0 = 0, h1 = 0;
#pragma unroll
    for (int r = 0; r < CLUSTER; ++r) {
      const unsigned* peer = cluster_peer<CLUSTER>(hist, r);
      h0 += peer[b0];
      h1 += peer[b1];
    }
    unsigned above;
    Scan(tmp.scan).ExclusiveSum(h0 + h1, above);
    if (above < need && above + h0 >= need) {
      found_digit = static_cast<unsigned>(b0);
      found_need = need - above;
    } else if (above + h0 < need && above + h0 + h1 >= need) {
      found_digit = static_cast<unsigned>(b1);
      found_need = need - above - h0;
    }
    __syncthreads();
    prefix = (prefix << width) | found_digit;
    need = found_need;
    // Peers may still be reading this block's histogram.
    cluster_barrier<CLUSTER>();
  }
  const std::uint32_t T = prefix;

  // Count, per warp sub-slice, the keys above T and equal to T.
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int len = hi - lo;
  const int seg = ((len + WARPS - 1) / WARPS + 31) / 32 * 32;
  const int w_lo = lo + min(warp * seg, len), w_hi = lo + min((warp + 1) * seg, len);
  unsigned gt = 0, eq = 0;
  for (int j0 = w_lo; j0 < w_hi; j0 += 32) {
    const int j = j0 + lane;
    const std::uint32_t u = j < w_hi ? bits_at(j) : 0u;
    gt += __popc(__ballot_sync(0xffffffffu, j < w_hi && u > T));
    eq += __popc(__ballot_sync(0xffffffffu, j < w_hi && u == T));
  }
  if (lane == 0) {
    warp_gt[warp] = gt;
    warp_eq[warp] = eq;
  }
  __syncthreads();
  if (threadIdx.x == 0) {
    unsigned tg = 0, te = 0;
    for (int w = 0; w < WARPS; ++w) {
      tg += warp_gt[w];
      te += warp_eq[w];
    }
    block_count[0] = tg;
    block_count[1] = te;
  }
  cluster_barrier<CLUSTER>();
  // Exclusive bases: lower ranks of the cluster, then lower warps of this block.
  unsigned base_gt = 0, base_eq = 0;
  for (int r = 0; r < rank; ++r) {
    const unsigned* peer = cluster_peer<CLUSTER>(block_count, r);
    base_gt += peer[0];
    base_eq += peer[1];
  }
  for (int w = 0; w < warp; ++w) {
    base_gt += warp_gt[w];
    base_eq += warp_eq[w];
  }
  // No block may leave (its shared memory going away) while a peer still reads it.
  if constexpr (CLUSTER > 1) cluster_barrier<CLUSTER>();
  // Winners before this warp's first key, in index order: all keys above T and the
  // first `need` keys equal to T.
  unsigned sel_run = base_gt + min(base_eq, need);
  unsigned eq_run = base_eq;
  const unsigned lt_mask = (1u << lane) - 1;
  TI* out_row = p.out + row * p.o_row;
  std::uint64_t* key_row = p.keys ? p.keys + static_cast<std::int64_t>(row) * p.k : nullptr;
  for (int j0 = w_lo; j0 < w_hi; j0 += 32) {
    const int j = j0 + lane;
    const std::uint32_t u = j < w_hi ? bits_at(j) : 0u;
    const bool is_gt = j < w_hi && u > T, is_eq = j < w_hi && u == T;
    const unsigned eq_mask = __ballot_sync(0xffffffffu, is_eq);
    const bool taken = is_eq && eq_run + __popc(eq_mask & lt_mask) < need;
    const unsigned sel_mask = __ballot_sync(0xffffffffu, is_gt || taken);
    if (is_gt || taken) {
      const unsigned pos = sel_run + __popc(sel_mask & lt_mask);
      if (key_row)
        key_row[pos] = composite_key(u, static_cast<std::uint32_t>(j), p.idx_bits);
      else
        out_row[pos] = static_cast<TI>(j);
    }
    sel_run += __popc(sel_mask);
    eq_run += __popc(eq_mask);
  }

  if constexpr (SORT_ITEMS > 0) {
    // Descending order for k <= THREADS * SORT_ITEMS: the cluster's first block
    // sorts the row's winners (written above, in index order) by (score, -index).
    cluster_barrier<CLUSTER>();  // every block's winners are in out_row
    if (rank != 0) return;
    std::uint64_t keys[SORT_ITEMS];
#pragma unroll
    for (int t = 0; t < SORT_ITEMS; ++t) {
      const int pos = static_cast<int>(threadIdx.x) * SORT_ITEMS + t;
      if (pos < p.k) {
        const auto j = static_cast<std::uint32_t>(out_row[pos]);
        keys[t] = composite_key(ordered_bits_dev(x[j]), j, p.idx_bits);
      } else {
        keys[t] = 0;  // below every real key: padding sorts last
      }
    }
    __syncthreads();
    Sort(tmp.sort).SortDescending(keys, 0, 32 + p.idx_bits);
#pragma unroll
    for (int t = 0; t < SORT_ITEMS; ++t) {
      const int pos = static_cast<int>(threadIdx.x) * SORT_ITEMS + t;
      if (pos < p.k) out_row[pos] = static_cast<TI>(composite_index(keys[t], p.idx_bits));
    }
  }
}

// After the device-wide sort: out(r, t) = index of the t-th composite key of row r.
template <class TI>
__global__ void unpack_indices_kernel(const std::uint64_t* __restrict__ keys, int rows, int k,
                                      int idx_bits, TI* __restrict__ out, std::int64_t o_row) {
  const std::int64_t e = static_cast<std::int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (e >= static_cast<std::int64_t>(rows) * k) return;
  const std::int64_t r = e / k, t = e - r * k;
  out[r * o_row + t] = static_cast<TI>(composite_index(keys[e], idx_bits));
}

}  // namespace cake::cuda_detail
