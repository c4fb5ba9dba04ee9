// cake::KvCache: a per-layer KV cache managed by CAKE (or any composition of a
// preference, a budget and an indicator policy).
//
//   prefill(layer, q_window, keys, values)  layers 0..L-1 in order; with cascading
//                                           every layer seen so far is re-budgeted
//                                           and cut at once, so memory stays bounded
//   decode(layer, q, k, v)                  append one token, evict one if over budget
//   keys(l) / values(l) / positions(l)      what is held, (batch, kv_heads, held, ...)
//   budget(l), tokens_held(l), bytes_held(l), preference(l), stage_budgets()
//
// Every call validates its input first and leaves the cache unchanged when it throws.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstring>
#include <numeric>
#include <span>
#include <vector>

#include "algorithm/allocate_budgets.hpp"
#include "algorithm/compact.hpp"
#include "algorithm/decode_scores.hpp"
#include "algorithm/select_k.hpp"
#include "algorithm/window_stats.hpp"
#include "core/concepts.hpp"
#include "policy/budget/proportional.hpp"
#include "policy/indicator/mean_variance.hpp"
#include "policy/preference/cake.hpp"

namespace cake {

struct CacheConfig {
  index_t layers = 0;      // L
  index_t batch = 1;       // B
  index_t q_heads = 0;     // H
  index_t kv_heads = 0;    // Hkv
  index_t head_dim = 0;    // d
  index_t window = 32;     // w: the last w tokens, always kept
  index_t cache_size = 1024;  // C: average tokens per layer, window included
  bool cascade = true;     // cut layer by layer during prefill (the paper's point)
  token_order order = token_order::position;
  bool check_finite = true;  // reject NaN/Inf in queries, keys and values

  // T = (C - w) * L: the prefix budget of all layers together.
  index_t total_budget() const { return (cache_size - window) * layers; }

  status validate() const {
    CAKE_CHECK(layers >= 1, "cake.config.layers", "layers must be >= 1, got ", layers);
    CAKE_CHECK(batch >= 1, "cake.config.batch", "batch must be >= 1, got ", batch);
    CAKE_CHECK(q_heads >= 1, "cake.config.q_heads", "q_heads must be >= 1, got ", q_heads);
    CAKE_CHECK(kv_heads >= 1 && q_heads % kv_heads == 0, "cake.config.kv_heads",
               "kv_heads must be >= 1 and divide q_heads = ", q_heads, ", got ", kv_heads);
    CAKE_CHECK(head_dim >= 1, "cake.config.head_dim", "head_dim must be >= 1, got ", head_dim);
    CAKE_CHECK(window >= 2, "cake.config.window", "window must be >= 2, got ", window);
    CAKE_CHECK(cache_size > window, "cake.config.cache_size",
               "cache_size must be > window = ", window, ", got ", cache_size);
    return status::success();
  }
};

namespace detail {

template <class V, std::size_t R>
auto element_ptr(const V& v, const std::array<index_t, R>& idx) {
  index_t off = 0;
  for (std::size_t r = 0; r < R; ++r) off += idx[r] * static_cast<index_t>(v.stride(r));
  return v.data_handle() + off;
}

// Finds the first non-finite element of a view; the common all-finite case is one
// branch-free pass per innermost row.
template <class V>
bool find_non_finite(const V& v, std::array<index_t, V::rank()>& where) {
  constexpr std::size_t R = V::rank();
  const index_t inner = v.extent(R - 1);
  index_t outer = 1;
  for (std::size_t r = 0; r + 1 < R; ++r) outer *= v.extent(r);
  for (index_t o = 0; o < outer; ++o) {
    std::array<index_t, R> idx{};
    index_t rem = o;
    for (std::size_t r = R - 1; r-- > 0;) {
      idx[r] = rem % v.extent(r);
      rem /= v.extent(r);
    }
    const auto* row = element_ptr(v, idx);
    bool bad = false;
    for (index_t x = 0; x < inner; ++x) bad |= !std::isfinite(static_cast<float>(row[x]));
    if (bad) {
      for (index_t x = 0; x < inner; ++x)
        if (!std::isfinite(static_cast<float>(row[x]))) {
          idx[R - 1] = x;
          where = idx;
          return true;
        }
    }
  }
  return false;
}

template <class V>
status check_finite(const V& v, const char* id, const char* name) {
  std::array<index_t, V::rank()> at{};
  if (!find_non_finite(v, at)) return status::success();
  std::string coords;
  for (std::size_t r = 0; r < at.size(); ++r) coords.append(r ? ", " : "").append(std::to_string(at[r]));
  return make_status(id, name, " must be finite, found ", static_cast<float>(*element_ptr(v, at)), " at (",
                     coords, ")");
}

template <class V>
std::string shape_string(const V& v) {
  std::string s = "(";
  for (std::size_t r = 0; r < V::rank(); ++r)
    s.append(r ? ", " : "").append(std::to_string(v.extent(r)));
  return s + ")";
}

// One layer's storage on the host. Each (batch, kv-head) row has room for `cap`
// tokens; the first `held` are live. During prefill a cut layer keeps its prefix
// in descending-indicator order (a later, smaller budget is then a truncation),
// followed by the window in position order.
template <class T>
struct HostLayer {
  index_t rows = 0, d = 0, cap = 0, held = 0;
  std::vector<T> k, v;          // (rows, cap, d)
  std::vector<index_t> pos;     // (rows, cap) token positions
  std::vector<float> ind;       // (rows, cap) indicator of held prefix tokens, prefill only
  bool by_indicator = false;    // prefix in descending-indicator order

