// Kernels of the fused window statistics (spec sections 1-3) and of the
// from-attention variant. Nothing of size [B, H, w, S] ever reaches global memory:
//
//   row_normaliser_kernel   split-K over the keys: per window query row a partial
//                           softmax normaliser (max, sum of exp) per split
//   lse_combine_kernel      merges the splits into one log-sum-exp per row
//   window_stats_kernel     per prefix key: probabilities of all window rows of the
//                           GQA group, mean / unbiased variance per head, the
//                           indicator policy's score summed over the group, and
//                           the block's share of the layer entropy and variance
//   pool_groups_kernel      average pool along the keys (zero padding, / kernel)
//                           and the 1 / group factor of the GQA mean
//   layer_stats_kernel      the per-block shares summed (in double, fixed order:
//                           deterministic) into stats_out, on the device
//
// A caller that already has each row's log-sum-exp (the attention kernel computed
// it) skips the first two: then K is read once. These are the exact kernels (float
// products on the SIMT cores, in the host's order); window_stats_mma.cuh has the
// tensor-core ones.
#pragma once

#ifndef CAKE_CUDA_EMULATION  // the emulator brings its own BlockReduce
#include <cub/block/block_reduce.cuh>
#endif

#include <cstdint>

#include "../block/common.cuh"
#include "../tuning.cuh"

