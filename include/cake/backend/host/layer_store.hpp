// Host storage of KvCache layers and the data movement the cache needs: copy,
// select-and-gather, truncate, reorder, append-and-evict. KvCache keeps the
// bookkeeping (budgets, stages, order of calls) and calls these through
// layer_store<T, Exec>; the CUDA backend specialises the same struct.
#pragma once

#include <algorithm>
#include <bit>
#include <cfloat>
#include <cmath>
#include <cstring>
#include <numeric>
#include <span>
#include <type_traits>
#include <utility>
#include <vector>

#include "../../algorithm/compact.hpp"
#include "../../algorithm/decode_scores.hpp"
#include "../../algorithm/select_k.hpp"
#include "../../algorithm/window_stats.hpp"
#include "../../detail/prefill_plan.hpp"

namespace cake::detail {

// Dimensions every store operation needs.
struct LayerShape {
  index_t batch, kv_heads, head_dim, window;
  index_t rows() const { return batch * kv_heads; }
};

// Per-token scores in the backend's memory space: (rows, cols) with row stride ld.
// The first cols tokens of each row have a score; p == nullptr: none.
struct token_scores {
  const float* p = nullptr;
  index_t ld = 0, cols = 0;
};

template <class T, class Exec>
struct layer_store {
  static_assert(sizeof(Exec) == 0,
                "cake::KvCache: no storage for this execution policy (include <cake/cake.cuh> "
                "for cake::cuda)");
};

// One layer on the host. Each (batch, kv-head) row has room for `cap` tokens; the
// first `held` are live. During prefill a cut layer keeps its prefix in
// descending-indicator order (a later, smaller budget is then a truncation),
// followed by the window in position order. `ind`, when the layer has one, holds
// each slot's score and travels with its token through every move: the prefix
// indicator during prefill, and an accumulating indicator's sums for good.
template <class T>
struct HostLayer {
  index_t rows = 0, d = 0, cap = 0, held = 0;
  std::vector<T> k, v;       // (rows, cap, d)
  std::vector<index_t> pos;  // (rows, cap) token positions
  std::vector<float> ind;    // (rows, cap) score of each held token, or empty
  // (rows) tokens of each row; `held` is the longest. Rows differ only with head-wise
  // budgets: row r's slots [len[r], held) are then padding: position -1, zero keys
  // and values.
  std::vector<index_t> len;
  bool by_indicator = false;  // prefix in descending-indicator order
  bool cut = false;           // made by a selection (else it holds the whole prompt)

  // A layer not prefilled yet has no rows: it holds nothing.
  index_t row_len(index_t r) const { return len.empty() ? 0 : len[static_cast<std::size_t>(r)]; }
  // Tokens held by all rows together.
  index_t total() const { return std::accumulate(len.begin(), len.end(), index_t{0}); }
  // Every row holds n tokens.
  void set_length(index_t n) {
    held = n;
    std::fill(len.begin(), len.end(), n);
  }

  HostLayer() = default;
  HostLayer(index_t rows_, index_t d_, index_t cap_, bool with_indicator)
      : rows(rows_),
        d(d_),
        cap(cap_),
        k(static_cast<std::size_t>(rows_ * cap_ * d_)),
        v(static_cast<std::size_t>(rows_ * cap_ * d_)),
        pos(static_cast<std::size_t>(rows_ * cap_)),
        ind(with_indicator ? static_cast<std::size_t>(rows_ * cap_) : 0),
        len(static_cast<std::size_t>(rows_), 0) {}

