// The host backend's primitives of the KvCache layers (detail/layer_ops.hpp lists
// them and writes the cache's data movement over them once): buffers are
// std::vector, and every primitive is a loop over the caller's or the layer's
// memory. None allocates except make() and the kernels' scratch (none once the
// cache's workspace has grown), so the commit steps built on them cannot fail.
#pragma once

#include <algorithm>
#include <bit>
#include <cstring>
#include <type_traits>
#include <utility>
#include <vector>

#include "../../algorithm/window_stats.hpp"
#include "../../detail/layer_ops.hpp"
#include "decode_scores.hpp"
#include "select_k.hpp"
#include "workspace.hpp"

namespace cake::detail {

template <class T>
struct layer_store<T, host_policy> {
  template <class U>
  using buffer = std::vector<U>;
  using staged_moves = std::vector<window_move<T>>;
  // What a cache owns besides its layers: the workspace its host kernels reuse
  // between calls, so a step allocates no scratch once it has grown (a copy of the
  // cache starts with an empty one of its own: two copies may run on two threads,
  // unless the cache was built with a policy lending a workspace, which copies share).
  struct resources {
    host_workspace ws;
    host_policy adopt(const host_policy& exec) { return exec; }
    // The policy of one call: the caller's workspace when it lent one, else ours.
    host_policy bind(const host_policy& exec) { return exec.workspace ? exec : exec.from(ws); }
    void after_prefill() noexcept {}
  };

  // ---- memory --------------------------------------------------------------------
  template <class U>
  static buffer<U> make(const host_policy&, index_t n) {
    return buffer<U>(static_cast<std::size_t>(n));
  }
  template <class U>
  static U* ptr(const buffer<U>& b) {
    return const_cast<U*>(b.data());  // a layer's slots are written through slots<T>
  }
  template <class U>
  static index_t size(const buffer<U>& b) {
    return static_cast<index_t>(b.size());
  }
  template <class U>
  static void fill(const host_policy&, U* p, index_t n, U value) {
    std::fill(p, p + n, value);
  }
  template <class U>
  static void upload(const host_policy&, const U* src, U* dst, index_t n) {
    std::copy_n(src, n, dst);
  }
  // dst (rows, cols) dense on the host = src (rows, cols) with row stride src_ld.
  template <class U>
  static void download(const host_policy& e, const U* src, index_t src_ld, U* dst, index_t rows,
                       index_t cols) {
    copy_2d(e, src, src_ld, dst, cols, rows, cols);
  }
  template <class U>
  static void copy_2d(const host_policy&, const U* src, index_t src_ld, U* dst, index_t dst_ld,
                      index_t rows, index_t cols) {
    for (index_t r = 0; r < rows; ++r) std::copy_n(src + r * src_ld, cols, dst + r * dst_ld);
  }

  // True when p[0..n) holds no NaN or Inf. For float the test reads the exponent
  // bits with integer operations, which vectorise (std::isfinite does not).
  template <class U>
  static bool all_finite(const U* p, index_t n, float bound) {
    if constexpr (std::is_same_v<std::remove_const_t<U>, float>) {
      // |x| <= bound as bits (sign cleared): ordered like the magnitudes, with Inf
      // and NaN above every finite bound; one compare, so the loop vectorises.
      const std::uint32_t lim = std::bit_cast<std::uint32_t>(bound);
      std::uint32_t bad = 0;
      for (index_t x = 0; x < n; ++x)
        bad |= static_cast<std::uint32_t>((std::bit_cast<std::uint32_t>(p[x]) & 0x7fffffffu) > lim);
      return bad == 0;
    } else if constexpr (sizeof(U) == 2 && !std::is_integral_v<std::remove_const_t<U>>) {
      // 16-bit floats (bf16, IEEE half): sign-magnitude, so the magnitude bits are
      // ordered like the magnitudes, Inf and NaN above every finite value: one integer
      // compare against the largest magnitude within bound (no conversion per element;
      // half's to double is a libgcc call).
      const std::uint16_t lim = max_bits_within<std::remove_const_t<U>>(bound);
      std::uint16_t bad = 0;
      // bf16: its member (a bit_cast of the struct stops the vectoriser); half: its
      // bits copied out by chunks (a bit_cast per element vectorises 4 lanes wide).
      if constexpr (requires { p[0].bits; }) {
        for (index_t x = 0; x < n; ++x)
          bad |= static_cast<std::uint16_t>((p[x].bits & 0x7fffu) > lim);
      } else {
        for (index_t x0 = 0; x0 < n; x0 += 64) {
          std::uint16_t b[64];
          const index_t m = std::min<index_t>(64, n - x0);
          std::memcpy(b, p + x0, static_cast<std::size_t>(m) * 2);
          for (index_t i = 0; i < m; ++i) bad |= static_cast<std::uint16_t>((b[i] & 0x7fffu) > lim);
        }
      }
      return bad == 0;
    } else {
      bool bad = false;
      for (index_t x = 0; x < n; ++x) bad |= !within(p[x], bound);
      return !bad;
    }
  }
  template <class U>
  static bool within(U x, float bound) {
    const auto a = static_cast<double>(x);
    return std::isfinite(a) && std::fabs(a) <= static_cast<double>(bound);
  }
  // The largest magnitude bits m of a 16-bit float U with within(m, bound) (m = 0
  // when none is): a binary search, within being true up to some m and false above.
  template <class U>
  static std::uint16_t max_bits_within(float bound) {
    const auto ok = [bound](std::uint16_t m) { return within(std::bit_cast<U>(m), bound); };
    std::uint16_t lo = 0, hi = 0x7fff;  // ok(lo) assumed (zero), the answer in [lo, hi]
    while (lo < hi) {
      const auto mid = static_cast<std::uint16_t>(lo + (hi - lo + 1) / 2);
      if (ok(mid))
        lo = mid;
      else
        hi = static_cast<std::uint16_t>(mid - 1);
    }
    return lo;
  }

