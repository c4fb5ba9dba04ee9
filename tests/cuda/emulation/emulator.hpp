// A CPU emulation of the CUDA constructs cake's window-statistics kernels use, so that
// a machine without a GPU (CI) runs the real kernel source against the host backend.
//
// Each CUDA thread of a block is a host thread; blocks run one after another. A warp
// meets at a barrier around every shuffle and every mma (so a lane that skipped one
// would deadlock the test instead of passing it), a block at __syncthreads. Shared
// memory starts as garbage, as on a GPU. mma.sync.m16n8k16 is emulated from the PTX
// ISA's fragment tables, summed exactly and rounded once: real tensor cores round
// differently in the last bits, and nothing here checks timing, occupancy or the
// memory model. Include this before any cake CUDA kernel header.
#pragma once

#define CAKE_CUDA_EMULATION 1

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <array>
#include <atomic>
#include <barrier>
#include <bit>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <thread>
#include <type_traits>
#include <vector>

using std::max;  // the kernels call CUDA's min / max
using std::min;

#undef __global__
#define __global__
#undef __device__
#define __device__
#undef __host__
#define __host__
#undef __forceinline__
#define __forceinline__ inline
#undef __launch_bounds__
#define __launch_bounds__(...)
#undef __shared__
#define __shared__ static  // blocks run one at a time: a static is the block's variable

inline unsigned __float_as_uint(float x) {
  unsigned u;
  std::memcpy(&u, &x, sizeof u);
  return u;
}

namespace cake_emulation {

struct Dim {
  unsigned x = 0, y = 0, z = 0;
};
inline thread_local Dim thread_index, block_index;
inline Dim block_dim, grid_dim;

struct Block {
  std::unique_ptr<std::barrier<>> all;
  std::vector<std::unique_ptr<std::barrier<>>> warps;
  std::vector<double> shuffle;                         // (threads)
  std::vector<std::array<std::uint32_t, 6>> operands;  // (threads) a0..a3, b0, b1
  std::vector<double> reduce;                          // (threads)
  std::vector<std::uint64_t> vote;                     // (threads * 8) warp votes, scans, sorts
  std::unique_ptr<unsigned char[]> shared;
};
inline Block* block = nullptr;

inline unsigned char* dynamic_shared() { return block->shared.get(); }
inline void sync_block() { block->all->arrive_and_wait(); }
inline void sync_warp() { block->warps[thread_index.x / 32]->arrive_and_wait(); }

template <class T>
T shfl_xor(T v, int mask) {
  const unsigned t = thread_index.x;
  block->shuffle[t] = static_cast<double>(v);
  sync_warp();
  const T r =
      static_cast<T>(block->shuffle[(t & ~31u) | ((t & 31u) ^ static_cast<unsigned>(mask))]);
  sync_warp();
  return r;
}

// A warp collective: every lane posts `v`, then each computes f(values of lanes 0..31).
template <class F>
auto warp_collective(std::uint64_t v, F f) {
  const unsigned t = thread_index.x, first = t & ~31u;
  block->vote[t] = v;
  sync_warp();
  std::array<std::uint64_t, 32> all{};
  for (unsigned lane = 0; lane < 32; ++lane) all[lane] = block->vote[first + lane];
  const auto r = f(all, t & 31u);
  sync_warp();
  return r;
}
inline unsigned ballot(bool p) {
  return warp_collective(p, [](const auto& all, unsigned) {
    unsigned m = 0;
    for (unsigned lane = 0; lane < 32; ++lane) m |= all[lane] ? 1u << lane : 0u;
    return m;
  });
}
inline unsigned match_any(unsigned v) {
  return warp_collective(v, [](const auto& all, unsigned me) {
    unsigned m = 0;
    for (unsigned lane = 0; lane < 32; ++lane) m |= all[lane] == all[me] ? 1u << lane : 0u;
    return m;
  });
}

inline double element(std::uint32_t reg, int high, bool bf16) {
  const auto u = static_cast<unsigned short>(high ? reg >> 16 : reg & 0xffffu);
  return bf16 ? static_cast<double>(__bfloat162float(__ushort_as_bfloat16(u)))
              : static_cast<double>(__half2float(__ushort_as_half(u)));
}

// d += a b over the warp, per "Matrix Fragments for mma.m16n8k16 with floating point
// type": a_i in register i / 2 (low half first), row groupID (+8 for a2, a3, a6, a7),
// column 2 * (lane % 4) + (i & 1) (+8 for i >= 4); b_i row 2 * (lane % 4) + (i & 1)
// (+8 for i >= 2), column groupID; c_i row groupID (+8 for i >= 2), column
// 2 * (lane % 4) + (i & 1).
template <bool BF16>
void mma_16816(float (&d)[4], const std::uint32_t (&a)[4], const std::uint32_t (&b)[2]) {
  const unsigned t = thread_index.x, first = t & ~31u;
  block->operands[t] = {a[0], a[1], a[2], a[3], b[0], b[1]};
  sync_warp();
  double A[16][16] = {}, B[16][8] = {};
  for (unsigned lane = 0; lane < 32; ++lane) {
    const int g = static_cast<int>(lane >> 2), q = static_cast<int>(lane & 3);
    const auto& r = block->operands[first + lane];
    for (int i = 0; i < 8; ++i) {
      const int row = (i < 2 || (i >= 4 && i < 6)) ? g : g + 8;
      const int col = q * 2 + (i & 1) + (i >= 4 ? 8 : 0);
      A[row][col] = element(r[static_cast<std::size_t>(i / 2)], i & 1, BF16);
    }
    for (int i = 0; i < 4; ++i)
      B[q * 2 + (i & 1) + (i >= 2 ? 8 : 0)][g] =
          element(r[static_cast<std::size_t>(4 + i / 2)], i & 1, BF16);
  }
  const int lane = static_cast<int>(t & 31);
  for (int i = 0; i < 4; ++i) {
    const int row = (lane >> 2) + (i >= 2 ? 8 : 0), col = (lane & 3) * 2 + (i & 1);
    double s = d[i];
    for (int k = 0; k < 16; ++k) s += A[row][k] * B[k][col];
    d[i] = static_cast<float>(s);
  }
  sync_warp();
}

// Runs `body` (one kernel invocation) over grid x block threads with `smem` bytes of
// dynamic shared memory.
template <class F>
void launch(Dim grid, Dim threads, std::size_t smem, F&& body) {
  grid_dim = grid;
  block_dim = threads;
  const auto n = static_cast<std::ptrdiff_t>(threads.x);
  for (unsigned by = 0; by < grid.y; ++by)
    for (unsigned bx = 0; bx < grid.x; ++bx) {
      Block blk;
      blk.all = std::make_unique<std::barrier<>>(n);
      for (std::ptrdiff_t w = 0; w < (n + 31) / 32; ++w)
        blk.warps.push_back(
            std::make_unique<std::barrier<>>(std::min<std::ptrdiff_t>(32, n - 32 * w)));
      blk.shuffle.assign(static_cast<std::size_t>(n), 0.0);
      blk.operands.assign(static_cast<std::size_t>(n), {});
      blk.reduce.assign(static_cast<std::size_t>(n), 0.0);
      blk.vote.assign(static_cast<std::size_t>(n) * 8, 0);
      blk.shared.reset(new unsigned char[std::max<std::size_t>(smem, 1)]);
      std::fill(blk.shared.get(), blk.shared.get() + std::max<std::size_t>(smem, 1), 0xA5);
      block = &blk;
      std::vector<std::thread> pool;
      for (unsigned t = 0; t < threads.x; ++t)
        pool.emplace_back([&, t, bx, by] {
          thread_index = {t, 0, 0};
          block_index = {bx, by, 0};
          body();
        });
      for (auto& th : pool) th.join();
      block = nullptr;
    }
}

}  // namespace cake_emulation

