// Kernels of cake::decode_scores on CUDA (spec section 7): the new token's attention
// over every held key (softmax in float32, no mask), the indicator policy's score
// with no variance, summed over the GQA group, then the average pool in cache order.
//
//   decode_logits_kernel   grid (key tiles, batch * kv_heads): a tile of keys is read
//                          once (16-byte loads when aligned) into shared memory and
//                          scored against every query head of the group (GQA reuse);
//                          the logits go to the workspace with each tile's softmax
//                          normaliser (max, sum of exp) per head
//   decode_finish_kernel   grid (candidate chunks, batch * kv_heads): merges the
//                          tiles' normalisers, turns logits into probabilities, the
//                          indicator's score summed over the group in head order,
//                          then the pool
//
// The keys are spread over many blocks, so that one step reads K at memory speed
// even with a handful of (batch, kv-head) rows; the finishing pass only touches
// (group, held) floats per row.
#pragma once

#include <cstdint>
#include <cstring>

#include "../block/common.cuh"
#include "../tuning.cuh"

namespace cake::cuda_detail {

template <class TQ, class TK>
struct DecodeParams {
  const TQ* q;  // (batch, q_heads, head_dim)
  std::int64_t q_b, q_h;
  const TK* k;  // (batch, kv_heads, held, head_dim)
  std::int64_t k_b, k_g, k_j;
  float* out;  // (batch, kv_heads, candidates)
  std::int64_t o_b, o_g;
  float* logits;  // (batch * kv_heads, group, held) workspace
  float2* part;   // (batch * kv_heads, group, tiles) workspace: per-tile (max, sum of exp)
  int Hkv, group, held, c, d, tiles;
  int ld;        // shared-memory pitch of a key row, in floats (odd: no bank conflicts)
  bool k_vec16;  // key rows are 16-byte aligned: loaded as uint4
  float sqrt_d;
};

// Shared-memory bytes of decode_logits_kernel: the group's queries, the key tile as
// float and the tile's logits.
__host__ __device__ constexpr std::int64_t decode_logits_smem(int group, int d, int ld) {
  return (static_cast<std::int64_t>(group) * d +
          static_cast<std::int64_t>(tuning::decode_tile) * ld +
          static_cast<std::int64_t>(group) * tuning::decode_tile) *
         4;
}

// Shared-memory bytes of decode_finish_kernel: the group's merged normalisers and the
// group sums of a chunk plus the pool's reach on either side.
__host__ __device__ constexpr std::int64_t decode_finish_smem(int group, int half) {
  return (2 * static_cast<std::int64_t>(group) + tuning::decode_chunk + 2 * half) * 4;
}

template <class TQ, class TK>
__global__ void __launch_bounds__(tuning::decode_threads)
    decode_logits_kernel(DecodeParams<TQ, TK> p) {
  constexpr int THREADS = tuning::decode_threads;
  constexpr int TILE = tuning::decode_tile;
  static_assert(TILE % 32 == 0, "a warp's (key, head) pairs share one head");
  CAKE_DYNAMIC_SHARED(16, dsm_bytes);
  float* dsm = reinterpret_cast<float*>(dsm_bytes);
  float* qs = dsm;                 // (group, d)
  float* ks = qs + p.group * p.d;  // (TILE, ld)
  float* ls = ks + TILE * p.ld;    // (group, TILE) this tile's logits
  const int tile = blockIdx.x, bg = blockIdx.y, b = bg / p.Hkv, g = bg % p.Hkv;
  const int j0 = tile * TILE, n = min(TILE, p.held - j0);

  for (int e = threadIdx.x; e < p.group * p.d; e += THREADS) {
    const int r = e / p.d, x = e - r * p.d;
    qs[e] = to_float(p.q[b * p.q_b + static_cast<std::int64_t>(g * p.group + r) * p.q_h + x]);
  }
  const TK* base = p.k + b * p.k_b + g * p.k_g + static_cast<std::int64_t>(j0) * p.k_j;
  if (p.k_vec16) {
    constexpr int V = 16 / sizeof(TK);
    const int per_row = p.d / V;
    for (int e = threadIdx.x; e < n * per_row; e += THREADS) {
      const int row = e / per_row, v = e - row * per_row;
      const uint4 val =
          reinterpret_cast<const uint4*>(base + static_cast<std::int64_t>(row) * p.k_j)[v];
      TK el[V];  // copied, not pointer-cast: reading a uint4 through TK* breaks aliasing
      memcpy(static_cast<void*>(el), &val, sizeof val);
#pragma unroll
      for (int t = 0; t < V; ++t) ks[row * p.ld + v * V + t] = to_float(el[t]);
    }
  } else {
    for (int e = threadIdx.x; e < n * p.d; e += THREADS) {
      const int row = e / p.d, x = e - row * p.d;
      ks[row * p.ld + x] = to_float(base[static_cast<std::int64_t>(row) * p.k_j + x]);
    }
  }
  __syncthreads();

  // (key, head) pairs, key fastest: a warp reads 32 distinct key rows (odd pitch) and
  // one broadcast query row.
  for (int e = threadIdx.x; e < p.group * TILE; e += THREADS) {
    const int r = e / TILE, jj = e - r * TILE;
    if (jj >= n) continue;
    const float* qr = qs + r * p.d;
    const float* kr = ks + jj * p.ld;
    float s = 0.0f;
    for (int x = 0; x < p.d; ++x) s += qr[x] * kr[x];
    s /= p.sqrt_d;
    ls[r * TILE + jj] = s;
    p.logits[(static_cast<std::int64_t>(bg) * p.group + r) * p.held + j0 + jj] = s;
  }
  __syncthreads();

  // A warp per head: the tile's softmax normaliser.
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  for (int r = warp; r < p.group; r += THREADS / 32) {
    float m = -INFINITY;
    for (int jj = lane; jj < n; jj += 32) m = fmaxf(m, ls[r * TILE + jj]);
    m = warp_max(m);
    float l = 0.0f;
    for (int jj = lane; jj < n; jj += 32) l += expf(ls[r * TILE + jj] - m);
    l = warp_sum(l);
    if (lane == 0)
      p.part[(static_cast<std::int64_t>(bg) * p.group + r) * p.tiles + tile] = make_float2(m, l);
  }
}

// grid (candidate chunks, batch * kv_heads). Every block first merges the tiles'
// normalisers of the group's heads (a warp per head), then computes the group sums
// of its chunk plus `half` candidates on either side (the pool's reach) into shared
// memory, then pools them: blocks are independent, and the logits are read with
// every head's term summed in a register (head order, as the host).
template <class TQ, class TK, class Ind>
__global__ void __launch_bounds__(tuning::decode_threads)
    decode_finish_kernel(DecodeParams<TQ, TK> p, Ind indicator) {
  constexpr int THREADS = tuning::decode_threads;
  constexpr int CHUNK = tuning::decode_chunk;
  CAKE_DYNAMIC_SHARED(16, fsm_bytes);
  float* fsm = reinterpret_cast<float*>(fsm_bytes);
  const int half = indicator.pool_kernel / 2;
  float2* ml = reinterpret_cast<float2*>(fsm);  // (group) merged (max, sum of exp)
  float* raw = fsm + 2 * p.group;               // (CHUNK + 2 * half) group sums
  const int bg = blockIdx.y, b = bg / p.Hkv, g = bg % p.Hkv;
  const int c0 = blockIdx.x * CHUNK;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  for (int r = warp; r < p.group; r += THREADS / 32) {
    const float2* part = p.part + (static_cast<std::int64_t>(bg) * p.group + r) * p.tiles;
    float m = -INFINITY, l = 0.0f;
    for (int t = lane; t < p.tiles; t += 32) merge_normaliser(m, l, part[t].x, part[t].y);
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) {
      const float m2 = __shfl_xor_sync(0xffffffffu, m, o);
      const float l2 = __shfl_xor_sync(0xffffffffu, l, o);
      merge_normaliser(m, l, m2, l2);
    }
    if (lane == 0) ml[r] = make_float2(m, l);
  }
  __syncthreads();
  const float* __restrict__ lg = p.logits + static_cast<std::int64_t>(bg) * p.group * p.held;
  const int span = CHUNK + 2 * half;
  for (int e = threadIdx.x; e < span; e += THREADS) {
    const int j = c0 - half + e;
    float v = 0.0f;  // zero padding outside [0, c)
    if (j >= 0 && j < p.c)
      for (int r = 0; r < p.group; ++r) {
        const float2 n = ml[r];
        v += indicator.score(expf(lg[static_cast<std::int64_t>(r) * p.held + j] - n.x) / n.y, 0.0f);
      }
    raw[e] = v;
  }
  __syncthreads();
  const float inv =
      1.0f / (static_cast<float>(indicator.pool_kernel) * static_cast<float>(p.group));
  float* out = p.out + b * p.o_b + g * p.o_g;
  for (int e = threadIdx.x; e < CHUNK; e += THREADS) {
    const int j = c0 + e;
    if (j >= p.c) break;
    float acc = 0.0f;
    for (int t = 0; t < indicator.pool_kernel; ++t) acc += raw[e + t];
    out[j] = acc * inv;
  }
}

}  // namespace cake::cuda_detail