  T* key_row(index_t r, index_t t) { return k.data() + (r * cap + t) * d; }
  T* value_row(index_t r, index_t t) { return v.data() + (r * cap + t) * d; }
  // (batch, kv_heads, n, head_dim) over a buffer laid out like k and v.
  template <class U>
  host_view<U, 4> tokens_view(U* base, index_t B, index_t Hkv, index_t n) const {
    // An empty layer (cap = 0, d = 0) still needs the positive strides layout_stride requires.
    const index_t c = std::max<index_t>(cap, 1), dd = std::max<index_t>(d, 1);
    return make_view(base, std::array<index_t, 4>{B, Hkv, n, d},
                     std::array<index_t, 4>{Hkv * c * dd, c * dd, dd, 1});
  }
  // (batch, kv_heads, n)
  host_view<const index_t, 3> positions_view(index_t B, index_t Hkv, index_t n) const {
    const index_t c = std::max<index_t>(cap, 1);
    return make_view(pos.data(), std::array<index_t, 3>{B, Hkv, n},
                     std::array<index_t, 3>{Hkv * c, c, 1});
  }
};

template <class V>
std::string shape_string(const V& v) {
  std::string s = "(";
  for (std::size_t r = 0; r < V::rank(); ++r)
    s.append(r ? ", " : "").append(std::to_string(v.extent(r)));
  return s + ")";
}

// The largest |x| a query or key element may have so that attention scores stay far
// from float's range: each of the d products of q . k is then at most
// FLT_MAX / (1024 d), so a score (and every partial sum) is at most FLT_MAX / 1024.
// The softmax subtracts a row's max (a difference up to twice that), and the fast
// entropy multiplies such differences by the probabilities and small constants
// (log2 e): the margin of 2^10 keeps all of it finite. Without the bound, finite
// inputs near 3e38 made a row's max +inf and softmax exp(inf - inf) = NaN. Real
// queries and keys are many orders of magnitude smaller (the bound is 5.1e16 at d = 128).
inline float score_bound(index_t head_dim) {
  return static_cast<float>(std::sqrt(static_cast<double>(FLT_MAX) / (1024.0 * head_dim)));
}

// A tensor with the id and name its errors carry, and the largest |x| its elements
// may have (FLT_MAX: finite is enough; score_bound(d) for queries and keys).
template <class V>
struct named_view {
  const V& v;
  const char* id;
  const char* name;
  float bound = FLT_MAX;
};
template <class V>
named_view<V> named(const V& v, const char* id, const char* name, float bound = FLT_MAX) {
  return {v, id, name, bound};
}
// The message of an element outside what t admits.
template <class V>
status out_of_bound_status(const named_view<V>& t, float found, const std::string& coords) {
  if (t.bound < FLT_MAX)
    return make_status(t.id, t.name, " must be finite with |x| <= ", t.bound,
                       " so that attention scores fit in float, found ", found, " at (", coords,
                       ")");
  return make_status(t.id, t.name, " must be finite, found ", found, " at (", coords, ")");
}

// A decoding step's scores of the first out.extent(2) held tokens, as the indicator
// asks: its own hook (a source indicator), else the new query's attention.
template <class Exec, class QV, class KV, class Ind, class Out, class... Ws>
void candidate_scores(const Exec& exec, const QV& q, const KV& keys, const Ind& indicator,
                      const Out& out, Ws&&... ws) {
  if constexpr (SourceIndicator<Ind>)
    indicator.decode_scores(exec, q, keys, out);
  else
    decode_scores(exec, q, keys, indicator, out, std::forward<Ws>(ws)...);
}

template <class V, std::size_t R>
auto element_ptr(const V& v, const std::array<index_t, R>& idx) {
  index_t off = 0;
  for (std::size_t r = 0; r < R; ++r) off += idx[r] * static_cast<index_t>(v.stride(r));
  return v.data_handle() + off;
}

template <class T>
struct layer_store<T, host_policy> {
  using layer = HostLayer<T>;
  using space = host_space;
  template <class U>
  using buffer = std::vector<U>;
  using permutation = std::vector<index_t>;
  // The truncations of a prefill's commit: (layer, prefix tokens each row keeps).
  struct truncation {
    std::vector<std::size_t> layers;
    std::vector<std::vector<index_t>> prefix;
  };
  // What a cache owns besides its layers: nothing on the host (its kernels' scratch
  // comes from the policy's cake::host_workspace, or is allocated per call).
  struct resources {
    host_policy adopt(const host_policy& exec) { return exec; }
    void after_prefill() noexcept {}
  };

