// Kernels of cake::compact on CUDA.
//   dense:  dst(b, g, t, :) = src(b, g, keep(b, g, t), :)
//   paged:  token t of row (s, h) <- token keep(s, h, t) of the same row, in the pool,
//           through the block table (in place)
// V is the access unit: uint4 (16 bytes) when rows, pointers and strides allow,
// otherwise the element type itself. With a guard (cake::cuda_index_guard), a check
// kernel runs first and records the first bad index; every gather then reads the
// record and writes nothing when it is set.
#pragma once

#include <cstdint>

#include "../../../../error.hpp"
#include "../tuning.cuh"

namespace cake::cuda_detail {

// The device-resident record of a guard. `first` orders errors as the host's checks
// meet them: row by row, a row's length before its indices, then by position.
struct IndexGuardRecord {
  static constexpr unsigned long long none = ~0ull;
  unsigned long long first;          // key(row, u, kind) of the first bad entry, `none` if none
  long long value, previous, bound;  // filled by the first gather that sees `first` set
  int sealed;                        // 1 once filled: later calls neither check nor write
  int heads, m, paged;
};
enum : int { guard_range = 0, guard_order = 1, guard_length = 2 };
// u = 0 is the row's length, u = 1 + t its index t.
CAKE_HOST_DEVICE inline unsigned long long guard_key(long long row, int m, int u, int kind) {
  return ((static_cast<unsigned long long>(row) * static_cast<unsigned long long>(m + 1) +
           static_cast<unsigned long long>(u))
          << 2) |
         static_cast<unsigned long long>(kind);
}

// The kept indices of a compaction, row = (batch or sequence) * heads + kv-head.
template <class TI>
struct KeepRows {
  const TI* keep;  // (rows / heads, heads, m), strides in elements
  std::int64_t k_b, k_g, k_t;
  const std::int32_t* lens;  // (rows / heads, heads) kept per row, or null: m each
  std::int64_t l_b, l_g;
  const std::int32_t* bounds;  // (rows / heads) exclusive bound per batch entry, or null: S
  int S, heads, m;
  bool ascending;  // in place: indices must increase strictly
  CAKE_HOST_DEVICE long long at(long long row, int t) const {
    const long long b = row / heads, g = row % heads;
    return static_cast<long long>(keep[b * k_b + g * k_g + t * k_t]);
  }
  CAKE_HOST_DEVICE int len(long long row) const {
    return lens ? lens[(row / heads) * l_b + (row % heads) * l_g] : m;
  }
  CAKE_HOST_DEVICE long long bound(long long row) const { return bounds ? bounds[row / heads] : S; }
};

// Threads the check kernel covers: one per (row, position), and at least one per row,
// so that a row's length is checked even when m = 0.
CAKE_HOST_DEVICE inline std::int64_t check_work(std::int64_t rows, int m) {
  return rows * (m > 0 ? m : 1);
}

// One thread per (row, position): the first bad entry, by atomicMin on its key. Skips
// everything once the record is sealed (an earlier call's error stays the one reported).
template <class TI>
__global__ void __launch_bounds__(tuning::compact_threads)
    compact_check_kernel(KeepRows<TI> k, std::int64_t rows, IndexGuardRecord* guard) {
  if (guard->sealed) return;
  const int per = k.m > 0 ? k.m : 1;
  const std::int64_t total = check_work(rows, k.m);
  for (std::int64_t e = static_cast<std::int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; e < total;
       e += static_cast<std::int64_t>(gridDim.x) * blockDim.x) {
    const std::int64_t row = e / per;
    const int t = static_cast<int>(e - row * per);
    const int len = k.len(row);
    const long long bound = k.bound(row);
    if (len < 0 || len > k.m || len > bound) {
      if (t == 0) atomicMin(&guard->first, guard_key(row, k.m, 0, guard_length));
      continue;
    }
    if (t >= len) continue;
    const long long j = k.at(row, t);
    if (j < 0 || j >= bound)
      atomicMin(&guard->first, guard_key(row, k.m, 1 + t, guard_range));
    else if (k.ascending && t > 0 && j <= k.at(row, t - 1))
      atomicMin(&guard->first, guard_key(row, k.m, 1 + t, guard_order));
  }
}

// At the start of every gather: true when the guard holds an error (then nothing is
// written). The first thread to see it fills in the offending values, once.
template <class TI>
__device__ bool guard_tripped(IndexGuardRecord* guard, const KeepRows<TI>& k, int paged) {
  if (guard == nullptr || guard->first == IndexGuardRecord::none) return false;
  if (blockIdx.x == 0 && threadIdx.x == 0 && !guard->sealed) {
    const unsigned long long pos = guard->first >> 2;
    const int kind = static_cast<int>(guard->first & 3u);
    const long long row = static_cast<long long>(pos / static_cast<unsigned long long>(k.m + 1));
    const int u = static_cast<int>(pos % static_cast<unsigned long long>(k.m + 1));
    guard->bound = k.bound(row);
    if (kind == guard_length) {
      guard->value = k.len(row);
    } else {
      guard->value = k.at(row, u - 1);
      guard->previous = u > 1 ? k.at(row, u - 2) : -1;
    }
    guard->heads = k.heads, guard->m = k.m, guard->paged = paged;
    guard->sealed = 1;
  }
  return true;
}

// When a guarded call has nothing to gather (m = 0 or head_dim = 0), one warp (thread 0
// of it) seals
// what the check kernel recorded, as a gather would have.
template <class TI>
__global__ void compact_seal_kernel(KeepRows<TI> k, IndexGuardRecord* guard, int paged) {
  (void)guard_tripped(guard, k, paged);
}

// The host's message for a filled record (the same words as algorithm/compact.hpp's).
inline status guard_status(const IndexGuardRecord& r) {
  if (r.first == IndexGuardRecord::none) return status::success();
  // Set but not sealed: the check found a bad entry and the kernel that fills in its
  // values never ran (its launch failed). Still an error, or the guard would report
  // success while every later guarded call writes nothing.
  if (!r.sealed)
    return detail::make_status("cake.compact.keep",
                               "a bad index or length was found, but the compaction that reports "
                               "it did not run (a failed launch); nothing was written");
  const unsigned long long pos = r.first >> 2;
  const int kind = static_cast<int>(r.first & 3u);
  const long long row = static_cast<long long>(pos / static_cast<unsigned long long>(r.m + 1));
  const long long t = static_cast<long long>(pos % static_cast<unsigned long long>(r.m + 1)) - 1;
  const long long b = row / r.heads, g = row % r.heads;
  if (kind == guard_length)
    return detail::make_status("cake.compact.keep_lens", "keep_lens(", b, ", ", g,
                               ") must be in [0, min(m = ", r.m, ", seq_lens(", b, ") = ", r.bound,
                               ")], got ", r.value);
  if (kind == guard_order)
    return detail::make_status("cake.compact.keep",
                               "in-place compaction needs strictly ascending keep rows; keep(", b,
                               ", ", g, ", ", t, ") = ", r.value, " follows ", r.previous);
  return detail::make_status("cake.compact.keep", "keep(", b, ", ", g, ", ", t, ") must be in [0, ",
                             r.paged ? "seq_lens = " : "", r.bound, "), got ", r.value);
}

template <class TI>
struct CompactParams {
  const char* src;  // (batch, kv_heads, tokens, head_dim), strides in bytes below
  std::int64_t s_b, s_g, s_t;
  char* dst;  // (batch, kv_heads, m, head_dim)
  std::int64_t d_b, d_g, d_t;
  KeepRows<TI> keep;  // (batch, kv_heads, m), every row m long, bound S
  int vecs;           // V units per row
  IndexGuardRecord* guard;
};

// Out of place: one thread per V unit of every kept row; consecutive threads read
// consecutive units of a row (coalesced), rows in flight from the whole grid.
// Indices outside [0, S) are skipped (unguarded: never dereferenced).
template <class V, class TI>
__global__ void __launch_bounds__(tuning::compact_threads)
    compact_kernel(CompactParams<TI> p, std::int64_t total) {
  if (guard_tripped(p.guard, p.keep, 0)) return;
  const std::int64_t e = static_cast<std::int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (e >= total) return;
  const int m = p.keep.m;
  const std::int64_t rt = e / p.vecs;
  const int v = static_cast<int>(e - rt * p.vecs);
  const std::int64_t bg = rt / m;
  const int t = static_cast<int>(rt - bg * m);
  const int b = static_cast<int>(bg / p.keep.heads), g = static_cast<int>(bg % p.keep.heads);
  const long long j = p.keep.at(bg, t);
  if (j < 0 || j >= p.keep.S) return;
  const V* from = reinterpret_cast<const V*>(p.src + b * p.s_b + g * p.s_g + j * p.s_t) + v;
  V* to = reinterpret_cast<V*>(p.dst + b * p.d_b + g * p.d_g + t * p.d_t) + v;
  *to = *from;
}

// One block walks `count` token rows of one compaction row in order, a chunk at a
// time: the whole chunk is read into registers before any of it is written, and
// (indices ascending, so source(t) >= t) every source row of a chunk lies at or after
// the chunk's first row, so no row is overwritten before it is read. src_of(t, j)
// gives the source row of token t (null: skip, out of range or unmoved), dst_of(t)
// its destination.
template <class V, int ITEMS, class Src, class Dst>
__device__ void gather_in_place(int count, int vecs, const Src& src_of, const Dst& dst_of) {
  const int per_chunk = max(1, (tuning::compact_threads * ITEMS) / vecs);  // rows per chunk
  constexpr int CAP = tuning::compact_threads * ITEMS;
  for (int t0 = 0; t0 < count; t0 += per_chunk) {
    const int units = min(per_chunk, count - t0) * vecs;
    // A chunk of several rows fits in one sweep (units <= CAP). A single row longer
    // than CAP goes in sweeps: its source row is itself or a later, untouched row.
    for (int u0 = 0; u0 < units; u0 += CAP) {
      V buf[ITEMS];
      V* at[ITEMS];
#pragma unroll
      for (int it = 0; it < ITEMS; ++it) {
        const int u = u0 + static_cast<int>(threadIdx.x) + it * tuning::compact_threads;
        at[it] = nullptr;
        if (u < units) {
          const int t = t0 + u / vecs, v = u % vecs;
          const V* from = src_of(t);
          if (from != nullptr) {
            buf[it] = from[v];
            at[it] = dst_of(t) + v;
          }
        }
      }
      __syncthreads();
#pragma unroll
      for (int it = 0; it < ITEMS; ++it)
        if (at[it] != nullptr) *at[it] = buf[it];
      __syncthreads();
    }
  }
}

// Dense in place (dst == src, keep rows strictly ascending): one block per
// (batch, kv-head).
template <class V, class TI, int ITEMS>
__global__ void __launch_bounds__(tuning::compact_threads)
    compact_in_place_kernel(CompactParams<TI> p) {
  if (guard_tripped(p.guard, p.keep, 0)) return;
  const int bg = blockIdx.x, b = bg / p.keep.heads, g = bg % p.keep.heads;
  const char* src = p.src + b * p.s_b + g * p.s_g;
  char* dst = p.dst + b * p.d_b + g * p.d_g;
  gather_in_place<V, ITEMS>(
      p.keep.m, p.vecs,
      [&](int t) -> const V* {
        const long long j = p.keep.at(bg, t);
        if (j < 0 || j >= p.keep.S) return nullptr;
        const V* from = reinterpret_cast<const V*>(src + j * p.s_t);
        return from == reinterpret_cast<const V*>(dst + t * p.d_t) ? nullptr : from;
      },
      [&](int t) { return reinterpret_cast<V*>(dst + t * p.d_t); });
}

template <class TI>
struct PagedCompactParams {
  char* pool;  // (num_blocks, kv_heads, block_size, head_dim), strides in bytes below
  std::int64_t p_n, p_h, p_t;
  const std::int32_t* indptr;  // (num_seqs + 1)
  const std::int32_t* ids;     // (indptr[num_seqs])
  KeepRows<TI> keep;           // (num_seqs, kv_heads, m), lengths keep_lens, bounds seq_lens
  int num_blocks, block_size, vecs;
  IndexGuardRecord* guard;
};

// Paged, in place: one block per (sequence, kv-head) row, then its padding slots
// zeroed (see below). Token t of the row is slot
// t % block_size of block ids[indptr[s] + t / block_size]. Unguarded, an index past
// the sequence, a table entry past the sequence's blocks or a block id outside the
// pool is skipped, never dereferenced.
template <class V, class TI, int ITEMS>
__global__ void __launch_bounds__(tuning::compact_threads)
    compact_paged_kernel(PagedCompactParams<TI> p) {
  if (guard_tripped(p.guard, p.keep, 1)) return;
  const long long row = blockIdx.x;
  const int s = static_cast<int>(row / p.keep.heads), h = static_cast<int>(row % p.keep.heads);
  const int first = p.indptr[s], blocks = p.indptr[s + 1] - first;
  const long long len_s = p.keep.bound(row);
  const auto slot = [&](long long t) -> V* {
    const long long e = t / p.block_size;
    if (e >= blocks) return nullptr;
    const int id = p.ids[first + e];
    if (id < 0 || id >= p.num_blocks) return nullptr;
    return reinterpret_cast<V*>(p.pool + id * p.p_n + h * p.p_h + (t % p.block_size) * p.p_t);
  };
  const int count = max(0, min(p.keep.len(row), p.keep.m));
  gather_in_place<V, ITEMS>(
      count, p.vecs,
      [&](int t) -> const V* {
        const long long j = p.keep.at(row, t);
        if (j == t || j < 0 || j >= len_s || slot(t) == nullptr) return nullptr;
        return slot(j);
      },
      [&](int t) { return slot(t); });
  // Padding [count, new_lens(s)) of a head shorter than the sequence's longest is zero
  // K/V, as the dense cache pads heads: paged attention reads new_lens(s) slots of every
  // head. The gather's last barrier orders these writes after all of the row's reads.
  int longest = 0;
  for (int g = 0; g < p.keep.heads; ++g)
    longest = max(longest, min(p.keep.len(static_cast<long long>(s) * p.keep.heads + g), p.keep.m));
  longest = static_cast<int>(min(static_cast<long long>(longest), len_s));
  const int pad = (longest - count) * p.vecs;
  for (int u = static_cast<int>(threadIdx.x); u < pad; u += static_cast<int>(blockDim.x)) {
    V* to = slot(count + u / p.vecs);
    if (to != nullptr) to[u % p.vecs] = V{};
  }
}

}  // namespace cake::cuda_detail