  HostLayer() = default;
  HostLayer(index_t rows_, index_t d_, index_t cap_, bool with_indicator)
      : rows(rows_), d(d_), cap(cap_),
        k(static_cast<std::size_t>(rows_ * cap_ * d_)),
        v(static_cast<std::size_t>(rows_ * cap_ * d_)),
        pos(static_cast<std::size_t>(rows_ * cap_)),
        ind(with_indicator ? static_cast<std::size_t>(rows_ * cap_) : 0) {}

  T* key_row(index_t r, index_t t) { return k.data() + (r * cap + t) * d; }
  T* value_row(index_t r, index_t t) { return v.data() + (r * cap + t) * d; }
  // (batch, kv_heads, cap, head_dim) over the whole capacity.
  template <class U>
  host_view<U, 4> tokens_view(U* base, index_t B, index_t Hkv, index_t n) const {
    // An empty layer (cap = 0, d = 0) still needs the positive strides layout_stride requires.
    const index_t c = std::max<index_t>(cap, 1), dd = std::max<index_t>(d, 1);
    return make_view(base, std::array<index_t, 4>{B, Hkv, n, d},
                     std::array<index_t, 4>{Hkv * c * dd, c * dd, dd, 1});
  }
};

}  // namespace detail

template <PreferencePolicy Pref = CakePreference, BudgetPolicy Budget = ProportionalBudget,
          IndicatorPolicy Ind = MeanVarianceIndicator, class T = float,
          class Exec = host_policy>
class KvCache {
  static_assert(std::is_same_v<Exec, host_policy>,
                "cake::KvCache: this header provides the host backend; the CUDA cache is "
                "declared in <cake/cake.cuh>");
  static_assert(std::is_floating_point_v<T>, "cake::KvCache<..., T>: T must be float or double");
  using Layer = detail::HostLayer<T>;

 public:
  using value_type = T;
  using preference_policy = Pref;
  using budget_policy = Budget;
  using indicator_policy = Ind;

  explicit KvCache(CacheConfig config, Pref preference = {}, Budget budget = {},
                   Ind indicator = {}, Exec exec = {})
      : cfg_(config), pref_(preference), budget_(budget), ind_(indicator), exec_(exec) {
    cfg_.validate().throw_if_error();
    pref_.validate().throw_if_error();
    budget_.validate().throw_if_error();
    ind_.validate().throw_if_error();
    reset();
  }

  // Forget the prompt: back to the state before layer 0's prefill.
  void reset() {
    const auto L = static_cast<std::size_t>(cfg_.layers);
    layers_.assign(L, Layer{});
    prefs_.clear();
    prefs_.reserve(L);
    stats_.clear();
    stats_.reserve(L);
    budgets_.assign(L, 0);
    stages_.clear();
    stages_.reserve(L);
    steps_.assign(L, 0);
    next_layer_ = 0;
    prompt_ = -1;
    peak_ = 0;
  }

  // ---- prefill -------------------------------------------------------------

