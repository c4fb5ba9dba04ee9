// A CPU emulation of the CUDA constructs cake's kernels use (window statistics, decode
// scores, select_k), so that a machine without a GPU (CI) runs the real kernel source
// against the host backend.
//
// Each CUDA thread of a block is a host thread; blocks run one after another. A warp
// meets at a barrier around every shuffle, vote and mma, a block at __syncthreads; a
// barrier that not every thread reaches within a minute (a lane that skipped a
// collective, a divergent __syncthreads) aborts naming the block, the thread and the
// collective, instead of hanging. Warp masks must be full. Dynamic shared memory
// starts as 0xFF bytes (NaN as float / half / bf16), so reading it before writing
// shows; static __shared__ variables are function statics: zero in the first block,
// then whatever the previous block left. mma.sync.m16n8k16 is emulated from the PTX
// ISA's fragment tables, summed exactly and rounded once: real tensor cores round
// differently in the last bits. The cub fakes end without a barrier, as cub's do, so a
// kernel that reuses their storage without one races (ThreadSanitizer sees it).
// Nothing here checks timing, occupancy or the memory model. Include this before any
// cake CUDA kernel header.
#pragma once

#define CAKE_CUDA_EMULATION 1

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <array>
#include <atomic>
#include <bit>
#include <chrono>
#include <cmath>
#include <condition_variable>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <mutex>
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

// A reusable barrier that aborts, saying where, when not every participant arrives
// within a minute.
class Barrier {
 public:
  explicit Barrier(unsigned n) : n_(n) {}
  void arrive_and_wait(const char* what) {
    std::unique_lock<std::mutex> lock(m_);
    const unsigned long long generation = generation_;
    if (++arrived_ == n_) {
      arrived_ = 0;
      ++generation_;
      cv_.notify_all();
      return;
    }
    if (!cv_.wait_for(lock, std::chrono::seconds(60), [&] { return generation_ != generation; })) {
      std::fprintf(stderr,
                   "emulated CUDA: %s in block (%u, %u), thread %u: only %u of %u threads arrived "
                   "within 60 s\n",
                   what, block_index.x, block_index.y, thread_index.x, arrived_, n_);
      std::abort();
    }
  }

 private:
  std::mutex m_;
  std::condition_variable cv_;
  unsigned n_, arrived_ = 0;
  unsigned long long generation_ = 0;
};

struct Block {
  std::unique_ptr<Barrier> all;
  std::vector<std::unique_ptr<Barrier>> warps;
  std::vector<double> shuffle;                         // (threads)
  std::vector<std::array<std::uint32_t, 6>> operands;  // (threads) a0..a3, b0, b1
  std::vector<std::uint64_t> vote;                     // (threads) warp votes
  std::vector<std::uint64_t> collective;               // (threads * 8) cub fakes' storage
  std::vector<unsigned char> shared;                   // dynamic shared memory (+ alignment)
  unsigned char* shared_base = nullptr;                // 128-byte aligned
};
inline Block* block = nullptr;

inline unsigned char* dynamic_shared() { return block->shared_base; }
inline void sync_block() { block->all->arrive_and_wait("__syncthreads"); }
inline void sync_warp(const char* what) {
  block->warps[thread_index.x / 32]->arrive_and_wait(what);
}
inline void full_mask(unsigned mask, const char* what) {
  if (mask != 0xffffffffu) {
    std::fprintf(stderr, "emulated CUDA: %s with a partial mask %#x is not emulated\n", what, mask);
    std::abort();
  }
}

template <class T>
T shfl_xor(unsigned mask, T v, int lane_mask) {
  static_assert(sizeof(T) <= 4, "shuffles of 32-bit values (exact through double)");
  full_mask(mask, "__shfl_xor_sync");
  const unsigned t = thread_index.x;
  block->shuffle[t] = static_cast<double>(v);
  sync_warp("__shfl_xor_sync");
  const T r =
      static_cast<T>(block->shuffle[(t & ~31u) | ((t & 31u) ^ static_cast<unsigned>(lane_mask))]);
  sync_warp("__shfl_xor_sync");
  return r;
}