namespace cake::cuda_detail {

// Shapes and addresses of one window-statistics call. Strides are in elements;
// head_dim has unit stride (checked by the front-end).
template <class TQ, class TK>
struct StatsParams {
  const TQ* q;  // (batch, q_heads, window, head_dim)
  std::int64_t q_b, q_h, q_i;
  const TK* k;  // (batch, kv_heads, tokens, head_dim)
  std::int64_t k_b, k_g, k_j;
  const float* lse;  // (batch, q_heads, window) caller's log-sum-exp, or null
  std::int64_t l_b, l_h, l_i;
  int H, Hkv, group, w, S, P, d;
  int ld;              // shared-memory row pitch of the K tile, in elements (odd: no
                       // bank conflicts when lanes read different keys)
  int ldq;             // row pitch of the query rows: head_dim rounded up to 4 (16-byte
                       // rows, read as float4 broadcasts)
  int ss_ld;           // row pitch of the score tile (TILE_N + 1)
  int rows_per_chunk;  // window rows of the group scored per step (all when they fit)
  int splits;          // key splits of the row-normaliser pass
  float sqrt_d;
};

// Shared-memory footprint, in floats, of the score tile machinery.
__host__ __device__ constexpr std::int64_t stats_rows_alloc(int rows) {
  constexpr int step = tuning::stats_threads / 32 * tuning::stats_rows_per_thread;
  return (rows + step - 1) / step * step;
}
// Shared-memory bytes of the tile machinery (K tile, query rows, score tile) plus
// `extra` floats.
__host__ __device__ constexpr std::int64_t stats_tile_bytes(int ld, int ldq, int ss_ld, int rows,
                                                            std::int64_t extra) {
  const std::int64_t ra = stats_rows_alloc(rows);
  return (tuning::stats_tile_n * ld + ra * ldq + ra * ss_ld + extra) * 4;
}
__host__ __device__ constexpr int stats_query_pitch(int head_dim) { return (head_dim + 3) / 4 * 4; }

// Where each piece lives in a stats block's dynamic shared memory.
struct TileLayout {
  float* Ks = nullptr;  // (TILE_N, ld) keys as float
  float* Qs = nullptr;  // (rows, ldq) queries as float, 16-byte rows
  float* Ss = nullptr;  // (rows, ss_ld) scores, then probabilities
  float* extra = nullptr;
};

template <class TQ, class TK>
__device__ TileLayout tile_layout(const StatsParams<TQ, TK>& p, unsigned char* base) {
  const int ra = static_cast<int>(stats_rows_alloc(p.rows_per_chunk));
  TileLayout t;
  t.Ks = reinterpret_cast<float*>(base);
  t.Qs = t.Ks + tuning::stats_tile_n * p.ld;
  t.Ss = t.Qs + ra * p.ldq;  // Ks is 64 * ld floats: Qs stays 16-byte aligned
  t.extra = t.Ss + ra * p.ss_ld;
  return t;
}

// Keys [j0, j0 + TILE_N) of one KV head into Ks as float; keys at or past `limit` are zero.
template <class TQ, class TK>
__device__ void load_key_tile(const StatsParams<TQ, TK>& p, int b, int g, int j0, int limit,
                              float* Ks) {
  constexpr int TILE_N = tuning::stats_tile_n;
  const TK* base = p.k + b * p.k_b + g * p.k_g;
  for (int e = threadIdx.x; e < TILE_N * p.d; e += blockDim.x) {
    const int row = e / p.d, x = e - row * p.d;
    const int j = j0 + row;
    Ks[row * p.ld + x] =
        j < limit ? to_float(base[static_cast<std::int64_t>(j) * p.k_j + x]) : 0.0f;
  }
}

// Window rows rho0 .. rho0 + count of the group (rho = head_in_group * w + i) into Qs.
template <class TQ, class TK>
__device__ void load_query_rows(const StatsParams<TQ, TK>& p, int b, int g, int rho0, int count,
                                float* Qs) {
  const int gw = p.group * p.w;
  for (int e = threadIdx.x; e < count * p.d; e += blockDim.x) {
    const int rr = e / p.d, x = e - rr * p.d;
    const int rho = rho0 + rr;
    float v = 0.0f;
    if (rho < gw) {
      const int h = g * p.group + rho / p.w, i = rho % p.w;
      v = to_float(p.q[b * p.q_b + h * p.q_h + i * p.q_i + x]);
    }
    Qs[rr * p.ldq + x] = v;
  }
}

// Ss[r][c] = Qs[r] . Ks[c] / sqrt(d) for `rows` rows and TILE_N keys. Each thread owns
// ROWS rows x 2 keys (c, c + 32): the warp shares its rows (shared-memory broadcasts,
// four head_dim elements per float4) and reads 32 distinct K rows (odd pitch:
// conflict-free), 16 loads per 64 FMAs. Each sum runs over head_dim in order, one fmaf
// per element, as the host backend's does.
template <class TQ, class TK>
__device__ void score_tile(const StatsParams<TQ, TK>& p, const float* Ks, const float* Qs,
                           float* Ss, int rows) {
  constexpr int TILE_N = tuning::stats_tile_n;
  constexpr int ROWS = tuning::stats_rows_per_thread;
  constexpr int STEP = tuning::stats_threads / 32 * ROWS;
  static_assert(TILE_N == 64, "score_tile maps two keys per lane");
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const float* k0 = Ks + lane * p.ld;
  const float* k1 = Ks + (lane + 32) * p.ld;
  const int d4 = p.d & ~3;
  for (int rb = warp * ROWS; rb < rows; rb += STEP) {
    float acc0[ROWS], acc1[ROWS];
#pragma unroll
    for (int t = 0; t < ROWS; ++t) acc0[t] = acc1[t] = 0.0f;
    const float* qr = Qs + rb * p.ldq;
    for (int x = 0; x < d4; x += 4) {
      const float a0 = k0[x], a1 = k0[x + 1], a2 = k0[x + 2], a3 = k0[x + 3];
      const float c0 = k1[x], c1 = k1[x + 1], c2 = k1[x + 2], c3 = k1[x + 3];
#pragma unroll
      for (int t = 0; t < ROWS; ++t) {
        const float4 q = *reinterpret_cast<const float4*>(qr + t * p.ldq + x);
        acc0[t] = fmaf(q.w, a3, fmaf(q.z, a2, fmaf(q.y, a1, fmaf(q.x, a0, acc0[t]))));
        acc1[t] = fmaf(q.w, c3, fmaf(q.z, c2, fmaf(q.y, c1, fmaf(q.x, c0, acc1[t]))));
      }
    }
    for (int x = d4; x < p.d; ++x) {
      const float a = k0[x], c = k1[x];
#pragma unroll
      for (int t = 0; t < ROWS; ++t) {
        const float qv = qr[t * p.ldq + x];
        acc0[t] = fmaf(qv, a, acc0[t]);
        acc1[t] = fmaf(qv, c, acc1[t]);
      }
    }
#pragma unroll
    for (int t = 0; t < ROWS; ++t) {
      Ss[(rb + t) * p.ss_ld + lane] = acc0[t] / p.sqrt_d;
      Ss[(rb + t) * p.ss_ld + lane + 32] = acc1[t] / p.sqrt_d;
    }
  }
}

// Ss = scores of window rows rho0 .. rho0 + rows against the key tile in Ks, the
// rows' queries loaded first unless all of them stay resident in Qs. The whole block
// calls it; Ss is complete for every thread on return.
template <class TQ, class TK>
__device__ __forceinline__ void score_rows(const StatsParams<TQ, TK>& p, const TileLayout& lay,
                                           int b, int g, int rho0, int rows, bool resident) {
  if (!resident) {
    __syncthreads();
    load_query_rows(p, b, g, rho0, rows, lay.Qs);
  }
  __syncthreads();
  score_tile(p, lay.Ks, lay.Qs, lay.Ss, rows);
  __syncthreads();
}

// The block's sums of a and b (two cub::BlockReduce passes on one storage), valid in
// thread 0 only.
template <int THREADS, class T>
__device__ __forceinline__ void block_sum_pair(T& a, T& b) {
  using Reduce = cub::BlockReduce<T, THREADS>;
  __shared__ typename Reduce::TempStorage red;
  a = Reduce(red).Sum(a);
  __syncthreads();  // the storage is reused
  b = Reduce(red).Sum(b);
}

// grid (splits, batch * kv_heads). Split s handles key tiles s, s + splits, ...
// part: (batch, kv_heads, group * window, splits) partial (max, sum of exp).
template <class TQ, class TK>
__global__ void __launch_bounds__(tuning::stats_threads, 1)  // shared memory: 1 block / SM
    row_normaliser_kernel(StatsParams<TQ, TK> p, float2* __restrict__ part) {
  constexpr int TILE_N = tuning::stats_tile_n;
  CAKE_DYNAMIC_SHARED(128, stats_smem);
  const int bg = blockIdx.y, b = bg / p.Hkv, g = bg % p.Hkv;
  const int gw = p.group * p.w, R = p.rows_per_chunk;
  const TileLayout lay = tile_layout(p, stats_smem);
  float* Ss = lay.Ss;
  float* run_m = lay.extra;  // (group * window)
  float* run_l = run_m + gw;
  for (int r = threadIdx.x; r < gw; r += blockDim.x) {
    run_m[r] = -INFINITY;
    run_l[r] = 0.0f;
  }
  const bool resident = R >= gw;
  if (resident) load_query_rows(p, b, g, 0, gw, lay.Qs);
  const int tiles = (p.S + TILE_N - 1) / TILE_N;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = blockDim.x >> 5;
  for (int t = blockIdx.x; t < tiles; t += p.splits) {
    const int j0 = t * TILE_N;
    __syncthreads();  // the previous tile's readers are done with Ks / Ss
    load_key_tile(p, b, g, j0, p.S, lay.Ks);
    for (int rho0 = 0; rho0 < gw; rho0 += R) {
      const int rows = min(R, gw - rho0);
      score_rows(p, lay, b, g, rho0, rows, resident);
      // A warp per row: this tile's normaliser, merged into the row's running one.
      for (int rr = warp; rr < rows; rr += warps) {
        const int rho = rho0 + rr, i = rho % p.w;
        const int last = p.P + i;  // row i sees keys [0, S - w + i]
        const int ja = j0 + lane, jb = j0 + lane + 32;
        const float sa = ja <= last && ja < p.S ? Ss[rr * p.ss_ld + lane] : -INFINITY;
        const float sb = jb <= last && jb < p.S ? Ss[rr * p.ss_ld + lane + 32] : -INFINITY;
        const float m = warp_max(fmaxf(sa, sb));
        if (m == -INFINITY) continue;  // uniform across the warp
        const float l = warp_sum((sa == -INFINITY ? 0.0f : expf(sa - m)) +
                                 (sb == -INFINITY ? 0.0f : expf(sb - m)));
        if (lane == 0) merge_normaliser(run_m[rho], run_l[rho], m, l);
      }
    }
  }
  __syncthreads();
  for (int r = threadIdx.x; r < gw; r += blockDim.x)
    part[(static_cast<std::int64_t>(bg) * gw + r) * p.splits + blockIdx.x] =
        make_float2(run_m[r], run_l[r]);
}

// One thread per window row: lse = max + ln(sum) over the splits (static: see layer_stats_kernel).
static __global__ void lse_combine_kernel(const float2* __restrict__ part, int rows, int splits,
                                          float* __restrict__ lse) {
  const int r = blockIdx.x * blockDim.x + threadIdx.x;
  if (r >= rows) return;
  float m = -INFINITY, l = 0.0f;
  for (int s = 0; s < splits; ++s) {
    const float2 v = part[static_cast<std::int64_t>(r) * splits + s];
    merge_normaliser(m, l, v.x, v.y);
  }
  lse[r] = m + logf(l);
}

// Running mean / sum of squared deviations of one key's probabilities over the
// window rows of one head, fed segment by segment (Chan et al.'s pairwise update),
// so that the window may span several row chunks.
struct ColumnMoments {
  int count = 0;
  float mean = 0.0f, m2 = 0.0f;
  __device__ void add(int n, float seg_mean, float seg_m2) {
    if (count == 0) {
      count = n;
      mean = seg_mean;
      m2 = seg_m2;
      return;
    }
    const int tot = count + n;
    const float delta = seg_mean - mean;
    mean += delta * (static_cast<float>(n) / static_cast<float>(tot));
    m2 +=
        seg_m2 + delta * delta *
                     (static_cast<float>(count) * static_cast<float>(n) / static_cast<float>(tot));
    count = tot;
  }
};

// grid (blocks, batch * kv_heads), persistent: block x handles prefix key tiles
// x, x + blocks, ... so that the group's queries are loaded once per block.
// raw: (batch, kv_heads, P) indicator summed over the group's heads, before pooling;
// partial: (batch * kv_heads, blocks) per-block (entropy, variance).
template <class TQ, class TK, class Ind>
__global__ void __launch_bounds__(tuning::stats_threads, 1)  // shared memory: 1 block / SM
    window_stats_kernel(StatsParams<TQ, TK> p, const float* __restrict__ lse_ws, Ind indicator,
                        bool want_entropy, bool want_variance, float* __restrict__ raw,
                        float2* __restrict__ partial) {
  constexpr int TILE_N = tuning::stats_tile_n;
  CAKE_DYNAMIC_SHARED(128, stats_smem);
  const int bg = blockIdx.y, b = bg / p.Hkv, g = bg % p.Hkv;
  const int gw = p.group * p.w, R = p.rows_per_chunk;
  const TileLayout lay = tile_layout(p, stats_smem);
  float* Ss = lay.Ss;
  float* lse_s = lay.extra;        // (group * window)
  float* head_score = lse_s + gw;  // (group, TILE_N) per-head indicator of the tile's keys
  for (int rho = threadIdx.x; rho < gw; rho += blockDim.x) {
    const int h = g * p.group + rho / p.w, i = rho % p.w;
    lse_s[rho] = p.lse ? p.lse[b * p.l_b + h * p.l_h + i * p.l_i]
                       : lse_ws[static_cast<std::int64_t>(bg) * gw + rho];
  }
  const bool resident = R >= gw;
  if (resident) load_query_rows(p, b, g, 0, gw, lay.Qs);

  const bool need_var = want_variance || Ind::needs_variance;
  const int col = threadIdx.x;  // column owner in the reduction phase, if < TILE_N
  const float inv_w1 = 1.0f / static_cast<float>(p.w - 1);
  float var_sum = 0.0f, ent = 0.0f;
  const int tiles = (p.P + TILE_N - 1) / TILE_N;

  for (int t = blockIdx.x; t < tiles; t += gridDim.x) {
    const int j0 = t * TILE_N, j = j0 + col;
    const bool col_valid = col < TILE_N && j < p.P;
    __syncthreads();  // the previous tile's readers are done with the K tile and Ss
    load_key_tile(p, b, g, j0, p.P, lay.Ks);
    ColumnMoments mom;
    float group_score = 0.0f;
    for (int rho0 = 0; rho0 < gw; rho0 += R) {
      const int rows = min(R, gw - rho0);
      score_rows(p, lay, b, g, rho0, rows, resident);
      // Scores -> probabilities (only prefix keys are needed here: every window row
      // sees them all) and the entropy terms.
      for (int e = threadIdx.x; e < rows * TILE_N; e += blockDim.x) {
        const int rr = e / TILE_N, c = e - rr * TILE_N;
        float& s = Ss[rr * p.ss_ld + c];
        const float pr = j0 + c < p.P ? expf(s - lse_s[rho0 + rr]) : 0.0f;
        s = pr;
        if (want_entropy) ent += pr * logf(pr + 1e-10f);
      }
      __syncthreads();
      if (resident) {
        // Every head's window is in the tile: TILE_N columns x (THREADS / TILE_N) heads
        // at a time, then the column's owner sums the heads in order (the host's order).
        constexpr int HEAD_LANES = tuning::stats_threads / TILE_N;
        const int c = threadIdx.x % TILE_N;
        const bool valid = j0 + c < p.P;
        for (int r = threadIdx.x / TILE_N; r < p.group; r += HEAD_LANES) {
          const float* colp = Ss + r * p.w * p.ss_ld + c;
          float sum = 0.0f;
          for (int i = 0; i < p.w; ++i) sum += colp[i * p.ss_ld];
          const float mean = sum * (1.0f / static_cast<float>(p.w));
          float m2 = 0.0f;
          if (need_var)
            for (int i = 0; i < p.w; ++i) {
              const float dv = colp[i * p.ss_ld] - mean;
              m2 += dv * dv;
            }
          const float var = need_var ? m2 * inv_w1 : 0.0f;
          head_score[r * TILE_N + c] = indicator.score(mean, var);
          if (valid && need_var) var_sum += var;  // as the host: whenever computed
        }
        __syncthreads();
        if (col < TILE_N)
          for (int r = 0; r < p.group; ++r) group_score += head_score[r * TILE_N + col];
      } else if (col < TILE_N) {
        // Walk the chunk head by head (rows of one head are contiguous).
        for (int rho = rho0; rho < rho0 + rows;) {
          const int r = rho / p.w;
          const int seg_end = min((r + 1) * p.w, rho0 + rows);
          const int n = seg_end - rho;
          float sum = 0.0f;
          for (int x = rho; x < seg_end; ++x) sum += Ss[(x - rho0) * p.ss_ld + col];
          const float seg_mean = sum * (1.0f / static_cast<float>(n));
          float seg_m2 = 0.0f;
          if (need_var)
            for (int x = rho; x < seg_end; ++x) {
              const float dv = Ss[(x - rho0) * p.ss_ld + col] - seg_mean;
              seg_m2 += dv * dv;
            }
          mom.add(n, seg_mean, seg_m2);
          if (seg_end == (r + 1) * p.w) {  // the head's window is complete
            const float var = need_var ? mom.m2 * inv_w1 : 0.0f;
            group_score += indicator.score(mom.mean, var);
            if (col_valid && need_var) var_sum += var;  // as the host: whenever computed
            mom = ColumnMoments{};
          }
          rho = seg_end;
        }
      }
    }
    if (col_valid) raw[static_cast<std::int64_t>(bg) * p.P + j] = group_score;
  }

  block_sum_pair<tuning::stats_threads>(ent, var_sum);
  if (threadIdx.x == 0)
    partial[static_cast<std::int64_t>(bg) * gridDim.x + blockIdx.x] = make_float2(-ent, var_sum);
}

// grid (ceil(P / THREADS), batch * kv_heads). From attention weights
// a: (batch, q_heads, window, tokens); one thread per prefix key, reading the
// window rows of every head of the group (coalesced along the keys).
template <class TA, class Ind>
__global__ void __launch_bounds__(tuning::column_threads)
    attention_stats_kernel(const TA* __restrict__ a, std::int64_t a_b, std::int64_t a_h,
                           std::int64_t a_i, int Hkv, int group, int w, int P, Ind indicator,
                           bool want_entropy, bool want_variance, float* __restrict__ raw,
                           float2* __restrict__ partial) {
  const int bg = blockIdx.y, b = bg / Hkv, g = bg % Hkv;
  const int j = blockIdx.x * blockDim.x + threadIdx.x;
  const bool need_var = want_variance || Ind::needs_variance;
  float group_score = 0.0f, var_sum = 0.0f, ent = 0.0f;
  if (j < P) {
    const float inv_w = 1.0f / static_cast<float>(w), inv_w1 = 1.0f / static_cast<float>(w - 1);
    for (int r = 0; r < group; ++r) {
      const TA* col = a + b * a_b + static_cast<std::int64_t>(g * group + r) * a_h + j;
      float sum = 0.0f;
      for (int i = 0; i < w; ++i) {
        const float v = to_float(col[i * a_i]);
        sum += v;
        if (want_entropy) ent += v * logf(v + 1e-10f);
      }
      const float mean = sum * inv_w;
      float m2 = 0.0f;
      if (need_var)
        for (int i = 0; i < w; ++i) {
          const float dv = to_float(col[i * a_i]) - mean;
          m2 += dv * dv;
        }
      const float var = need_var ? m2 * inv_w1 : 0.0f;
      group_score += indicator.score(mean, var);
      if (need_var) var_sum += var;  // as the host: whenever computed
    }
    raw[static_cast<std::int64_t>(bg) * P + j] = group_score;
  }
  block_sum_pair<tuning::column_threads>(ent, var_sum);
  if (threadIdx.x == 0)
    partial[static_cast<std::int64_t>(bg) * gridDim.x + blockIdx.x] = make_float2(-ent, var_sum);
}

// grid (ceil(P / THREADS), batch * kv_heads): out(b, g, j) = sum of raw over the
// kernel window centred on j (zeros outside), / (kernel * group), in the host's order.
static __global__ void pool_groups_kernel(const float* __restrict__ raw, int Hkv, int P, int kernel,
                                          float inv, float* __restrict__ out, std::int64_t o_b,
                                          std::int64_t o_g) {
  const int bg = blockIdx.y, b = bg / Hkv, g = bg % Hkv;
  const int j = blockIdx.x * blockDim.x + threadIdx.x;
  if (j >= P) return;
  const float* row = raw + static_cast<std::int64_t>(bg) * P;
  const int half = kernel / 2;
  float acc = 0.0f;
  for (int t = 0; t < kernel; ++t) {
    const int jj = j - half + t;
    acc += (jj >= 0 && jj < P) ? row[jj] : 0.0f;
  }
  out[b * o_b + g * o_g + j] = acc * inv;
}

// One block: the per-block (entropy, variance) shares summed in double, in a fixed
// order, into stats_out(0) and stats_out(1). Stays on the device: no host sync.
// (static: a non-template kernel in a header needs internal linkage per translation unit)
static __global__ void __launch_bounds__(tuning::column_threads)
    layer_stats_kernel(const float2* __restrict__ partial, int count, float* __restrict__ stats,
                       std::int64_t stride) {
  double e = 0, v = 0;
  for (int i = threadIdx.x; i < count; i += blockDim.x) {
    e += partial[i].x;
    v += partial[i].y;
  }
  block_sum_pair<tuning::column_threads>(e, v);
  if (threadIdx.x == 0) {
    stats[0] = static_cast<float>(e);
    stats[stride] = static_cast<float>(v);
  }
}

}  // namespace cake::cuda_detail
