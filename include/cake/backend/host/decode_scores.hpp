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

// Where a row's held keys are: an mdspan (b, g, j, x), or one pointer per key (listed:
// a layer's slots through its slot map, or a paged layer's through its block table:
// scored where they lie, nothing copied). A listed source writes row `row`'s n key
// pointers (row b * kv_heads + g) into the worker's scratch, or hands out a table.
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
template <class T, class List>
struct listed_keys {
  List list;  // list(row, scratch, n) -> const T* const*: the row's n key pointers
  index_t kv_heads;
  using elem = std::remove_cv_t<T>;
  bool contiguous(index_t, index_t) const { return true; }
};
// A table of pointers, row r's key j at k[r * ld + j].
template <class T>
auto table_keys(const T* const* k, index_t ld, index_t kv_heads) {
  const auto list = [k, ld](index_t row, const T**, index_t) { return k + row * ld; };
  return listed_keys<T, decltype(list)>{list, kv_heads};
}

// A worker's scratch for one (batch, kv-head) row of n_held keys: (grp_pad, ld) logits,
// then probabilities (row 0 ends as the group's summed scores); (grp_pad, d) the
// group's queries as float (rows past grp are zero); (n_held) key pointers of a listed
// row; (d) a key row as float (the portable path's 16-bit keys); (grp_pad) 1 / each
// query row's softmax sum.
struct row_scratch {
  float *p, *qg, *kf, *inv;
  const void** keys;
  index_t ld;  // n_held padded to whole vectors
};
inline row_scratch carve_row(detail::carver& cv, index_t grp_pad, index_t d, index_t n_held) {
  const auto z = [](index_t x) { return static_cast<std::size_t>(x); };
  const index_t ld = (n_held + 15) / 16 * 16;
  row_scratch s{};
  s.p = cv.take<float>(z(grp_pad * ld));
  s.qg = cv.take<float>(z(grp_pad * d));
  s.kf = cv.take<float>(z(d));
  s.inv = cv.take<float>(z(grp_pad));
  s.keys = cv.take<const void*>(z(n_held));
  s.ld = ld;
  return s;
}
inline index_t padded_group(index_t grp) { return (grp + QB - 1) / QB * QB; }

// The policy score_groups runs under, and the bytes each of its workers takes. A decode
// step is small (4.3 M multiply-adds at Llama-3.1-8B heads, 1K held): below the
// policy's min_parallel_work it stays on the calling thread.
struct group_plan {
  host_policy exec;
  int workers;
  std::size_t bytes;
};
inline group_plan plan_groups(const host_policy& policy, index_t B, index_t H, index_t Hkv,
                              index_t n_held, index_t d) {
  const host_policy exec = detail::for_work(policy, B * H * n_held * d);
  detail::carver sizer;
  carve_row(sizer, padded_group(H / Hkv), d, n_held);
  return {exec, detail::worker_count(exec, B * Hkv), sizer.bytes()};
}

// The group's queries as float, rows past grp zero (scored, never read).
template <class TQ>
void load_group(const host_view<TQ, 3>& q, index_t b, index_t g, index_t grp, index_t grp_pad,
                index_t d, float* qg) {
  for (index_t r = 0; r < grp; ++r) {
    const auto* qr = &q(b, g * grp + r, 0);
    for (index_t x = 0; x < d; ++x) qg[r * d + x] = static_cast<float>(qr[x]);
  }
  std::fill(qg + grp * d, qg + grp_pad * d, 0.0f);
}

// o[j] = the mean over the group's rows and the pool window of the indicator's scores:
// row r's probabilities at p + r * ld times inv[r]; row 0 takes their sums. The
// window's positions outside [0, c) are the pool's zero padding (adding +0 to a sum
// that is never -0 changes nothing, so they are skipped).
template <class Ind>
void pool_group(const Ind& indicator, float* p, index_t ld, index_t grp, const float* inv,
                index_t c, float* o) {
  for (index_t j = 0; j < c; ++j) p[j] = 0.0f + indicator.score(p[j] * inv[0], 0.0f);
  for (index_t r = 1; r < grp; ++r) {
    const float* pr = p + r * ld;
    for (index_t j = 0; j < c; ++j) p[j] += indicator.score(pr[j] * inv[r], 0.0f);
  }
  const int kernel = indicator.pool_kernel, half = kernel / 2;
  const float scale = 1.0f / (static_cast<float>(kernel) * static_cast<float>(grp));
  // Where the window lies inside [0, c): its sums vectorised over j, each added in the
  // order the edges add theirs (from 0, the window's positions ascending).
  const index_t in0 = std::min<index_t>(half, c), in1 = std::max<index_t>(in0, c - half);
  for (index_t j = in0; j < in1; ++j) o[j] = 0.0f;
  for (int t = 0; t < kernel; ++t) {
    const float* pt = p + t - half;
    for (index_t j = in0; j < in1; ++j) o[j] += pt[j];
  }
  for (index_t j = in0; j < in1; ++j) o[j] *= scale;
  const auto edge = [&](index_t j) {
    float s = 0;
    const index_t lo = std::max<index_t>(0, j - half), hi = std::min<index_t>(c, j + half + 1);
    for (index_t t = lo; t < hi; ++t) s += p[t];
    o[j] = s * scale;
  };
  for (index_t j = 0; j < in0; ++j) edge(j);
  for (index_t j = in1; j < c; ++j) edge(j);
}