  // q_window: (batch, q_heads, window, head_dim)  last w queries, rotary applied
  // keys, values: (batch, kv_heads, S, head_dim)  the layer's whole prompt
  template <tensor_like Q, tensor_like K, tensor_like V>
  status validate_prefill(index_t layer, Q&& q_window, K&& keys, V&& values) const {
    auto q = as_view(q_window);
    auto k = as_view(keys);
    auto v = as_view(values);
    check_spaces<decltype(q), decltype(k), decltype(v)>();
    CAKE_CHECK_STATE(next_layer_ < cfg_.layers, "cake.prefill.layer", "all ", cfg_.layers,
                     " layers are already prefilled; call reset() before a new prompt");
    CAKE_CHECK_STATE(layer == next_layer_, "cake.prefill.layer",
                     "layers must be prefilled in order: expected layer ", next_layer_, ", got ",
                     layer);
    const index_t B = cfg_.batch, H = cfg_.q_heads, Hkv = cfg_.kv_heads, d = cfg_.head_dim,
                  w = cfg_.window;
    CAKE_CHECK(q.extent(0) == B && q.extent(1) == H && q.extent(2) == w && q.extent(3) == d,
               "cake.prefill.q_window", "q_window must be (batch, q_heads, window, head_dim) = (",
               B, ", ", H, ", ", w, ", ", d, "), got ", detail::shape_string(q));
    const index_t S = k.extent(2);
    CAKE_CHECK(k.extent(0) == B && k.extent(1) == Hkv && k.extent(3) == d, "cake.prefill.keys",
               "keys must be (batch, kv_heads, S, head_dim) = (", B, ", ", Hkv, ", S, ", d,
               "), got ", detail::shape_string(k));
    CAKE_CHECK(prompt_ < 0 || S == prompt_, "cake.prefill.keys",
               "every layer must have the prompt length of layer 0, S = ", prompt_, ", got ", S);
    CAKE_CHECK(S >= w, "cake.prefill.keys", "the prompt must hold at least window = ", w,
               " tokens, got S = ", S);
    CAKE_CHECK(v.extent(0) == B && v.extent(1) == Hkv && v.extent(2) == S && v.extent(3) == d,
               "cake.prefill.values", "values must have the shape of keys (", B, ", ", Hkv, ", ",
               S, ", ", d, "), got ", detail::shape_string(v));
    CAKE_CHECK(inner_contiguous(q), "cake.prefill.q_window",
               "q_window must have unit stride along head_dim, got ", q.stride(3));
    CAKE_CHECK(inner_contiguous(k), "cake.prefill.keys",
               "keys must have unit stride along head_dim, got ", k.stride(3));
    CAKE_CHECK(inner_contiguous(v), "cake.prefill.values",
               "values must have unit stride along head_dim, got ", v.stride(3));
    if (cfg_.check_finite) {
      CAKE_TRY(detail::check_finite(q, "cake.prefill.q_window", "q_window"));
      CAKE_TRY(detail::check_finite(k, "cake.prefill.keys", "keys"));
      CAKE_TRY(detail::check_finite(v, "cake.prefill.values", "values"));
    }
    return status::success();
  }