  // A status naming the first non-finite element of v. The all-finite case is one
  // streaming pass: whole (token, head_dim) slabs at once when they are contiguous.
  template <class... V>
  static status check_finite(const host_policy& exec, const named_view<V>&... t) {
    status st;
    (void)((st = check_finite(exec, t)).ok() && ...);
    return st;
  }
  template <class V>
  static status check_finite(const host_policy&, const named_view<V>& t) {
    const V& v = t.v;
    constexpr std::size_t R = V::rank();
    index_t inner = v.extent(R - 1);
    std::size_t lead = R - 1;  // dimensions walked one by one
    if (R >= 2 && v.stride(R - 1) == 1 && v.stride(R - 2) == inner) {
      inner *= v.extent(R - 2);
      lead = R - 2;
    }
    index_t outer = 1;
    for (std::size_t r = 0; r < lead; ++r) outer *= v.extent(r);
    for (index_t o = 0; o < outer; ++o) {
      std::array<index_t, R> idx{};
      index_t rem = o;
      for (std::size_t r = lead; r-- > 0;) {
        idx[r] = rem % v.extent(r);
        rem /= v.extent(r);
      }
      const auto* run = element_ptr(v, idx);
      if (all_finite(run, inner, t.bound)) continue;
      for (index_t x = 0; x < inner; ++x)
        if (!within(run[x], t.bound)) {
          // Unflatten x over the dimensions the run covered.
          index_t rest = x;
          for (std::size_t r = R; r-- > lead;) {
            idx[r] = rest % v.extent(r);
            rest /= v.extent(r);
          }
          std::string coords;
          for (std::size_t r = 0; r < R; ++r)
            coords.append(r ? ", " : "").append(std::to_string(idx[r]));
          return out_of_bound_status(t, static_cast<float>(run[x]), coords);
        }
    }
    return status::success();
  }

  // ---- tokens --------------------------------------------------------------------

  // Slots [0, S) of every row: the prompt's keys and values, positions 0..S-1 and
  // the first sc.cols scores.
  template <class KV, class VV>
  static void copy_prompt(const host_policy&, const KV& k, const VV& v, const slots<T>& out,
                          token_scores sc, index_t Hkv) {
    const index_t S = k.extent(2), d = out.d;
    for (index_t r = 0; r < out.rows; ++r) {
      const index_t b = r / Hkv, g = r % Hkv;
      for (index_t t = 0; t < S; ++t) {
        if (out.k) {  // else the metadata of a paged layer, its prompt in the pools
          std::copy_n(&k(b, g, t, 0), d, out.k + (r * out.cap + t) * d);
          std::copy_n(&v(b, g, t, 0), d, out.v + (r * out.cap + t) * d);
        }
        out.pos[r * out.cap + t] = t;
      }
      if (sc.p) std::copy_n(sc.p + r * sc.ld, sc.cols, out.ind + r * out.cap);
    }
  }

  // out.pos[r, t] = src_pos ? src_pos[r, sel[r, t]] : sel[r, t] for t < n; out.ind
  // likewise from sc, for the tokens that have a score (sel < sc.cols).
  static void gather_meta(const host_policy&, const slots<T>& out, const index_t* sel, index_t n,
                          const index_t* src_pos, index_t src_cap, token_scores sc) {
    for (index_t r = 0; r < out.rows; ++r)
      for (index_t t = 0; t < n; ++t) {
        const index_t j = sel[r * n + t];
        out.pos[r * out.cap + t] = src_pos ? src_pos[r * src_cap + j] : j;
        if (out.ind && sc.p && j < sc.cols) out.ind[r * out.cap + t] = sc.p[r * sc.ld + j];
      }
  }