  template <class U>
  static buffer<U> make_buffer(const host_policy&, index_t n) {
    return buffer<U>(static_cast<std::size_t>(n));
  }
  template <class U>
  static U* data(buffer<U>& b) {
    return b.data();
  }
  template <class U>
  static void fill(const host_policy&, buffer<U>& b, U value) {
    std::fill(b.begin(), b.end(), value);
  }
  // Copies n floats of a buffer to the host (here: already there).
  static void read(const host_policy&, const buffer<float>& b, float* out, index_t n) {
    std::copy_n(b.data(), n, out);
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

  // A layer holding all S tokens in position order (an uncut prompt, or one-shot
  // mode before the last layer), with room for one decoded token; scores, when
  // given, travel with the tokens (the first sc.cols slots of each row).
  template <class KV, class VV>
  static layer copy_all(const host_policy&, const LayerShape& sh, const KV& k, const VV& v,
                        token_scores sc) {
    const index_t B = sh.batch, Hkv = sh.kv_heads, d = sh.head_dim, S = k.extent(2);
    layer out(sh.rows(), d, S + 1, sc.p != nullptr);
    for (index_t b = 0; b < B; ++b)
      for (index_t g = 0; g < Hkv; ++g) {
        const index_t r = b * Hkv + g;
        for (index_t t = 0; t < S; ++t) {
          std::copy_n(&k(b, g, t, 0), d, out.key_row(r, t));
          std::copy_n(&v(b, g, t, 0), d, out.value_row(r, t));
          out.pos[static_cast<std::size_t>(r * out.cap + t)] = t;
        }
        if (sc.p) std::copy_n(sc.p + r * sc.ld, sc.cols, out.ind.data() + r * out.cap);
      }
    out.set_length(S);
    return out;
  }

  // A layer holding, per row r, the keep[r] prefix tokens of highest score and the
  // window (the last w of the P + w source tokens); rows shorter than the longest are
  // padded. The source is the caller's tensors (src == nullptr: positions 0..S-1) or
  // a stored layer (positions from it); sc scores its first sc.cols >= P tokens. The
  // new layer keeps the scores of its tokens (those that have one) when keep_scores.
  // One top-k for all rows: of the longest keep in descending order when rows differ
  // (the first keep[r] of it are row r's top keep[r]), then one gather.
  template <class KV, class VV>
  static layer select(const host_policy& exec, const LayerShape& sh, const KV& k, const VV& v,
                      const layer* src, token_scores sc, index_t P, std::span<const index_t> keep,
                      bool position_order, bool keep_scores) {
    const index_t B = sh.batch, Hkv = sh.kv_heads, d = sh.head_dim, w = sh.window;
    const index_t rows = sh.rows(), most = *std::max_element(keep.begin(), keep.end()),
                  n = most + w;
    const bool ragged = *std::min_element(keep.begin(), keep.end()) != most;
    std::vector<index_t> sel(static_cast<std::size_t>(rows * n));  // (rows, n)
    select_k(
        exec, make_view(sc.p, std::array<index_t, 2>{rows, P}, std::array<index_t, 2>{sc.ld, 1}),
        make_view(sel.data(), std::array<index_t, 2>{rows, most}, std::array<index_t, 2>{n, 1}),
        position_order && !ragged ? select_order::position : select_order::descending);
    for (index_t r = 0; r < rows; ++r) {
      index_t* s = sel.data() + r * n;
      const index_t kr = keep[static_cast<std::size_t>(r)];
      if (position_order && ragged) std::sort(s, s + kr);
      // The window, then padding that gathers the last token (cleared below).
      for (index_t t = kr; t < n; ++t) s[t] = P + std::min(t - kr, w - 1);
    }
    layer out(rows, d, n + 1, keep_scores);
    auto keep_v =
        make_view(static_cast<const index_t*>(sel.data()), std::array<index_t, 3>{B, Hkv, n});
    compact(exec, k, keep_v, out.tokens_view(out.k.data(), B, Hkv, n));
    compact(exec, v, keep_v, out.tokens_view(out.v.data(), B, Hkv, n));
    for (index_t r = 0; r < rows; ++r) {
      for (index_t t = 0; t < n; ++t) {
        const index_t j = sel[static_cast<std::size_t>(r * n + t)];
        out.pos[static_cast<std::size_t>(r * out.cap + t)] =
            src ? src->pos[static_cast<std::size_t>(r * src->cap + j)] : j;
        if (keep_scores && j < sc.cols)
          out.ind[static_cast<std::size_t>(r * out.cap + t)] = sc.p[r * sc.ld + j];
      }
      const index_t len = keep[static_cast<std::size_t>(r)] + w;
      pad_row(out, r, len, n);
      out.len[static_cast<std::size_t>(r)] = len;
    }
    out.by_indicator = !position_order;
    out.cut = true;
    out.held = n;
    return out;
  }

  // A stored layer's tokens as the source of select(): (batch, kv_heads, held, head_dim).
  static host_view<const T, 4> keys(const layer& ly, const LayerShape& sh) {
    return ly.tokens_view(static_cast<const T*>(ly.k.data()), sh.batch, sh.kv_heads, ly.held);
  }
  static host_view<const T, 4> values(const layer& ly, const LayerShape& sh) {
    return ly.tokens_view(static_cast<const T*>(ly.v.data()), sh.batch, sh.kv_heads, ly.held);
  }
  static host_view<const index_t, 3> positions(const layer& ly, const LayerShape& sh) {
    return ly.positions_view(sh.batch, sh.kv_heads, ly.held);
  }
  // Scores as a dense host array (rows, cols).
  static std::vector<float> download(const host_policy&, token_scores sc, index_t rows,
                                     index_t cols) {
    std::vector<float> out(static_cast<std::size_t>(rows * cols));
    for (index_t r = 0; r < rows; ++r) std::copy_n(sc.p + r * sc.ld, cols, out.data() + r * cols);
    return out;
  }

  // The scores a stored layer keeps for its held tokens.
  static token_scores scores(const layer& ly) { return {ly.ind.data(), ly.cap, ly.held}; }

  // out[r, t] = indicator.score_position(t) for t < cols: a position indicator's
  // prefill scores, positions 0..cols-1 in every row.
  template <class Ind>
  static void position_scores(const host_policy&, const Ind& indicator, float* out, index_t ld,
                              index_t rows, index_t cols) {
    for (index_t t = 0; t < cols; ++t) out[t] = indicator.score_position(t);
    for (index_t r = 1; r < rows; ++r) std::copy_n(out, cols, out + r * ld);
  }

  // out[r, t] (row stride ld) = the attention token t receives from the window rows
  // (row i sees tokens [0, S - w + i]), summed over the rows, each row's share being the
  // mean over the GQA group's query heads: an accumulating indicator's prefill sums.
  // One pass per GQA group with window_stats' score tiles and softmax rows.
  template <class QV, class KV>
  static void attention_sums(const host_policy& exec, const QV& q, const KV& k, float* out,
                             index_t ld) {
    host_stats::attention_sums(exec, q, k, out, ld);
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

  // Row r of each layer the plan truncates keeps its first prefix[r] prefix tokens
  // (the highest-indicator ones: the prefix is in descending order) and its window.
  // Permutations run after, on the truncated layers.
  static truncation prepare_truncate(const host_policy&, std::span<const layer> layers,
                                     const LayerShape&, std::span<const layer_plan> plan,
                                     std::span<const permutation>) {
    truncation tr;
    for (std::size_t l = 0; l < plan.size() && l < layers.size(); ++l) {
      if (plan[l].action != layer_action::truncate) continue;
      std::vector<index_t> p(static_cast<std::size_t>(layers[l].rows));
      for (index_t r = 0; r < layers[l].rows; ++r)
        p[static_cast<std::size_t>(r)] = row_prefix(plan[l], r);
      tr.layers.push_back(l);
      tr.prefix.push_back(std::move(p));
    }
    return tr;
  }
  // Only the window rows move; freed slots below the new longest row become padding.
  static void truncate(const host_policy&, std::span<layer> layers, const LayerShape& sh,
                       truncation& tr) noexcept {
    const index_t w = sh.window;
    for (std::size_t i = 0; i < tr.layers.size(); ++i) {
      layer& ly = layers[tr.layers[i]];
      const std::vector<index_t>& prefix = tr.prefix[i];
      const index_t longest = *std::max_element(prefix.begin(), prefix.end()) + w;
      for (index_t r = 0; r < ly.rows; ++r) {
        const index_t len = ly.row_len(r), p = prefix[static_cast<std::size_t>(r)];
        if (p != len - w) move_window(ly, r, len - w, p, w);
        pad_row(ly, r, p + w, std::min(len, longest));
        ly.len[static_cast<std::size_t>(r)] = p + w;
      }
      ly.held = longest;
    }
  }

  // Per row, the order of its first prefix[r] prefix tokens sorted by position:
  // perm[r * longest + t] = current slot of the token that goes to slot t; entries
  // past prefix[r] up to the longest prefix are the identity, which permute() leaves
  // alone. Applied after the truncation to prefix[r].
  static permutation position_permutation(const host_policy&, const layer& ly, const LayerShape&,
                                          std::span<const index_t> prefix) {
    const index_t longest = prefix.empty() ? 0 : *std::max_element(prefix.begin(), prefix.end());
    permutation perm(static_cast<std::size_t>(ly.rows * longest));
    for (index_t r = 0; r < ly.rows; ++r) {
      index_t* s = perm.data() + r * longest;
      std::iota(s, s + longest, index_t{0});
      const index_t* p = ly.pos.data() + r * ly.cap;
      std::sort(s, s + prefix[static_cast<std::size_t>(r)],
                [p](index_t a, index_t b) { return p[a] < p[b]; });
    }
    return perm;
  }

  // Applies a permutation to each row's prefix in place, cycle by cycle, moving each
  // token once through a one-token buffer: the row's spare slot, which every layer
  // has for decoding, so nothing is allocated and nothing throws.
  static void permute(const host_policy&, layer& ly, const LayerShape&,
                      permutation& perm) noexcept {
    const index_t prefix = static_cast<index_t>(perm.size()) / std::max<index_t>(ly.rows, 1);
    const index_t d = ly.d, spare = ly.cap - 1;
    for (index_t r = 0; r < ly.rows; ++r) {
      index_t* pr = perm.data() + r * prefix;
      index_t* pos = ly.pos.data() + r * ly.cap;
      float* sc = ly.ind.empty() ? nullptr : ly.ind.data() + r * ly.cap;
      auto move_token = [&](index_t to, index_t from) {
        std::memcpy(ly.key_row(r, to), ly.key_row(r, from),
                    static_cast<std::size_t>(d) * sizeof(T));
        std::memcpy(ly.value_row(r, to), ly.value_row(r, from),
                    static_cast<std::size_t>(d) * sizeof(T));
        pos[to] = pos[from];
        if (sc) sc[to] = sc[from];
      };
      for (index_t start = 0; start < prefix; ++start) {
        if (pr[start] == start || pr[start] < 0) continue;
        move_token(spare, start);
        index_t to = start;
        while (pr[to] != start) {
          const index_t from = pr[to];
          move_token(to, from);
          pr[to] = -1;  // placed
          to = from;
        }
        move_token(to, spare);
        pr[to] = -1;
      }
    }
    ly.by_indicator = false;
  }

  // Prefill is over: the prefix indicator is no longer needed, unless the scores
  // accumulate while decoding.
  static void finish_prefill(layer& ly, bool keep_scores) noexcept {
    if (keep_scores) return;
    std::vector<float>().swap(ly.ind);  // frees without allocating
  }

  // One decoding step of one layer: append the token at `position`, then, if the
  // layer holds more than budget + w, score the candidates (all but the last w) and
  // keep the top `budget` (spec section 7). Attention indicators score with the new
  // query alone; an accumulating one adds the new query's attention to every held
  // token's sum first and ranks by the sums; a position indicator ranks by position.
  // Reference order writes the kept prefix by descending score; position order
  // compacts in place. Everything that can throw (allocation, scoring, selection)
  // runs before the first visible write: the new token waits in the spare slot past
  // `held` and new sums in a scratch buffer until the commit.
  template <class Ind, class QV, class KV, class VV>
  static void decode(const host_policy& exec, layer& ly, const LayerShape& sh, const QV& q,
                     const KV& k, const VV& v, index_t position, index_t budget,
                     const Ind& indicator, bool reference, bool keep_lengths) {
    if (keep_lengths || !uniform(ly))
      return decode_rows(exec, ly, sh, q, k, v, position, indicator, reference);
    constexpr indicator_source source = indicator_source_of<Ind>;
    constexpr bool accumulates = source == indicator_source::accumulated;
    const index_t B = sh.batch, Hkv = sh.kv_heads, d = sh.head_dim, w = sh.window;
    const index_t rows = sh.rows(), held = ly.held + 1;
    const bool evict = held > budget + w;
    const index_t cand = held - w, keep = std::min(budget, cand), n = keep + w;

    layer grown;
    if (held > ly.cap) grown = regrow(ly, std::max(held, std::min(2 * ly.cap, budget + w + 1)));
    // Scores of the candidates, or (accumulating) the new query's attention to every
    // held token: (rows, held) either way; sums: the updated sums, (rows, held).
    std::vector<float> scores(evict || accumulates ? static_cast<std::size_t>(rows * held) : 0);
    std::vector<float> sums(accumulates ? static_cast<std::size_t>(rows * held) : 0);
    std::vector<index_t> sel(evict ? static_cast<std::size_t>(rows * n) : 0);
    layer next;
    if (evict && reference) next = layer(ly.rows, d, std::max(ly.cap, held), accumulates);
    if (held > ly.cap) ly = std::move(grown);  // the same tokens with more room

    for (index_t b = 0; b < B; ++b)
      for (index_t g = 0; g < Hkv; ++g) {
        const index_t r = b * Hkv + g;
        for (index_t x = 0; x < d; ++x) {
          ly.key_row(r, held - 1)[x] = static_cast<T>(k(b, g, x));
          ly.value_row(r, held - 1)[x] = static_cast<T>(v(b, g, x));
        }
        ly.pos[static_cast<std::size_t>(r * ly.cap + held - 1)] = position;
      }
    const auto all_keys = ly.tokens_view(static_cast<const T*>(ly.k.data()), B, Hkv, held);

    const float* ranked = scores.data();  // (rows, cand) with row stride ranked_ld
    index_t ranked_ld = cand;
    if constexpr (accumulates) {
      decode_scores(exec, q, all_keys, indicator,
                    make_view(scores.data(), std::array<index_t, 3>{B, Hkv, held}));
      for (index_t r = 0; r < rows; ++r) {
        float* sr = sums.data() + r * held;
        std::copy_n(ly.ind.data() + r * ly.cap, held - 1, sr);
        sr[held - 1] = 0.0f;
      }
      accumulate(exec, sums.data(), held, scores.data(), held, rows, held);
      ranked = sums.data();
      ranked_ld = held;
    }
    if (!evict) {
      if constexpr (accumulates)
        for (index_t r = 0; r < rows; ++r)
          std::copy_n(sums.data() + r * held, held, ly.ind.data() + r * ly.cap);
      ly.set_length(held);
      return;
    }
    if constexpr (source == indicator_source::position) {
      for (index_t r = 0; r < rows; ++r)
        for (index_t t = 0; t < cand; ++t)
          scores[static_cast<std::size_t>(r * cand + t)] =
              indicator.score_position(ly.pos[static_cast<std::size_t>(r * ly.cap + t)]);
    } else if constexpr (!accumulates) {
      candidate_scores(exec, q, all_keys, indicator,
                       make_view(scores.data(), std::array<index_t, 3>{B, Hkv, cand}));
    }
    select_k(
        exec,
        make_view(ranked, std::array<index_t, 2>{rows, cand}, std::array<index_t, 2>{ranked_ld, 1}),
        make_view(sel.data(), std::array<index_t, 2>{rows, keep}, std::array<index_t, 2>{n, 1}),
        reference ? select_order::descending : select_order::position);
    // Commit: nothing below allocates or throws.
    for (index_t r = 0; r < rows; ++r)
      for (index_t t = 0; t < w; ++t) sel[static_cast<std::size_t>(r * n + keep + t)] = cand + t;
    ly.set_length(held);
    auto keep_v =
        make_view(static_cast<const index_t*>(sel.data()), std::array<index_t, 3>{B, Hkv, n});
    // Reference order is a permutation: gather into the spare layer. Position order
    // is ascending: compaction in place moves only the rows after the evicted token.
    layer& dst = reference ? next : ly;
    compact(exec, keys(ly, sh), keep_v, dst.tokens_view(dst.k.data(), B, Hkv, n));
    compact(exec, values(ly, sh), keep_v, dst.tokens_view(dst.v.data(), B, Hkv, n));
    for (index_t r = 0; r < rows; ++r) {
      const index_t* rs = sel.data() + r * n;
      const index_t* src = ly.pos.data() + r * ly.cap;
      index_t* out = dst.pos.data() + r * dst.cap;
      for (index_t t = 0; t < n; ++t) out[t] = src[rs[t]];
      if constexpr (accumulates) {
        const float* ssc = sums.data() + r * held;
        float* osc = dst.ind.data() + r * dst.cap;
        for (index_t t = 0; t < n; ++t) osc[t] = ssc[rs[t]];
      }
    }
    dst.set_length(n);
    if (reference) {
      next.by_indicator = ly.by_indicator;
      next.cut = ly.cut;  // a replacement keeps what the layer is (head-wise decode reads it)
      ly = std::move(next);
    }
  }

 private:
  static bool uniform(const layer& ly) {
    return std::all_of(ly.len.begin(), ly.len.end(), [&](index_t x) { return x == ly.held; });
  }

  // decode() row by row, for ragged rows or when every row keeps its length
  // (head-wise allocation): each appends the new token and evicts one of its candidates. All rows
  // are scored and selected first (the new token waits in each row's first padding slot, cleared
  // again if anything throws); then every row is rewritten.
  template <class Ind, class QV, class KV, class VV>
  static void decode_rows(const host_policy& exec, layer& ly, const LayerShape& sh, const QV& q,
                          const KV& k, const VV& v, index_t position, const Ind& indicator,
                          bool reference) {
    constexpr indicator_source source = indicator_source_of<Ind>;
    constexpr bool accumulates = source == indicator_source::accumulated;
    const index_t Hkv = sh.kv_heads, d = sh.head_dim, w = sh.window, rows = sh.rows();
    const index_t grp = q.extent(1) / Hkv;
    index_t longest = 0;
    for (index_t x : ly.len) longest = std::max(longest, x + 1);
    layer grown;
    if (longest > ly.cap) grown = regrow(ly, longest);
    const auto L = static_cast<std::size_t>(longest);
    std::vector<float> scores(L);
    std::vector<index_t> sel(static_cast<std::size_t>(rows) * L);  // (rows, longest)
    std::vector<float> sums(accumulates ? sel.size() : 0);         // (rows, longest)
    // One row's tokens in their new order, when reference order permutes them.
    std::vector<T> tk(reference ? L * static_cast<std::size_t>(d) : 0), tv(tk.size());
    std::vector<index_t> tp(reference ? L : 0);
    if (longest > ly.cap) ly = std::move(grown);

    index_t written = 0;  // rows whose first padding slot holds the new token
    try {
      for (index_t r = 0; r < rows; ++r) {
        const index_t b = r / Hkv, g = r % Hkv;
        const index_t n = ly.row_len(r) + 1, cand = n - w, keep = cand - 1;
        for (index_t x = 0; x < d; ++x) {
          ly.key_row(r, n - 1)[x] = static_cast<T>(k(b, g, x));
          ly.value_row(r, n - 1)[x] = static_cast<T>(v(b, g, x));
        }
        ly.pos[static_cast<std::size_t>(r * ly.cap + n - 1)] = position;
        written = r + 1;
        const auto qv = make_view(&q(b, g * grp, 0), std::array<index_t, 3>{1, grp, d},
                                  std::array<index_t, 3>{static_cast<index_t>(q.stride(0)),
                                                         static_cast<index_t>(q.stride(1)), 1});
        const auto kv =
            make_view(static_cast<const T*>(ly.key_row(r, 0)), std::array<index_t, 4>{1, 1, n, d},
                      std::array<index_t, 4>{n * d, n * d, d, 1});
        const float* ranked = scores.data();
        if constexpr (accumulates) {
          float* sr = sums.data() + r * longest;
          decode_scores(exec, qv, kv, indicator,
                        make_view(scores.data(), std::array<index_t, 3>{1, 1, n}));
          const float* old = ly.ind.data() + r * ly.cap;
          for (index_t t = 0; t < n; ++t)
            sr[t] = (t < n - 1 ? old[t] : 0.0f) + scores[static_cast<std::size_t>(t)];
          ranked = sr;
        } else if constexpr (source == indicator_source::position) {
          for (index_t t = 0; t < cand; ++t)
            scores[static_cast<std::size_t>(t)] =
                indicator.score_position(ly.pos[static_cast<std::size_t>(r * ly.cap + t)]);
        } else {
          candidate_scores(exec, qv, kv, indicator,
                           make_view(scores.data(), std::array<index_t, 3>{1, 1, cand}));
        }
        index_t* rs = sel.data() + r * longest;
        select_k(exec, make_view(ranked, std::array<index_t, 2>{1, cand}),
                 make_view(rs, std::array<index_t, 2>{1, keep}),
                 reference ? select_order::descending : select_order::position);
        for (index_t t = 0; t < w; ++t) rs[keep + t] = cand + t;
      }
    } catch (...) {
      for (index_t r = 0; r < written; ++r) pad_row(ly, r, ly.row_len(r), ly.row_len(r) + 1);
      throw;
    }

    // Commit: nothing below allocates or throws.
    for (index_t r = 0; r < rows; ++r) {
      const index_t n = ly.row_len(r) + 1;
      const index_t* rs = sel.data() + r * longest;
      index_t* pos = ly.pos.data() + r * ly.cap;
      float* sc = accumulates ? ly.ind.data() + r * ly.cap : nullptr;
      const float* sr = accumulates ? sums.data() + r * longest : nullptr;
      const auto move = [&](T* dk, T* dv, index_t* dp, index_t to, index_t from) {
        std::memmove(dk + to * d, ly.key_row(r, from), static_cast<std::size_t>(d) * sizeof(T));
        std::memmove(dv + to * d, ly.value_row(r, from), static_cast<std::size_t>(d) * sizeof(T));
        dp[to] = pos[from];
      };
      // Position order is ascending (rs[t] >= t): in place. Reference order permutes:
      // through the row buffer. The sums come from the scratch either way.
      if (!reference) {
        for (index_t t = 0; t < n - 1; ++t)
          move(ly.key_row(r, 0), ly.value_row(r, 0), pos, t, rs[t]);
      } else {
        for (index_t t = 0; t < n - 1; ++t) move(tk.data(), tv.data(), tp.data(), t, rs[t]);
        std::copy_n(tk.data(), (n - 1) * d, ly.key_row(r, 0));
        std::copy_n(tv.data(), (n - 1) * d, ly.value_row(r, 0));
        std::copy_n(tp.data(), n - 1, pos);
      }
      if (sc)
        for (index_t t = 0; t < n - 1; ++t) sc[t] = sr[rs[t]];
      pad_row(ly, r, n - 1, n);
    }
  }

  // Row r's w window tokens from slot `from` to slot `to`, scores included.
  static void move_window(layer& ly, index_t r, index_t from, index_t to, index_t w) noexcept {
    std::memmove(ly.key_row(r, to), ly.key_row(r, from),
                 static_cast<std::size_t>(w * ly.d) * sizeof(T));
    std::memmove(ly.value_row(r, to), ly.value_row(r, from),
                 static_cast<std::size_t>(w * ly.d) * sizeof(T));
    index_t* p = ly.pos.data() + r * ly.cap;
    std::memmove(p + to, p + from, static_cast<std::size_t>(w) * sizeof(index_t));
    if (!ly.ind.empty()) {
      float* sc = ly.ind.data() + r * ly.cap;
      std::memmove(sc + to, sc + from, static_cast<std::size_t>(w) * sizeof(float));
    }
  }

  // Slots [from, to) of row r become padding.
  static void pad_row(layer& ly, index_t r, index_t from, index_t to) noexcept {
    if (from >= to) return;
    std::fill(ly.key_row(r, from), ly.key_row(r, to), T{});
    std::fill(ly.value_row(r, from), ly.value_row(r, to), T{});
    std::fill(ly.pos.data() + r * ly.cap + from, ly.pos.data() + r * ly.cap + to, index_t{-1});
    if (!ly.ind.empty())
      std::fill(ly.ind.data() + r * ly.cap + from, ly.ind.data() + r * ly.cap + to, 0.0f);
  }

  // A copy of ly with a larger capacity.
  static layer regrow(const layer& ly, index_t cap) {
    layer out(ly.rows, ly.d, cap, !ly.ind.empty());
    for (index_t r = 0; r < ly.rows; ++r) {
      std::copy_n(ly.k.data() + r * ly.cap * ly.d, ly.held * ly.d, out.k.data() + r * cap * ly.d);
      std::copy_n(ly.v.data() + r * ly.cap * ly.d, ly.held * ly.d, out.v.data() + r * cap * ly.d);
      std::copy_n(ly.pos.data() + r * ly.cap, ly.held, out.pos.data() + r * cap);
      if (!ly.ind.empty())
        std::copy_n(ly.ind.data() + r * ly.cap, ly.held, out.ind.data() + r * cap);
    }
    out.held = ly.held;
    out.len = ly.len;
    out.by_indicator = ly.by_indicator;
    out.cut = ly.cut;
    return out;
  }
};

}  // namespace cake::detail
