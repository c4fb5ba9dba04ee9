// Host backend of cake::decode_scores. One (batch, kv-head) row per task; the
// group's query heads share each key row while it is in cache.
#pragma once

#include <algorithm>
#include <bit>
#include <cmath>
#include <cstdint>
#include <limits>
#include <type_traits>

#include "../../detail/lanes.hpp"
#include "../../detail/math.hpp"
#include "../../detail/parallel.hpp"
#include "detail/simd.hpp"
#include "detail/threads.hpp"
#include "workspace.hpp"

namespace cake {
namespace detail::host_decode {

inline constexpr index_t QB = 4;  // query heads scored together against one key row

// dots[r] = q[r] . k for QB query rows (q: QB x d, zero-padded rows allowed), each
// with LANES partial sums added in a fixed order.
CAKE_ALWAYS_INLINE void dot_rows(const float* CAKE_RESTRICT q, const float* CAKE_RESTRICT k,
                                 index_t d, float* CAKE_RESTRICT dots) {
  float acc[QB][LANES] = {};
  index_t x = 0;
  for (; x + LANES <= d; x += LANES)
    for (index_t r = 0; r < QB; ++r)
      for (index_t l = 0; l < LANES; ++l) acc[r][l] += q[r * d + x + l] * k[x + l];
  for (index_t l = 0; x < d; ++x, ++l)
    for (index_t r = 0; r < QB; ++r) acc[r][l] += q[r * d + x] * k[x];
  for (index_t r = 0; r < QB; ++r) {
    float s = 0;
    for (index_t l = 0; l < LANES; ++l) s += acc[r][l];
    dots[r] = s;
  }
}

}  // namespace detail::host_decode

// Scratch per worker thread: the group's (padded) logits over the held keys, its
// queries as float and the pooled sums; from the policy's workspace, or allocated
// for the call.
template <>
struct decode_scores_backend<host_policy> {
  template <class TQ, class TK, class Ind>
  static void run(const host_policy& policy, host_view<TQ, 4 - 1> q, host_view<TK, 4> k,
                  const Ind& indicator, host_view<float, 3> out) {
    const index_t B = q.extent(0), H = q.extent(1), d = q.extent(2);
    const index_t Hkv = k.extent(1), n_held = k.extent(2), grp = H / Hkv, c = out.extent(2);
    if (B * Hkv == 0 || c == 0) return;  // nothing to score
    const int kernel = indicator.pool_kernel, half = kernel / 2;
    const float sqrt_d = static_cast<float>(std::sqrt(static_cast<double>(d)));
    using namespace detail::host_decode;
    using detail::lane_sum;
    using detail::row_max;
    const index_t grp_pad = (grp + QB - 1) / QB * QB;
    // A decode step is small (4.3 M multiply-adds at Llama-3.1-8B heads, 1K held):
    // below the policy's min_parallel_work it stays on the calling thread.
    const host_policy exec = detail::for_work(policy, B * H * n_held * d);
    const int nt = detail::worker_count(exec, B * Hkv);
    host_workspace local;
    host_workspace& ws = detail::workspace_of(exec, local);
    const auto z = [](index_t x) { return static_cast<std::size_t>(x); };
    // The SIMD path (picked at run time) for float or half keys with head_dim a whole number
    // of vectors: logits along head_dim with the group's queries sharing each key
    // row, exponentials and their sums vectorised over the keys.
    const detail::simd::kernels* kk = detail::simd::active_kernels();
    using TKe = std::remove_cv_t<TK>;
#if CAKE_SIMD_HAS_HALF
    constexpr bool simd_keys = std::is_same_v<TKe, float> || std::is_same_v<TKe, bfloat16> ||
                               std::is_same_v<TKe, _Float16>;
#else
    constexpr bool simd_keys = std::is_same_v<TKe, float> || std::is_same_v<TKe, bfloat16>;
#endif
    if constexpr (simd_keys) {
      if (kk && d % kk->vw == 0 && (n_held <= 1 || k.stride(2) >= d)) {
        const index_t ld = (n_held + 15) / 16 * 16;  // rows padded to whole vectors
        // (grp_pad, ld) logits, (grp_pad, d) queries, (c + 2 * half) pooled sums. What
        // is read is written first, but for the padding lanes past n_held, which the
        // softmax masks out.
        const auto carve = [&](detail::carver& cv) {
          struct {
            float *p, *qg, *a;
          } b{cv.take<float>(z(grp_pad * ld)), cv.take<float>(z(grp_pad * d)),
              cv.take<float>(z(c + 2 * half))};
          return b;
        };
        detail::carver sizer;
        carve(sizer);
        ws.prepare(0, nt, sizer.bytes());
        const float inv_sqrt_d = static_cast<float>(1.0 / std::sqrt(static_cast<double>(d)));
        detail::parallel_for(exec, B * Hkv, [&](index_t row, int worker) {
          const index_t b = row / Hkv, g = row % Hkv;
          detail::carver cv(ws.worker(worker));
          const auto buf = carve(cv);
          float* p = buf.p;
          float* qg = buf.qg;
          for (index_t r = 0; r < grp; ++r) {
            const auto* qr = &q(b, g * grp + r, 0);
            for (index_t x = 0; x < d; ++x) qg[r * d + x] = static_cast<float>(qr[x]);
          }
          std::fill(qg + grp * d, qg + grp_pad * d, 0.0f);  // padding rows: scored, never read
          const index_t k_ld = n_held > 1 ? k.stride(2) : d;
          if constexpr (std::is_same_v<TKe, float>)
            kk->decode_dots(qg, grp_pad, d, &k(b, g, 0, 0), k_ld, n_held, inv_sqrt_d, p, ld);
          else if constexpr (std::is_same_v<TKe, bfloat16>)
            kk->decode_dots_b(qg, grp_pad, d, &k(b, g, 0, 0), k_ld, n_held, inv_sqrt_d, p, ld);
#if CAKE_SIMD_HAS_HALF
          else
            kk->decode_dots_h(qg, grp_pad, d, &k(b, g, 0, 0), k_ld, n_held, inv_sqrt_d, p, ld);
#endif
          float* a = buf.a;
          std::fill(a, a + c + 2 * half, 0.0f);
          for (index_t r = 0; r < grp; ++r) {
            float* pr = p + r * ld;
            float m, sum, unused[2];
            kk->tile_softmax(pr, n_held, ld, 0, &m, &sum, &unused[0], &unused[1]);
            const float inv = 1.0f / sum;
            for (index_t j = 0; j < c; ++j) a[half + j] += indicator.score(pr[j] * inv, 0.0f);
          }
          const float inv = 1.0f / (static_cast<float>(kernel) * static_cast<float>(grp));
          float* o = &out(b, g, 0);
          for (index_t j = 0; j < c; ++j) {
            float s = 0;
            for (int t = 0; t < kernel; ++t) s += a[j + t];
            o[j] = s * inv;
          }
        });
        return;
      }
    }
    // Per worker: (grp, n_held) probabilities, (grp_pad, d) the group's queries as
    // float (rows past grp are zero), (c + 2 * half) padded sums, a key row as float.
    const auto carve = [&](detail::carver& cv) {
      struct {
        float *p, *qg, *a, *kf;
      } b{cv.take<float>(z(grp * n_held)), cv.take<float>(z(grp_pad * d)),
          cv.take<float>(z(c + 2 * half)), cv.take<float>(z(d))};
      return b;
    };
    detail::carver sizer;
    carve(sizer);
    ws.prepare(0, nt, sizer.bytes());
    detail::parallel_for(exec, B * Hkv, [&](index_t row, int worker) {
      const index_t b = row / Hkv, g = row % Hkv;
      detail::carver cv(ws.worker(worker));
      const auto buf = carve(cv);
      float* p = buf.p;
      float* qg = buf.qg;
      for (index_t r = 0; r < grp; ++r) {
        const auto* qr = &q(b, g * grp + r, 0);
        for (index_t x = 0; x < d; ++x) qg[r * d + x] = static_cast<float>(qr[x]);
      }
      std::fill(qg + grp * d, qg + grp_pad * d, 0.0f);
      float* kf = buf.kf;  // a key row as float, if need be
      for (index_t j = 0; j < n_held; ++j) {
        const auto* kr = &k(b, g, j, 0);
        const float* kp;
        if constexpr (std::is_same_v<std::remove_const_t<std::remove_reference_t<decltype(*kr)>>,
                                     float>) {
          kp = kr;
        } else {
          for (index_t x = 0; x < d; ++x) kf[x] = static_cast<float>(kr[x]);
          kp = kf;
        }
        for (index_t r0 = 0; r0 < grp; r0 += QB) {
          float dots[QB];
          dot_rows(qg + r0 * d, kp, d, dots);
          for (index_t r = r0; r < std::min(grp, r0 + QB); ++r)
            p[r * n_held + j] = dots[r - r0] / sqrt_d;
        }
      }
      float* a = buf.a;
      std::fill(a, a + c + 2 * half, 0.0f);
      for (index_t r = 0; r < grp; ++r) {
        float* pr = p + r * n_held;
        const float m = row_max(pr, n_held);
        for (index_t j = 0; j < n_held; ++j) pr[j] = detail::exp_approx(pr[j] - m);
        const float sum = lane_sum(pr, n_held);
        for (index_t j = 0; j < c; ++j) a[half + j] += indicator.score(pr[j] / sum, 0.0f);
      }
      const float inv = 1.0f / (static_cast<float>(kernel) * static_cast<float>(grp));
      float* o = &out(b, g, 0);
      for (index_t j = 0; j < c; ++j) {
        float s = 0;
        for (int t = 0; t < kernel; ++t) s += a[j + t];
        o[j] = s * inv;
      }
    });
  }
};

}  // namespace cake