  // Slot t < n of every row of dst takes src's slot sel[r, t] (sel null: slot t):
  // key, value, position and (both non-null) score from src_ind (row stride
  // src_ind_ld); slots at or past the row's length (lens[r] + base, or base) become
  // padding. dst may be src when each row of sel is ascending (sel[r, t] >= t): in
  // place, slot by slot in ascending order. Either side may be paged (slots<T>::key);
  // what dst lacks (K/V, V, metadata) is not written.
  static void move_slots(const host_policy&, const slots<T>& dst, const slots<T>& src,
                         const float* src_ind, index_t src_ind_ld, const index_t* sel, index_t n,
                         const index_t* lens, index_t base) noexcept {
    const index_t d = dst.d;
    const std::size_t row = static_cast<std::size_t>(d) * sizeof(T);
    const bool dense = !dst.is_paged() && !src.is_paged() && dst.k && dst.v;
    if (!sel && !lens && base >= n && src.is_paged() && !dst.is_paged() && dst.k && !dst.pos) {
      copy_out(dst, src, n);  // paged rows' first n slots into dense ones, block by block
      return;
    }
    for (index_t r = 0; r < dst.rows; ++r) {
      const index_t len = (lens ? lens[r] : 0) + base;
      for (index_t t = 0; t < std::min(n, len); ++t) {
        const index_t j = sel ? sel[r * n + t] : t;
        if (dense) {
          std::memmove(dst.k + (r * dst.cap + t) * d, src.k + (r * src.cap + j) * d, row);
          std::memmove(dst.v + (r * dst.cap + t) * d, src.v + (r * src.cap + j) * d, row);
        } else {
          copy_slot(dst.key(r, t), src.key(r, j), row);
          copy_slot(dst.value(r, t), src.value(r, j), row);
        }
        if (dst.pos) {
          dst.pos[r * dst.cap + t] = src.pos[r * src.cap + j];
          if (dst.ind && src_ind) dst.ind[r * dst.cap + t] = src_ind[r * src_ind_ld + j];
        }
      }
      pad_row(dst, r, std::min(n, len), n);
    }
  }

  // sel[r, t] for t in [k_r, n): the window (first_r + t - k_r, t - k_r < w) after
  // each row's k_r selected slots, then padding that repeats the window's last slot;
  // k_r = (keeps ? keeps[r] : 0) + keep, first_r = (firsts ? firsts[r] : 0) + first.
  static void window_slots(const host_policy&, index_t* sel, index_t rows, index_t n,
                           const index_t* keeps, index_t keep, index_t w, const index_t* firsts,
                           index_t first) noexcept {
    for (index_t r = 0; r < rows; ++r) {
      const index_t kr = (keeps ? keeps[r] : 0) + keep, fr = (firsts ? firsts[r] : 0) + first;
      for (index_t t = kr; t < n; ++t) sel[r * n + t] = fr + std::min(t - kr, w - 1);
    }
  }

  // out = in, row r's first lens[r] entries sorted ascending by key[r, entry] (key
  // null: by the entry itself).
  static void sort_prefixes(const host_policy&, const index_t* in, index_t* out, index_t n,
                            index_t rows, const index_t* lens, const index_t* key, index_t key_ld) {
    std::copy_n(in, rows * n, out);
    for (index_t r = 0; r < rows; ++r) {
      index_t* o = out + r * n;
      if (!key) {
        std::sort(o, o + lens[r]);
      } else {
        const index_t* kr = key + r * key_ld;
        std::sort(o, o + lens[r], [kr](index_t a, index_t b) { return kr[a] < kr[b]; });
      }
    }
  }

  // The new token (k, v: (batch, kv_heads, head_dim)) into slot lens[r] (lens null:
  // `slot`) of every row, at `position`.
  template <class KV, class VV>
  static void append(const host_policy&, const slots<T>& s, const KV& k, const VV& v,
                     index_t position, const index_t* lens, index_t slot, index_t Hkv) {
    for (index_t r = 0; r < s.rows; ++r) {
      const index_t b = r / Hkv, g = r % Hkv, t = lens ? lens[r] : slot;
      T* kt = s.key(r, t);  // a paged row has room for it (the cache checked its table)
      T* vt = s.value(r, t);
      for (index_t x = 0; x < s.d; ++x) {
        kt[x] = static_cast<T>(k(b, g, x));
        vt[x] = static_cast<T>(v(b, g, x));
      }
      s.pos[r * s.cap + t] = position;
    }
  }

  // Slots [from_r, to) of every row become padding, from_r = (from ? from[r] : 0) + base.
  static void pad(const host_policy&, const slots<T>& s, const index_t* from, index_t base,
                  index_t to) noexcept {
    for (index_t r = 0; r < s.rows; ++r) pad_row(s, r, (from ? from[r] : 0) + base, to);
  }

  // The truncations of a prefill's commit (detail::window_move): staged as they are.
  static staged_moves stage_moves(const host_policy&, std::vector<window_move<T>>&& jobs) {
    return std::move(jobs);
  }
  static void move_windows(const host_policy&, staged_moves& jobs, index_t d, index_t w) noexcept {
    for (const window_move<T>& j : jobs) {
      // A paged row's K/V, slot by slot in ascending order (to < from: in place).
      const slots<T> kv{nullptr, nullptr, nullptr, nullptr, 0, 0, d, j.paged};
      if (j.from != j.to) {
        if (j.k) {
          std::memmove(j.k + j.to * d, j.k + j.from * d,
                       static_cast<std::size_t>(w * d) * sizeof(T));
          std::memmove(j.v + j.to * d, j.v + j.from * d,
                       static_cast<std::size_t>(w * d) * sizeof(T));
        } else if (kv.is_paged()) {
          const std::size_t row = static_cast<std::size_t>(d) * sizeof(T);
          for (index_t t = 0; t < w; ++t) {
            copy_slot(kv.key(j.row, j.to + t), kv.key(j.row, j.from + t), row);
            copy_slot(kv.value(j.row, j.to + t), kv.value(j.row, j.from + t), row);
          }
        }
        std::memmove(j.pos + j.to, j.pos + j.from, static_cast<std::size_t>(w) * sizeof(index_t));
        if (j.ind)
          std::memmove(j.ind + j.to, j.ind + j.from, static_cast<std::size_t>(w) * sizeof(float));
      }
      const slots<T> row{j.k, j.v, j.pos, j.ind, 1, 0, d};
      pad_row(row, 0, j.to + w, j.pad_end);
      if (kv.is_paged()) pad_row(kv, j.row, j.to + w, j.pad_end);
    }
  }