  template <tensor_like Q, tensor_like K, tensor_like V>
  void prefill(index_t layer, Q&& q_window, K&& keys, V&& values) {
    validate_prefill(layer, q_window, keys, values).throw_if_error();
    auto q = as_view(q_window);
    auto k = as_view(keys);
    auto v = as_view(values);
    check_value_type<decltype(k), decltype(v)>();
    const index_t B = cfg_.batch, Hkv = cfg_.kv_heads, w = cfg_.window, L = cfg_.layers;
    const index_t rows = B * Hkv, S = k.extent(2), P = S - w;
    const auto m = static_cast<std::size_t>(layer);

    // 1. Statistics and preference of this layer.
    std::vector<float> ind(static_cast<std::size_t>(rows * P));  // (batch, kv_heads, S - w)
    std::array<float, 2> st{};
    window_stats(exec_, q, k, ind_, make_view(ind.data(), std::array<index_t, 3>{B, Hkv, P}),
                 make_view(st.data(), std::array<index_t, 1>{2}),
                 StatsRequest::for_preference<Pref>());
    const LayerStats stats{st[0], st[1]};
    const double pref = pref_(stats);
    CAKE_EXPECTS(std::isfinite(pref) && pref >= 0, "cake.preference.value",
                 "the preference policy must return a finite value >= 0, got ", pref,
                 " for layer ", layer, " (entropy ", stats.entropy, ", variance ", stats.variance,
                 ")");

    // 2. Plan the new state without touching the current one: every allocation
    //    (new layers, permutations, bookkeeping) happens here.
    std::vector<float> prefs = prefs_;
    prefs.push_back(static_cast<float>(pref));
    std::vector<index_t> stage(m + 1, 0);
    std::vector<Layer> fresh;  // replacements, by layer
    std::vector<std::size_t> fresh_at;
    std::vector<index_t> prefix_after(m + 1, -1);  // truncations of layers kept in place
    std::vector<std::vector<index_t>> perms(m + 1);  // in-place reorders to position order
    const bool last = layer == L - 1;
    const bool want_position = cfg_.order == token_order::position;

    if (S <= cfg_.cache_size + w) {
      // The prompt already fits: nothing is cut, every budget is C - w (spec section 5).
      std::fill(stage.begin(), stage.end(), cfg_.cache_size - w);
      fresh.push_back(copy_all(k, v, P, /*with_indicator=*/false, ind));
      fresh_at.push_back(m);
    } else if (cfg_.cascade) {
      allocate_budgets(budget_, prefs, L, cfg_.total_budget(), P, stage);
      fresh.push_back(select_from(k, v, /*src_pos=*/nullptr, ind.data(), P, P,
                                  std::min(stage[m], P), last && want_position));
      fresh_at.push_back(m);
      for (std::size_t l = 0; l < m; ++l) {
        // Prefixes are in descending-indicator order: a smaller budget is a truncation.
        prefix_after[l] = std::min(stage[l], layers_[l].held - w);
        if (last && want_position && layers_[l].by_indicator)
          perms[l] = position_permutation(layers_[l], prefix_after[l]);
      }
    } else if (!last) {
      fresh.push_back(copy_all(k, v, P, /*with_indicator=*/true, ind));
      fresh_at.push_back(m);
    } else {
      // One-shot: every layer is cut once, now; the last one straight from the caller.
      allocate_budgets(budget_, prefs, L, cfg_.total_budget(), P, stage);
      fresh.push_back(select_from(k, v, nullptr, ind.data(), P, P, std::min(stage[m], P),
                                  want_position));
      fresh_at.push_back(m);
      for (std::size_t l = 0; l < m; ++l) {
        const Layer& src = layers_[l];
        fresh.push_back(select_from(src.tokens_view(src.k.data(), B, Hkv, S),
                                    src.tokens_view(src.v.data(), B, Hkv, S), src.pos.data(),
                                    src.ind.data(), src.cap, P, std::min(stage[l], P),
                                    want_position));
        fresh_at.push_back(l);
      }
    }
    // Tokens stored at once while the new layers exist beside the old ones.
    index_t transient = tokens_held();
    for (const auto& f : fresh) transient += f.held;

    // 3. Commit: nothing below allocates or throws.
    for (std::size_t l = 0; l < m; ++l) {
      if (prefix_after[l] >= 0) truncate_prefix(layers_[l], prefix_after[l]);
      if (!perms[l].empty()) permute_prefix(layers_[l], perms[l]);
    }
    for (std::size_t i = 0; i < fresh.size(); ++i) layers_[fresh_at[i]] = std::move(fresh[i]);
    prefs_ = std::move(prefs);
    stats_.push_back(stats);  // capacity reserved in reset()
    if (cfg_.cascade || last || S <= cfg_.cache_size + w) {
      for (std::size_t l = 0; l <= m; ++l) budgets_[l] = stage[l];
      if (cfg_.cascade) stages_.push_back(std::move(stage));  // capacity reserved in reset()
    }
    prompt_ = S;
    next_layer_ = layer + 1;
    if (last)
      for (auto& ly : layers_) {
        ly.ind.clear();
        ly.ind.shrink_to_fit();
        ly.by_indicator = ly.by_indicator && !want_position;
      }
    peak_ = std::max(peak_, transient);
  }

  // ---- decode --------------------------------------------------------------

  // q: (batch, q_heads, head_dim); k, v: (batch, kv_heads, head_dim), the new token.
  template <tensor_like Q, tensor_like K, tensor_like V>
  status validate_decode(index_t layer, Q&& q_new, K&& k_new, V&& v_new) const {
    auto q = as_view(q_new);
    auto k = as_view(k_new);
    auto v = as_view(v_new);
    check_spaces<decltype(q), decltype(k), decltype(v)>();
    CAKE_CHECK_STATE(next_layer_ == cfg_.layers, "cake.decode.state",
                     "decode needs every layer prefilled first; ", next_layer_, " of ",
                     cfg_.layers, " layers are");
    CAKE_CHECK(layer >= 0 && layer < cfg_.layers, "cake.decode.layer", "layer must be in [0, ",
               cfg_.layers, "), got ", layer);
    const index_t B = cfg_.batch, H = cfg_.q_heads, Hkv = cfg_.kv_heads, d = cfg_.head_dim;
    CAKE_CHECK(q.extent(0) == B && q.extent(1) == H && q.extent(2) == d, "cake.decode.q",
               "q must be (batch, q_heads, head_dim) = (", B, ", ", H, ", ", d, "), got ",
               detail::shape_string(q));
    CAKE_CHECK(k.extent(0) == B && k.extent(1) == Hkv && k.extent(2) == d, "cake.decode.k",
               "k must be (batch, kv_heads, head_dim) = (", B, ", ", Hkv, ", ", d, "), got ",
               detail::shape_string(k));
    CAKE_CHECK(v.extent(0) == B && v.extent(1) == Hkv && v.extent(2) == d, "cake.decode.v",
               "v must be (batch, kv_heads, head_dim) = (", B, ", ", Hkv, ", ", d, "), got ",
               detail::shape_string(v));
    CAKE_CHECK(inner_contiguous(q) && inner_contiguous(k) && inner_contiguous(v),
               "cake.decode.layout", "q, k and v must have unit stride along head_dim");
    if (cfg_.check_finite) {
      CAKE_TRY(detail::check_finite(q, "cake.decode.q", "q"));
      CAKE_TRY(detail::check_finite(k, "cake.decode.k", "k"));
      CAKE_TRY(detail::check_finite(v, "cake.decode.v", "v"));
    }
    return status::success();
  }

