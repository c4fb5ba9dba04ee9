// Host backend of cake::window_stats.
//
// One task per (batch, KV head): the GQA group's n query heads share each key tile.
// SIMD paths (AVX-512, AVX2; chosen at run time): the group's window rows in vector
// lanes, K read in place, each tile's scores turned at once into exp(logit - tile max)
// (kept, n*w*S floats per worker, never B*H*w*S) and row sums; then per row the
// softmax scale of each tile, and per head one pass over the kept values for the
// column statistics. Portable path: (w x S) score tiles from a transposed K tile with a
// register-blocked micro-kernel the compiler vectorises, softmax row by row, then
// column by column. Per-head results are combined in a fixed order, so the output
// does not depend on the thread count.
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

// Where a layer's keys are, for the kernels below: row(b, g, j) is key j of KV head g
// (head_dim values, unit stride), and run(b, g, j, most) how many keys from j (at most
// `most`) lie at one pitch, so that a tile of them is read in place. A dense
// (batch, kv_heads, tokens, head_dim) view is one run per head; an engine's block pool
// (detail::paged_keys, layer_ops.hpp) one per block, or per stretch of blocks that
// continue one another. Every key is read with the same arithmetic either way, so
// the results do not depend on where the keys are.
struct key_run {
  index_t count, pitch;  // keys, and elements from one to the next (count > 1)
};
template <class KV>
struct dense_keys {
  using element_type = std::remove_cv_t<typename KV::element_type>;
  KV k;  // (batch, kv_heads, tokens, head_dim)
  index_t heads() const { return k.extent(1); }
  index_t tokens() const { return k.extent(2); }
  const element_type* row(index_t b, index_t g, index_t j) const { return &k(b, g, j, 0); }
  key_run run(index_t, index_t, index_t j, index_t most) const {
    const index_t n = std::min(most, k.extent(2) - j);
    return {n, n > 1 ? static_cast<index_t>(k.stride(2)) : k.extent(3)};
  }
};
template <class KV>
dense_keys<KV> keys_of(const KV& k) {
  return dense_keys<KV>{k};
}

