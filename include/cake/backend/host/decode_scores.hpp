// Host backend of cake::decode_scores. One (batch, kv-head) row per task; the
// group's query heads share each key row while it is in cache.
#pragma once

#include <cmath>
#include <limits>
#include <vector>

#include "../../detail/math.hpp"
#include "../../detail/parallel.hpp"

namespace cake {

template <>
struct decode_scores_backend<host_policy> {
  template <class TQ, class TK, class Ind>
  static void run(const host_policy& exec, host_view<TQ, 4 - 1> q, host_view<TK, 4> k,
                  const Ind& indicator, host_view<float, 3> out) {
    const index_t B = q.extent(0), H = q.extent(1), d = q.extent(2);
    const index_t Hkv = k.extent(1), n_held = k.extent(2), grp = H / Hkv, c = out.extent(2);
    const int kernel = indicator.pool_kernel, half = kernel / 2;
    const float sqrt_d = static_cast<float>(std::sqrt(static_cast<double>(d)));
    const int nt = detail::worker_count(exec, B * Hkv);
    // per worker: (grp, n_held) probabilities, (c + 2 * half) padded sums
    std::vector<std::vector<float>> prob(static_cast<std::size_t>(nt)), acc(prob.size());
    for (std::size_t t = 0; t < prob.size(); ++t) {
      prob[t].resize(static_cast<std::size_t>(grp * n_held));
      acc[t].resize(static_cast<std::size_t>(c + 2 * half));
    }
    detail::parallel_for(exec, B * Hkv, [&](index_t row, int worker) {
      const index_t b = row / Hkv, g = row % Hkv;
      float* p = prob[static_cast<std::size_t>(worker)].data();
      for (index_t j = 0; j < n_held; ++j) {
        const auto* kr = &k(b, g, j, 0);
        for (index_t r = 0; r < grp; ++r) {
          const auto* qr = &q(b, g * grp + r, 0);
          float s = 0;
          for (index_t x = 0; x < d; ++x) s += static_cast<float>(qr[x]) * static_cast<float>(kr[x]);
          p[r * n_held + j] = s / sqrt_d;
        }
      }
      float* a = acc[static_cast<std::size_t>(worker)].data();
      std::fill(a, a + c + 2 * half, 0.0f);
      for (index_t r = 0; r < grp; ++r) {
        float* pr = p + r * n_held;
        float m = -std::numeric_limits<float>::max();
        for (index_t j = 0; j < n_held; ++j) m = pr[j] > m ? pr[j] : m;
        float sum = 0;
        for (index_t j = 0; j < n_held; ++j) {
          pr[j] = detail::exp_approx(pr[j] - m);
          sum += pr[j];
        }
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