  template <tensor_like Q, tensor_like K, tensor_like V>
  void decode(index_t layer, Q&& q_new, K&& k_new, V&& v_new) {
    validate_decode(layer, q_new, k_new, v_new).throw_if_error();
    auto q = as_view(q_new);
    auto k = as_view(k_new);
    auto v = as_view(v_new);
    check_value_type<decltype(k), decltype(v)>();
    const index_t B = cfg_.batch, Hkv = cfg_.kv_heads, d = cfg_.head_dim, w = cfg_.window;
    const auto l = static_cast<std::size_t>(layer);
    Layer& ly = layers_[l];
    const index_t held = ly.held + 1, budget = budgets_[l];
    const bool evict = held > budget + w;
    const index_t cand = held - w, keep = std::min(budget, cand);

    // Everything that can throw happens before the first write.
    Layer grown;
    if (held > ly.cap) grown = regrow(ly, std::max(held, std::min(2 * ly.cap, budget + w + 1)));
    std::vector<float> scores(evict ? static_cast<std::size_t>(B * Hkv * cand) : 0);
    std::vector<index_t> sel(evict ? static_cast<std::size_t>(B * Hkv * held) : 0);
    const bool reference = cfg_.order == token_order::reference;
    Layer next;
    if (evict && reference) next = Layer(ly.rows, d, ly.cap, false);
    if (held > ly.cap) ly = std::move(grown);

    // Append the new token at the end of every row.
    const index_t position = prompt_ + steps_[l];
    for (index_t b = 0; b < B; ++b)
      for (index_t g = 0; g < Hkv; ++g) {
        const index_t r = b * Hkv + g;
        for (index_t x = 0; x < d; ++x) {
          ly.key_row(r, held - 1)[x] = static_cast<T>(k(b, g, x));
          ly.value_row(r, held - 1)[x] = static_cast<T>(v(b, g, x));
        }
        ly.pos[static_cast<std::size_t>(r * ly.cap + held - 1)] = position;
      }
    ly.held = held;
    ++steps_[l];
    if (!evict) return;

    // Score the candidates (all but the last w) with the new query alone, keep the top `keep`.
    auto keys_v = ly.tokens_view(static_cast<const T*>(ly.k.data()), B, Hkv, held);
    decode_scores(exec_, q, keys_v, ind_,
                  make_view(scores.data(), std::array<index_t, 3>{B, Hkv, cand}));
    auto sel_v = make_view(sel.data(), std::array<index_t, 3>{B, Hkv, held},
                           std::array<index_t, 3>{Hkv * held, held, 1});
    select_k(exec_, make_view(static_cast<const float*>(scores.data()),
                              std::array<index_t, 2>{B * Hkv, cand}),
             make_view(sel.data(), std::array<index_t, 2>{B * Hkv, keep},
                       std::array<index_t, 2>{held, 1}),
             reference ? select_order::descending : select_order::position);
    for (index_t r = 0; r < B * Hkv; ++r)
      for (index_t t = 0; t < w; ++t) sel[static_cast<std::size_t>(r * held + keep + t)] = cand + t;
    auto keep_v = cake::view<const index_t, 3>(sel.data(), sel_v.mapping());
    auto keep_n = submdspan_tokens(keep_v, keep + w);
    if (reference) {
      gather_layer(ly, keep_n, next);
      next.held = keep + w;
      ly = std::move(next);
    } else {
      // Ascending positions: compaction in place moves only the rows after the evicted one.
      auto kv = ly.tokens_view(ly.k.data(), B, Hkv, held);
      auto vv = ly.tokens_view(ly.v.data(), B, Hkv, held);
      compact(exec_, kv, keep_n, ly.tokens_view(ly.k.data(), B, Hkv, keep + w));
      compact(exec_, vv, keep_n, ly.tokens_view(ly.v.data(), B, Hkv, keep + w));
      for (index_t r = 0; r < B * Hkv; ++r) {
        index_t* p = ly.pos.data() + r * ly.cap;
        for (index_t t = 0; t < keep + w; ++t) p[t] = p[sel[static_cast<std::size_t>(r * held + t)]];
      }
      ly.held = keep + w;
    }
  }

