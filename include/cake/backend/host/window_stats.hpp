// Host backend of cake::window_stats.
//
// Per query head: the (w x S) scores are computed tile by tile from a transposed
// K tile with a register-blocked micro-kernel the compiler vectorises, kept in a
// per-worker buffer (n*w*S floats for one GQA group, never B*H*w*S), turned into
// probabilities row by row, then reduced column by column into the per-key
// indicator. Heads run in parallel; the per-head results are combined in a fixed
// order, so the output does not depend on the thread count.
#pragma once

#include <algorithm>
#include <bit>
#include <cmath>
#include <cstdint>
#include <limits>
#include <type_traits>
#include <vector>

#include "../../detail/lanes.hpp"
#include "../../detail/math.hpp"
#include "../../detail/parallel.hpp"
#include "detail/simd.hpp"
#include "detail/threads.hpp"
#include "workspace.hpp"

namespace cake {
namespace detail::host_stats {

inline constexpr index_t RB = 4;    // query rows per micro-tile
inline constexpr index_t CB = 32;   // keys per micro-tile
inline constexpr index_t TJ = 256;  // keys per transposed K tile
// Row pitch of the transposed tile: TJ plus one cache line, so that its d rows do
// not all map to the same few L1 sets (a 1 KiB pitch made the transpose thrash L1).
inline constexpr index_t KT_LD = TJ + 16;
inline constexpr index_t COL_CHUNK = 2048;  // keys per column-reduction chunk (stays in L2)

inline index_t round_up(index_t x, index_t m) { return (x + m - 1) / m * m; }

// One worker's buffers, carved from its workspace block (see carve).
struct Scratch {
  float* q;     // (rows, d)       window queries of one GQA group, as float
  float* kt;    // (d, KT_LD)      one key tile, transposed
  float* p;     // (rows, ld)      scores, then probabilities
  float* col;   // (COL_CHUNK)     column means
  float* m2;    // (COL_CHUNK)     column sums of squared deviations
  float* rmax;  // (rows)          maximum score of each row over its valid keys
  float* tmax;  // (tiles, rows)   SIMD path: each row's maximum per key tile
  float* tsum;  // (tiles, rows)   SIMD path: sum of exp(score - tile max), then
                //                 the tile's scale exp(tile max - max) / sum
  float* tep;   // (tiles, rows)   SIMD path: that sum over the prefix keys only
  float* tes;   // (tiles, rows)   SIMD path: sum of e * (score - tile max) over the
                //                 prefix keys, e = exp(score - tile max)
  float* tmp;   // (w, 16)         SIMD path: one key vector's probabilities
  // tiles = 0 leaves the SIMD path's pieces out.
  static Scratch carve(carver& c, index_t rows, index_t d, index_t ld, index_t tiles, index_t w) {
    const auto z = [](index_t n) { return static_cast<std::size_t>(n); };
    Scratch s{};
    s.q = c.take<float>(z(rows * d));
    s.kt = c.take<float>(z(d * KT_LD));
    s.p = c.take<float>(z(rows * ld));
    s.col = c.take<float>(z(COL_CHUNK));
    s.m2 = c.take<float>(z(COL_CHUNK));
    s.rmax = c.take<float>(z(rows));
    if (tiles > 0) {
      s.tmax = c.take<float>(z(tiles * rows));
      s.tsum = c.take<float>(z(tiles * rows));
      s.tep = c.take<float>(z(tiles * rows));
      s.tes = c.take<float>(z(tiles * rows));
      s.tmp = c.take<float>(z(w * 16));
    }
    return s;
  }
};

// The call's shared buffers: per-head results, in fixed slots so that nothing
// depends on the thread count.
struct Shared {
  float* ind_heads;  // (batch, q_heads, S - w)
  double* ent;       // (batch, q_heads)
  double* var;       // (batch, q_heads)
  static Shared carve(carver& c, index_t BH, index_t P) {
    Shared s{};
    s.ind_heads = c.take<float>(static_cast<std::size_t>(BH * P));
    s.ent = c.take<double>(static_cast<std::size_t>(BH));
    s.var = c.take<double>(static_cast<std::size_t>(BH));
    return s;
  }
};

// Sizes the workspace for a call: the shared block, and per worker the larger of
// its Scratch and pool_groups' row buffer (the two never live at once).
inline void prepare_workspace(host_workspace& ws, index_t BH, index_t P, int nt, index_t rows,
                              index_t d, index_t ld, index_t tiles, index_t w, int kernel) {
  carver shared, worker, pool;
  Shared::carve(shared, BH, P);
  Scratch::carve(worker, rows, d, ld, tiles, w);
  pool.take<float>(static_cast<std::size_t>(P + 2 * (kernel / 2)));
  ws.prepare(shared.bytes(), nt, std::max(worker.bytes(), pool.bytes()));
}

// out[r][c] = (q[r] . kt[:, c]) / sqrt_d for RB rows and CB keys.
CAKE_ALWAYS_INLINE void micro_tile(const float* CAKE_RESTRICT q, const float* CAKE_RESTRICT kt,
                                   index_t d, float sqrt_d, float* CAKE_RESTRICT out, index_t ld) {
  float acc[RB][CB] = {};
  for (index_t x = 0; x < d; ++x) {
    const float* CAKE_RESTRICT kr = kt + x * KT_LD;
    for (index_t r = 0; r < RB; ++r) {
      const float qv = q[r * d + x];
      for (index_t c = 0; c < CB; ++c) acc[r][c] += qv * kr[c];
    }
  }
  for (index_t r = 0; r < RB; ++r)
    for (index_t c = 0; c < CB; ++c) out[r * ld + c] = acc[r][c] / sqrt_d;
}

// Row i of the window sees keys [0, S - w + i]; the rest is masked (probability 0).
// Writes probabilities in place and returns sum over prefix keys of p ln(p + 1e-10).
// m is the maximum of row[0..valid), found while the scores were still in cache.
inline double softmax_row(float* CAKE_RESTRICT row, index_t valid, index_t prefix, index_t ld,
                          bool want_entropy, float m) {
  // Three passes (max; exp and sum; divide and entropy), each fused loop keeping
  // the lane order of the separate loops it replaces, so the bits are unchanged.
  float part[LANES] = {};
  index_t j = 0;
  for (; j + LANES <= valid; j += LANES)
    for (index_t l = 0; l < LANES; ++l) {
      const float e = exp_approx(row[j + l] - m);
      row[j + l] = e;
      part[l] += e;
    }
  for (index_t l = 0; j < valid; ++j, ++l) {
    const float e = exp_approx(row[j] - m);
    row[j] = e;
    part[l] += e;
  }
  for (j = valid; j < ld; ++j) row[j] = 0.0f;
  float sum = 0;
  for (index_t l = 0; l < LANES; ++l) sum += part[l];
  if (!want_entropy) {
    for (j = 0; j < valid; ++j) row[j] = row[j] / sum;
    return 0.0;
  }
  float ep[LANES] = {};
  j = 0;
  for (; j + LANES <= prefix; j += LANES)
    for (index_t l = 0; l < LANES; ++l) {
      const float p = row[j + l] / sum;
      row[j + l] = p;
      ep[l] += p * log_approx(p + 1e-10f);
    }
  for (index_t l = 0; j < prefix; ++j, ++l) {
    const float p = row[j] / sum;
    row[j] = p;
    ep[l] += p * log_approx(p + 1e-10f);
  }
  for (; j < valid; ++j) row[j] = row[j] / sum;
  double s = 0;
  for (index_t l = 0; l < LANES; ++l) s += ep[l];
  return -s;
}

// Per prefix key j: mean and unbiased variance over the w rows, then the
// indicator policy's score into ind[j]. Returns the sum of the variances.
template <class Ind>
double column_stats(const float* CAKE_RESTRICT p, index_t ld, index_t w, index_t prefix,
                    const Ind& indicator, bool want_variance, Scratch& s,
                    float* CAKE_RESTRICT ind) {
  const bool need_var = want_variance || Ind::needs_variance;
  const float inv_w = 1.0f / static_cast<float>(w);
  const float inv_w1 = 1.0f / static_cast<float>(w - 1);
  double var_total = 0;
  float* CAKE_RESTRICT col = s.col;
  float* CAKE_RESTRICT m2 = s.m2;
  for (index_t j0 = 0; j0 < prefix; j0 += COL_CHUNK) {
    const index_t n = std::min(COL_CHUNK, prefix - j0);
    std::fill(col, col + n, 0.0f);
    for (index_t i = 0; i < w; ++i) {
      const float* CAKE_RESTRICT r = p + i * ld + j0;
      for (index_t j = 0; j < n; ++j) col[j] += r[j];
    }
    for (index_t j = 0; j < n; ++j) col[j] = col[j] * inv_w;
    if (need_var) {
      std::fill(m2, m2 + n, 0.0f);
      for (index_t i = 0; i < w; ++i) {
        const float* CAKE_RESTRICT r = p + i * ld + j0;
        for (index_t j = 0; j < n; ++j) {
          const float dv = r[j] - col[j];
          m2[j] += dv * dv;
        }
      }
      for (index_t j = 0; j < n; ++j) m2[j] = m2[j] * inv_w1;
      var_total += static_cast<double>(lane_sum(m2, n));
      for (index_t j = 0; j < n; ++j) ind[j0 + j] = indicator.score(col[j], m2[j]);
    } else {
      for (index_t j = 0; j < n; ++j) ind[j0 + j] = indicator.score(col[j], 0.0f);
    }
  }
  return var_total;
}

// Scores of the n query heads of KV head g against all its keys, into s.p: head r's
// window row i is row r * w_pad + i (ld floats). Each transposed key tile is built
// once and used by the whole group, so the transpose costs 1/n of what it would
// per head; every score is computed exactly as for a single head.
template <class QV, class KV>
void group_scores(const QV& q, const KV& k, index_t b, index_t g, index_t n, index_t w,
                  index_t w_pad, index_t S, index_t d, index_t ld, Scratch& s) {
  const float sqrt_d = static_cast<float>(std::sqrt(static_cast<double>(d)));
  for (index_t r = 0; r < n; ++r)
    for (index_t i = 0; i < w; ++i) {
      const auto* qr = &q(b, g * n + r, i, 0);
      float* dst = s.q + (r * w_pad + i) * d;
      for (index_t x = 0; x < d; ++x) dst[x] = static_cast<float>(qr[x]);
    }
  // The padding rows are scored too (whole micro-tiles) but never read: zeros keep
  // them finite and off the slow denormal path.
  for (index_t r = 0; r < n; ++r)
    std::fill(s.q + (r * w_pad + w) * d, s.q + (r + 1) * w_pad * d, 0.0f);
  const index_t rows = n * w_pad;
  float* kt = s.kt;
  for (index_t j0 = 0; j0 < S; j0 += TJ) {
    const index_t tj = std::min(TJ, S - j0);
    for (index_t jj = 0; jj < tj; ++jj) {
      const auto* kr = &k(b, g, j0 + jj, 0);
      for (index_t x = 0; x < d; ++x) kt[x * KT_LD + jj] = static_cast<float>(kr[x]);
    }
    if (tj < TJ)
      for (index_t x = 0; x < d; ++x) std::fill(kt + x * KT_LD + tj, kt + x * KT_LD + TJ, 0.0f);
    const index_t tj_pad = round_up(tj, CB);
    for (index_t i0 = 0; i0 < rows; i0 += RB)
      for (index_t c0 = 0; c0 < tj_pad; c0 += CB)
        micro_tile(s.q + i0 * d, kt + c0, d, sqrt_d, s.p + i0 * ld + j0 + c0, ld);
    // Row maxima over the valid keys (row i sees [0, S - w + i]) while the tile is
    // still in cache, so softmax does not need a pass of its own for them.
    for (index_t r = 0; r < n; ++r)
      for (index_t i = 0; i < w; ++i) {
        const index_t row = r * w_pad + i;
        const index_t cnt = std::min(tj, S - w + i + 1 - j0);
        if (cnt <= 0) continue;
        const float tm = row_max(s.p + row * ld + j0, cnt);
        float& m = s.rmax[static_cast<std::size_t>(row)];
        m = j0 == 0 || tm > m ? tm : m;
      }
  }
}

// The SIMD path for KV head g of batch b (simd.hpp's kernels, picked at run time):
// scores of the group's n * w window rows tile by tile, each tile's rows turned at
// once (while in cache) into e = exp(score - tile max) with the tile's max and sums
// kept; then per row the global max M and sum L, so that p = e * scale(row, tile);
// then per head one pass of column statistics over the prefix keys. The entropy
// needs no logarithm per key: ln p = score - M - ln L, so the row's sum of p ln p is
// sum p * (score - M) - ln L * sum p over the prefix, from the tile sums (each tile's
// taken relative to its own max m_t: score - M = (score - m_t) + (m_t - M), so huge
// scores never cancel). That drops
// the reference's 1e-10 inside ln(p + 1e-10), which moves the entropy by at most
// 1e-10 per (head, row, key): 1.7e-3 of about 9.5e3 for a 16K Llama layer.
// Two passes over the scores instead of the portable path's several; the same
// quantities, rounded differently (fused multiply-adds, scale by 1/sqrt(d), the
// softmax sum by tiles).
template <class QV, class KV, class Ind>
void group_simd(const simd::kernels& kk, const QV& q, const KV& k, index_t b, index_t g, index_t n,
                index_t w, index_t w_pad, index_t S, index_t d, index_t ld, const Ind& indicator,
                StatsRequest req, Scratch& s, float* ind_group, double* ent, double* var) {
  const index_t P = S - w, rows = n * w_pad, tiles = (S + TJ - 1) / TJ;
  const float inv_sqrt_d = static_cast<float>(1.0 / std::sqrt(static_cast<double>(d)));
  for (index_t r = 0; r < n; ++r)
    for (index_t i = 0; i < w; ++i) {
      const auto* qr = &q(b, g * n + r, i, 0);
      float* dst = s.q + (r * w_pad + i) * d;
      for (index_t x = 0; x < d; ++x) dst[x] = static_cast<float>(qr[x]);
    }
  // The padding rows are scored too (whole micro-tiles) but never read: zeros keep
  // them finite and off the slow denormal path.
  for (index_t r = 0; r < n; ++r)
    std::fill(s.q + (r * w_pad + w) * d, s.q + (r + 1) * w_pad * d, 0.0f);
  float* kt = s.kt;
  float* p = s.p;
  for (index_t t = 0; t < tiles; ++t) {
    const index_t j0 = t * TJ, tj = std::min(TJ, S - j0);
    using TKe = std::remove_cv_t<typename KV::element_type>;
    if constexpr (std::is_same_v<TKe, float>) {
      kk.transpose_tile(&k(b, g, j0, 0), tj > 1 ? k.stride(2) : d, tj, d, kt, KT_LD);
    } else if constexpr (std::is_same_v<TKe, bfloat16>) {
      kk.transpose_tile_b(&k(b, g, j0, 0), tj > 1 ? k.stride(2) : d, tj, d, kt, KT_LD);
    }
#if CAKE_SIMD_HAS_HALF
    else if constexpr (std::is_same_v<TKe, _Float16>) {
      kk.transpose_tile_h(&k(b, g, j0, 0), tj > 1 ? k.stride(2) : d, tj, d, kt, KT_LD);
    }
#endif
    else {
      for (index_t jj = 0; jj < tj; ++jj) {
        const auto* kr = &k(b, g, j0 + jj, 0);
        for (index_t x = 0; x < d; ++x) kt[x * KT_LD + jj] = static_cast<float>(kr[x]);
      }
    }
    if (tj < TJ)
      for (index_t x = 0; x < d; ++x) std::fill(kt + x * KT_LD + tj, kt + x * KT_LD + TJ, 0.0f);
    const index_t tj_pad = round_up(tj, 32);
    kk.score_tile(s.q, rows, d, kt, KT_LD, tj_pad, inv_sqrt_d, p + j0, ld);
    const std::size_t o = static_cast<std::size_t>(t * rows);
    for (index_t r = 0; r < n; ++r)
      for (index_t i = 0; i < w; ++i) {
        const std::size_t row = static_cast<std::size_t>(r * w_pad + i);
        const index_t cnt = std::min(tj, P + i + 1 - j0);  // row i sees keys [0, P + i]
        if (cnt <= 0) {
          s.tmax[o + row] = -std::numeric_limits<float>::infinity();
          s.tsum[o + row] = s.tep[o + row] = s.tes[o + row] = 0.0f;
          continue;
        }
        kk.tile_softmax(p + static_cast<index_t>(row) * ld + j0, cnt, tj_pad, P - j0,
                        &s.tmax[o + row], &s.tsum[o + row], &s.tep[o + row], &s.tes[o + row]);
      }
  }
  // Per row: max M over the tiles, sum L = sum_t tsum_t exp(tmax_t - M); tile t's
  // probabilities are then e * exp(tmax_t - M) / L (stored over tsum).
  for (index_t r = 0; r < n; ++r) {
    double e_head = 0;
    for (index_t i = 0; i < w; ++i) {
      const std::size_t row = static_cast<std::size_t>(r * w_pad + i),
                        R = static_cast<std::size_t>(rows);
      double m = -std::numeric_limits<double>::infinity(), l = 0;
      for (index_t t = 0; t < tiles; ++t) m = std::max(m, static_cast<double>(s.tmax[t * R + row]));
      for (index_t t = 0; t < tiles; ++t)
        if (s.tsum[t * R + row] > 0) l += s.tsum[t * R + row] * std::exp(s.tmax[t * R + row] - m);
      double sp = 0, sps = 0;  // sum p and sum p * (score - M) over the prefix
      for (index_t t = 0; t < tiles; ++t) {
        float& c = s.tsum[t * R + row];
        const double ct = c > 0 ? std::exp(s.tmax[t * R + row] - m) / l : 0.0;
        if (ct > 0) {
          const double tm = static_cast<double>(s.tmax[t * R + row]) - m;
          sp += ct * s.tep[t * R + row];
          sps += ct * (s.tes[t * R + row] + tm * s.tep[t * R + row]);
        }
        c = static_cast<float>(ct);
      }
      e_head -= sps - std::log(l) * sp;
    }
    ent[r] = req.entropy ? e_head : 0.0;
  }
  const bool need_var = req.variance || Ind::needs_variance;
  float* col = s.col;
  float* m2 = s.m2;
  for (index_t r = 0; r < n; ++r) {
    double v = 0;
    for (index_t t = 0; t * TJ < P; ++t) {
      const index_t j0 = t * TJ, cnt = std::min(TJ, P - j0);
      kk.head_columns(p + r * w_pad * ld + j0, ld, w, s.tsum + t * rows + r * w_pad, cnt, need_var,
                      col, m2, s.tmp, &v);
      float* dst = ind_group + r * P + j0;
      for (index_t j = 0; j < cnt; ++j) dst[j] = indicator.score(col[j], need_var ? m2[j] : 0.0f);
    }
    var[r] = need_var ? v : 0.0;
  }
}

// Sum the per-head indicators of each GQA group, pool along the keys, divide by
// kernel * group size: out[b, g, j]. Each worker's row buffer is the start of its
// workspace block (prepare_workspace sized it).
template <class OutV>
void pool_groups(const host_policy& exec, host_workspace& ws, const float* ind_heads, index_t B,
                 index_t Hkv, index_t n, index_t P, int kernel, OutV& out) {
  if (P == 0) return;  // no prefix keys (S == w): nothing to write
  const index_t half = kernel / 2;
  const float inv = 1.0f / (static_cast<float>(kernel) * static_cast<float>(n));
  parallel_for(exec, B * Hkv, [&](index_t row, int worker) {
    const index_t b = row / Hkv, g = row % Hkv;
    float* tmp = reinterpret_cast<float*>(ws.worker(worker));  // (P + 2 * half)
    std::fill(tmp, tmp + P + 2 * half, 0.0f);
    for (index_t r = 0; r < n; ++r) {
      const float* src = ind_heads + ((b * Hkv + g) * n + r) * P;
      for (index_t j = 0; j < P; ++j) tmp[half + j] += src[j];
    }
    float* dst = &out(b, g, 0);
    for (index_t j = 0; j < P; ++j) {
      float acc = 0;
      for (index_t t = 0; t < kernel; ++t) acc += tmp[j + t];
      dst[j] = acc * inv;
    }
  });
}

// out[r, t] (row stride ld) = the attention token t receives from the window rows
// (row i sees tokens [0, S - w + i]), summed over the rows, each row's share being the
// mean over the GQA group's query heads: an accumulating indicator's (H2O's) prefill
// sums. One pass per GQA group with the score tiles and softmax rows above; scratch
// from the policy's workspace, or allocated for the call.
template <class QV, class KV>
void attention_sums(const host_policy& policy, const QV& q, const KV& k, float* out, index_t ld) {
  const index_t B = q.extent(0), H = q.extent(1), w = q.extent(2), d = q.extent(3);
  const index_t Hkv = k.extent(1), S = k.extent(2), n = H / Hkv, P = S - w;
  const index_t w_pad = round_up(w, RB), lds = round_up(S, TJ);
  const float inv = 1.0f / static_cast<float>(n);
  const host_policy exec = for_work(policy, B * H * w * S * d);
  const int nt = worker_count(exec, B * Hkv);
  host_workspace local;
  host_workspace& ws = workspace_of(exec, local);
  carver sizer;
  Scratch::carve(sizer, n * w_pad, d, lds, 0, w);
  ws.prepare(0, nt, sizer.bytes());
  parallel_for(exec, B * Hkv, [&](index_t bg, int worker) {
    carver c(ws.worker(worker));
    Scratch s = Scratch::carve(c, n * w_pad, d, lds, 0, w);
    const index_t b = bg / Hkv, g = bg % Hkv;
    group_scores(q, k, b, g, n, w, w_pad, S, d, lds, s);
    for (index_t r = 0; r < n; ++r)
      for (index_t i = 0; i < w; ++i)
        softmax_row(s.p + (r * w_pad + i) * lds, P + i + 1, P, lds, false, s.rmax[r * w_pad + i]);
    float* CAKE_RESTRICT o = out + bg * ld;
    std::fill(o, o + S, 0.0f);
    // Row by row: the group's heads summed in order, times 1/n, added to the sums
    // (the order decode_scores and the CUDA store use).
    float* CAKE_RESTRICT h = s.col;  // the heads' sum for a chunk of tokens
    for (index_t i = 0; i < w; ++i) {
      const index_t seen = P + i + 1;
      for (index_t j0 = 0; j0 < seen; j0 += COL_CHUNK) {
        const index_t m = std::min(COL_CHUNK, seen - j0);
        std::fill(h, h + m, 0.0f);
        for (index_t r = 0; r < n; ++r) {
          const float* CAKE_RESTRICT pr = s.p + (r * w_pad + i) * lds + j0;
          for (index_t j = 0; j < m; ++j) h[j] += pr[j];
        }
        for (index_t j = 0; j < m; ++j) o[j0 + j] += h[j] * inv;
      }
    }
  });
}

}  // namespace detail::host_stats

template <>
struct window_stats_backend<host_policy> {
  // Scratch: about (n * w_pad * S per worker thread + B * H * (S - w)) floats, n query
  // heads per KV head (80 MiB for a 128K Llama-3.1-8B layer on one thread), from the
  // policy's workspace or allocated for the call.
  template <class TQ, class TK, class Ind>
  static void run(const host_policy& policy, host_view<TQ, 4> q, host_view<TK, 4> k,
                  const Ind& indicator, host_view<float, 3> out, host_view<float, 1> stats,
                  StatsRequest req) {
    using namespace detail::host_stats;
    using detail::LANES;
    const index_t B = q.extent(0), H = q.extent(1), w = q.extent(2), d = q.extent(3);
    const index_t Hkv = k.extent(1), S = k.extent(2), n = H / Hkv, P = S - w;
    const host_policy exec = detail::for_work(policy, B * H * w * S * d);
    const detail::simd::kernels* kk = detail::simd::active_kernels();
    // The SIMD micro-tiles take 8 rows at a time; the portable one RB.
    const index_t w_pad = round_up(w, kk ? 8 : RB), ld = round_up(S, TJ);
    const index_t rows = n * w_pad, tiles = kk ? (S + TJ - 1) / TJ : 0;
    // One task per (batch, KV head): its n query heads share each key tile.
    // Per-head results land in fixed slots, so nothing depends on the thread count.
    const int nt = detail::worker_count(exec, B * Hkv);
    host_workspace local;
    host_workspace& ws = detail::workspace_of(exec, local);
    prepare_workspace(ws, B * H, P, nt, rows, d, ld, tiles, w, indicator.pool_kernel);
    detail::carver shared_c(ws.shared());
    const Shared sh = Shared::carve(shared_c, B * H, P);
    const auto scratch = [&](int worker) {
      detail::carver c(ws.worker(worker));
      return Scratch::carve(c, rows, d, ld, tiles, w);
    };
    if (kk) {
      detail::parallel_for(exec, B * Hkv, [&](index_t bg, int worker) {
        Scratch s = scratch(worker);
        const index_t b = bg / Hkv, g = bg % Hkv, h0 = b * H + g * n;
        group_simd(*kk, q, k, b, g, n, w, w_pad, S, d, ld, indicator, req, s, sh.ind_heads + h0 * P,
                   sh.ent + h0, sh.var + h0);
      });
      finish(exec, ws, sh, B, Hkv, n, P, indicator.pool_kernel, out, stats);
      return;
    }
    detail::parallel_for(exec, B * Hkv, [&](index_t bg, int worker) {
      Scratch s = scratch(worker);
      const index_t b = bg / Hkv, g = bg % Hkv;
      group_scores(q, k, b, g, n, w, w_pad, S, d, ld, s);
      for (index_t r = 0; r < n; ++r) {
        const index_t bh = b * H + g * n + r;
        float* p = s.p + r * w_pad * ld;
        double e = 0;
        for (index_t i = 0; i < w; ++i)
          e += softmax_row(p + i * ld, P + i + 1, P, ld, req.entropy, s.rmax[r * w_pad + i]);
        sh.ent[bh] = e;
        sh.var[bh] = column_stats(p, ld, w, P, indicator, req.variance, s, sh.ind_heads + bh * P);
      }
    });
    finish(exec, ws, sh, B, Hkv, n, P, indicator.pool_kernel, out, stats);
  }