#define threadIdx ::cake_emulation::thread_index
#define blockIdx ::cake_emulation::block_index
#define blockDim ::cake_emulation::block_dim
#define gridDim ::cake_emulation::grid_dim
#define __syncthreads() ::cake_emulation::sync_block()
#define __shfl_xor_sync(mask, v, o) ::cake_emulation::shfl_xor(v, o)
#define __ldg(p) (*(p))
#define __ballot_sync(mask, p) ::cake_emulation::ballot(p)
#define __any_sync(mask, p) (::cake_emulation::ballot(p) != 0u)
#define __match_any_sync(mask, v) ::cake_emulation::match_any(v)
inline int __popc(unsigned x) { return std::popcount(x); }
inline int __ffs(unsigned x) { return x == 0 ? 0 : std::countr_zero(x) + 1; }
inline unsigned atomicAdd(unsigned* p, unsigned v) {
  return std::atomic_ref<unsigned>(*p).fetch_add(v);
}
#define __trap() std::abort()

// cub::BlockReduce as the kernels use it: Sum over the block, result in thread 0.
namespace cub {
template <class T, int THREADS>
struct BlockReduce {
  struct TempStorage {};
  explicit BlockReduce(TempStorage&) {}
  T Sum(T v) {
    ::cake_emulation::block->reduce[threadIdx.x] = static_cast<double>(v);
    __syncthreads();
    T s = 0;
    if (threadIdx.x == 0)
      for (unsigned i = 0; i < blockDim.x; ++i)
        s += static_cast<T>(::cake_emulation::block->reduce[i]);
    __syncthreads();
    return s;
  }
};

// cub::BlockScan<unsigned>::ExclusiveSum, in thread order.
template <class T, int THREADS>
struct BlockScan {
  struct TempStorage {};
  explicit BlockScan(TempStorage&) {}
  void ExclusiveSum(T v, T& out) {
    auto& slots = ::cake_emulation::block->vote;
    slots[threadIdx.x] = static_cast<std::uint64_t>(v);
    __syncthreads();
    T s = 0;
    for (unsigned i = 0; i < threadIdx.x; ++i) s += static_cast<T>(slots[i]);
    out = s;
    __syncthreads();
  }
};

// cub::BlockRadixSort<uint64_t>::SortDescending of a blocked arrangement, by bits
// [begin, end): a stable sort of the block's keys, each thread taking its items back.
template <class T, int THREADS, int ITEMS>
struct BlockRadixSort {
  struct TempStorage {};
  explicit BlockRadixSort(TempStorage&) {}
  void SortDescending(T (&keys)[ITEMS], int begin, int end) {
    auto& slots = ::cake_emulation::block->vote;
    for (int i = 0; i < ITEMS; ++i) slots[threadIdx.x * ITEMS + i] = keys[i];
    __syncthreads();
    if (threadIdx.x == 0) {
      const std::uint64_t mask =
          (end - begin >= 64 ? ~std::uint64_t{0} : ((std::uint64_t{1} << (end - begin)) - 1))
          << begin;
      std::stable_sort(slots.begin(), slots.begin() + blockDim.x * ITEMS,
                       [&](std::uint64_t a, std::uint64_t b) { return (a & mask) > (b & mask); });
    }
    __syncthreads();
    for (int i = 0; i < ITEMS; ++i) keys[i] = slots[threadIdx.x * ITEMS + i];
    __syncthreads();
  }
};
}  // namespace cub