// What score_groups does with a row once its scores are out: nothing, or the caller's
// next step for that row (a decoding step's eviction), on the worker that scored it
// (worker < worker_count(policy, rows): an index into the caller's own scratch).
struct no_row_done {
  void operator()(index_t, int) const noexcept {}
};

// Every (batch, kv-head) row: the group's logits against its n_held keys, each row's
// softmax, the indicator's scores, pooled, into out (B, Hkv, c); then done(row, worker)
// (row = b * Hkv + g; it must not throw, and touch nothing of another row).
template <class TQ, class Keys, class Ind, class Done = no_row_done>
void score_groups(const host_policy& policy, host_view<TQ, 3> q, const Keys& keys, index_t Hkv,
                  index_t n_held, const Ind& indicator, host_view<float, 3> out,
                  const Done& done = {}) {
  const index_t B = q.extent(0), H = q.extent(1), d = q.extent(2);
  const index_t grp = H / Hkv, c = out.extent(2), grp_pad = padded_group(grp);
  if (B * Hkv == 0 || c == 0) return;  // nothing to score
  const group_plan plan = plan_groups(policy, B, H, Hkv, n_held, d);
  host_workspace local;
  host_workspace& ws = detail::workspace_of(plan.exec, local);
  ws.prepare(0, plan.workers, plan.bytes);
  using TKe = typename Keys::elem;
  constexpr bool listed = requires { keys.kv_heads; };
  // The SIMD path (picked at run time) for float or half keys with head_dim a whole number
  // of vectors: logits along head_dim with the group's queries sharing each key
  // row, exponentials and their sums vectorised over the keys.
  const detail::simd::kernels* kk = detail::simd::active_kernels();
#if CAKE_SIMD_HAS_HALF
  constexpr bool simd_keys =
      std::is_same_v<TKe, float> || std::is_same_v<TKe, bfloat16> || std::is_same_v<TKe, _Float16>;
#else
  constexpr bool simd_keys = std::is_same_v<TKe, float> || std::is_same_v<TKe, bfloat16>;
#endif
  const bool simd = simd_keys && kk && d % kk->vw == 0 && keys.contiguous(n_held, d);
  const float sqrt_d = static_cast<float>(std::sqrt(static_cast<double>(d)));
  const float inv_sqrt_d = static_cast<float>(1.0 / std::sqrt(static_cast<double>(d)));
  detail::parallel_for(plan.exec, B * Hkv, [&](index_t row, int worker) {
    const index_t b = row / Hkv, g = row % Hkv;
    detail::carver cv(ws.worker(worker));
    const row_scratch buf = carve_row(cv, grp_pad, d, n_held);
    const index_t ld = buf.ld;
    float* p = buf.p;
    load_group(q, b, g, grp, grp_pad, d, buf.qg);
    [[maybe_unused]] const TKe* const* kr = nullptr;  // a listed row's key pointers
    if constexpr (listed) kr = keys.list(row, reinterpret_cast<const TKe**>(buf.keys), n_held);
    float* inv = buf.inv;
    if constexpr (simd_keys) {
      if (simd) {
        if constexpr (listed) {
          if constexpr (std::is_same_v<TKe, float>)
            kk->decode_dots_l(buf.qg, grp_pad, d, kr, n_held, inv_sqrt_d, p, ld);
          else if constexpr (std::is_same_v<TKe, bfloat16>)
            kk->decode_dots_lb(buf.qg, grp_pad, d, kr, n_held, inv_sqrt_d, p, ld);
#if CAKE_SIMD_HAS_HALF
          else
            kk->decode_dots_lh(buf.qg, grp_pad, d, kr, n_held, inv_sqrt_d, p, ld);
#endif
        } else {
          const index_t k_ld = keys.ld(n_held, d);
          const TKe* k0 = keys.row(b, g, 0);
          if constexpr (std::is_same_v<TKe, float>)
            kk->decode_dots(buf.qg, grp_pad, d, k0, k_ld, n_held, inv_sqrt_d, p, ld);
          else if constexpr (std::is_same_v<TKe, bfloat16>)
            kk->decode_dots_b(buf.qg, grp_pad, d, k0, k_ld, n_held, inv_sqrt_d, p, ld);
#if CAKE_SIMD_HAS_HALF
          else
            kk->decode_dots_h(buf.qg, grp_pad, d, k0, k_ld, n_held, inv_sqrt_d, p, ld);
#endif
        }
        for (index_t r = 0; r < grp; ++r) {
          float m, sum, unused[2];
          kk->tile_softmax(p + r * ld, n_held, ld, 0, &m, &sum, &unused[0], &unused[1]);
          inv[r] = 1.0f / sum;
        }
        pool_group(indicator, p, ld, grp, inv, c, &out(b, g, 0));
        done(row, worker);
        return;
      }
    }
    // The portable path: QB query rows at a time against each key row.
    for (index_t j = 0; j < n_held; ++j) {
      const TKe* kj;
      if constexpr (listed)
        kj = kr[j];
      else
        kj = keys.row(b, g, j);
      const float* kp;
      if constexpr (std::is_same_v<TKe, float>) {
        kp = kj;
      } else {
        for (index_t x = 0; x < d; ++x) buf.kf[x] = static_cast<float>(kj[x]);
        kp = buf.kf;
      }
      for (index_t r0 = 0; r0 < grp; r0 += QB) {
        float dots[QB];
        dot_rows(buf.qg + r0 * d, kp, d, dots);
        for (index_t r = r0; r < std::min(grp, r0 + QB); ++r) p[r * ld + j] = dots[r - r0] / sqrt_d;
      }
    }
    for (index_t r = 0; r < grp; ++r) {
      float* pr = p + r * ld;
      const float m = detail::row_max(pr, n_held);
      for (index_t j = 0; j < n_held; ++j) pr[j] = detail::exp_approx(pr[j] - m);
      const float sum = detail::lane_sum(pr, n_held);
      // (x / sum, as the portable path always divided: not x * (1 / sum))
      for (index_t j = 0; j < n_held; ++j) pr[j] /= sum;
      inv[r] = 1.0f;
    }
    pool_group(indicator, p, ld, grp, inv, c, &out(b, g, 0));
    done(row, worker);
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
                                      detail::host_decode::table_keys(keys, ld, kv_heads), kv_heads,
                                      n_held, indicator, out);
  }
  // The same with row r's key j at key(r, j), asked by the worker that scores row r,
  // which then calls done(r, worker) (see score_groups).
  template <class TK, class TQ, class KeyAt, class Ind,
            class Done = detail::host_decode::no_row_done>
  static void run_rows(const host_policy& policy, host_view<TQ, 3> q, const KeyAt& key,
                       index_t kv_heads, index_t n_held, const Ind& indicator,
                       host_view<float, 3> out, const Done& done = {}) {
    const auto list = [&key](index_t row, const TK** to, index_t n) {
      // A local copy: the stores through `to` cannot reach it, so what it holds by
      // value stays in registers (a pointer member of the same type as *to would be
      // reloaded after every store).
      const KeyAt at = key;
      for (index_t j = 0; j < n; ++j) to[j] = at(row, j);
      return static_cast<const TK* const*>(to);
    };
    detail::host_decode::score_groups(
        policy, q, detail::host_decode::listed_keys<TK, decltype(list)>{list, kv_heads}, kv_heads,
        n_held, indicator, out, done);
  }
  // Grows policy's workspace (when it lends one) to what a call with up to n_held keys
  // takes, so that such calls allocate nothing.
  static void reserve(const host_policy& policy, index_t B, index_t H, index_t kv_heads,
                      index_t n_held, index_t d) {
    if (!policy.workspace || B * kv_heads == 0) return;
    const auto plan = detail::host_decode::plan_groups(policy, B, H, kv_heads, n_held, d);
    policy.workspace->prepare(0, plan.workers, plan.bytes);
  }
};

}  // namespace cake