  // ---- queries -------------------------------------------------------------

  const CacheConfig& config() const noexcept { return cfg_; }
  index_t num_layers() const noexcept { return cfg_.layers; }
  index_t layers_prefilled() const noexcept { return next_layer_; }
  bool prefilled() const noexcept { return next_layer_ == cfg_.layers; }
  // S, or -1 before layer 0 is prefilled.
  index_t prompt_length() const noexcept { return prompt_; }
  index_t total_budget() const noexcept { return cfg_.total_budget(); }
  // The budget recorded for each layer (prefix tokens outside the window).
  std::span<const index_t> budgets() const noexcept { return budgets_; }
  index_t budget(index_t layer) const { return budgets_.at(checked(layer)); }
  // Recomputed budgets of layers 0..m after each cascade stage m.
  const std::vector<std::vector<index_t>>& stage_budgets() const noexcept { return stages_; }
  double preference(index_t layer) const { return prefs_.at(checked(layer)); }
  LayerStats stats(index_t layer) const { return stats_.at(checked(layer)); }
  // Tokens held by each (batch, kv-head) row of a layer, the window included.
  index_t tokens_held(index_t layer) const { return layers_.at(checked(layer)).held; }
  index_t tokens_held() const noexcept {
    index_t s = 0;
    for (const auto& ly : layers_) s += ly.held;
    return s;
  }
  // Largest tokens_held() seen at the end of any prefill or decode call.
  index_t peak_tokens_held() const noexcept { return peak_; }
  // Bytes of K and V held by a layer (all rows).
  std::size_t bytes_held(index_t layer) const {
    return 2 * static_cast<std::size_t>(cfg_.batch * cfg_.kv_heads * tokens_held(layer) *
                                        cfg_.head_dim) *
           sizeof(T);
  }
  std::size_t bytes_held() const {
    std::size_t s = 0;
    for (index_t l = 0; l < cfg_.layers; ++l) s += bytes_held(l);
    return s;
  }

  // (batch, kv_heads, tokens_held, head_dim)
  host_view<const T, 4> keys(index_t layer) const {
    const Layer& ly = layers_.at(checked(layer));
    return ly.tokens_view(static_cast<const T*>(ly.k.data()), cfg_.batch, cfg_.kv_heads, ly.held);
  }
  host_view<const T, 4> values(index_t layer) const {
    const Layer& ly = layers_.at(checked(layer));
    return ly.tokens_view(static_cast<const T*>(ly.v.data()), cfg_.batch, cfg_.kv_heads, ly.held);
  }
  // (batch, kv_heads, tokens_held): the prompt or decode position of every held token.
  host_view<const index_t, 3> positions(index_t layer) const {
    const Layer& ly = layers_.at(checked(layer));
    return make_view(static_cast<const index_t*>(ly.pos.data()),
                     std::array<index_t, 3>{cfg_.batch, cfg_.kv_heads, ly.held},
                     std::array<index_t, 3>{cfg_.kv_heads * std::max<index_t>(ly.cap, 1),
                                            std::max<index_t>(ly.cap, 1), 1});
  }

 private:
  template <class QV, class KV, class VV>
  static constexpr void check_spaces() {
    require_space<Exec, QV>();
    require_space<Exec, KV>();
    require_space<Exec, VV>();
  }

  // The cache stores what it is given: a cache of T takes keys and values of T.
  template <class KV, class VV>
  static constexpr void check_value_type() {
    static_assert(std::is_same_v<std::remove_const_t<typename KV::element_type>, T> &&
                      std::is_same_v<std::remove_const_t<typename VV::element_type>, T>,
                  "cake::KvCache<..., T>: keys and values must hold T, the cache's value type "
                  "(convert them, or instantiate the cache with their type)");
  }

