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

// o[0, len) sorted by `before` (a strict total order on its entries) by the block:
// a bitonic sort in place (O(len log^2 len / threads)), in the form whose every
// compare puts the earlier entry at the lower index, so that a length that is not a
// power of two sorts as if padded at the end: a pair reaching past len never moves.
// Every thread of the block calls it; it starts and ends without a barrier.
template <class I, class Before>
__device__ void block_sort(I* o, index_t len, Before before) {
  index_t span = 1;  // len rounded up to a power of two
  while (span < len) span *= 2;
  for (index_t size = 2; size <= span; size *= 2)  // merges sorted runs of size / 2
    for (index_t stride = size / 2; stride >= 1; stride /= 2) {
      __syncthreads();  // the previous step's writes (the caller's, first)
      for (index_t p = threadIdx.x; p < span / 2; p += blockDim.x) {
        index_t i, j;
        if (stride == size / 2) {  // the first step compares each run with the other's mirror
          const index_t q = p % stride;
          i = (p / stride) * size + q;
          j = (p / stride) * size + size - 1 - q;
        } else {
          i = (p / stride) * 2 * stride + p % stride;
          j = i + stride;
        }
        if (j >= len) continue;  // j is padding: the pair is in order
        const I x = o[i], y = o[j];
        if (before(y, x)) {
          o[i] = y;
          o[j] = x;
        }
      }
    }
}

// out = in (rows, n), row r's first lens[r] entries sorted ascending by
// key[r, entry] (key null: by the entry), one block per row. The entries of a
// prefix are distinct slots with distinct keys, so any sort gives the host's order.
template <class I>
__global__ void sort_prefix_kernel(const I* in, I* out, index_t n, const index_t* lens,
                                   const index_t* key, index_t key_ld) {
  const index_t r = blockIdx.x;
  const I* a = in + r * n;
  I* o = out + r * n;
  const index_t* kr = key ? key + r * key_ld : nullptr;
  for (index_t t = threadIdx.x; t < n; t += blockDim.x) o[t] = a[t];
  block_sort(o, lens[r], [&](I x, I y) { return kr ? kr[x] < kr[y] : x < y; });
}

