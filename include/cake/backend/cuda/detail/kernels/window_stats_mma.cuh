// Tensor-core kernels of the window statistics (cuda_math::tensor_cores, 16-bit K):
//
//   mma_row_normaliser_kernel  per window row, a partial softmax normaliser (max, sum
//                              of exp) per key stream; lse_combine_kernel merges them
//   mma_window_stats_kernel    per prefix key the indicator summed over the group's
//                              heads, and the block's share of the layer's entropy and
//                              variance sums
//
// Both issue mma.sync m16n8k16 (16-bit inputs, float accumulation). K goes from global
// memory straight into fragments with 16-byte loads (mma_layout.hpp), so every key is
// read once per kernel and nothing but the group's queries sits in shared memory;
// softmax, moments over the window rows and the indicator are computed in registers
// on the accumulators. The score matrix never exists outside registers.
//
// Q is float (or another 16-bit type) while the tensor cores take K's 16-bit type: Q is
// split into planes, hi = K(q) and lo = K(q - hi), and Q . K is summed over both
// (about 16 significant bits of q; one plane, exact, when Q already has K's type).
#pragma once

#include <cstdint>
#include <type_traits>

#include "../block/common.cuh"
#include "../mma_layout.hpp"
#include "../tuning.cuh"
#include "window_stats.cuh"