  // ---- scores --------------------------------------------------------------------

  // out[r, t] = indicator.score_position(pos ? pos[r, t] : t) for t < cols.
  template <class Ind>
  static void position_scores(const host_policy&, const Ind& indicator, const index_t* pos,
                              index_t pos_ld, float* out, index_t ld, index_t rows, index_t cols) {
    for (index_t r = 0; r < rows; ++r)
      for (index_t t = 0; t < cols; ++t)
        out[r * ld + t] = indicator.score_position(pos ? pos[r * pos_ld + t] : t);
  }

  // dst[r, t] += src[r, t] for t < cols: an accumulating indicator's sums.
  static void accumulate(const host_policy&, float* dst, index_t dst_ld, const float* src,
                         index_t src_ld, index_t rows, index_t cols) {
    for (index_t r = 0; r < rows; ++r) {
      float* CAKE_RESTRICT d = dst + r * dst_ld;
      const float* CAKE_RESTRICT s = src + r * src_ld;
      for (index_t t = 0; t < cols; ++t) d[t] += s[t];
    }
  }

  // A decoding step's scores (detail::candidate_scores); the host keeps no scratch here.
  template <class QV, class KV, class Ind, class Out>
  static void candidates(const host_policy& exec, const QV& q, const KV& keys, const Ind& indicator,
                         const Out& out, buffer<char>&) {
    candidate_scores(exec, q, keys, indicator, out);
  }
  // A decoding step's scratch for rows of up to n tokens (decode_bytes), and the
  // scoring kernel's in the policy's workspace (head_dim d), so that steps allocate nothing.
  static void reserve_scoring(const host_policy& exec, buffer<char>& scratch, index_t B, index_t,
                              index_t Hkv, index_t n) {
    if (size(scratch) < decode_bytes(exec, B * Hkv, n))
      scratch = buffer<char>(static_cast<std::size_t>(decode_bytes(exec, B * Hkv, n)));
  }
  static void reserve_scores(const host_policy& exec, index_t B, index_t H, index_t Hkv, index_t n,
                             index_t d) {
    decode_scores_backend<host_policy>::reserve(exec, B, H, Hkv, n, d);
  }

  // ---- decoding over a slot map (cache_layer::map) ---------------------------------
  static constexpr bool slot_map = true;

  // Bytes of scratch a mapped or paged decoding step takes (select_decode, then
  // commit_mapped, one after the other, or sort_commit_row on each worker) for `rows`
  // rows of up to n tokens under exec.
  static index_t decode_bytes(const host_policy& exec, index_t rows, index_t n) {
    const index_t workers =
        detail::worker_count(detail::for_work(exec, kSortWork * rows * n), rows);
    const index_t sel = workers * sort_words(n) * static_cast<index_t>(sizeof(std::uint32_t));
    // a reference-order step's sort and commit on the workers that score the rows
    const index_t fused = detail::worker_count(exec, rows) * sort_commit_bytes(n);
    return std::max({sel, commit_bytes(n), fused});
  }
  // A reference-order selection's work per key in multiply-add equivalents (for_work's
  // unit): its sort of 1K keys (4-5 us) took as long as about 160 K of decode_dots'
  // multiply-adds on Zen 3.
  static constexpr std::int64_t kSortWork = 160;

  // A decoding step's scores of rows [r0, r0 + rows_q * kv_per) of s (q: (rows_q,
  // kv_per * group, d), out: (rows_q, kv_per, c)), the first `held` tokens of each row
  // read where they lie (through s.map or a paged row's block table; the worker that
  // scores a row lists its keys): the same arithmetic as decode_scores over a dense
  // copy, bit for bit. Then done(row) for each row (row r0 + row of s) on the worker
  // that scored it (see score_groups).
  template <class QV, class Ind, class Out, class Done = host_decode::no_row_done>
  static void candidates_listed(const host_policy& exec, const QV& q, const slots<T>& s, index_t r0,
                                index_t kv_per, index_t held, const Ind& indicator, const Out& out,
                                buffer<char>&, const Done& done = {}) {
    const auto run = [&](const auto& key) {
      decode_scores_backend<host_policy>::template run_rows<T>(exec, q, key, kv_per, held,
                                                               indicator, out, done);
    };
    // Each key source holds copies of the fields it reads: the listing's stores through
    // a const T** may alias a pointer held by reference, which would be reloaded per key.
    const index_t* map = s.map;
    const index_t cap = s.cap;
    if (s.is_paged()) {  // through the row's block table (and map): within its blocks
      const paged_rows<T> p = s.paged;
      run([p, map, cap, r0](index_t row, index_t j) -> const T* {
        const index_t r = r0 + row;
        return p.key(r, map ? map[r * cap + j] : j);
      });
    } else if (map) {  // a dense row through its map: a plain gather of pointers
      const T* k = s.k;
      const index_t d = s.d;
      run([k, map, cap, d, r0](index_t row, index_t j) -> const T* {
        const index_t o = (r0 + row) * cap;
        return k + (o + map[o + j]) * d;
      });
    } else {
      run([&s, r0](index_t row, index_t j) -> const T* { return s.key(r0 + row, j); });
    }
  }