  std::size_t checked(index_t layer) const {
    CAKE_EXPECTS(layer >= 0 && layer < cfg_.layers, "cake.layer", "layer must be in [0, ",
                 cfg_.layers, "), got ", layer);
    return static_cast<std::size_t>(layer);
  }

  static host_view<const index_t, 3> submdspan_tokens(host_view<const index_t, 3> v, index_t n) {
    return make_view(v.data_handle(), std::array<index_t, 3>{v.extent(0), v.extent(1), n},
                     std::array<index_t, 3>{v.stride(0), v.stride(1), v.stride(2)});
  }

  // A layer holding all S tokens in position order (uncut prompt, or one-shot mode
  // before the last layer), with room for one decoded token.
  template <class KV, class VV>
  Layer copy_all(const KV& k, const VV& v, index_t P, bool with_indicator,
                 const std::vector<float>& ind) const {
    const index_t B = cfg_.batch, Hkv = cfg_.kv_heads, d = cfg_.head_dim, S = k.extent(2);
    Layer out(B * Hkv, d, S + 1, with_indicator);
    for (index_t b = 0; b < B; ++b)
      for (index_t g = 0; g < Hkv; ++g) {
        const index_t r = b * Hkv + g;
        for (index_t t = 0; t < S; ++t) {
          std::copy_n(&k(b, g, t, 0), d, out.key_row(r, t));
          std::copy_n(&v(b, g, t, 0), d, out.value_row(r, t));
          out.pos[static_cast<std::size_t>(r * out.cap + t)] = t;
        }
        if (with_indicator)
          std::copy_n(ind.data() + r * P, P, out.ind.data() + r * out.cap);
      }
    out.held = S;
    return out;
  }

  // A layer holding, per row, the `keep` prefix tokens of highest indicator and the
  // window (the last w of the P + w source tokens). src_pos == nullptr means the
  // source tokens are positions 0..S-1; ind has row stride ind_ld.
  template <class KV, class VV>
  Layer select_from(const KV& k, const VV& v, const index_t* src_pos, const float* ind,
                    index_t ind_ld, index_t P, index_t keep, bool position_order) const {
    const index_t B = cfg_.batch, Hkv = cfg_.kv_heads, d = cfg_.head_dim, w = cfg_.window;
    const index_t rows = B * Hkv, n = keep + w, src_cap = src_pos ? k.stride(1) / d : 0;
    std::vector<index_t> sel(static_cast<std::size_t>(rows * n));
    select_k(exec_,
             make_view(ind, std::array<index_t, 2>{rows, P}, std::array<index_t, 2>{ind_ld, 1}),
             make_view(sel.data(), std::array<index_t, 2>{rows, keep},
                       std::array<index_t, 2>{n, 1}),
             position_order ? select_order::position : select_order::descending);
    for (index_t r = 0; r < rows; ++r)
      for (index_t t = 0; t < w; ++t) sel[static_cast<std::size_t>(r * n + keep + t)] = P + t;
    Layer out(rows, d, n + 1, !position_order);
    auto keep_v = make_view(static_cast<const index_t*>(sel.data()),
                            std::array<index_t, 3>{B, Hkv, n});
    compact(exec_, k, keep_v, out.tokens_view(out.k.data(), B, Hkv, n));
    compact(exec_, v, keep_v, out.tokens_view(out.v.data(), B, Hkv, n));
    for (index_t r = 0; r < rows; ++r)
      for (index_t t = 0; t < n; ++t) {
        const index_t j = sel[static_cast<std::size_t>(r * n + t)];
        out.pos[static_cast<std::size_t>(r * out.cap + t)] =
            src_pos ? src_pos[r * src_cap + j] : j;
        if (!position_order && t < keep)
          out.ind[static_cast<std::size_t>(r * out.cap + t)] = ind[r * ind_ld + j];
      }
    out.by_indicator = !position_order;
    out.held = n;
    return out;
  }

  // Keep the first `prefix` prefix tokens (the highest-indicator ones, since the
  // prefix is in descending order) and the window: the window rows move down.
  void truncate_prefix(Layer& ly, index_t prefix) const noexcept {
    const index_t w = cfg_.window, old_prefix = ly.held - w;
    if (prefix == old_prefix) return;
    for (index_t r = 0; r < ly.rows; ++r) {
      std::memmove(ly.key_row(r, prefix), ly.key_row(r, old_prefix),
                   static_cast<std::size_t>(w * ly.d) * sizeof(T));
      std::memmove(ly.value_row(r, prefix), ly.value_row(r, old_prefix),
                   static_cast<std::size_t>(w * ly.d) * sizeof(T));
      index_t* p = ly.pos.data() + r * ly.cap;
      std::memmove(p + prefix, p + old_prefix, static_cast<std::size_t>(w) * sizeof(index_t));
    }
    ly.held = prefix + w;
  }

