// Host backend of cake::window_stats.
//
// Per query head: the (w x S) scores are computed tile by tile from a transposed
// K tile with a register-blocked micro-kernel the compiler vectorises, kept in a
// per-thread buffer (w*S floats for one head, never B*H*w*S), turned into
// probabilities row by row, then reduced column by column into the per-key
// indicator. Heads run in parallel; the per-head results are combined in a fixed
// order, so the output does not depend on the thread count.
#pragma once

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#include "../../detail/math.hpp"
#include "../../detail/parallel.hpp"

namespace cake {
namespace detail::host_stats {

inline constexpr index_t RB = 4;    // query rows per micro-tile
inline constexpr index_t CB = 32;   // keys per micro-tile
inline constexpr index_t TJ = 256;  // keys per transposed K tile
inline constexpr index_t LANES = 16;
inline constexpr index_t COL_CHUNK = 2048;  // keys per column-reduction chunk (stays in L2)

inline index_t round_up(index_t x, index_t m) { return (x + m - 1) / m * m; }

struct Scratch {
  std::vector<float> q;    // (w_pad, d)      window queries of one head, as float
  std::vector<float> kt;   // (d, TJ)         one key tile, transposed
  std::vector<float> p;    // (w_pad, ld)     scores, then probabilities
  std::vector<float> col;  // (COL_CHUNK)     column means
  std::vector<float> m2;   // (COL_CHUNK)     column sums of squared deviations
  void reserve(index_t w_pad, index_t d, index_t ld) {
    q.assign(static_cast<std::size_t>(w_pad * d), 0.0f);
    kt.assign(static_cast<std::size_t>(d * TJ), 0.0f);
    p.resize(static_cast<std::size_t>(w_pad * ld));
    col.resize(COL_CHUNK);
    m2.resize(COL_CHUNK);
  }
};

// out[r][c] = (q[r] . kt[:, c]) / sqrt_d for RB rows and CB keys.
CAKE_ALWAYS_INLINE void micro_tile(const float* CAKE_RESTRICT q, const float* CAKE_RESTRICT kt,
                                   index_t d, float sqrt_d, float* CAKE_RESTRICT out, index_t ld) {
  float acc[RB][CB] = {};
  for (index_t x = 0; x < d; ++x) {
    const float* CAKE_RESTRICT kr = kt + x * TJ;
    for (index_t r = 0; r < RB; ++r) {
      const float qv = q[r * d + x];
      for (index_t c = 0; c < CB; ++c) acc[r][c] += qv * kr[c];
    }
  }
  for (index_t r = 0; r < RB; ++r)
    for (index_t c = 0; c < CB; ++c) out[r * ld + c] = acc[r][c] / sqrt_d;
}

// Sum with LANES independent accumulators, so that it vectorises without
// reassociation flags; the result does not depend on the target's vector width.
CAKE_ALWAYS_INLINE float lane_sum(const float* CAKE_RESTRICT x, index_t n) {
  float part[LANES] = {};
  index_t j = 0;
  for (; j + LANES <= n; j += LANES)
    for (index_t l = 0; l < LANES; ++l) part[l] += x[j + l];
  for (index_t l = 0; j < n; ++j, ++l) part[l] += x[j];
  float s = 0;
  for (index_t l = 0; l < LANES; ++l) s += part[l];
  return s;
}

// Row i of the window sees keys [0, S - w + i]; the rest is masked (probability 0).
// Writes probabilities in place and returns sum over prefix keys of p ln(p + 1e-10).
inline double softmax_row(float* CAKE_RESTRICT row, index_t valid, index_t prefix, index_t ld,
                          bool want_entropy) {
  float m = -std::numeric_limits<float>::max();
  for (index_t j = 0; j < valid; ++j) m = row[j] > m ? row[j] : m;
  for (index_t j = 0; j < valid; ++j) row[j] = exp_approx(row[j] - m);
  for (index_t j = valid; j < ld; ++j) row[j] = 0.0f;
  const float sum = lane_sum(row, valid);
  for (index_t j = 0; j < valid; ++j) row[j] = row[j] / sum;
  if (!want_entropy) return 0.0;
  float part[LANES] = {};
  index_t j = 0;
  for (; j + LANES <= prefix; j += LANES)
    for (index_t l = 0; l < LANES; ++l) {
      const float p = row[j + l];
      part[l] += p * log_approx(p + 1e-10f);
    }
  for (index_t l = 0; j < prefix; ++j, ++l) part[l] += row[j] * log_approx(row[j] + 1e-10f);
  double s = 0;
  for (index_t l = 0; l < LANES; ++l) s += part[l];
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
  float* CAKE_RESTRICT col = s.col.data();
  float* CAKE_RESTRICT m2 = s.m2.data();
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

// Scores of one query head against all keys of its KV head, into s.p (w_pad x ld).
template <class QV, class KV>
void head_scores(const QV& q, const KV& k, index_t b, index_t h, index_t g, index_t w,
                 index_t w_pad, index_t S, index_t d, index_t ld, Scratch& s) {
  const float sqrt_d = static_cast<float>(std::sqrt(static_cast<double>(d)));
  for (index_t i = 0; i < w; ++i) {
    const auto* qr = &q(b, h, i, 0);
    for (index_t x = 0; x < d; ++x) s.q[static_cast<std::size_t>(i * d + x)] = static_cast<float>(qr[x]);
  }
  float* kt = s.kt.data();
  for (index_t j0 = 0; j0 < S; j0 += TJ) {
    const index_t tj = std::min(TJ, S - j0);
    for (index_t jj = 0; jj < tj; ++jj) {
      const auto* kr = &k(b, g, j0 + jj, 0);
      for (index_t x = 0; x < d; ++x) kt[x * TJ + jj] = static_cast<float>(kr[x]);
    }
    if (tj < TJ)
      for (index_t x = 0; x < d; ++x) std::fill(kt + x * TJ + tj, kt + (x + 1) * TJ, 0.0f);
    const index_t tj_pad = round_up(tj, CB);
    for (index_t i0 = 0; i0 < w_pad; i0 += RB)
      for (index_t c0 = 0; c0 < tj_pad; c0 += CB)
        micro_tile(s.q.data() + i0 * d, kt + c0, d, sqrt_d, s.p.data() + i0 * ld + j0 + c0, ld);
  }
}

// Sum the per-head indicators of each GQA group, pool along the keys, divide by
// kernel * group size: out[b, g, j].
template <class OutV>
void pool_groups(const host_policy& exec, const std::vector<float>& ind_heads, index_t B,
                 index_t Hkv, index_t n, index_t P, int kernel, OutV& out) {
  if (P == 0) return;  // no prefix keys (S == w): nothing to write
  const index_t half = kernel / 2;
  const float inv = 1.0f / (static_cast<float>(kernel) * static_cast<float>(n));
  const int nt = worker_count(exec, B * Hkv);
  std::vector<std::vector<float>> bufs(static_cast<std::size_t>(nt),
                                       std::vector<float>(static_cast<std::size_t>(P + 2 * half)));
  parallel_for(exec, B * Hkv, [&](index_t row, int worker) {
    const index_t b = row / Hkv, g = row % Hkv;
    float* tmp = bufs[static_cast<std::size_t>(worker)].data();
    std::fill(tmp, tmp + P + 2 * half, 0.0f);
    for (index_t r = 0; r < n; ++r) {
      const float* src = ind_heads.data() + ((b * Hkv + g) * n + r) * P;
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

}  // namespace detail::host_stats

template <>
struct window_stats_backend<host_policy> {
  template <class TQ, class TK, class Ind>
  static void run(const host_policy& exec, host_view<TQ, 4> q, host_view<TK, 4> k,
                  const Ind& indicator, host_view<float, 3> out, host_view<float, 1> stats,
                  StatsRequest req) {
    using namespace detail::host_stats;
    const index_t B = q.extent(0), H = q.extent(1), w = q.extent(2), d = q.extent(3);
    const index_t Hkv = k.extent(1), S = k.extent(2), n = H / Hkv, P = S - w;
    const index_t w_pad = round_up(w, RB), ld = round_up(S, TJ);
    std::vector<float> ind_heads(static_cast<std::size_t>(B * H * P));
    std::vector<double> ent(static_cast<std::size_t>(B * H)), var(static_cast<std::size_t>(B * H));
    const int nt = detail::worker_count(exec, B * H);
    std::vector<Scratch> scratch(static_cast<std::size_t>(nt));
    for (auto& s : scratch) s.reserve(w_pad, d, ld);
    detail::parallel_for(exec, B * H, [&](index_t bh, int worker) {
      Scratch& s = scratch[static_cast<std::size_t>(worker)];
      const index_t b = bh / H, h = bh % H, g = h / n;
      head_scores(q, k, b, h, g, w, w_pad, S, d, ld, s);
      double e = 0;
      for (index_t i = 0; i < w; ++i)
        e += softmax_row(s.p.data() + i * ld, P + i + 1, P, ld, req.entropy);
      ent[static_cast<std::size_t>(bh)] = e;
      var[static_cast<std::size_t>(bh)] =
          column_stats(s.p.data(), ld, w, P, indicator, req.variance, s,
                       ind_heads.data() + bh * P);
    });
    finish(exec, ind_heads, ent, var, B, Hkv, n, P, indicator.pool_kernel, out, stats);
  }

  template <class TA, class Ind>
  static void run_from_attention(const host_policy& exec, host_view<TA, 4> a, const Ind& indicator,
                                 host_view<float, 3> out, host_view<float, 1> stats,
                                 StatsRequest req) {
    using namespace detail::host_stats;
    const index_t B = a.extent(0), H = a.extent(1), w = a.extent(2), S = a.extent(3);
    const index_t Hkv = out.extent(1), n = H / Hkv, P = S - w;
    std::vector<float> ind_heads(static_cast<std::size_t>(B * H * P));
    std::vector<double> ent(static_cast<std::size_t>(B * H)), var(static_cast<std::size_t>(B * H));
    const int nt = detail::worker_count(exec, B * H);
    std::vector<Scratch> scratch(static_cast<std::size_t>(nt));
    for (auto& s : scratch) s.reserve(w, 1, P);
    detail::parallel_for(exec, B * H, [&](index_t bh, int worker) {
      Scratch& s = scratch[static_cast<std::size_t>(worker)];
      const index_t b = bh / H, h = bh % H;
      // Copy the prefix columns as float: the reductions read them twice.
      for (index_t i = 0; i < w; ++i) {
        const auto* src = &a(b, h, i, 0);
        float* dst = s.p.data() + i * P;
        for (index_t j = 0; j < P; ++j) dst[j] = static_cast<float>(src[j]);
      }
      double e = 0;
      if (req.entropy)
        for (index_t i = 0; i < w; ++i) {
          const float* r = s.p.data() + i * P;
          float part[LANES] = {};
          index_t j = 0;
          for (; j + LANES <= P; j += LANES)
            for (index_t l = 0; l < LANES; ++l)
              part[l] += r[j + l] * detail::log_approx(r[j + l] + 1e-10f);
          for (index_t l = 0; j < P; ++j, ++l) part[l] += r[j] * detail::log_approx(r[j] + 1e-10f);
          for (index_t l = 0; l < LANES; ++l) e -= part[l];
        }
      ent[static_cast<std::size_t>(bh)] = e;
      var[static_cast<std::size_t>(bh)] =
          column_stats(s.p.data(), P, w, P, indicator, req.variance, s, ind_heads.data() + bh * P);
    });
    finish(exec, ind_heads, ent, var, B, Hkv, n, P, indicator.pool_kernel, out, stats);
  }

 private:
  static void finish(const host_policy& exec, const std::vector<float>& ind_heads,
                     const std::vector<double>& ent, const std::vector<double>& var, index_t B,
                     index_t Hkv, index_t n, index_t P, int kernel, host_view<float, 3> out,
                     host_view<float, 1> stats) {
    detail::host_stats::pool_groups(exec, ind_heads, B, Hkv, n, P, kernel, out);
    double e = 0, v = 0;
    for (std::size_t i = 0; i < ent.size(); ++i) {
      e += ent[i];
      v += var[i];
    }
    stats(0) = static_cast<float>(e);
    stats(1) = static_cast<float>(v);
  }
};

}  // namespace cake