  // The token one eviction in position order drops from x[0, n) (n >= 1): the last of
  // the lowest (ties, the two zeros among them, go to the lower index in select_k).
  // Two passes: the lowest bits (a reduction the compiler vectorises; one pass that
  // tracked the index was a branch per token), then the last token holding them.
  static index_t last_argmin(const float* x, index_t n) noexcept {
    std::uint32_t lo = ordered_bits(x[0]);
    for (index_t j = 1; j < n; ++j) lo = std::min(lo, ordered_bits(x[j]));
    index_t e = n - 1;
    while (ordered_bits(x[e]) != lo) --e;
    return e;
  }

  // o[0, keep): the indices of the keep highest of x[0, cand), by descending score, ties
  // to the lower index (select_k's order). One stable counting pass over the keys'
  // actual range (the scores' order-preserving bits from the lowest to the highest, cut
  // into about twice as many buckets as keys: a step's scores lie within a few binades,
  // which fixed digits cut into a few crowded buckets), then an insertion pass by the
  // whole key, which moves few keys. Where many keys crowd one bucket (one outlier
  // stretching the range) it gives up after a few moves per key and radix-sorts the
  // keys by bytes instead. Where the CPU has AVX-512, a sorting network over 64-bit
  // keys does it 1.3-1.5x faster for 129 to 8192 keys (simd_sort.hpp: no branch on the
  // data; the decode_sort benchmark). scratch: sort_words(cand).
  static void sort_descending(const float* x, index_t cand, index_t keep, index_t* o,
                              std::uint32_t* scratch) noexcept {
    // AVX-512: a sorting network, branch-free (simd_sort.hpp); the same result
    if (const detail::simd::kernels* kk = detail::simd::active_kernels();
        kk && kk->sort_desc && cand >= detail::simd::kSortMin && cand <= detail::simd::kSortMax) {
      kk->sort_desc(x, cand, keep, o, scratch);
      return;
    }
    // (cand) keys and indices, twice; then (2 << bit_width(cand)) bucket counters
    std::uint32_t *key = scratch, *idx = scratch + cand, *k1 = scratch + 2 * cand,
                  *i1 = scratch + 3 * cand, *count = scratch + 4 * cand;
    if (cand == 0) return;
    std::uint32_t lo = ~0u, hi = 0;
    for (index_t j = 0; j < cand; ++j) {
      const std::uint32_t k = ~ordered_bits(x[j]);  // ascending key = descending score
      key[j] = k;
      lo = std::min(lo, k);
      hi = std::max(hi, k);
    }
    // buckets of 2^sh keys' width from lo: at most 2 << bit_width(cand) of them
    const int digits = static_cast<int>(std::bit_width(static_cast<std::uint64_t>(cand))) + 1;
    const int sh = std::max(0, static_cast<int>(std::bit_width(hi - lo)) - digits);
    const std::uint32_t buckets = ((hi - lo) >> sh) + 1;
    std::fill_n(count, buckets, 0u);
    for (index_t j = 0; j < cand; ++j) ++count[(key[j] - lo) >> sh];
    std::uint32_t sum = 0;
    for (std::uint32_t b = 0; b < buckets; ++b) sum += std::exchange(count[b], sum);
    for (index_t j = 0; j < cand; ++j) {
      const std::uint32_t at = count[(key[j] - lo) >> sh]++;
      k1[at] = key[j];
      i1[at] = static_cast<std::uint32_t>(j);
    }
    std::uint32_t *k0 = k1, *i0 = i1;
    // Equal buckets sit together in index order: an insertion by the whole key
    // (moving only past strictly greater ones) leaves ties in index order. A bucket one
    // key wide (sh = 0) is sorted already.
    std::int64_t budget = 4 * static_cast<std::int64_t>(cand);
    for (index_t j = 1; sh > 0 && j < cand && budget >= 0; ++j) {
      const std::uint32_t kj = k0[j], ij = i0[j];
      index_t t = j;
      for (; t > 0 && k0[t - 1] > kj; --t) {
        k0[t] = k0[t - 1];
        i0[t] = i0[t - 1];
      }
      k0[t] = kj;
      i0[t] = ij;
      budget -= j - t;
    }
    if (budget < 0) {  // crowded buckets: an LSD radix sort by bytes from the start
      k0 = key;
      i0 = idx;
      k1 = scratch + 2 * cand;
      i1 = scratch + 3 * cand;
      for (index_t j = 0; j < cand; ++j) idx[j] = static_cast<std::uint32_t>(j);
      for (int b = 0; b < 32; b += 8) radix_pass(k0, i0, k1, i1, cand, b);
    }
    for (index_t t = 0; t < keep; ++t) o[t] = static_cast<index_t>(i0[t]);
  }
  // The 32-bit words of scratch sort_descending takes for cand keys (the AVX-512
  // network's 2 * bit_ceil(cand) + 16 among them: cand > 128 there).
  static constexpr index_t sort_words(index_t cand) {
    return 4 * cand + (index_t{2} << std::bit_width(static_cast<std::uint64_t>(cand)));
  }
  // One stable pass of an LSD radix sort by the byte at bit sh: (k0, i0) into (k1, i1),
  // then the pointers swapped (k0, i0 name the result). The keys are counted and
  // scattered as four runs (quarters, in order) side by side: four independent counters
  // where most keys share a byte (a score's exponent), which one histogram made a chain
  // of dependent increments. Stable all the same: a bucket takes quarter 0's keys
  // first, and each quarter's in order.
  static void radix_pass(std::uint32_t*& k0, std::uint32_t*& i0, std::uint32_t*& k1,
                         std::uint32_t*& i1, index_t n, int sh) noexcept {
    if (n == 0) return;
    const index_t q4 = (n + 3) / 4;
    index_t at0[4], len[4];  // each quarter's first key and length
    for (int q = 0; q < 4; ++q) {
      at0[q] = std::min(n, q * q4);
      len[q] = std::min(n, (q + 1) * q4) - at0[q];
    }
    std::uint32_t hist[4][256] = {};
    const auto digit = [sh](std::uint32_t v) { return (v >> sh) & 0xffu; };
    for (index_t i = 0; i < q4; ++i)
      for (int q = 0; q < 4; ++q)
        if (i < len[q]) ++hist[q][digit(k0[at0[q] + i])];
    const std::uint32_t b0 = digit(k0[0]);
    if (hist[0][b0] + hist[1][b0] + hist[2][b0] + hist[3][b0] == static_cast<std::uint32_t>(n))
      return;  // one bucket: order unchanged
    std::uint32_t sum = 0;
    for (int b = 0; b < 256; ++b)
      for (int q = 0; q < 4; ++q) {
        const std::uint32_t c = hist[q][b];
        hist[q][b] = sum;
        sum += c;
      }
    for (index_t i = 0; i < q4; ++i)
      for (int q = 0; q < 4; ++q)
        if (i < len[q]) {
          const index_t j = at0[q] + i;
          const std::uint32_t at = hist[q][digit(k0[j])]++;
          k1[at] = k0[j];
          i1[at] = i0[j];
        }
    std::swap(k0, k1);
    std::swap(i0, i1);
  }