// A warp collective: every lane posts `v`, then each computes f(values of lanes 0..31).
template <class F>
auto warp_collective(unsigned mask, const char* what, std::uint64_t v, F f) {
  full_mask(mask, what);
  const unsigned t = thread_index.x, first = t & ~31u;
  block->vote[t] = v;
  sync_warp(what);
  std::array<std::uint64_t, 32> all{};
  for (unsigned lane = 0; lane < 32; ++lane) all[lane] = block->vote[first + lane];
  const auto r = f(all, t & 31u);
  sync_warp(what);
  return r;
}
inline unsigned ballot(unsigned mask, bool p, const char* what = "__ballot_sync") {
  return warp_collective(mask, what, p, [](const auto& all, unsigned) {
    unsigned m = 0;
    for (unsigned lane = 0; lane < 32; ++lane) m |= all[lane] ? 1u << lane : 0u;
    return m;
  });
}
inline unsigned match_any(unsigned mask, unsigned v) {
  return warp_collective(mask, "__match_any_sync", v, [](const auto& all, unsigned me) {
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
  sync_warp("mma.sync");
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
  sync_warp("mma.sync");
}

// Runs `body` (one kernel invocation) over grid x block threads with `smem` bytes of
// dynamic shared memory. One-dimensional blocks of whole warps, as cake launches.
template <class F>
void launch(Dim grid, Dim threads, std::size_t smem, F&& body) {
  const auto fail = [](const char* why) {
    std::fprintf(stderr, "emulated CUDA: launch %s\n", why);
    std::abort();
  };
  if (grid.x == 0 || grid.y == 0 || grid.z > 1) fail("grid must be (x >= 1, y >= 1, 1)");
  if (threads.x == 0 || threads.x % 32 != 0 || threads.x > 1024 || threads.y > 1 || threads.z > 1)
    fail("block must be (32 * k <= 1024, 1, 1)");
  if (smem > 227 * 1024) fail("asks for more dynamic shared memory than an H200 has");
  grid_dim = {grid.x, grid.y, 1};
  block_dim = {threads.x, 1, 1};
  const unsigned n = threads.x;
  for (unsigned by = 0; by < grid.y; ++by)
    for (unsigned bx = 0; bx < grid.x; ++bx) {
      Block blk;
      blk.all = std::make_unique<Barrier>(n);
      for (unsigned w = 0; w < n / 32; ++w) blk.warps.push_back(std::make_unique<Barrier>(32));
      blk.shuffle.assign(n, 0.0);
      blk.operands.assign(n, {});
      blk.vote.assign(n, 0);
      blk.collective.assign(static_cast<std::size_t>(n) * 8, 0);
      blk.shared.assign(smem + 128, 0xFF);  // NaN as float, half and bf16
      blk.shared_base =
          blk.shared.data() + (128 - reinterpret_cast<std::uintptr_t>(blk.shared.data()) % 128);
      block = &blk;
      std::vector<std::thread> pool;
      for (unsigned t = 0; t < n; ++t)
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
#define __shfl_xor_sync(mask, v, o) ::cake_emulation::shfl_xor(mask, v, o)
#define __ldg(p) (*(p))
#define __ballot_sync(mask, p) ::cake_emulation::ballot(mask, p)
#define __any_sync(mask, p) (::cake_emulation::ballot(mask, p, "__any_sync") != 0u)
#define __match_any_sync(mask, v) ::cake_emulation::match_any(mask, v)
inline int __popc(unsigned x) { return std::popcount(x); }
inline int __ffs(unsigned x) { return x == 0 ? 0 : std::countr_zero(x) + 1; }
inline unsigned atomicAdd(unsigned* p, unsigned v) {
  return std::atomic_ref<unsigned>(*p).fetch_add(v);
}
#define __trap() std::abort()

// cub's block primitives as the kernels use them, on the block's collective storage.
// Like cub's, they end without a barrier: reusing them needs one.
namespace cub {
namespace detail_emulation {
template <int THREADS>
void check_threads() {
  if (static_cast<unsigned>(THREADS) != blockDim.x) {
    std::fprintf(stderr, "emulated CUDA: a cub block primitive for %d threads in a block of %u\n",
                 THREADS, blockDim.x);
    std::abort();
  }
}
}  // namespace detail_emulation

// Sum over the block; valid in thread 0 only (NaN elsewhere for floating types).
template <class T, int THREADS>
struct BlockReduce {
  struct TempStorage {};
  explicit BlockReduce(TempStorage&) { detail_emulation::check_threads<THREADS>(); }
  T Sum(T v) {
    auto& slots = ::cake_emulation::block->collective;
    slots[threadIdx.x] = std::bit_cast<std::uint64_t>(static_cast<double>(v));
    __syncthreads();
    if (threadIdx.x != 0) return std::is_floating_point_v<T> ? static_cast<T>(NAN) : T{};
    T s = 0;
    for (unsigned i = 0; i < blockDim.x; ++i) s += static_cast<T>(std::bit_cast<double>(slots[i]));
    return s;
  }
};

// ExclusiveSum in thread order.
template <class T, int THREADS>
struct BlockScan {
  struct TempStorage {};
  explicit BlockScan(TempStorage&) { detail_emulation::check_threads<THREADS>(); }
  void ExclusiveSum(T v, T& out) {
    auto& slots = ::cake_emulation::block->collective;
    slots[threadIdx.x] = static_cast<std::uint64_t>(v);
    __syncthreads();
    T s = 0;
    for (unsigned i = 0; i < threadIdx.x; ++i) s += static_cast<T>(slots[i]);
    out = s;
  }
};

// SortDescending of a blocked arrangement by bits [begin, end): a stable sort of the
// block's keys, each thread taking its items back.
template <class T, int THREADS, int ITEMS>
struct BlockRadixSort {
  static_assert(ITEMS <= 8, "the collective storage holds 8 items per thread");
  struct TempStorage {};
  explicit BlockRadixSort(TempStorage&) { detail_emulation::check_threads<THREADS>(); }
  void SortDescending(T (&keys)[ITEMS], int begin, int end) {
    auto& slots = ::cake_emulation::block->collective;
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
  }
};
}  // namespace cub
