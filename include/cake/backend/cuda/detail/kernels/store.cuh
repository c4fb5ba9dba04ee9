// The kernels of the CUDA backend's KvCache primitives (backend/cuda/layer_store.cuh):
// finite checks, index lists (window slots, sorted prefixes), metadata gathers,
// scores by position, sums, padding, the batched truncation of a prefill's commit and
// the one-launch slot moves of a decoding step (in place, or back from the workspace).
#pragma once

#include <cuda_runtime.h>

#include <algorithm>
#include <type_traits>

#include "../../../../config.hpp"

namespace cake::cuda_detail {

// First element that is not finite or exceeds `bound` in magnitude (flat index in
// logical row-major order) of a rank-4 strided tensor (lower ranks pass extent 1);
// *first starts at ~0 (none found).
template <class U>
__global__ void find_non_finite_kernel(const U* p, long long e0, long long e1, long long e2,
                                       long long e3, long long s0, long long s1, long long s2,
                                       long long s3, float bound, unsigned long long* first) {
  const long long total = e0 * e1 * e2 * e3;
  for (long long i = blockIdx.x * static_cast<long long>(blockDim.x) + threadIdx.x; i < total;
       i += static_cast<long long>(gridDim.x) * blockDim.x) {
    long long r = i;
    const long long i3 = r % e3;
    r /= e3;
    const long long i2 = r % e2;
    r /= e2;
    const long long i1 = r % e1;
    const long long i0 = r / e1;
    const float x = static_cast<float>(p[i0 * s0 + i1 * s1 + i2 * s2 + i3 * s3]);
    const float a = x < 0.0f ? -x : x;
    if (!(a <= bound)) atomicMin(first, static_cast<unsigned long long>(i));  // NaN too
  }
}

// pos[r, t] = t for t < n.
template <class I>
__global__ void iota_rows_kernel(I* pos, index_t rows, index_t cap, index_t n) {
  const long long total = rows * n;
  for (long long i = blockIdx.x * static_cast<long long>(blockDim.x) + threadIdx.x; i < total;
       i += static_cast<long long>(gridDim.x) * blockDim.x)
    pos[(i / n) * cap + i % n] = i % n;
}

// sel[r, t] for t in [k_r, n): the window (f_r + t - k_r, t - k_r < w) after each
// row's k_r selected slots, then padding that repeats the window's last slot;
// k_r = (keeps ? keeps[r] : 0) + keep, f_r = (firsts ? firsts[r] : 0) + first.
template <class I>
__global__ void window_slots_kernel(I* sel, index_t rows, index_t n, const index_t* keeps,
                                    index_t keep, index_t w, const index_t* firsts, index_t first) {
  const long long total = rows * n;
  for (long long i = blockIdx.x * static_cast<long long>(blockDim.x) + threadIdx.x; i < total;
       i += static_cast<long long>(gridDim.x) * blockDim.x) {
    const index_t r = i / n, t = i % n, kr = (keeps ? keeps[r] : 0) + keep;
    const index_t fr = (firsts ? firsts[r] : 0) + first;
    if (t >= kr) sel[i] = fr + (t - kr < w ? t - kr : w - 1);
  }
}

// out = in (rows, n), row r's first lens[r] entries sorted ascending by
// key[r, entry] (key null: by the entry), one block per row. The entries of a
// prefix are distinct slots with distinct keys, so each one's rank is the count of
// smaller keys: O(len^2 / threads) per row, no shared memory.
template <class I>
__global__ void sort_prefix_kernel(const I* in, I* out, index_t n, const index_t* lens,
                                   const index_t* key, index_t key_ld) {
  const index_t r = blockIdx.x, len = lens[r];
  const I* a = in + r * n;
  const index_t* kr = key ? key + r * key_ld : nullptr;
  for (index_t t = threadIdx.x; t < n; t += blockDim.x) {
    if (t >= len) {
      out[r * n + t] = a[t];
      continue;
    }
    const index_t mine = kr ? kr[a[t]] : a[t];
    index_t rank = 0;
    for (index_t u = 0; u < len; ++u) rank += (kr ? kr[a[u]] : a[u]) < mine;
    out[r * n + rank] = a[t];
  }
}

// out_pos[r, t] = src_pos ? src_pos[r, sel[r, t]] : sel[r, t]; out_ind[r, t] likewise
// from ind for the tokens that have a score (source slot < ind_cols).
template <class I>
__global__ void gather_meta_kernel(I* out_pos, float* out_ind, index_t out_cap, const index_t* sel,
                                   index_t rows, index_t n, const index_t* src_pos, index_t src_cap,
                                   const float* ind, index_t ind_ld, index_t ind_cols) {
  const long long total = rows * n;
  for (long long i = blockIdx.x * static_cast<long long>(blockDim.x) + threadIdx.x; i < total;
       i += static_cast<long long>(gridDim.x) * blockDim.x) {
    const index_t r = i / n, t = i % n, j = sel[i];
    out_pos[r * out_cap + t] = src_pos ? src_pos[r * src_cap + j] : j;
    if (out_ind && ind && j < ind_cols) out_ind[r * out_cap + t] = ind[r * ind_ld + j];
  }
}

// out[r, t] = pos ? indicator.score_position(pos[r, t]) : indicator.score_position(t).
template <class Ind>
__global__ void position_scores_kernel(Ind indicator, const index_t* pos, index_t pos_ld,
                                       float* out, index_t out_ld, index_t rows, index_t cols) {
  const long long total = rows * cols;
  for (long long i = blockIdx.x * static_cast<long long>(blockDim.x) + threadIdx.x; i < total;
       i += static_cast<long long>(gridDim.x) * blockDim.x) {
    const index_t r = i / cols, t = i % cols;
    out[r * out_ld + t] = indicator.score_position(pos ? pos[r * pos_ld + t] : t);
  }
}

// dst[r, t] += src[r, t].
template <class U>
__global__ void accumulate_kernel(U* dst, index_t dst_ld, const U* src, index_t src_ld,
                                  index_t rows, index_t cols) {
  const long long total = rows * cols;
  for (long long i = blockIdx.x * static_cast<long long>(blockDim.x) + threadIdx.x; i < total;
       i += static_cast<long long>(gridDim.x) * blockDim.x) {
    const index_t r = i / cols, t = i % cols;
    dst[r * dst_ld + t] += src[r * src_ld + t];
  }
}

// Slots [from_r, to) of every row become padding, one block per row: zero keys and
// values, position -1, score 0 (ind may be null); from_r = (from ? from[r] : 0) + base.
template <class T>
__global__ void pad_rows_kernel(T* k, T* v, index_t* pos, float* ind, index_t cap, index_t d,
                                const index_t* from, index_t base, index_t to) {
  const index_t r = blockIdx.x, f = (from ? from[r] : 0) + base;
  for (long long i = threadIdx.x; i < (to - f) * d; i += blockDim.x) {
    k[(r * cap + f) * d + i] = T{};
    v[(r * cap + f) * d + i] = T{};
    if (i % d == 0) {
      pos[r * cap + f + i / d] = -1;
      if (ind) ind[r * cap + f + i / d] = 0.0f;
    }
  }
}

template <class U>
__global__ void fill_kernel(U* p, index_t n, U value) {
  for (long long i = blockIdx.x * static_cast<long long>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<long long>(gridDim.x) * blockDim.x)
    p[i] = value;
}

// Every truncation of a prefill's commit in one launch, one block per row: a failed
// launch runs none of them, so the cache either changes as planned or not at all.
// Each thread owns the same columns of every token and moves tokens in ascending
// order: a destination overlaps only source tokens already read.
// Job (detail::window_move<T>): k, v, pos, ind (or null) of one row, from, to, pad_end.
template <class Job>
__global__ void truncate_rows_kernel(const Job* jobs, index_t d, index_t w) {
  using T = std::remove_pointer_t<decltype(Job::k)>;
  const Job j = jobs[blockIdx.x];
  if (j.from != j.to)
    for (index_t t = 0; t < w; ++t) {
      for (index_t x = threadIdx.x; x < d; x += blockDim.x) {
        j.k[(j.to + t) * d + x] = j.k[(j.from + t) * d + x];
        j.v[(j.to + t) * d + x] = j.v[(j.from + t) * d + x];
      }
      if (threadIdx.x == 0) {
        j.pos[j.to + t] = j.pos[j.from + t];
        if (j.ind) j.ind[j.to + t] = j.ind[j.from + t];
      }
    }
  __syncthreads();  // padding may cover slots other threads read above
  const index_t first = j.to + w;
  for (long long i = threadIdx.x; i < (j.pad_end - first) * d; i += blockDim.x) {
    j.k[first * d + i] = T{};
    j.v[first * d + i] = T{};
    if (i % d == 0) {
      j.pos[first + i / d] = -1;
      if (j.ind) j.ind[first + i / d] = 0.0f;
    }
  }
}

// Slots [0, n) of every row of dst (one block per row, in one launch, so a failed
// launch changes nothing): slot t < len_r takes src's slot sel[r, t] (sel null:
// slot t), key, value and position, and its score from src_ind[r, sel[r, t]] when
// dst_ind and src_ind are given; slots from len_r on become padding, len_r = (lens ?
// lens[r] : 0) + base. dst may be src when each row of sel is ascending (sel[r, t] >=
// t): a chunk of slots is read into registers before any of it is written, and every
// later read lies past the chunk.
template <class T, int ITEMS>
__global__ void move_slots_kernel(T* k, T* v, index_t* pos, float* ind, index_t cap, const T* sk,
                                  const T* sv, const index_t* spos, index_t scap, const float* sind,
                                  index_t sind_ld, index_t d, const index_t* sel, index_t n,
                                  const index_t* lens, index_t base) {
  const index_t r = blockIdx.x;
  const index_t len = (lens ? lens[r] : 0) + base, live = len < n ? len : n;
  const index_t* kr = sel ? sel + r * n : nullptr;
  T* kb = k + r * cap * d;
  T* vb = v + r * cap * d;
  index_t* pb = pos + r * cap;
  const T* skb = sk + r * scap * d;
  const T* svb = sv + r * scap * d;
  const index_t* spb = spos + r * scap;
  const index_t cap_items = static_cast<index_t>(blockDim.x) * ITEMS;
  const index_t per_chunk = d >= cap_items ? 1 : cap_items / d;  // slots per chunk
  for (index_t t0 = 0; t0 < n; t0 += per_chunk) {
    const index_t slots = t0 + per_chunk < n ? per_chunk : n - t0, units = slots * d;
    // Metadata: one slot per thread (per_chunk <= blockDim.x * ITEMS slots).
    index_t p[ITEMS]{};
    float s[ITEMS]{};
#pragma unroll
    for (int it = 0; it < ITEMS; ++it) {
      const index_t u = threadIdx.x + it * static_cast<index_t>(blockDim.x);
      if (u < slots && t0 + u < live) {
        const index_t j = kr ? kr[t0 + u] : t0 + u;
        p[it] = spb[j];
        s[it] = sind ? sind[r * sind_ld + j] : 0.0f;
      }
    }
    // One slot longer than a sweep goes in sweeps: its source is itself or later.
    for (index_t u0 = 0; u0 < units; u0 += cap_items) {
      T bk[ITEMS]{}, bv[ITEMS]{};
#pragma unroll
      for (int it = 0; it < ITEMS; ++it) {
        const index_t u = u0 + threadIdx.x + it * static_cast<index_t>(blockDim.x);
        if (u < units && t0 + u / d < live) {
          const index_t j = kr ? kr[t0 + u / d] : t0 + u / d;
          bk[it] = skb[j * d + u % d];
          bv[it] = svb[j * d + u % d];
        }
      }
      __syncthreads();
#pragma unroll
      for (int it = 0; it < ITEMS; ++it) {
        const index_t u = u0 + threadIdx.x + it * static_cast<index_t>(blockDim.x);
        if (u < units) {  // past the row's length: zeros, as read
          kb[(t0 + u / d) * d + u % d] = bk[it];
          vb[(t0 + u / d) * d + u % d] = bv[it];
        }
      }
      __syncthreads();
    }
#pragma unroll
    for (int it = 0; it < ITEMS; ++it) {
      const index_t u = threadIdx.x + it * static_cast<index_t>(blockDim.x);
      if (u < slots) {
        const bool live_slot = t0 + u < live;
        pb[t0 + u] = live_slot ? p[it] : -1;
        if (ind && (sind || !live_slot)) ind[r * cap + t0 + u] = live_slot ? s[it] : 0.0f;
      }
    }
    __syncthreads();
  }
}

// Writes the new token (k, v: (batch, kv_heads, head_dim), any strides) into slot
// lens[r] of each row r (lens null: `slot`), one block per row.
template <class T, class U>
__global__ void append_token_kernel(T* k, T* v, index_t* pos, index_t cap, index_t d, index_t Hkv,
                                    const index_t* lens, index_t slot_, const U* ks, index_t kb,
                                    index_t kg, const U* vs, index_t vb, index_t vg,
                                    index_t position) {
  const index_t r = blockIdx.x, b = r / Hkv, g = r % Hkv, slot = lens ? lens[r] : slot_;
  for (index_t x = threadIdx.x; x < d; x += blockDim.x) {
    k[(r * cap + slot) * d + x] = static_cast<T>(ks[b * kb + g * kg + x]);
    v[(r * cap + slot) * d + x] = static_cast<T>(vs[b * vb + g * vg + x]);
  }
  if (threadIdx.x == 0) pos[r * cap + slot] = position;
}

inline unsigned small_grid(long long work) {
  return static_cast<unsigned>(
      std::max<long long>(1, std::min<long long>((work + 255) / 256, 4096)));
}

}  // namespace cake::cuda_detail