  // sel (rows, keep) with row stride ld: the keep of the first cand entries of each row
  // of x (row stride x_ld) that select_k would choose, in its order: ascending
  // (position) or by descending score, ties to the lower index. Descending order is a
  // stable radix sort of the scores' order-preserving bits; else select_k itself (one
  // eviction in position order takes evict_one_mapped instead, no selection written).
  static void select_decode(const host_policy& exec, const float* x, index_t x_ld, index_t rows,
                            index_t cand, index_t keep, index_t* sel, index_t ld,
                            select_order order, buffer<char>& scratch) {
    if (keep <= 0) return;  // nothing to choose (and no (rows, 0) view with stride 0)
    if (order == select_order::descending) {
      // Rows sorted side by side when the policy splits this much work (each worker
      // its own scratch, sized by decode_bytes under the same policy; one worker where
      // the scratch holds fewer, e.g. OpenMP's thread count raised since it was sized).
      host_policy ex = detail::for_work(exec, kSortWork * rows * cand);
      const auto per_worker = static_cast<std::size_t>(sort_words(cand)) * sizeof(std::uint32_t);
      if (static_cast<std::size_t>(detail::worker_count(ex, rows)) * per_worker > scratch.size())
        ex = ex.threads(1);
      detail::parallel_for(ex, rows, [&](index_t r, int worker) {
        sort_descending(
            x + r * x_ld, cand, keep, sel + r * ld,
            reinterpret_cast<std::uint32_t*>(scratch.data()) + sort_words(cand) * worker);
      });
      return;
    }
    select_k(exec,
             make_view<host_space>(x, std::array<index_t, 2>{rows, cand},
                                   std::array<index_t, 2>{x_ld, 1}),
             make_view<host_space>(sel, std::array<index_t, 2>{rows, keep},
                                   std::array<index_t, 2>{ld, 1}),
             order);
  }