// One worker's buffers on the portable path, carved from its workspace block (see carve).
struct Scratch {
  float* q;     // (rows, d)       window queries of one GQA group, as float
  float* kt;    // (d, KT_LD)      one key tile, transposed
  float* p;     // (rows, ld)      scores, then probabilities
  float* col;   // (COL_CHUNK)     column means
  float* m2;    // (COL_CHUNK)     column sums of squared deviations
  float* rmax;  // (rows)          maximum score of each row over its valid keys
  static Scratch carve(carver& c, index_t rows, index_t d, index_t ld) {
    const auto z = [](index_t n) { return static_cast<std::size_t>(n); };
    Scratch s{};
    s.q = c.take<float>(z(rows * d));
    s.kt = c.take<float>(z(d * KT_LD));
    s.p = c.take<float>(z(rows * ld));
    s.col = c.take<float>(z(COL_CHUNK));
    s.m2 = c.take<float>(z(COL_CHUNK));
    s.rmax = c.take<float>(z(rows));
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
                              index_t d, index_t ld, int kernel) {
  carver shared, worker, pool;
  Shared::carve(shared, BH, P);
  Scratch::carve(worker, rows, d, ld);
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
template <class QV, class KS>
void group_scores(const QV& q, const KS& ks, index_t b, index_t g, index_t n, index_t w,
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
      const auto* kr = ks.row(b, g, j0 + jj);
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

// The SIMD path's buffers (simd.hpp's kernels, picked at run time), rows in lanes:
// the group's n * w_pad rows (w_pad = w rounded up to a vector) are R lanes, two row
// vectors (a pair, kk.pr lanes) per micro-tile; keys go by tiles of kk.tk.
struct LaneScratch {
  float* qt;     // (pairs, d, pr)    the window rows of one GQA group, transposed, as float
  float* ri;     // (R)               each lane's row within its head (padding: huge)
  float* kt;     // (tk, d)           one key tile as float rows (16-bit keys, or a tile of
                 //                   a pool that spans blocks)
  float* kpad;   // (kt, d)           a tile's last, partial micro-tile of keys, zero-padded
  float* buf;    // (tk, pr)          one pair's scores of one tile
  float* e;      // (n, P_pad, w_pad) e = exp(logit - tile max) of the prefix keys, rows in
                 //                   lanes (group_lanes: in which order)
  float* st[4];  // (tiles, R)        per tile: max, sum of e, over the prefix sum of e and of
                 //                   e * (logit - max)
  float* c;      // (tiles, R)        per tile: the factor that turns e into probabilities
  double* rs;    // (3, R)            per row: softmax sum, prefix sums of p, p * (logit - max)
  float* col;    // (chunk)           column means
  float* m2;     // (chunk)           column variances

  const char** next;  // (tk) the next tile's key rows, fetched ahead
  struct dims {
    index_t w_pad, nvec, pairs, R, tiles, P_pad, chunk;
    dims(const simd::kernels& kk, index_t n, index_t w, index_t S) {
      const index_t vw = kk.vw, P = S - w;
      w_pad = round_up(w, vw);
      nvec = n * w_pad / vw;
      pairs = (nvec + 1) / 2;
      R = pairs * kk.pr;
      tiles = (S + kk.tk - 1) / kk.tk;
      P_pad = round_up(P, kk.tk);
      chunk = kk.tk * std::max<index_t>(1, COL_CHUNK / kk.tk);  // whole tiles
    }
  };
  static LaneScratch carve(carver& c, const simd::kernels& kk, const dims& m, index_t n,
                           index_t d) {
    const auto z = [](index_t v) { return static_cast<std::size_t>(v); };
    LaneScratch s{};
    s.qt = c.take<float>(z(m.pairs * d * kk.pr));
    s.ri = c.take<float>(z(m.R));
    s.kt = c.take<float>(z(kk.tk * d));
    s.kpad = c.take<float>(z(kk.kt * d));
    s.buf = c.take<float>(z(kk.tk * kk.pr));
    s.next = c.take<const char*>(z(kk.tk));
    s.e = c.take<float>(z(n * m.P_pad * m.w_pad));
    for (float*& p : s.st) p = c.take<float>(z(m.tiles * m.R));
    s.c = c.take<float>(z(m.tiles * m.R));
    s.rs = c.take<double>(z(3 * m.R));
    s.col = c.take<float>(z(m.chunk));
    s.m2 = c.take<float>(z(m.chunk));
    return s;
  }
};

// The SIMD path for KV head g of batch b. Per key tile and row pair: the scores (K read
// in place, each key value broadcast against the pair's rows), each lane's tile max,
// e = exp(logit - tile max) of the prefix keys kept, and the tile's sums; then per row
// the max M and sum L over the tiles and each tile's factor exp(tile max - M) / L that
// turns its e into probabilities; then per head one pass over the kept e for the column
// statistics. The entropy needs no logarithm per key: ln p = logit - M - ln L, so a
// row's sum of p ln p is sum p * (logit - M) - ln L * sum p over the prefix, from the
// tile sums (each relative to its tile's max, so huge logits never cancel). That drops
// the reference's 1e-10 inside ln(p + 1e-10), which moves the entropy by at most 1e-10
// per (head, row, key): 1.7e-3 of about 9.5e3 for a 16K Llama layer. The same
// quantities as the portable path, rounded differently (fused multiply-adds, the
// softmax sum by tiles).
// cnt key rows from src (pitch elements apart) as float rows of d: out[t * d + x].
template <class TK>
void widen_keys(const simd::kernels& kk, const TK* src, index_t pitch, index_t cnt, index_t d,
                float* out) {
  if constexpr (std::is_same_v<TK, float>) {
    for (index_t t = 0; t < cnt; ++t) std::copy_n(src + t * pitch, d, out + t * d);
  } else if constexpr (std::is_same_v<TK, bfloat16>) {
    kk.widen_rows_b(src, pitch, cnt, d, out);
  }
#if CAKE_SIMD_HAS_HALF
  else if constexpr (std::is_same_v<TK, _Float16>) {
    kk.widen_rows_h(src, pitch, cnt, d, out);
  }
#endif
  else {
    for (index_t t = 0; t < cnt; ++t)
      for (index_t x = 0; x < d; ++x) out[t * d + x] = static_cast<float>(src[t * pitch + x]);
  }
}

template <class QV, class KS, class Ind>
void group_lanes(const simd::kernels& kk, const QV& q, const KS& ks, index_t b, index_t g,
                 index_t n, index_t w, index_t S, index_t d, const Ind& indicator, StatsRequest req,
                 const LaneScratch::dims& m, LaneScratch& s, float* ind_group, double* ent,
                 double* var) {
  const index_t P = S - w, vw = kk.vw, pr = kk.pr, tk = kk.tk, R = m.R, nvh = m.w_pad / vw;
  // Where e is: head h's vector u (lanes u * vw ... of its rows) for key j at
  // e_at(h, u) + j * key_ld. Interleaved (a key's vectors side by side) where a vector
  // fills a cache line; else one plane per vector, so that a vector's keys fill whole
  // lines (pair_tile's streaming stores).
  const bool planes = vw * static_cast<index_t>(sizeof(float)) < 64;
  const index_t key_ld = planes ? vw : m.w_pad, vec_ld = planes ? m.P_pad * vw : vw;
  const auto e_at = [&](index_t h, index_t u) { return s.e + h * nvh * m.P_pad * vw + u * vec_ld; };
  const float inv_sqrt_d = static_cast<float>(1.0 / std::sqrt(static_cast<double>(d)));
  std::fill(s.qt, s.qt + m.pairs * d * pr, 0.0f);
  for (index_t r = 0; r < n; ++r)
    for (index_t i = 0; i < w; ++i) {
      const index_t lane = r * m.w_pad + i, pair = lane / pr, l = lane % pr;
      const auto* qr = &q(b, g * n + r, i, 0);
      float* dst = s.qt + pair * d * pr + l;
      for (index_t x = 0; x < d; ++x) dst[x * pr] = static_cast<float>(qr[x]);
    }
  for (index_t lane = 0; lane < R; ++lane) {
    const index_t h = lane / m.w_pad, i = lane % m.w_pad;
    s.ri[lane] = h < n && i < w ? static_cast<float>(i) : 1e9f;
  }
  using TKe = typename KS::element_type;
  for (index_t t = 0; t < m.tiles; ++t) {
    const index_t j0 = t * tk, nk = std::min(tk, S - j0);
    const float* kp = s.kt;
    index_t kld = d;
    // Float keys at one pitch are read in place; others (16-bit, or a tile that spans
    // blocks of a pool) are first widened or copied, run by run, into s.kt.
    const key_run here = ks.run(b, g, j0, nk);
    if constexpr (std::is_same_v<TKe, float>) {
      if (here.count == nk) {
        kp = ks.row(b, g, j0);
        kld = here.pitch;
      }
    }
    if (kp == s.kt)
      for (index_t jj = 0; jj < nk;) {
        const key_run rn = jj == 0 ? here : ks.run(b, g, j0 + jj, nk - jj);
        widen_keys(kk, ks.row(b, g, j0 + jj), rn.pitch, rn.count, d, s.kt + jj * d);
        jj += rn.count;
      }
    // The next tile's key rows (in their storage type), each pair fetching its share
    // into cache while it computes.
    const index_t nk2 = std::min(tk, S - j0 - nk);
    for (index_t jj = 0; jj < nk2;) {
      const key_run rn = ks.run(b, g, j0 + nk + jj, nk2 - jj);
      const char* first = reinterpret_cast<const char*>(ks.row(b, g, j0 + nk + jj));
      for (index_t x = 0; x < rn.count; ++x)
        s.next[jj + x] = first + x * rn.pitch * static_cast<index_t>(sizeof(TKe));
      jj += rn.count;
    }
    const index_t share = (nk2 + m.pairs - 1) / m.pairs;
    for (index_t p = 0; p < m.pairs; ++p) {
      float* ev[2] = {nullptr, nullptr};
      for (index_t v = 0; v < 2; ++v) {
        const index_t vec = 2 * p + v;
        if (vec >= m.nvec) continue;
        const index_t lane = vec * vw, h = lane / m.w_pad, u = lane % m.w_pad / vw;
        ev[v] = e_at(h, u) + j0 * key_ld;
      }
      const std::size_t so = static_cast<std::size_t>(t * R + p * pr);
      float* const stp[4] = {s.st[0] + so, s.st[1] + so, s.st[2] + so, s.st[3] + so};
      const index_t pf0 = std::min(nk2, p * share), pf_n = std::min(nk2, pf0 + share) - pf0;
      kk.pair_tile(s.qt + p * d * pr, d, kp, kld, nk, j0, P, s.ri + p * pr, inv_sqrt_d, s.kpad,
                   s.buf, ev[0], ev[1], key_ld, stp, s.next + pf0, pf_n,
                   d * static_cast<index_t>(sizeof(TKe)));
    }
  }
  kk.combine_rows(s.st[0], s.st[1], s.st[2], s.st[3], m.tiles, R, s.c, s.rs);
  for (index_t r = 0; r < n; ++r) {
    double e_head = 0;
    for (index_t i = 0; i < w; ++i) {
      const index_t lane = r * m.w_pad + i;
      e_head -= s.rs[2 * R + lane] - std::log(s.rs[lane]) * s.rs[R + lane];
    }
    ent[r] = req.entropy ? e_head : 0.0;
  }
  const bool need_var = req.variance || Ind::needs_variance;
  for (index_t r = 0; r < n; ++r) {
    double v = 0;
    for (index_t j0 = 0; j0 < P; j0 += m.chunk) {
      const index_t cnt = std::min(m.chunk, P - j0);
      kk.head_columns_lanes(e_at(r, 0) + j0 * key_ld, nvh, key_ld, vec_ld, w,
                            s.c + (j0 / tk) * R + r * m.w_pad, R, cnt, need_var, s.col, s.m2, &v);
      float* dst = ind_group + r * P + j0;
      for (index_t j = 0; j < cnt; ++j)
        dst[j] = indicator.score(s.col[j], need_var ? s.m2[j] : 0.0f);
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
  Scratch::carve(sizer, n * w_pad, d, lds);
  ws.prepare(0, nt, sizer.bytes());
  parallel_for(exec, B * Hkv, [&](index_t bg, int worker) {
    carver c(ws.worker(worker));
    Scratch s = Scratch::carve(c, n * w_pad, d, lds);
    const index_t b = bg / Hkv, g = bg % Hkv;
    group_scores(q, keys_of(k), b, g, n, w, w_pad, S, d, lds, s);
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
    run_keys(policy, q, detail::host_stats::keys_of(k), indicator, out, stats, req);
  }

  // The same with the keys wherever a key source (host_stats::dense_keys, or
  // detail::paged_keys for an engine's block pool) says they are; the arguments
  // checked as window_stats checks them.
  template <class TQ, class KS, class Ind>
  static void run_keys(const host_policy& policy, host_view<TQ, 4> q, const KS& ks,
                       const Ind& indicator, host_view<float, 3> out, host_view<float, 1> stats,
                       StatsRequest req) {
    using namespace detail::host_stats;
    using detail::LANES;
    const index_t B = q.extent(0), H = q.extent(1), w = q.extent(2), d = q.extent(3);
    const index_t Hkv = ks.heads(), S = ks.tokens(), n = H / Hkv, P = S - w;
    const host_policy exec = detail::for_work(policy, B * H * w * S * d);
    const detail::simd::kernels* kk = detail::simd::active_kernels();
    // One task per (batch, KV head): its n query heads share each key tile.
    // Per-head results land in fixed slots, so nothing depends on the thread count.
    const int nt = detail::worker_count(exec, B * Hkv);
    host_workspace local;
    host_workspace& ws = detail::workspace_of(exec, local);
    if (kk) {
      const LaneScratch::dims m(*kk, n, w, S);
      detail::carver shared, worker, pool;
      Shared::carve(shared, B * H, P);
      LaneScratch::carve(worker, *kk, m, n, d);
      pool.take<float>(static_cast<std::size_t>(P + 2 * (indicator.pool_kernel / 2)));
      ws.prepare(shared.bytes(), nt, std::max(worker.bytes(), pool.bytes()));
      detail::carver shared_c(ws.shared());
      const Shared sh = Shared::carve(shared_c, B * H, P);
      detail::parallel_for(exec, B * Hkv, [&](index_t bg, int wk) {
        detail::carver c(ws.worker(wk));
        LaneScratch s = LaneScratch::carve(c, *kk, m, n, d);
        const index_t b = bg / Hkv, g = bg % Hkv, h0 = b * H + g * n;
        group_lanes(*kk, q, ks, b, g, n, w, S, d, indicator, req, m, s, sh.ind_heads + h0 * P,
                    sh.ent + h0, sh.var + h0);
      });
      finish(exec, ws, sh, B, Hkv, n, P, indicator.pool_kernel, out, stats);
      return;
    }
    const index_t w_pad = round_up(w, RB), ld = round_up(S, TJ), rows = n * w_pad;
    prepare_workspace(ws, B * H, P, nt, rows, d, ld, indicator.pool_kernel);
    detail::carver shared_c(ws.shared());
    const Shared sh = Shared::carve(shared_c, B * H, P);
    const auto scratch = [&](int worker) {
      detail::carver c(ws.worker(worker));
      return Scratch::carve(c, rows, d, ld);
    };
    detail::parallel_for(exec, B * Hkv, [&](index_t bg, int worker) {
      Scratch s = scratch(worker);
      const index_t b = bg / Hkv, g = bg % Hkv;
      group_scores(q, ks, b, g, n, w, w_pad, S, d, ld, s);
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
    prepare_workspace(ws, B * H, P, nt, w, 1, P, indicator.pool_kernel);
    detail::carver shared_c(ws.shared());
    const Shared sh = Shared::carve(shared_c, B * H, P);
    detail::parallel_for(exec, B * H, [&](index_t bh, int worker) {
      detail::carver c(ws.worker(worker));
      Scratch s = Scratch::carve(c, w, 1, P);
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
