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

namespace detail::host_decode {

// Where a row's held keys are: an mdspan (b, g, j, x), or a table of one pointer per
// key (rows, ld), row b * Hkv + g (a layer's slots through its slot map, or a paged
// layer's through its block table: scored where they lie, nothing copied).
template <class V>
struct view_keys {
  const V& k;
  using elem = std::remove_cv_t<typename V::element_type>;
  const typename V::element_type* row(index_t b, index_t g, index_t j) const {
    return &k(b, g, j, 0);
  }
  bool contiguous(index_t n_held, index_t d) const { return n_held <= 1 || k.stride(2) >= d; }
  index_t ld(index_t n_held, index_t d) const { return n_held > 1 ? k.stride(2) : d; }
};
template <class T>
struct listed_keys {
  const T* const* k;
  index_t ld, kv_heads;
  using elem = std::remove_cv_t<T>;
  const T* row(index_t b, index_t g, index_t j) const { return k[(b * kv_heads + g) * ld + j]; }
  bool contiguous(index_t, index_t) const { return true; }
};

// Scratch per worker thread: the group's (padded) logits over the held keys, its
// queries as float and the pooled sums; from the policy's workspace, or allocated
// for the call.
template <class TQ, class Keys, class Ind>
void score_groups(const host_policy& policy, host_view<TQ, 3> q, const Keys& keys, index_t Hkv,
                  index_t n_held, const Ind& indicator, host_view<float, 3> out) {
  const index_t B = q.extent(0), H = q.extent(1), d = q.extent(2);
  const index_t grp = H / Hkv, c = out.extent(2);
  if (B * Hkv == 0 || c == 0) return;  // nothing to score
  const int kernel = indicator.pool_kernel, half = kernel / 2;
  const float sqrt_d = static_cast<float>(std::sqrt(static_cast<double>(d)));
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
  using TKe = typename Keys::elem;
  constexpr bool listed = requires { keys.kv_heads; };
#if CAKE_SIMD_HAS_HALF
  constexpr bool simd_keys =
      std::is_same_v<TKe, float> || std::is_same_v<TKe, bfloat16> || std::is_same_v<TKe, _Float16>;
#else
  constexpr bool simd_keys = std::is_same_v<TKe, float> || std::is_same_v<TKe, bfloat16>;
#endif
  if constexpr (simd_keys) {
    if (kk && d % kk->vw == 0 && keys.contiguous(n_held, d)) {
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
        if constexpr (listed) {
          const TKe* const* kr = keys.k + row * keys.ld;
          if constexpr (std::is_same_v<TKe, float>)
            kk->decode_dots_l(qg, grp_pad, d, kr, n_held, inv_sqrt_d, p, ld);
          else if constexpr (std::is_same_v<TKe, bfloat16>)
            kk->decode_dots_lb(qg, grp_pad, d, kr, n_held, inv_sqrt_d, p, ld);
#if CAKE_SIMD_HAS_HALF
          else
            kk->decode_dots_lh(qg, grp_pad, d, kr, n_held, inv_sqrt_d, p, ld);
#endif
        } else {
          const index_t k_ld = keys.ld(n_held, d);
          const TKe* k0 = keys.row(b, g, 0);
          if constexpr (std::is_same_v<TKe, float>)
            kk->decode_dots(qg, grp_pad, d, k0, k_ld, n_held, inv_sqrt_d, p, ld);
          else if constexpr (std::is_same_v<TKe, bfloat16>)
            kk->decode_dots_b(qg, grp_pad, d, k0, k_ld, n_held, inv_sqrt_d, p, ld);
#if CAKE_SIMD_HAS_HALF
          else
            kk->decode_dots_h(qg, grp_pad, d, k0, k_ld, n_held, inv_sqrt_d, p, ld);
#endif
        }
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
      const auto* kr = keys.row(b, g, j);
      const float* kp;
      if constexpr (std::is_same_v<TKe, float>) {
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

}  // namespace detail::host_decode

template <>
struct decode_scores_backend<host_policy> {
  template <class TQ, class TK, class Ind>
  static void run(const host_policy& policy, host_view<TQ, 4 - 1> q, host_view<TK, 4> k,
                  const Ind& indicator, host_view<float, 3> out) {
    detail::host_decode::score_groups(policy, q,
                                      detail::host_decode::view_keys<host_view<TK, 4>>{k},
                                      k.extent(1), k.extent(2), indicator, out);
  }
  // The same with row r's key j at keys[r * ld + j] (rows = batch * kv_heads, j < n_held):
  // the held keys scored where they lie. Equal to run() on the same keys, bit for bit.
  template <class TQ, class TK, class Ind>
  static void run_listed(const host_policy& policy, host_view<TQ, 3> q, const TK* const* keys,
                         index_t ld, index_t kv_heads, index_t n_held, const Ind& indicator,
                         host_view<float, 3> out) {
    detail::host_decode::score_groups(policy, q,
                                      detail::host_decode::listed_keys<TK>{keys, ld, kv_heads},
                                      kv_heads, n_held, indicator, out);
  }
};

}  // namespace cake