  template <class TA, class Ind>
  static void run_from_attention(const host_policy& policy, host_view<TA, 4> a,
                                 const Ind& indicator, host_view<float, 3> out,
                                 host_view<float, 1> stats, StatsRequest req) {
    using namespace detail::host_stats;
    using detail::LANES;
    const index_t B = a.extent(0), H = a.extent(1), w = a.extent(2), S = a.extent(3);
    const index_t Hkv = out.extent(1), n = H / Hkv, P = S - w;
    const host_policy exec = detail::for_work(policy, B * H * w * S);
    const int nt = detail::worker_count(exec, B * H);
    host_workspace local;
    host_workspace& ws = detail::workspace_of(exec, local);
    prepare_workspace(ws, B * H, P, nt, w, 1, P, 0, w, indicator.pool_kernel);
    detail::carver shared_c(ws.shared());
    const Shared sh = Shared::carve(shared_c, B * H, P);
    detail::parallel_for(exec, B * H, [&](index_t bh, int worker) {
      detail::carver c(ws.worker(worker));
      Scratch s = Scratch::carve(c, w, 1, P, 0, w);
      const index_t b = bh / H, h = bh % H;
      // Copy the prefix columns as float: the reductions read them twice.
      for (index_t i = 0; i < w; ++i) {
        const auto* src = &a(b, h, i, 0);
        float* dst = s.p + i * P;
        for (index_t j = 0; j < P; ++j) dst[j] = static_cast<float>(src[j]);
      }
      double e = 0;
      if (req.entropy)
        for (index_t i = 0; i < w; ++i) {
          const float* r = s.p + i * P;
          float part[LANES] = {};
          index_t j = 0;
          for (; j + LANES <= P; j += LANES)
            for (index_t l = 0; l < LANES; ++l)
              part[l] += r[j + l] * detail::log_approx(r[j + l] + 1e-10f);
          for (index_t l = 0; j < P; ++j, ++l) part[l] += r[j] * detail::log_approx(r[j] + 1e-10f);
          for (index_t l = 0; l < LANES; ++l) e -= part[l];
        }
      sh.ent[bh] = e;
      sh.var[bh] = column_stats(s.p, P, w, P, indicator, req.variance, s, sh.ind_heads + bh * P);
    });
    finish(exec, ws, sh, B, Hkv, n, P, indicator.pool_kernel, out, stats);
  }

 private:
  static void finish(const host_policy& exec, host_workspace& ws,
                     const detail::host_stats::Shared& sh, index_t B, index_t Hkv, index_t n,
                     index_t P, int kernel, host_view<float, 3> out, host_view<float, 1> stats) {
    // The pooling is a few adds per key: a region of its own would cost more than it
    // saves (see host_policy::min_parallel_work).
    const host_policy pool_exec = detail::for_work(exec, B * Hkv * (n + kernel) * P);
    detail::host_stats::pool_groups(pool_exec, ws, sh.ind_heads, B, Hkv, n, P, kernel, out);
    double e = 0, v = 0;
    for (index_t i = 0; i < B * Hkv * n; ++i) {
      e += sh.ent[i];
      v += sh.var[i];
    }
    stats(0) = static_cast<float>(e);
    stats(1) = static_cast<float>(v);
  }
};

}  // namespace cake