  // Per row, the order of the first `prefix` prefix tokens sorted by position:
  // perm[r * prefix + t] = current slot of the token that goes to slot t.
  std::vector<index_t> position_permutation(const Layer& ly, index_t prefix) const {
    std::vector<index_t> perm(static_cast<std::size_t>(ly.rows * prefix));
    for (index_t r = 0; r < ly.rows; ++r) {
      index_t* s = perm.data() + r * prefix;
      std::iota(s, s + prefix, index_t{0});
      const index_t* p = ly.pos.data() + r * ly.cap;
      std::sort(s, s + prefix, [p](index_t a, index_t b) { return p[a] < p[b]; });
    }
    return perm;
  }

  // Applies a permutation to each row's prefix in place, cycle by cycle, moving
  // each token once through a one-token buffer (no allocation: the buffer lives
  // in the row's spare slot, which every layer has for decoding).
  void permute_prefix(Layer& ly, std::vector<index_t>& perm) const noexcept {
    const index_t prefix = static_cast<index_t>(perm.size()) / std::max<index_t>(ly.rows, 1);
    const index_t d = ly.d, spare = ly.cap - 1;
    for (index_t r = 0; r < ly.rows; ++r) {
      index_t* pr = perm.data() + r * prefix;
      index_t* pos = ly.pos.data() + r * ly.cap;
      auto move_token = [&](index_t to, index_t from) {
        std::memcpy(ly.key_row(r, to), ly.key_row(r, from), static_cast<std::size_t>(d) * sizeof(T));
        std::memcpy(ly.value_row(r, to), ly.value_row(r, from), static_cast<std::size_t>(d) * sizeof(T));
        pos[to] = pos[from];
      };
      for (index_t start = 0; start < prefix; ++start) {
        if (pr[start] == start || pr[start] < 0) continue;
        move_token(spare, start);
        index_t to = start;
        while (pr[to] != start) {
          const index_t from = pr[to];
          move_token(to, from);
          pr[to] = -1;  // done
          to = from;
        }
        move_token(to, spare);
        pr[to] = -1;
      }
    }
  }

  // out's first n rows = ly's rows picked by keep (batch, kv_heads, n).
  void gather_layer(const Layer& ly, host_view<const index_t, 3> keep, Layer& out) const {
    const index_t B = cfg_.batch, Hkv = cfg_.kv_heads, n = keep.extent(2);
    compact(exec_, ly.tokens_view(static_cast<const T*>(ly.k.data()), B, Hkv, ly.held), keep,
            out.tokens_view(out.k.data(), B, Hkv, n));
    compact(exec_, ly.tokens_view(static_cast<const T*>(ly.v.data()), B, Hkv, ly.held), keep,
            out.tokens_view(out.v.data(), B, Hkv, n));
    for (index_t b = 0; b < B; ++b)
      for (index_t g = 0; g < Hkv; ++g) {
        const index_t r = b * Hkv + g;
        for (index_t t = 0; t < n; ++t)
          out.pos[static_cast<std::size_t>(r * out.cap + t)] =
              ly.pos[static_cast<std::size_t>(r * ly.cap + keep(b, g, t))];
      }
  }

  // A copy of ly with a larger capacity.
  Layer regrow(const Layer& ly, index_t cap) const {
    Layer out(ly.rows, ly.d, cap, false);
    for (index_t r = 0; r < ly.rows; ++r) {
      std::copy_n(ly.k.data() + r * ly.cap * ly.d, ly.held * ly.d, out.k.data() + r * cap * ly.d);
      std::copy_n(ly.v.data() + r * ly.cap * ly.d, ly.held * ly.d, out.v.data() + r * cap * ly.d);
      std::copy_n(ly.pos.data() + r * ly.cap, ly.held, out.pos.data() + r * cap);
    }
    out.held = ly.held;
    out.by_indicator = ly.by_indicator;
    return out;
  }

  CacheConfig cfg_;
  Pref pref_;
  Budget budget_;
  Ind ind_;
  Exec exec_;
  std::vector<Layer> layers_;
  std::vector<float> prefs_;
  std::vector<LayerStats> stats_;
  std::vector<index_t> budgets_;
  std::vector<std::vector<index_t>> stages_;
  std::vector<index_t> steps_;  // tokens decoded per layer
  index_t next_layer_ = 0;
  index_t prompt_ = -1;
  index_t peak_ = 0;
};

}  // namespace cake