  // A mapped layer's commit (every row uniform, N tokens after the append): token t < n
  // of each row becomes token sel[r, t] (sel: (rows, n)), its map entry, position and,
  // with sums (row stride N), its score moving with it; the map entries of the tokens
  // left out follow (their K/V rows are free now). No K/V row moves.
  static void commit_mapped(const slots<T>& s, index_t* map, const index_t* sel, index_t n,
                            index_t N, const float* sums, buffer<char>& scratch) noexcept {
    for (index_t r = 0; r < s.rows; ++r)
      commit_row(s, map, r, sel + r * n, n, N, sums, scratch.data());
  }
  // Bytes commit_row takes for N tokens.
  static constexpr index_t commit_bytes(index_t N) {
    return N * static_cast<index_t>(2 * sizeof(index_t) + sizeof(float) + 1);
  }
  // The same for row r alone (sel: its n selected tokens; scratch: commit_bytes(N)).
  static void commit_row(const slots<T>& s, index_t* map, index_t r, const index_t* sel, index_t n,
                         index_t N, const float* sums, char* scratch) noexcept {
    auto* tpos = reinterpret_cast<index_t*>(scratch);         // (N)
    auto* tmap = tpos + N;                                    // (N)
    auto* tind = reinterpret_cast<float*>(tmap + N);          // (N)
    auto* mark = reinterpret_cast<unsigned char*>(tind + N);  // (N)
    const index_t o = r * s.cap;
    std::fill(mark, mark + N, static_cast<unsigned char>(0));
    for (index_t t = 0; t < n; ++t) {
      const index_t j = sel[t];
      mark[j] = 1;
      tpos[t] = s.pos[o + j];
      tmap[t] = map[o + j];
      if (sums && s.ind) tind[t] = sums[r * N + j];
    }
    index_t f = n;
    for (index_t j = 0; j < N; ++j)
      if (!mark[j]) tmap[f++] = map[o + j];
    std::copy_n(tmap, N, map + o);
    std::copy_n(tpos, n, s.pos + o);
    if (sums && s.ind) std::copy_n(tind, n, s.ind + o);
  }

  // A mapped layer's step in reference order for row r alone, on the worker that
  // scored it: the keep highest of its candidates x[0, cand) by descending score, its
  // window (the w tokens from cand) after them, committed as commit_mapped does (the
  // same tokens and order as select_decode, window_slots and commit_mapped). scratch:
  // sort_commit_bytes(N), the worker's own.
  static constexpr index_t sort_commit_bytes(index_t N) {
    return sort_commit_at(N, 2) + aligned16(commit_bytes(N));
  }
  // The offset of sort_commit_row's part `part` in its scratch: the sort's words (0),
  // the selection (1), commit_row's bytes (2), each from a 16-byte boundary.
  static constexpr index_t aligned16(index_t bytes) { return (bytes + 15) / 16 * 16; }
  static constexpr index_t sort_commit_at(index_t N, int part) {
    const index_t sort = aligned16(sort_words(N) * static_cast<index_t>(sizeof(std::uint32_t)));
    return part == 0   ? 0
           : part == 1 ? sort
                       : sort + aligned16(N * static_cast<index_t>(sizeof(index_t)));
  }
  static void sort_commit_row(const slots<T>& s, index_t* map, index_t r, const float* x,
                              index_t cand, index_t keep, index_t w, index_t N,
                              char* scratch) noexcept {
    const index_t n = keep + w;
    auto* sort = reinterpret_cast<std::uint32_t*>(scratch);
    auto* sel = reinterpret_cast<index_t*>(scratch + sort_commit_at(N, 1));
    if (keep > 0) sort_descending(x, cand, keep, sel, sort);
    for (index_t t = keep; t < n; ++t) sel[t] = cand + std::min(t - keep, w - 1);
    commit_row(s, map, r, sel, n, N, nullptr, scratch + sort_commit_at(N, 2));
  }
  // Whether scratch holds sort_commit_row's bytes for every worker exec may run on rows
  // of up to N tokens (it does once decode_bytes sized it under the same policy).
  static bool sort_commit_fits(const host_policy& exec, index_t rows, index_t N,
                               const buffer<char>& scratch) {
    return static_cast<std::size_t>(detail::worker_count(exec, rows)) *
               static_cast<std::size_t>(sort_commit_bytes(N)) <=
           scratch.size();
  }

  // A mapped layer's step in position order that evicts one token per row (N tokens
  // after the append, candidates the first cand): the same tokens as select_decode,
  // window_slots and commit_mapped, without writing a selection: each row's argmin of
  // x (row stride x_ld; the last of the lowest) leaves the map, positions and, with
  // sums (row stride N), scores by one move of what follows it, and its map entry (a
  // free K/V row now) goes last.
  static void evict_one_mapped(const slots<T>& s, index_t* map, const float* x, index_t x_ld,
                               index_t cand, index_t N, const float* sums) noexcept {
    for (index_t r = 0; r < s.rows; ++r) evict_one_row(s, map, r, x + r * x_ld, cand, N, sums);
  }
  // The same for row r alone (x: its scores; sums: every row's, or null).
  static void evict_one_row(const slots<T>& s, index_t* map, index_t r, const float* x,
                            index_t cand, index_t N, const float* sums) noexcept {
    const index_t e = last_argmin(x, cand);
    const index_t o = r * s.cap, tail = N - 1 - e;
    index_t* m = map + o;
    const index_t freed = m[e];
    std::memmove(m + e, m + e + 1, static_cast<std::size_t>(tail) * sizeof(index_t));
    m[N - 1] = freed;
    std::memmove(s.pos + o + e, s.pos + o + e + 1,
                 static_cast<std::size_t>(tail) * sizeof(index_t));
    if (sums && s.ind) {
      std::copy_n(sums + r * N, e, s.ind + o);
      std::copy_n(sums + r * N + e + 1, tail, s.ind + o + e);
    }
  }

