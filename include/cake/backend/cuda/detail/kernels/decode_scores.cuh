// Kernel of cake::decode_scores on CUDA (spec section 7): the new token's attention
// over every held key (softmax in float32, no mask), the indicator policy's score
// with no variance, summed over the GQA group, then the average pool in cache order.
// One block per (batch, kv-head); decoding budgets are small (a few thousand keys),
// so a block walks the whole row, once per query head of the group.
#pragma once

#include <cub/block/block_reduce.cuh>

#include <cstdint>

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
  int Hkv, group, held, c, d;
  bool cache_scores;  // the held keys' scores of one head fit in shared memory
  float sqrt_d;
};

template <class TQ, class TK, class Ind>
__global__ void __launch_bounds__(tuning::decode_threads)
    decode_scores_kernel(DecodeParams<TQ, TK> p, Ind indicator) {
  constexpr int THREADS = tuning::decode_threads;
  using Reduce = cub::BlockReduce<float, THREADS>;
  __shared__ typename Reduce::TempStorage red;
  __shared__ float bcast;
  extern __shared__ float smem[];
  const int half = indicator.pool_kernel / 2;
  float* qs = smem;          // (head_dim)
  float* carry = qs + p.d;   // (half) raw sums just left of the current chunk
  float* sc = carry + half;  // (held) scores of the current head, when cached
  const int bg = blockIdx.x, b = bg / p.Hkv, g = bg % p.Hkv;
  const TK* krow = p.k + b * p.k_b + g * p.k_g;
  float* out = p.out + b * p.o_b + g * p.o_g;

  const auto score_of = [&](int j) {
    const TK* kr = krow + static_cast<std::int64_t>(j) * p.k_j;
    float s = 0.0f;
    for (int x = 0; x < p.d; ++x) s += qs[x] * to_float(kr[x]);  // the host's order
    return s / p.sqrt_d;
  };

  for (int r = 0; r < p.group; ++r) {
    __syncthreads();
    const TQ* qr = p.q + b * p.q_b + static_cast<std::int64_t>(g * p.group + r) * p.q_h;
    for (int x = threadIdx.x; x < p.d; x += THREADS) qs[x] = to_float(qr[x]);
    __syncthreads();
    float m = -INFINITY;
    for (int j = threadIdx.x; j < p.held; j += THREADS) {
      const float s = score_of(j);
      if (p.cache_scores) sc[j] = s;
      m = fmaxf(m, s);
    }
    m = Reduce(red).Reduce(m, [](float a, float c) { return fmaxf(a, c); });
    if (threadIdx.x == 0) bcast = m;
    __syncthreads();
    m = bcast;
    float sum = 0.0f;
    for (int j = threadIdx.x; j < p.held; j += THREADS)
      sum += expf((p.cache_scores ? sc[j] : score_of(j)) - m);
    __syncthreads();
    sum = Reduce(red).Sum(sum);
    if (threadIdx.x == 0) bcast = sum;
    __syncthreads();
    sum = bcast;
    // Thread j owns out[j] across heads: the group sum accumulates in head order.
    for (int j = threadIdx.x; j < p.c; j += THREADS) {
      const float pr = expf((p.cache_scores ? sc[j] : score_of(j)) - m);
      const float v = indicator.score(pr / sum, 0.0f);
      out[j] = r == 0 ? v : out[j] + v;
    }
  }
  __syncthreads();
  // Pool in place, a chunk at a time; the raw sums just left of a chunk are kept in
  // `carry` before the previous chunk overwrites them.
  for (int t = threadIdx.x; t < half; t += THREADS) carry[t] = 0.0f;  // zero padding
  const float inv =
      1.0f / (static_cast<float>(indicator.pool_kernel) * static_cast<float>(p.group));
  for (int c0 = 0; c0 < p.c; c0 += THREADS) {
    __syncthreads();
    const int j = c0 + static_cast<int>(threadIdx.x);
    float acc = 0.0f;
    if (j < p.c)
      for (int t = 0; t < indicator.pool_kernel; ++t) {
        const int jj = j - half + t;
        acc += jj < 0 ? 0.0f : jj < c0 ? carry[jj - (c0 - half)] : jj < p.c ? out[jj] : 0.0f;
      }
    float next_carry = 0.0f;
    const int tail = c0 + THREADS - half + static_cast<int>(threadIdx.x);
    if (static_cast<int>(threadIdx.x) < half && tail >= 0 && tail < p.c) next_carry = out[tail];
    __syncthreads();
    if (j < p.c) out[j] = acc * inv;
    if (static_cast<int>(threadIdx.x) < half) carry[threadIdx.x] = next_carry;
  }
}

}  // namespace cake::cuda_detail