// A decoding step's selection for ragged rows, every row in one launch (one block
// of SELECT_THREADS per row): row r keeps keeps[r] of its keeps[r] + 1 candidates,
// scores[r, 0 .. keeps[r]] (row stride ld), i.e. all but the lowest, the highest
// index among equal lowest (select_k keeps ties at the lower index). sel[r, 0 ..
// keeps[r]) (row stride n) gets them in ascending order, or with `descending` by
// score, ties by index: what select_k returns for the row alone.
constexpr int select_ragged_threads = 256;
template <class I>
__global__ void select_ragged_kernel(const float* scores, index_t ld, I* sel, index_t n,
                                     const index_t* keeps, bool descending) {
  __shared__ float low[select_ragged_threads];
  __shared__ index_t at[select_ragged_threads];
  const index_t r = blockIdx.x, keep = keeps[r];
  if (keep <= 0) return;  // uniform in the block
  const float* sr = scores + r * ld;
  // The lowest candidate: each thread's, then the block's (ties: the higher index).
  float lo = 0.0f;
  index_t li = -1;
  for (index_t j = threadIdx.x; j <= keep; j += blockDim.x)
    if (li < 0 || sr[j] < lo || (sr[j] == lo && j > li)) {
      lo = sr[j];
      li = j;
    }
  low[threadIdx.x] = lo;
  at[threadIdx.x] = li;
  __syncthreads();
  for (unsigned half = blockDim.x / 2; half > 0; half /= 2) {
    if (threadIdx.x < half) {
      const float o = low[threadIdx.x + half];
      const index_t oi = at[threadIdx.x + half];
      const index_t mi = at[threadIdx.x];
      if (oi >= 0 && (mi < 0 || o < low[threadIdx.x] || (o == low[threadIdx.x] && oi > mi))) {
        low[threadIdx.x] = o;
        at[threadIdx.x] = oi;
      }
    }
    __syncthreads();
  }
  const index_t drop = at[0];
  I* out = sel + r * n;
  for (index_t t = threadIdx.x; t < keep; t += blockDim.x) out[t] = t < drop ? t : t + 1;
  if (descending)
    block_sort(out, keep, [&](I x, I y) { return sr[x] > sr[y] || (sr[x] == sr[y] && x < y); });
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
// values, position -1, score 0; from_r = (from ? from[r] : 0) + base. Slots is
// detail::slots<T>: K/V through key / value (dense, or a paged row's through its
// block table: slots past its blocks are not stored), and what it lacks (K/V,
// positions, scores) is not written.
template <class Slots>
__global__ void pad_rows_kernel(Slots s, const index_t* from, index_t base, index_t to) {
  using T = std::remove_pointer_t<decltype(Slots::k)>;
  const index_t r = blockIdx.x, f = (from ? from[r] : 0) + base, d = s.d;
  for (long long i = threadIdx.x; i < (to - f) * d; i += blockDim.x) {
    const index_t t = f + static_cast<index_t>(i / d), x = static_cast<index_t>(i % d);
    if (T* p = s.key(r, t)) p[x] = T{};
    if (T* p = s.value(r, t)) p[x] = T{};
    if (x == 0 && s.pos) {
      s.pos[r * s.cap + t] = -1;
      if (s.ind) s.ind[r * s.cap + t] = 0.0f;
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
// order: a destination overlaps only source tokens already read (a paged row's
// slots are distinct memory too: a block table names a block once).
// Job (detail::window_move<T>): k, v, pos, ind (or null) of one row, from, to,
// pad_end; a paged row (k and v null) has its K/V in paged, row `row` of the pools.
template <class Job>
__global__ void truncate_rows_kernel(const Job* jobs, index_t d, index_t w) {
  using T = std::remove_pointer_t<decltype(Job::k)>;
  const Job j = jobs[blockIdx.x];
  // Slot t of the row's K (V): dense, or through the block table (null past its blocks).
  const auto at = [&](T* dense, bool value, index_t t) -> T* {
    if (dense) return dense + t * d;
    if (j.paged.k == nullptr || t >= j.paged.room(j.row)) return nullptr;
    return value ? j.paged.value(j.row, t) : j.paged.key(j.row, t);
  };
  if (j.from != j.to)
    for (index_t t = 0; t < w; ++t) {
      T* kd = at(j.k, false, j.to + t);
      T* vd = at(j.v, true, j.to + t);
      const T* ks = at(j.k, false, j.from + t);
      const T* vs = at(j.v, true, j.from + t);
      for (index_t x = threadIdx.x; x < d; x += blockDim.x) {
        if (kd && ks) kd[x] = ks[x];
        if (vd && vs) vd[x] = vs[x];
      }
      if (threadIdx.x == 0) {
        j.pos[j.to + t] = j.pos[j.from + t];
        if (j.ind) j.ind[j.to + t] = j.ind[j.from + t];
      }
    }
  __syncthreads();  // padding may cover slots other threads read above
  const index_t first = j.to + w;
  for (long long i = threadIdx.x; i < (j.pad_end - first) * d; i += blockDim.x) {
    const index_t t = first + static_cast<index_t>(i / d), x = static_cast<index_t>(i % d);
    if (T* p = at(j.k, false, t)) p[x] = T{};
    if (T* p = at(j.v, true, t)) p[x] = T{};
    if (x == 0) {
      j.pos[t] = -1;
      if (j.ind) j.ind[t] = 0.0f;
    }
  }
}

// Slots [0, n) of every row of dst (one block per row, in one launch, so a failed
// launch changes nothing): slot t < len_r takes src's slot sel[r, t] (sel null:
// slot t), key, value and position, and its score from sind[r, sel[r, t]] when
// dst.ind and sind are given; slots from len_r on become padding, len_r = (lens ?
// lens[r] : 0) + base. dst may be src when each row of sel is ascending (sel[r, t] >=
// t): a chunk of slots is read into registers before any of it is written, and every
// later read lies past the chunk. Slots is detail::slots<T>: either side dense or
// paged (K/V through key / value, null where a row has no such slot: not written,
// or read as zero); what dst lacks (V, metadata) is not written.
template <class Slots, int ITEMS>
__global__ void move_slots_kernel(Slots dst, Slots src, const float* sind, index_t sind_ld,
                                  const index_t* sel, index_t n, const index_t* lens,
                                  index_t base) {
  using T = std::remove_pointer_t<decltype(Slots::k)>;
  const index_t r = blockIdx.x, d = dst.d;
  const index_t len = (lens ? lens[r] : 0) + base, live = len < n ? len : n;
  const index_t* kr = sel ? sel + r * n : nullptr;
  index_t* pb = dst.pos ? dst.pos + r * dst.cap : nullptr;
  const index_t* spb = src.pos ? src.pos + r * src.cap : nullptr;
  const bool kv = dst.k != nullptr || dst.is_paged();      // else the metadata only
  const bool with_v = dst.v != nullptr || dst.is_paged();  // else keys only (scoring)
  const index_t cap_items = static_cast<index_t>(blockDim.x) * ITEMS;
  const index_t per_chunk = d >= cap_items ? 1 : cap_items / d;  // slots per chunk
  for (index_t t0 = 0; t0 < n; t0 += per_chunk) {
    const index_t slots = t0 + per_chunk < n ? per_chunk : n - t0, units = kv ? slots * d : 0;
    // Metadata: one slot per thread (per_chunk <= blockDim.x * ITEMS slots).
    index_t p[ITEMS]{};
    float s[ITEMS]{};
#pragma unroll
    for (int it = 0; it < ITEMS; ++it) {
      const index_t u = threadIdx.x + it * static_cast<index_t>(blockDim.x);
      if (pb && u < slots && t0 + u < live) {
        const index_t j = kr ? kr[t0 + u] : t0 + u;
        p[it] = spb ? spb[j] : j;
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
          if (const T* a = src.key(r, j)) bk[it] = a[u % d];
          if (const T* a = with_v ? src.value(r, j) : nullptr) bv[it] = a[u % d];
        }
      }
      __syncthreads();
#pragma unroll
      for (int it = 0; it < ITEMS; ++it) {
        const index_t u = u0 + threadIdx.x + it * static_cast<index_t>(blockDim.x);
        if (u < units) {  // past the row's length: zeros, as read
          if (T* a = dst.key(r, t0 + u / d)) a[u % d] = bk[it];
          if (T* a = dst.value(r, t0 + u / d)) a[u % d] = bv[it];
        }
      }
      __syncthreads();
    }
#pragma unroll
    for (int it = 0; it < ITEMS; ++it) {
      const index_t u = threadIdx.x + it * static_cast<index_t>(blockDim.x);
      if (pb && u < slots) {
        const bool live_slot = t0 + u < live;
        pb[t0 + u] = live_slot ? p[it] : -1;
        if (dst.ind && (sind || !live_slot))
          dst.ind[r * dst.cap + t0 + u] = live_slot ? s[it] : 0.0f;
      }
    }
    __syncthreads();
  }
}

// Writes the new token (k, v: (batch, kv_heads, head_dim), any strides) into slot
// lens[r] of each row r (lens null: `slot`), one block per row; Slots is
// detail::slots<T> (a paged row's slot through its block table).
template <class Slots, class U>
__global__ void append_token_kernel(Slots s, index_t Hkv, const index_t* lens, index_t slot_,
                                    const U* ks, index_t kb, index_t kg, const U* vs, index_t vb,
                                    index_t vg, index_t position) {
  using T = std::remove_pointer_t<decltype(Slots::k)>;
  const index_t r = blockIdx.x, b = r / Hkv, g = r % Hkv, slot = lens ? lens[r] : slot_;
  T* kt = s.key(r, slot);  // a paged row has room for it (the cache checked its table)
  T* vt = s.value(r, slot);
  for (index_t x = threadIdx.x; x < s.d; x += blockDim.x) {
    if (kt) kt[x] = static_cast<T>(ks[b * kb + g * kg + x]);
    if (vt) vt[x] = static_cast<T>(vs[b * vb + g * vg + x]);
  }
  if (threadIdx.x == 0) s.pos[r * s.cap + slot] = position;
}

inline unsigned small_grid(long long work) {
  return static_cast<unsigned>(
      std::max<long long>(1, std::min<long long>((work + 255) / 256, 4096)));
}

}  // namespace cake::cuda_detail
