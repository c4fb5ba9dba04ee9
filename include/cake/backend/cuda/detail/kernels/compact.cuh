// Kernels of cake::compact on CUDA: dst(b, g, t, :) = src(b, g, keep(b, g, t), :).
// V is the access unit: uint4 (16 bytes) when rows, pointers and strides allow,
// otherwise the element type itself.
#pragma once

#include <cstdint>

#include "../tuning.cuh"

namespace cake::cuda_detail {

template <class TI>
struct CompactParams {
  const char* src;  // (batch, kv_heads, tokens, head_dim), strides in bytes below
  std::int64_t s_b, s_g, s_t;
  char* dst;  // (batch, kv_heads, m, head_dim)
  std::int64_t d_b, d_g, d_t;
  const TI* keep;  // (batch, kv_heads, m), strides in elements
  std::int64_t k_b, k_g, k_t;
  int Hkv, S, m, vecs;  // vecs: V units per row
};

// Out of place: one thread per V unit of every kept row; consecutive threads read
// consecutive units of a row (coalesced), rows in flight from the whole grid.
// Indices outside [0, S) are skipped (the device cannot report them without a sync).
template <class V, class TI>
__global__ void __launch_bounds__(tuning::compact_threads)
    compact_kernel(CompactParams<TI> p, std::int64_t total) {
  const std::int64_t e = static_cast<std::int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (e >= total) return;
  const std::int64_t rt = e / p.vecs;
  const int v = static_cast<int>(e - rt * p.vecs);
  const std::int64_t bg = rt / p.m;
  const int t = static_cast<int>(rt - bg * p.m);
  const int b = static_cast<int>(bg / p.Hkv), g = static_cast<int>(bg % p.Hkv);
  const std::int64_t j = static_cast<std::int64_t>(p.keep[b * p.k_b + g * p.k_g + t * p.k_t]);
  if (j < 0 || j >= p.S) return;
  const V* from = reinterpret_cast<const V*>(p.src + b * p.s_b + g * p.s_g + j * p.s_t) + v;
  V* to = reinterpret_cast<V*>(p.dst + b * p.d_b + g * p.d_g + t * p.d_t) + v;
  *to = *from;
}

// In place (dst == src, keep rows strictly ascending, so keep(t) >= t): one block per
// (batch, kv-head) walks its rows in order, a chunk at a time; the whole chunk is read
// into registers before any of it is written, and every source row of a chunk lies at
// or after the chunk's first row, so no row is overwritten before it is read.
template <class V, class TI, int ITEMS>
__global__ void __launch_bounds__(tuning::compact_threads)
    compact_in_place_kernel(CompactParams<TI> p) {
  const int bg = blockIdx.x, b = bg / p.Hkv, g = bg % p.Hkv;
  const int per_chunk = max(1, (tuning::compact_threads * ITEMS) / p.vecs);  // rows per chunk
  constexpr int CAP = tuning::compact_threads * ITEMS;
  for (int t0 = 0; t0 < p.m; t0 += per_chunk) {
    const int units = min(per_chunk, p.m - t0) * p.vecs;
    // A chunk of several rows fits in one sweep (units <= CAP). A single row longer
    // than CAP goes in sweeps: its source row is itself or a later, untouched row.
    for (int u0 = 0; u0 < units; u0 += CAP) {
      V buf[ITEMS];
      std::int64_t at[ITEMS];
#pragma unroll
      for (int it = 0; it < ITEMS; ++it) {
        const int u = u0 + static_cast<int>(threadIdx.x) + it * tuning::compact_threads;
        at[it] = -1;
        if (u < units) {
          const int t = t0 + u / p.vecs, v = u % p.vecs;
          const std::int64_t j =
              static_cast<std::int64_t>(p.keep[b * p.k_b + g * p.k_g + t * p.k_t]);
          if (j >= 0 && j < p.S) {
            buf[it] = reinterpret_cast<const V*>(p.src + b * p.s_b + g * p.s_g + j * p.s_t)[v];
            at[it] = b * p.d_b + g * p.d_g + t * p.d_t + static_cast<std::int64_t>(v) * sizeof(V);
          }
        }
      }
      __syncthreads();
#pragma unroll
      for (int it = 0; it < ITEMS; ++it)
        if (at[it] >= 0) *reinterpret_cast<V*>(p.dst + at[it]) = buf[it];
      __syncthreads();
    }
  }
}

}  // namespace cake::cuda_detail