namespace cake::cuda_detail {

inline constexpr float kLog2e = 1.4426950408889634f;
inline constexpr float kLn2 = 0.6931471805599453f;

__device__ __forceinline__ std::uint32_t bits16(__half x) { return __half_as_ushort(x); }
__device__ __forceinline__ std::uint32_t bits16(__nv_bfloat16 x) { return __bfloat16_as_ushort(x); }

// d += a * b for one m16n8k16 tile, in K's 16-bit type.
template <class TK>
__device__ __forceinline__ void mma_16816(float (&d)[4], const std::uint32_t (&a)[4],
                                          const std::uint32_t (&b)[2]) {
#if defined(CAKE_CUDA_EMULATION)
  ::cake_emulation::mma_16816<std::is_same_v<TK, __nv_bfloat16>>(d, a, b);
#elif defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  if constexpr (std::is_same_v<TK, __nv_bfloat16>)
    asm("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
        "{%8,%9}, {%0,%1,%2,%3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
  else
    asm("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
        "{%8,%9}, {%0,%1,%2,%3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
#else
  // The launcher takes this path on sm_80+ only.
  (void)d, (void)a, (void)b;
  __trap();
#endif
}

// Lane quad member t's piece of chunk c of a 16-byte aligned row (mma_layout.hpp).
template <class TK>
__device__ __forceinline__ mma::Piece load_piece(const TK* row, int c, int t, bool half) {
  mma::Piece p{};
  if (half) {
    const uint2 v = __ldg(reinterpret_cast<const uint2*>(row + mma::piece_dim(c, t, 0, true)));
    p.v[0] = v.x, p.v[1] = v.y;
  } else {
    const uint4 v = __ldg(reinterpret_cast<const uint4*>(row + mma::piece_dim(c, t, 0, false)));
    p.v[0] = v.x, p.v[1] = v.y, p.v[2] = v.z, p.v[3] = v.w;
  }
  return p;
}

// All of head_dim of one row as lane quad member t's pieces (zero when !valid).
template <int DC, class TK>
__device__ __forceinline__ void load_row_pieces(const TK* row, bool valid, int head_dim, int t,
                                                mma::Piece (&out)[DC]) {
  const int cc = mma::chunks_of(head_dim);
  const bool half_last = mma::last_chunk_half(head_dim);
#pragma unroll
  for (int c = 0; c < DC; ++c)
    out[c] = valid && c < cc ? load_piece(row, c, t, half_last && c == cc - 1) : mma::Piece{};
}

// The group's window queries into shared memory as pieces (mma_layout.hpp), split in
// `planes` planes of K's type; rows past the window are zero. With half K a query
// element beyond half's range (|q| > 65504, far above what attention queries reach)
// becomes infinite: such inputs need cuda_math::exact.
template <class TQ, class TK>
__device__ void load_query_pieces(const StatsParams<TQ, TK>& p, int b, int g, int planes,
                                  mma::Piece* qf) {
  const int row_tiles = mma::query_row_tiles(p.w), chunks = mma::chunks_of(p.d);
  const bool half_last = mma::last_chunk_half(p.d);
  const int n = p.group * row_tiles * chunks * 32;
  for (int e = threadIdx.x; e < n; e += blockDim.x) {
    const int lane = e & 31;
    int rest = e >> 5;
    const int c = rest % chunks;
    rest /= chunks;
    const int rt = rest % row_tiles, r = rest / row_tiles;
    const int row = rt * 8 + (lane >> 2), t = lane & 3;
    const bool half = half_last && c == chunks - 1;
    mma::Piece hi{}, lo{};
    if (row < p.w) {
      const TQ* q = p.q + b * p.q_b + (g * p.group + r) * p.q_h + row * p.q_i;
#pragma unroll
      for (int x = 0; x < 8; ++x) {
        if (half && x >= 4) break;
        const float v = to_float(q[mma::piece_dim(c, t, x, half)]);
        const TK h = TK(v);
        const TK l = TK(v - to_float(h));
        hi.v[x / 2] |= bits16(h) << (16 * (x & 1));
        lo.v[x / 2] |= bits16(l) << (16 * (x & 1));
      }
    }
    qf[mma::query_piece_index(r, 0, rt, c, lane, planes, row_tiles, chunks)] = hi;
    if (planes > 1) qf[mma::query_piece_index(r, 1, rt, c, lane, planes, row_tiles, chunks)] = lo;
  }
}

// Compile-time register shapes, by window (<= 32 or <= 64 rows) and head_dim (<= 128 or
// <= 256). Each warp holds its keys' fragments for the whole head_dim in registers.
template <int WINDOW, int HEAD_DIM>
struct MmaShape {
  static constexpr int window = WINDOW, head_dim = HEAD_DIM;
  static constexpr int DC = HEAD_DIM / 32;  // chunks of head_dim
  static constexpr bool small = WINDOW == 32 && HEAD_DIM == 128;
  // statistics: MT m-tiles of 16 keys per warp step, NT 8-row tiles of one head's window
  static constexpr int MT = small ? 2 : 1;
  static constexpr int NT = WINDOW / 8;
  // row normaliser: MQ m-tiles of 16 window rows, NK n-tiles of 8 keys per warp step
  static constexpr int MQ = WINDOW / 16;
  static constexpr int NK = small ? 4 : 2;
};

// p * ln(p + 1e-10) for p = 2^s2. ln p = s2 ln 2 spares a logarithm; the 1e-10 then adds
// p * ln(1 + 1e-10 / p), within 1e-14 of 1e-10 while p >= 1e-6; smaller p (rare) take
// the formula as written.
__device__ __forceinline__ float entropy_term(float p, float s2) {
  return p >= 1e-6f ? fmaf(p, s2 * kLn2, 1e-10f) : p * logf(p + 1e-10f);
}

// grid (blocks, batch * kv_heads); block = group * streams_per_block warps. Warp
// (stream, r) scores head r's window rows against key chunks stream, stream + streams, ...
// of all S keys (row i sees keys [0, P + i]), keeping a running base-2 normaliser per
// row in registers; warps of one stream read the same K chunk (L1 serves the others).
// part: (batch, kv_heads, group * window, streams) as (max, sum of exp), natural base.
template <class TQ, class TK, class Shape>
__global__ void __launch_bounds__(tuning::mma_threads, 1)
    mma_row_normaliser_kernel(StatsParams<TQ, TK> p, int planes, int streams_per_block,
                              float2* __restrict__ part) {
  constexpr int DC = Shape::DC, MQ = Shape::MQ, NK = Shape::NK, KC = NK * 8;
  CAKE_DYNAMIC_SHARED(16, mma_smem);
  auto* qf = reinterpret_cast<mma::Piece*>(mma_smem);
  const int bg = blockIdx.y, b = bg / p.Hkv, g = bg % p.Hkv;
  load_query_pieces(p, b, g, planes, qf);
  __syncthreads();  // the last barrier: warps run independently from here

  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int gq = lane >> 2, t = lane & 3;
  const int r = warp % p.group;
  const int stream = blockIdx.x * streams_per_block + warp / p.group;
  const int streams = gridDim.x * streams_per_block;
  const int row_tiles = mma::query_row_tiles(p.w), cc = mma::chunks_of(p.d);
  const bool half_last = mma::last_chunk_half(p.d);
  const float scale2 = kLog2e / p.sqrt_d;
  const TK* kbase = p.k + b * p.k_b + g * p.k_g;
  const int chunks = (p.S + KC - 1) / KC;

  float run_m[MQ][2], run_l[MQ][2];  // rows mt * 16 + hf * 8 + gq, base 2
#pragma unroll
  for (int mt = 0; mt < MQ; ++mt)
#pragma unroll
    for (int hf = 0; hf < 2; ++hf) run_m[mt][hf] = -INFINITY, run_l[mt][hf] = 0.0f;

  for (int ch = stream; ch < chunks; ch += streams) {
    const int j0 = ch * KC;
    mma::Piece kb[NK][DC];  // key j0 + nk * 8 + gq
#pragma unroll
    for (int nk = 0; nk < NK; ++nk) {
      const int j = j0 + nk * 8 + gq;
      const TK* row = kbase + static_cast<std::int64_t>(j) * p.k_j;
      load_row_pieces(row, j < p.S, p.d, t, kb[nk]);
    }
    float acc[MQ][NK][4] = {};
    for (int pl = planes - 1; pl >= 0; --pl) {  // the small plane first
#pragma unroll
      for (int c = 0; c < DC; ++c) {
        if (c >= cc) break;
        const int steps = mma::piece_steps(half_last && c == cc - 1);
#pragma unroll
        for (int mt = 0; mt < MQ; ++mt) {
          if (mt * 16 >= p.w) break;
          const mma::Piece top =
              qf[mma::query_piece_index(r, pl, 2 * mt, c, lane, planes, row_tiles, cc)];
          const mma::Piece bottom =
              qf[mma::query_piece_index(r, pl, 2 * mt + 1, c, lane, planes, row_tiles, cc)];
#pragma unroll
          for (int h = 0; h < 2; ++h) {
            if (h >= steps) break;
            std::uint32_t af[4];
            mma::a_fragment(top, bottom, h, af);
#pragma unroll
            for (int nk = 0; nk < NK; ++nk) {
              std::uint32_t bf[2];
              mma::b_fragment(kb[nk][c], h, bf);
              mma_16816<TK>(acc[mt][nk], af, bf);
            }
          }
        }
      }
    }
    // Row i of the accumulators (mma_layout.hpp: c_row / c_col) against this lane's keys.
#pragma unroll
    for (int mt = 0; mt < MQ; ++mt)
#pragma unroll
      for (int hf = 0; hf < 2; ++hf) {
        const int i = mt * 16 + hf * 8 + gq;
        const int last = p.P + i;  // causal inside the window
        float s2[NK][2], mloc = -INFINITY;
#pragma unroll
        for (int nk = 0; nk < NK; ++nk)
#pragma unroll
          for (int u = 0; u < 2; ++u) {
            const int j = j0 + nk * 8 + 2 * t + u;
            const bool ok = i < p.w && j <= last;  // last < S
            s2[nk][u] = ok ? acc[mt][nk][2 * hf + u] * scale2 : -INFINITY;
            mloc = fmaxf(mloc, s2[nk][u]);
          }
        if (mloc == -INFINITY) continue;
        const float mn = fmaxf(run_m[mt][hf], mloc);
        float l = run_l[mt][hf] == 0.0f ? 0.0f : run_l[mt][hf] * exp2f(run_m[mt][hf] - mn);
#pragma unroll
        for (int nk = 0; nk < NK; ++nk)
#pragma unroll
          for (int u = 0; u < 2; ++u) l += exp2f(s2[nk][u] - mn);  // 2^-inf = 0
        run_m[mt][hf] = mn;
        run_l[mt][hf] = l;
      }
  }
  // The quad's four lanes hold the same rows over different keys: merge, then write.
  const int gw = p.group * p.w;
#pragma unroll
  for (int mt = 0; mt < MQ; ++mt)
#pragma unroll
    for (int hf = 0; hf < 2; ++hf) {
      float m = run_m[mt][hf], l = run_l[mt][hf];
#pragma unroll
      for (int o = 1; o <= 2; o <<= 1) {
        const float m2 = __shfl_xor_sync(0xffffffffu, m, o);
        const float l2 = __shfl_xor_sync(0xffffffffu, l, o);
        merge_normaliser<true>(m, l, m2, l2);
      }
      const int i = mt * 16 + hf * 8 + gq;
      if (t == 0 && i < p.w)
        part[(static_cast<std::int64_t>(bg) * gw + r * p.w + i) * streams + stream] =
            make_float2(l == 0.0f ? -INFINITY : m * kLn2, l);
    }
}

// grid (blocks, batch * kv_heads), tuning::mma_threads per block. Warp steps of
// Shape::MT * 16 prefix keys: the keys' fragments are loaded once, then for each head
// of the group in order the scores of its window rows (n-tiles of 8 rows), the
// probabilities exp(s - lse), their mean and unbiased variance over the window (a
// key's row of the accumulators sits in one lane quad: two shuffles), the indicator,
// and the entropy / variance terms.
// raw: (batch, kv_heads, P) indicator summed over the group, before pooling;
// partial: (batch * kv_heads, blocks) per-block (-entropy, variance).
template <class TQ, class TK, class Shape, class Ind>
__global__ void __launch_bounds__(tuning::mma_threads, 1)
    mma_window_stats_kernel(StatsParams<TQ, TK> p, int planes, const float* __restrict__ lse_ws,
                            Ind indicator, bool want_entropy, bool want_variance,
                            float* __restrict__ raw, float2* __restrict__ partial) {
  constexpr int DC = Shape::DC, MT = Shape::MT, NT = Shape::NT, KC = MT * 16;
  CAKE_DYNAMIC_SHARED(16, mma_smem);
  auto* qf = reinterpret_cast<mma::Piece*>(mma_smem);
  float* lse2 = reinterpret_cast<float*>(qf + mma::query_pieces(p.group, planes, p.w, p.d));
  const int bg = blockIdx.y, b = bg / p.Hkv, g = bg % p.Hkv;
  const int gw = p.group * p.w;
  load_query_pieces(p, b, g, planes, qf);
  for (int rho = threadIdx.x; rho < gw; rho += blockDim.x) {  // (group, window), base 2
    const int h = g * p.group + rho / p.w, i = rho % p.w;
    lse2[rho] = kLog2e * (p.lse ? p.lse[b * p.l_b + h * p.l_h + i * p.l_i]
                                : lse_ws[static_cast<std::int64_t>(bg) * gw + rho]);
  }
  __syncthreads();

  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = blockDim.x >> 5;
  const int gq = lane >> 2, t = lane & 3;
  const int row_tiles = mma::query_row_tiles(p.w), cc = mma::chunks_of(p.d);
  const bool half_last = mma::last_chunk_half(p.d);
  const bool need_var = want_variance || Ind::needs_variance;
  const float scale2 = kLog2e / p.sqrt_d;
  const float inv_w = 1.0f / static_cast<float>(p.w), inv_w1 = 1.0f / static_cast<float>(p.w - 1);
  const TK* kbase = p.k + b * p.k_b + g * p.k_g;
  const int chunks = (p.P + KC - 1) / KC;
  double ent = 0.0, var_sum = 0.0;

  for (int ch = blockIdx.x * warps + warp; ch < chunks; ch += gridDim.x * warps) {
    const int j0 = ch * KC;
    mma::Piece a[MT][2][DC];  // keys j0 + mt * 16 + hf * 8 + gq
#pragma unroll
    for (int mt = 0; mt < MT; ++mt)
#pragma unroll
      for (int hf = 0; hf < 2; ++hf) {
        const int j = j0 + mt * 16 + hf * 8 + gq;
        const TK* row = kbase + static_cast<std::int64_t>(j) * p.k_j;
        load_row_pieces(row, j < p.P, p.d, t, a[mt][hf]);
      }
    float group_score[MT][2] = {};
    float ent_step = 0.0f, var_step = 0.0f;
    for (int r = 0; r < p.group; ++r) {  // heads in order: the host's summation order
      float acc[MT][NT][4] = {};
      for (int pl = planes - 1; pl >= 0; --pl) {  // the small plane first
#pragma unroll
        for (int c = 0; c < DC; ++c) {
          if (c >= cc) break;
          const int steps = mma::piece_steps(half_last && c == cc - 1);
#pragma unroll
          for (int nt = 0; nt < NT; ++nt) {
            if (nt * 8 >= p.w) break;
            const mma::Piece col =
                qf[mma::query_piece_index(r, pl, nt, c, lane, planes, row_tiles, cc)];
#pragma unroll
            for (int h = 0; h < 2; ++h) {
              if (h >= steps) break;
              std::uint32_t bf[2];
              mma::b_fragment(col, h, bf);
#pragma unroll
              for (int mt = 0; mt < MT; ++mt) {
                std::uint32_t af[4];
                mma::a_fragment(a[mt][0][c], a[mt][1][c], h, af);
                mma_16816<TK>(acc[mt][nt], af, bf);
              }
            }
          }
        }
      }
      float l2[NT][2];  // this lane's window rows nt * 8 + 2t + u
#pragma unroll
      for (int nt = 0; nt < NT; ++nt)
#pragma unroll
        for (int u = 0; u < 2; ++u) {
          const int i = nt * 8 + 2 * t + u;
          l2[nt][u] = i < p.w ? lse2[r * p.w + i] : 0.0f;
        }
#pragma unroll
      for (int mt = 0; mt < MT; ++mt)
#pragma unroll
        for (int hf = 0; hf < 2; ++hf) {
          const bool key_ok = j0 + mt * 16 + hf * 8 + gq < p.P;
          float pr[NT][2], sum = 0.0f;
#pragma unroll
          for (int nt = 0; nt < NT; ++nt)
#pragma unroll
            for (int u = 0; u < 2; ++u) {
              const bool ok = key_ok && nt * 8 + 2 * t + u < p.w;
              const float s2 = fmaf(acc[mt][nt][2 * hf + u], scale2, -l2[nt][u]);
              const float pv = ok ? exp2f(s2) : 0.0f;
              pr[nt][u] = pv;
              sum += pv;
              if (want_entropy && ok) ent_step += entropy_term(pv, s2);
            }
          sum += __shfl_xor_sync(0xffffffffu, sum, 1);
          sum += __shfl_xor_sync(0xffffffffu, sum, 2);
          const float mean = sum * inv_w;
          float var = 0.0f;
          if (need_var) {
            float m2 = 0.0f;
#pragma unroll
            for (int nt = 0; nt < NT; ++nt)
#pragma unroll
              for (int u = 0; u < 2; ++u) {
                const float dv = pr[nt][u] - mean;
                m2 += nt * 8 + 2 * t + u < p.w ? dv * dv : 0.0f;
              }
            m2 += __shfl_xor_sync(0xffffffffu, m2, 1);
            m2 += __shfl_xor_sync(0xffffffffu, m2, 2);
            var = m2 * inv_w1;
            if (key_ok && t == 0) var_step += var;  // as the host: whenever computed
          }
          group_score[mt][hf] += indicator.score(mean, var);
        }
    }
    ent += ent_step;
    var_sum += var_step;
    if (t == 0)
#pragma unroll
      for (int mt = 0; mt < MT; ++mt)
#pragma unroll
        for (int hf = 0; hf < 2; ++hf) {
          const int j = j0 + mt * 16 + hf * 8 + gq;
          if (j < p.P) raw[static_cast<std::int64_t>(bg) * p.P + j] = group_score[mt][hf];
        }
  }

  block_sum_pair<tuning::mma_threads>(ent, var_sum);
  if (threadIdx.x == 0)
    partial[static_cast<std::int64_t>(bg) * gridDim.x + blockIdx.x] =
        make_float2(static_cast<float>(-ent), static_cast<float>(var_sum));
}

}  // namespace cake::cuda_detail