  // K and V rows of every row of s (its slots as they lie: s.map null) back in the order
  // map names (map: (rows, cap), a permutation of each row's K/V rows), and map the
  // identity: a cycle at a time. A paged row's map moves only slots its blocks hold.
  static void settle(const slots<T>& s, index_t* map) noexcept {
    const index_t d = s.d;
    for (index_t r = 0; r < s.rows; ++r) {
      index_t* m = map + r * s.cap;
      for (index_t i = 0; i < s.cap; ++i) {
        index_t j = i;
        while (m[j] != i) {  // row j takes row m[j]'s K/V; the one it held moves on
          const index_t next = m[j];
          T *kj = s.key(r, j), *vj = s.value(r, j);
          std::swap_ranges(kj, kj + d, s.key(r, next));
          std::swap_ranges(vj, vj + d, s.value(r, next));
          m[j] = j;
          j = next;
        }
        m[j] = j;
      }
    }
  }

  // A paged row r after a mapped commit (n tokens kept of N): its tokens back in its
  // first n slots, in any order. The kept tokens in slots [n, N) (the new token's, where
  // the step evicted one token) move into the slots its evicted tokens left below n:
  // one K/V row each. Then map[n, N) names slots n, n + 1, ... (the next token's slot
  // is n). s: the row's slots as they lie (s.map null).
  static void compact_row(const slots<T>& s, index_t* map, index_t r, index_t n,
                          index_t N) noexcept {
    index_t* m = map + r * s.cap;
    index_t f = n;  // the next free entry that may name a slot below n
    // The displaced tokens are among the last (the new one is at n - 1): look back.
    for (index_t t = n - 1; t >= 0; --t) {
      while (f < N && m[f] >= n) ++f;
      if (f == N) break;  // no slot below n is free: the row is compact
      if (m[t] < n) continue;
      const auto bytes = static_cast<std::size_t>(s.d) * sizeof(T);
      std::memcpy(s.key(r, m[f]), s.key(r, m[t]), bytes);
      std::memcpy(s.value(r, m[f]), s.value(r, m[t]), bytes);
      std::swap(m[t], m[f]);
    }
    for (index_t j = n; j < N; ++j) m[j] = j;
  }

  // An accumulating indicator's prefill sums (detail::attention_sums says what they
  // are), fused: one pass per GQA group with window_stats' score tiles and softmax rows.
  template <class QV, class KV>
  static void attention_sums(const host_policy& exec, const QV& q, const KV& k, float* out,
                             index_t ld) {
    host_stats::attention_sums(exec, q, k, out, ld);
  }

 private:
  // Slots [from, to) of row r become padding.
  static void pad_row(const slots<T>& s, index_t r, index_t from, index_t to) noexcept {
    if (from >= to) return;
    const index_t o = r * s.cap;
    if (s.is_paged()) {  // slot by slot; slots past the sequence's blocks are not stored
      for (index_t t = from; t < to; ++t) {
        if (T* p = s.key(r, t)) std::fill(p, p + s.d, T{});
        if (T* p = s.value(r, t)) std::fill(p, p + s.d, T{});
      }
    } else {
      if (s.k) std::fill(s.k + (o + from) * s.d, s.k + (o + to) * s.d, T{});
      if (s.v) std::fill(s.v + (o + from) * s.d, s.v + (o + to) * s.d, T{});
    }
    if (s.pos) std::fill(s.pos + o + from, s.pos + o + to, index_t{-1});
    if (s.pos && s.ind) std::fill(s.ind + o + from, s.ind + o + to, 0.0f);
  }
  // dst's (dense) K, and V when it has one, take the first n slots of each paged row
  // of src (those its blocks hold): a block's slots are one run of block_size rows.
  static void copy_out(const slots<T>& dst, const slots<T>& src, index_t n) noexcept {
    const paged_rows<T>& p = src.paged;
    const index_t d = dst.d, bs = p.block_size;
    for (index_t r = 0; r < dst.rows; ++r) {
      const index_t end = std::min(n, p.room(r));
      for (index_t t0 = 0; t0 < end; t0 += bs) {
        const index_t m = std::min(bs, end - t0);
        const auto run = [&](T* to, const T* from, index_t slot_stride) {
          if (slot_stride == d) {
            std::memcpy(to, from, static_cast<std::size_t>(m * d) * sizeof(T));
          } else {
            for (index_t i = 0; i < m; ++i)
              std::memcpy(to + i * d, from + i * slot_stride,
                          static_cast<std::size_t>(d) * sizeof(T));
          }
        };
        run(dst.k + (r * dst.cap + t0) * d, p.key(r, t0), p.k_slot);
        if (dst.v) run(dst.v + (r * dst.cap + t0) * d, p.value(r, t0), p.v_slot);
      }
    }
  }
  // One token's K or V row; either side null (no such slot): nothing.
  static void copy_slot(T* to, const T* from, std::size_t bytes) noexcept {
    if (to && from && to != from) std::memmove(to, from, bytes);
  }
};

}  // namespace cake::detail
