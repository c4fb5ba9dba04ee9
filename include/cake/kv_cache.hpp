// cake::KvCache: a per-layer KV cache managed by CAKE (or any composition of a
// preference, a budget and an indicator policy).
//
//   prefill(layer, q_window, keys, values)  layers 0..L-1 in order; with cascading
//                                           every layer seen so far is re-budgeted
//                                           and cut at once, so memory stays bounded
//   decode(layer, q, k, v)                  append one token; a layer holding more than
//                                           budget + w evicts its lowest-scored
//                                           candidate (head-wise: every row evicts one)
//   keys(l) / values(l) / positions(l)      what is held, (batch, kv_heads, held, ...)
//   row_lengths(l)                          tokens of each row (they differ only with
//                                           head-wise budgets: rows are then padded)
//   budget(l), tokens_held(l), bytes_held(l), bytes_allocated(l), preference(l),
//   stage_budgets()
//
// Paged (host and CUDA): a layer prefilled with paged_kv (an engine's K/V pools and
// block table, core/paged.hpp) keeps its tokens in those pools, in place:
//   prefill(layer, q_window, paged_kv)      the prompt read where the engine wrote it
//   decode(layer, q, k, v, table)           the table with room for the new token
//   table(l) / freed(l)                     the blocks held, and the tail released
//
// Every call validates its input first and leaves the cache unchanged when it throws.
// prefill is plan then commit: detail/prefill_plan.hpp decides budgets and per-layer
// actions on the host, everything the plan needs is allocated, then it is committed.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <span>
#include <vector>

#include "backend/host/layer_store.hpp"  // the host's primitives
#include "core/concepts.hpp"
#include "detail/layer_ops.hpp"  // the data movement, over the primitives
#include "detail/prefill_plan.hpp"
#include "policy/budget/headwise.hpp"
#include "policy/budget/proportional.hpp"
#include "policy/indicator/mean_variance.hpp"
#include "policy/preference/cake.hpp"

namespace cake {

// One layer's K and V in an engine's block pools (core/paged.hpp) and the block table
// of the cache's batch sequences (sequence s is batch entry s), for KvCache's paged
// prefill. The pools are in the cache's memory space (device_space for cake::cuda);
// the table is always the host copy the engine's block manager keeps: the cache
// checks it there and, on CUDA, uploads it itself.
template <class T, class Space = host_space>
struct paged_kv {
  view<T, 4, Space> k_pool;  // (num_blocks, kv_heads, block_size, head_dim), HND or NHD strides
  view<T, 4, Space> v_pool;  // the same extents, disjoint from k_pool
  block_table<host_space> table;
};

struct CacheConfig {
  index_t layers = 0;         // L
  index_t batch = 1;          // B
  index_t q_heads = 0;        // H
  index_t kv_heads = 0;       // Hkv
  index_t head_dim = 0;       // d
  index_t window = 32;        // w: the last w tokens, always kept
  index_t cache_size = 1024;  // C: average tokens per layer, window included
  bool cascade = true;        // cut layer by layer during prefill (the paper's point)
  token_order order = token_order::position;
  // A paged layer's held tokens in its sequences' blocks while decoding: in token order,
  // or in any order within the first slots (host; a step then moves at most one K/V row
  // per row, see slot_order and token_slots).
  slot_order paged_slots = slot_order::token;
  // Reject NaN/Inf in queries, keys and values: on the host one streaming pass; on
  // CUDA one kernel per tensor and one flag read per call (a stream sync per call:
  // engines that guarantee finite inputs turn it off).
  bool check_finite = true;

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
    CAKE_CHECK(paged_slots == slot_order::token || paged_slots == slot_order::any,
               "cake.config.paged_slots", "paged_slots must be slot_order::token or ::any, got ",
               static_cast<int>(paged_slots));
    return status::success();
  }
};

namespace detail {
// slot_order::any needs the backend's slot maps (the host's); CUDA keeps paged tokens
// in token order.
template <class T, class Exec>
void expect_paged_slots(const CacheConfig& c) {
  if constexpr (!requires { layer_store<T, Exec>::slot_map; })
    CAKE_EXPECTS(c.paged_slots == slot_order::token, "cake.config.paged_slots",
                 "paged_slots = slot_order::any needs a backend with slot maps (the host); "
                 "this one keeps paged tokens in token order: pass slot_order::token");
}
}  // namespace detail

template <PreferencePolicy Pref = CakePreference, BudgetPolicy Budget = ProportionalBudget,
          IndicatorPolicy Ind = MeanVarianceIndicator, class T = float, class Exec = host_policy>
class KvCache {
  // The data movement is detail/layer_ops.hpp, over the backend's primitives
  // (backend/host/layer_store.hpp, and the CUDA one in cake.cuh); this class keeps
  // the bookkeeping.
  using Store = detail::layer_store<T, Exec>;
  using Layer = detail::cache_layer<T, Exec>;
  using Space = typename Exec::memory_space;

 public:
  using value_type = T;
  using preference_policy = Pref;
  using budget_policy = Budget;
  using indicator_policy = Ind;

  explicit KvCache(CacheConfig config, Pref preference = {}, Budget budget = {}, Ind indicator = {},
                   Exec exec = {})
      : cfg_(config), pref_(preference), budget_(budget), ind_(indicator), exec_(res_.adopt(exec)) {
    cfg_.validate().throw_if_error();
    detail::expect_paged_slots<T, Exec>(cfg_);
    pref_.validate().throw_if_error();
    budget_.validate().throw_if_error();
    ind_.validate().throw_if_error();
    reset();
  }

  // Forget the prompt: back to the state before layer 0's prefill.
  void reset() {
    const auto L = static_cast<std::size_t>(cfg_.layers);
    layers_.clear();
    layers_.resize(L);  // layers may be move-only (device memory)
    prefs_.clear();
    prefs_.reserve(L);
    stats_.clear();
    stats_.reserve(L);
    budgets_.assign(L, 0);
    stages_.clear();
    stages_.reserve(L);
    steps_.assign(L, 0);
    tables_.clear();
    tables_.resize(L);
    next_layer_ = 0;
    prompt_ = -1;
    peak_ = 0;
  }

  // ---- prefill -------------------------------------------------------------

  // q_window: (batch, q_heads, window, head_dim)  last w queries, rotary applied
  // keys, values: (batch, kv_heads, S, head_dim)  the layer's whole prompt
  template <tensor_like Q, tensor_like K, tensor_like V>
  status validate_prefill(index_t layer, Q&& q_window, K&& keys, V&& values) const {
    return check_prefill(layer, as_view(q_window), as_view(keys), as_view(values));
  }

  template <tensor_like Q, tensor_like K, tensor_like V>
  void prefill(index_t layer, Q&& q_window, K&& keys, V&& values) {
    // Each adapter runs once: the views are checked and used as they are.
    const auto q = as_view(q_window);
    const auto k = as_view(keys);
    const auto v = as_view(values);
    check_prefill(layer, q, k, v).throw_if_error();
    check_value_type<decltype(k), decltype(v)>();
    run_prefill(layer, q, k, v, nullptr);
  }

  // Paged: the layer's prompt is in the engine's pools already, sequence s (batch
  // entry s) in the blocks kv.table names, with kv.table.seq_lens(s) = S for every s.
  // The cache scores it, keeps its selection in place (each (sequence, kv-head)
  // row's kept tokens packed into the leading slots of its blocks, shorter heads
  // padded with zero K/V up to the sequence's longest) and, with cascading,
  // re-budgets the earlier paged layers in their pools. After the call, table(l)
  // says what each layer holds and freed(l) which trailing entries of the table the
  // engine lent (or the cache held) name blocks it may free. The cache keeps the
  // pools' views and a copy of the table: the pools must stay valid (and unmoved)
  // until reset() or the cache's end; the engine's table arrays need not. A copy of
  // the cache refers to the same pools (use one of them). On CUDA the pools are
  // device memory (paged_kv<T, device_space>) and the table stays on the host: the
  // cache uploads its copy of each paged layer's table at every call that moves that
  // layer's tokens, stream-ordered before the kernels that read it.
  // validate_prefill(layer, q_window, kv): the paged prefill's checks (layer,
  // q_window, pools, table), without prefilling; the pools' contents are not read
  // (prefill checks them when check_finite is set).
  template <tensor_like Q>
  status validate_prefill(index_t layer, Q&& q_window, const paged_kv<T, Space>& kv) const {
    return check_prefill_paged(layer, as_view(q_window), kv);
  }

  template <tensor_like Q>
  void prefill(index_t layer, Q&& q_window, const paged_kv<T, Space>& kv) {
    const auto q = as_view(q_window);
    check_prefill_paged(layer, q, kv).throw_if_error();
    const index_t B = cfg_.batch, Hkv = cfg_.kv_heads, d = cfg_.head_dim, rows = B * Hkv;
    const index_t S = kv.table.seq_lens(0);
    const Exec ex = res_.bind(exec_);
    Layer lent;  // the pools and the cache's copy of the table, for the new layer
    lent.pool = pool_rows(kv);
    lent.table = copy_table(kv.table);
    table_buffer lent_table;  // CUDA: its device copy, the layer's once committed
    upload_table(ex, lent, lent_table);
    // On the host, window statistics read the prompt's keys in the pool, through the
    // table, and a position indicator reads none; other indicator sources (and CUDA)
    // score a dense copy of them (the values are not copied).
    constexpr bool in_place = std::is_same_v<Exec, host_policy> &&
                              (indicator_source_of<Ind> == indicator_source::window ||
                               indicator_source_of<Ind> == indicator_source::position);
    auto kbuf = Store::template make<T>(ex, in_place ? 0 : rows * S * d);
    const auto keys =
        make_view<Space>(static_cast<const T*>(Store::ptr(kbuf)),
                         std::array<index_t, 4>{B, Hkv, S, d});  // shape only if in_place
    if (!in_place)
      Store::move_slots(ex,
                        detail::slots<T>{Store::ptr(kbuf), nullptr, nullptr, nullptr, rows, S, d},
                        lent.at().kv_only(), nullptr, 0, nullptr, S, nullptr, S);
    if (cfg_.check_finite) {
      const float bound = detail::score_bound(d);
      Store::check_finite(ex, detail::named(q, "cake.prefill.q_window", "q_window", bound))
          .throw_if_error();
      check_pool_finite(ex, kv, bound).throw_if_error();
    }
    // A paged decode's spare table gets the room of the largest table lent, so that
    // decoding does not allocate while the sequences are no longer than their prompt.
    detail::paged_table& sp = spare_table_;
    sp.indptr.reserve(static_cast<std::size_t>(B + 1));
    sp.seq_lens.reserve(static_cast<std::size_t>(B));
    sp.freed.reserve(static_cast<std::size_t>(B));
    sp.ids.reserve(
        std::max(sp.ids.capacity(), lent.table.ids.size() + static_cast<std::size_t>(B)));
    const detail::paged_keys<T> pk{lent.at().paged, S};
    run_prefill(layer, q, keys, keys, &lent, in_place ? &pk : nullptr);
    tables_[static_cast<std::size_t>(layer)] = std::move(lent_table);  // noexcept
  }

 private:
  // The prefill of one layer, checked: k and v its prompt (lent: the new layer's
  // pools and table, v unused and k a dense copy of its keys for scoring, or their
  // shape only when paged_keys reads them in the pools).
  template <class QV, class KV, class VV>
  void run_prefill(index_t layer, const QV& q, const KV& k, const VV& v, Layer* lent,
                   const detail::paged_keys<T>* paged_keys = nullptr) {
    const index_t B = cfg_.batch, Hkv = cfg_.kv_heads, w = cfg_.window;
    const index_t rows = B * Hkv, S = k.extent(2), P = S - w;
    const auto m = static_cast<std::size_t>(layer);
    const Exec ex = res_.bind(exec_);  // with the cache's workspace
    // CUDA: the earlier paged layers' tables, as they are now, for the kernels that
    // may cut them below (before anything changes; a failure leaves a copy that equals
    // the host's table).
    for (std::size_t l = 0; l < m; ++l)
      if (layers_[l].paged()) upload_table(ex, layers_[l], tables_[l]);

    // 1. Statistics, preference and token scores of this layer.
    const index_t ind_cols = accumulates ? S : P;
    auto ind = Store::template make<float>(ex, rows * ind_cols);  // (batch, kv_heads, ind_cols)
    const LayerStats stats =
        detail::score_prefill<T, Pref>(ex, ind_, q, k, Store::ptr(ind), ind_cols, paged_keys);
    // ld >= 1: a prompt of exactly the window has no scores (P = 0), and a view over
    // them still needs the positive strides layout_stride requires.
    const detail::token_scores scores{Store::ptr(ind), std::max<index_t>(ind_cols, 1), ind_cols};
    const double pref = pref_(stats);
    CAKE_EXPECTS(std::isfinite(pref) && pref >= 0, "cake.preference.value",
                 "the preference policy must return a finite value >= 0, got ", pref, " for layer ",
                 layer, " (entropy ", stats.entropy, ", variance ", stats.variance, ")");

    // 2. Plan: budgets and what happens to every layer (detail/prefill_plan.hpp).
    std::vector<float> prefs = prefs_;
    prefs.push_back(static_cast<float>(pref));
    std::vector<detail::layer_state> state(m);
    for (std::size_t l = 0; l < m; ++l)
      state[l] = {layers_[l].held, layers_[l].cut, layers_[l].by_indicator};
    const detail::prefill_request rq{layer,
                                     cfg_.layers,
                                     S,
                                     w,
                                     cfg_.cache_size,
                                     cfg_.total_budget(),
                                     cfg_.cascade,
                                     cfg_.order == token_order::position,
                                     accumulates};
    // Head-wise: the new layer's rows from its scores; a cut layer's from the scores it
    // keeps, each row limited to what it holds; an uncut (one-shot) layer's from all.
    const auto row_lengths = [&](index_t l, index_t budget) -> std::vector<index_t> {
      if constexpr (headwise) {  // avail: tokens scored per row (empty: all cols)
        const auto head_lengths = [&](detail::token_scores sc, std::span<const index_t> avail,
                                      index_t cols, index_t b) {
          return detail::head_lengths(ex, shape(), sc, avail, cols, b, budget_.head_floor(b));
        };
        if (static_cast<std::size_t>(l) == m) return head_lengths(scores, {}, P, budget);
        const Layer& ly = layers_[static_cast<std::size_t>(l)];
        if (!ly.cut) return head_lengths(detail::scores(ly), {}, P, budget);
        std::vector<index_t> avail(static_cast<std::size_t>(rows));
        for (index_t r = 0; r < rows; ++r) avail[static_cast<std::size_t>(r)] = ly.row_len(r) - w;
        return head_lengths(detail::scores(ly), avail, ly.held - w, budget);
      } else {
        return {};
      }
    };
    const detail::prefill_plan plan = detail::plan_prefill(budget_, rq, prefs, state, row_lengths);

    // 3. Allocate: the new layers, selected, copied or reordered (a truncated layer
    //    reordered to position order is gathered into a new one).
    const detail::LayerShape sh = shape();
    const bool paged_map = cfg_.paged_slots == slot_order::any;  // paged layers' slot maps
    std::vector<Layer> fresh(m + 1);
    std::vector<char> replaced(m + 1, 0);
    std::vector<detail::reorder_plan<T, Exec>> reorders(m + 1);
    std::vector<detail::kv_move<T, Exec>> moves(m + 1);  // paged layers' selections
    index_t most = 0;                                    // the longest reordered row
    bool with_scores = false;
    index_t transient = tokens_held();  // tokens stored while new layers exist beside old
    for (std::size_t l = 0; l <= m; ++l) {
      const detail::layer_plan& lp = plan.layers[l];
      if (lp.action == detail::layer_action::copy_all) {
        fresh[l] =
            detail::copy_all<T>(ex, sh, k, v, lp.keep_scores ? scores : detail::token_scores{},
                                lent == nullptr, paged_map);
        if (lent) attach(fresh[l], std::move(*lent));
        transient += fresh[l].total() / rows;
      } else if (lp.action == detail::layer_action::select) {
        // A paged layer's K/V move at the commit (moves[l]), in place in its pools.
        if (l == m) {
          detail::slots<T> src{};
          if (lent) src = lent->at().kv_only();
          fresh[l] =
              detail::select<T>(ex, sh, k, v, nullptr, 0, scores, P, prefixes(lp), lp.to_position,
                                lp.keep_scores, lent ? &src : nullptr, &moves[l], paged_map);
          if (lent) attach(fresh[l], std::move(*lent));
        } else {
          const Layer& src = layers_[l];
          const detail::slots<T> ss = src.at();
          fresh[l] =
              detail::select<T>(ex, sh, detail::keys(src, sh), detail::values(src, sh), ss.pos,
                                src.cap, detail::scores(src), P, prefixes(lp), lp.to_position,
                                lp.keep_scores, src.paged() ? &ss : nullptr, &moves[l], paged_map);
          if (src.paged()) {
            fresh[l].pool = src.pool;
            fresh[l].table = src.table;
          }
        }
        if (!moves[l].ascending) most = std::max(most, moves[l].n);
        transient += fresh[l].total() / rows;
      } else if (lp.action == detail::layer_action::truncate && lp.to_position) {
        reorders[l] = detail::plan_reorder(ex, layers_[l], sh, prefixes(lp));
        most = std::max(most, reorders[l].n);
        with_scores = with_scores || layers_[l].has_scores();
      }
      replaced[l] = fresh[l].rows > 0 || reorders[l].n > 0;
    }
    // One layer in flight for every reorder and every paged selection that permutes
    // (they run one after another).
    const Layer scratch =
        most > 0 ? detail::make_layer<T>(ex, rows, cfg_.head_dim, most, with_scores) : Layer{};
    transient += most;
    if (next_layer_ + 1 == cfg_.layers)  // decoding then allocates nothing while layers have room
      detail::reserve_decode(ex, ws_, sh, cfg_.q_heads, std::span<const Layer>(layers_),
                             std::span<const Layer>(fresh), plan.budgets, headwise,
                             cfg_.order == token_order::reference, accumulates);

    // The new bookkeeping, built before the first write so the commit only moves it
    // in: a copied cache's vectors have no spare capacity to push_back into.
    std::vector<LayerStats> stats_next;
    stats_next.reserve(static_cast<std::size_t>(cfg_.layers));
    stats_next = stats_;
    stats_next.push_back(stats);
    std::vector<std::vector<index_t>> stages_next;
    if (plan.record_stage) {
      stages_next.reserve(static_cast<std::size_t>(cfg_.layers));
      stages_next = stages_;
      stages_next.push_back(plan.budgets);
    }

    auto cut = detail::prepare_truncate(ex, std::span<const Layer>(layers_), sh,
                                        std::span<const detail::layer_plan>(plan.layers),
                                        std::span<const char>(replaced));

    // 4. Commit. Nothing allocates or throws on the host. On CUDA the truncation is
    //    one launch, which changes nothing when it fails; the reorders that follow it
    //    (the last stage, in position order) launch gathers, which fail only with an
    //    already broken context.
    detail::truncate(ex, std::span<Layer>(layers_), sh, cut);
    for (std::size_t l = 0; l <= m; ++l)
      if (fresh[l].rows > 0) layers_[l] = std::move(fresh[l]);
    for (std::size_t l = 0; l <= m; ++l)
      if (moves[l].n > 0) detail::commit_move(ex, layers_[l].at(), moves[l], scratch);
    for (std::size_t l = 0; l < m; ++l)
      if (reorders[l].n > 0) detail::commit_reorder(ex, layers_[l], sh, reorders[l], scratch);
    release_blocks(m + 1);

    prefs_ = std::move(prefs);
    stats_ = std::move(stats_next);
    if (plan.record_budgets) std::copy(plan.budgets.begin(), plan.budgets.end(), budgets_.begin());
    if (plan.record_stage) stages_ = std::move(stages_next);
    prompt_ = S;
    next_layer_ = layer + 1;
    if (next_layer_ == cfg_.layers) {
      for (auto& ly : layers_) detail::finish_prefill(ly, accumulates);
      res_.after_prefill();
    }
    peak_ = std::max(peak_, transient);
  }

 public:
  // ---- decode --------------------------------------------------------------

  // q: (batch, q_heads, head_dim); k, v: (batch, kv_heads, head_dim), the new token.
  template <tensor_like Q, tensor_like K, tensor_like V>
  status validate_decode(index_t layer, Q&& q_new, K&& k_new, V&& v_new) const {
    return check_decode(layer, as_view(q_new), as_view(k_new), as_view(v_new));
  }
  // The paged decode's checks, the table's included, without decoding.
  template <tensor_like Q, tensor_like K, tensor_like V>
  status validate_decode(index_t layer, Q&& q_new, K&& k_new, V&& v_new,
                         const block_table<host_space>& table) const {
    CAKE_TRY(check_decode(layer, as_view(q_new), as_view(k_new), as_view(v_new), true));
    std::vector<std::pair<std::int32_t, index_t>> scratch;  // a const call: its own
    return check_decode_table(layers_[static_cast<std::size_t>(layer)], table, scratch);
  }

  // Appends the token to the layer; when the layer then holds more than its budget
  // plus the window (head-wise: in every row, always), the lowest-scored candidate
  // outside the window is evicted, so the layer holds at most budget + w tokens.
  template <tensor_like Q, tensor_like K, tensor_like V>
  void decode(index_t layer, Q&& q_new, K&& k_new, V&& v_new) {
    const auto q = as_view(q_new);
    const auto k = as_view(k_new);
    const auto v = as_view(v_new);
    check_decode(layer, q, k, v, false).throw_if_error();
    check_value_type<decltype(k), decltype(v)>();
    const auto l = static_cast<std::size_t>(layer);
    const Exec ex = res_.bind(exec_);
    // Rows cut head-wise keep their lengths; others grow to budget + w.
    detail::decode(ex, layers_[l], ws_, shape(), q, k, v, prompt_ + steps_[l], budgets_[l], ind_,
                   cfg_.order == token_order::reference, headwise && layers_[l].cut);
    ++steps_[l];
    release_blocks(static_cast<std::size_t>(next_layer_));
    peak_ = std::max(peak_, tokens_held());
  }

  // Paged: the layer was prefilled paged; `table` is its block table now: the blocks
  // table(layer) names, in order, with seq_lens as table(layer) has them, and room
  // for one more token per sequence (an engine appends a block where a sequence's
  // last is full). The new token goes into the pools, the eviction compacts in place,
  // and freed(layer) says which trailing entries of `table` the engine may free.
  template <tensor_like Q, tensor_like K, tensor_like V>
  void decode(index_t layer, Q&& q_new, K&& k_new, V&& v_new,
              const block_table<host_space>& table) {
    const auto q = as_view(q_new);
    const auto k = as_view(k_new);
    const auto v = as_view(v_new);
    check_decode(layer, q, k, v, true).throw_if_error();
    check_value_type<decltype(k), decltype(v)>();
    const auto l = static_cast<std::size_t>(layer);
    check_decode_table(layers_[l], table, id_scratch_).throw_if_error();
    const Exec ex = res_.bind(exec_);
    // The lent table into the spare one (no allocation once the spare has grown), then
    // swapped in; the held one becomes the spare.
    copy_table(table, spare_table_);
    std::swap(layers_[l].table, spare_table_);  // the lent table: room for the new token
    try {
      upload_table(ex, layers_[l], tables_[l]);  // CUDA: the kernels read the lent table
      detail::decode(ex, layers_[l], ws_, shape(), q, k, v, prompt_ + steps_[l], budgets_[l], ind_,
                     cfg_.order == token_order::reference, headwise && layers_[l].cut);
    } catch (...) {
      std::swap(layers_[l].table, spare_table_);  // as it was (a regrown layer copied the lent one)
      throw;
    }
    ++steps_[l];
    release_blocks(static_cast<std::size_t>(next_layer_));
    peak_ = std::max(peak_, tokens_held());
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
  // A layer not yet prefilled has budget 0, holds no tokens and empty views.
  // Recomputed budgets of layers 0..m after each cascade stage m.
  const std::vector<std::vector<index_t>>& stage_budgets() const noexcept { return stages_; }
  // Of a prefilled layer (the preference and statistics exist from its prefill on).
  double preference(index_t layer) const { return prefs_[prefilled(layer)]; }
  LayerStats stats(index_t layer) const { return stats_[prefilled(layer)]; }
  // Tokens held by each (batch, kv-head) row of a layer, the window included; with
  // head-wise allocation rows differ and this is their mean, rounded down (exact
  // when the heads of each batch entry fill the layer's budget, which they do unless
  // a cascade stage raised it), row_lengths() has each.
  index_t tokens_held(index_t layer) const {
    const auto& ly = layers_.at(checked(layer));
    return ly.total() / (cfg_.batch * cfg_.kv_heads);
  }
  index_t tokens_held() const noexcept {
    index_t s = 0;
    for (const auto& ly : layers_) s += ly.total() / (cfg_.batch * cfg_.kv_heads);
    return s;
  }
  // (batch * kv_heads) tokens held by each row of a layer, row-major. keys(l),
  // values(l) and positions(l) have the longest as their extent 2; a shorter row's
  // slots past its length are padding: position -1, zero keys and values.
  std::vector<index_t> row_lengths(index_t layer) const {
    const auto& ly = layers_.at(checked(layer));
    std::vector<index_t> out(static_cast<std::size_t>(cfg_.batch * cfg_.kv_heads));
    for (std::size_t r = 0; r < out.size(); ++r) out[r] = ly.row_len(static_cast<index_t>(r));
    return out;
  }
  // Largest tokens_held() seen at the end of any prefill or decode call.
  index_t peak_tokens_held() const noexcept { return peak_; }
  // Bytes of K and V held by a layer (all rows; padding not counted).
  std::size_t bytes_held(index_t layer) const {
    return 2 * static_cast<std::size_t>(layers_.at(checked(layer)).total() * cfg_.head_dim) *
           sizeof(T);
  }
  std::size_t bytes_held() const {
    std::size_t s = 0;
    for (index_t l = 0; l < cfg_.layers; ++l) s += bytes_held(l);
    return s;
  }
  // Bytes the cache allocated for a layer: K and V at the layer's capacity (room to grow
  // and padding included; none for a paged layer, whose K/V are the engine's), positions,
  // kept scores and, for a host layer with one, its slot map (detail::cache_layer::map).
  // The decoding workspace the layers share is not counted.
  std::size_t bytes_allocated(index_t layer) const {
    return detail::layer_bytes(layers_.at(checked(layer)));
  }
  std::size_t bytes_allocated() const {
    std::size_t s = 0;
    for (const auto& ly : layers_) s += detail::layer_bytes(ly);
    return s;
  }

  // (batch, kv_heads, tokens_held, head_dim), in the memory space of the backend. A
  // paged layer's K/V are in the engine's pools, where table(layer) says: these throw
  // cake::logic_error for it.
  // A decoded layer's K/V rows may be out of token order (its slot map,
  // detail::cache_layer::map): these put them back in place first (no allocation).
  // So, although const, the first keys(l) or values(l) after a decode of layer l
  // writes layer l's K/V: two threads calling them for the same layer of one cache at
  // once race, as does either with any other call that reads layer l's K/V (decode,
  // copying the cache). Once one of them has returned, layer l is in token order
  // until its next decode: later calls write nothing, and the views they returned
  // stay valid and unchanged until then. Other layers, positions(), row_lengths()
  // and the rest of the const calls never write.
  view<const T, 4, Space> keys(index_t layer) const {
    return detail::keys(settled(dense(layer, "keys")), shape());
  }
  view<const T, 4, Space> values(index_t layer) const {
    return detail::values(settled(dense(layer, "values")), shape());
  }

  // ---- paged layers ----------------------------------------------------------

  // Whether layer l was prefilled on an engine's pools.
  bool paged(index_t layer) const { return layers_.at(checked(layer)).paged(); }
  // Of a paged layer, after each call: the blocks it holds, sequence s's in
  // ids(indptr(s)) .. ids(indptr(s + 1) - 1), ceil(seq_lens(s) / block_size) of them;
  // seq_lens(s) is the longest of s's rows (row_lengths), shorter heads padded with
  // zero K/V. Views into the cache, valid until its next call.
  block_table<host_space> table(index_t layer) const { return paged_layer(layer).table.view(); }
  // (batch) how many trailing entries of each sequence's table the latest successful
  // call released from this layer: the tail of the table the engine lent it (decode)
  // or that table(layer) showed before the call. 0 for layers the call left alone;
  // the engine frees those blocks and drops them from its table, which then equals
  // table(layer).
  std::span<const std::int32_t> freed(index_t layer) const {
    return paged_layer(layer).table.freed;
  }
  // (batch, kv_heads, tokens_held): the prompt or decode position of every held token.
  view<const index_t, 3, Space> positions(index_t layer) const {
    return detail::positions(layers_.at(checked(layer)), shape());
  }
  // (batch, kv_heads, tokens_held) of a paged layer with paged_slots = slot_order::any:
  // the slot of every held token (in token order, as positions(layer)) in its sequence's
  // blocks; each row's are a permutation of 0 .. its length - 1 (the identity where the
  // rows differ in length, which decode in token order; head-wise rows of equal length
  // do not). A view into the cache, valid until its next call. Throws
  // cake::logic_error for another layer (token t is then in slot t).
  view<const index_t, 3, Space> token_slots(index_t layer) const {
    const Layer& ly = paged_layer(layer);
    if (Store::size(ly.map) == 0)
      throw logic_error("cake.paged.layer",
                        detail::concat("layer ", layer,
                                       " keeps its tokens in token order (paged_slots = "
                                       "slot_order::token): token t is in slot t"));
    const index_t c = std::max<index_t>(ly.cap, 1);
    return make_view<Space>(static_cast<const index_t*>(Store::ptr(ly.map)),
                            std::array<index_t, 3>{cfg_.batch, cfg_.kv_heads, ly.held},
                            std::array<index_t, 3>{cfg_.kv_heads * c, c, 1});
  }

 private:
  static constexpr bool accumulates = indicator_source_of<Ind> == indicator_source::accumulated;
  static constexpr bool headwise = is_headwise_budget<Budget>;
  static_assert(
      !requires { requires Budget::headwise; } || headwise,
      "cake::KvCache: a budget policy with headwise = true must model "
      "HeadwiseBudgetPolicy (a head_floor(budget) member)");

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
  std::size_t prefilled(index_t layer) const {
    const std::size_t l = checked(layer);
    if (layer >= next_layer_)
      throw logic_error("cake.layer",
                        detail::concat("layer ", layer, " is not prefilled yet (", next_layer_,
                                       " of ", cfg_.layers, " layers are)"));
    return l;
  }

  // What every prefill checks first, dense or paged: the layer's turn and q_window.
  template <class QV>
  status check_prefill_layer(index_t layer, const QV& q) const {
    CAKE_CHECK_STATE(next_layer_ < cfg_.layers, "cake.prefill.layer", "all ", cfg_.layers,
                     " layers are already prefilled; call reset() before a new prompt");
    CAKE_CHECK_STATE(layer == next_layer_, "cake.prefill.layer",
                     "layers must be prefilled in order: expected layer ", next_layer_, ", got ",
                     layer);
    const index_t B = cfg_.batch, H = cfg_.q_heads, d = cfg_.head_dim, w = cfg_.window;
    CAKE_CHECK(q.extent(0) == B && q.extent(1) == H && q.extent(2) == w && q.extent(3) == d,
               "cake.prefill.q_window", "q_window must be (batch, q_heads, window, head_dim) = (",
               B, ", ", H, ", ", w, ", ", d, "), got ", detail::shape_string(q));
    return status::success();
  }
  template <class QV, class KV, class VV>
  status check_prefill(index_t layer, const QV& q, const KV& k, const VV& v) const {
    static_assert(QV::rank() == 4 && KV::rank() == 4 && VV::rank() == 4,
                  "cake::KvCache::prefill: q_window, keys and values are rank 4: "
                  "(batch, heads, tokens, head_dim)");
    require_space<Exec, QV, KV, VV>();
    CAKE_TRY(check_prefill_layer(layer, q));
    const index_t B = cfg_.batch, Hkv = cfg_.kv_heads, d = cfg_.head_dim, w = cfg_.window;
    const index_t S = k.extent(2);
    CAKE_CHECK(k.extent(0) == B && k.extent(1) == Hkv && k.extent(3) == d, "cake.prefill.keys",
               "keys must be (batch, kv_heads, S, head_dim) = (", B, ", ", Hkv, ", S, ", d,
               "), got ", detail::shape_string(k));
    CAKE_CHECK(prompt_ < 0 || S == prompt_, "cake.prefill.keys",
               "every layer must have the prompt length of layer 0, S = ", prompt_, ", got ", S);
    CAKE_CHECK(S >= w, "cake.prefill.keys", "the prompt must hold at least window = ", w,
               " tokens, got S = ", S);
    CAKE_CHECK(v.extent(0) == B && v.extent(1) == Hkv && v.extent(2) == S && v.extent(3) == d,
               "cake.prefill.values", "values must have the shape of keys (", B, ", ", Hkv, ", ", S,
               ", ", d, "), got ", detail::shape_string(v));
    CAKE_CHECK(inner_contiguous(q), "cake.prefill.q_window",
               "q_window must have unit stride along head_dim, got ", q.stride(3));
    CAKE_CHECK(inner_contiguous(k), "cake.prefill.keys",
               "keys must have unit stride along head_dim, got ", k.stride(3));
    CAKE_CHECK(inner_contiguous(v), "cake.prefill.values",
               "values must have unit stride along head_dim, got ", v.stride(3));
    // Queries and keys also bounded so that attention scores fit in float
    // (detail::score_bound); values only finite.
    const float bound = detail::score_bound(cfg_.head_dim);
    if (cfg_.check_finite)
      return Store::check_finite(exec_,
                                 detail::named(q, "cake.prefill.q_window", "q_window", bound),
                                 detail::named(k, "cake.prefill.keys", "keys", bound),
                                 detail::named(v, "cake.prefill.values", "values"));
    return status::success();
  }

  template <class QV, class KV, class VV>
  status check_decode(index_t layer, const QV& q, const KV& k, const VV& v,
                      bool with_table = false) const {
    static_assert(QV::rank() == 3 && KV::rank() == 3 && VV::rank() == 3,
                  "cake::KvCache::decode: q, k and v are rank 3: (batch, heads, head_dim)");
    require_space<Exec, QV, KV, VV>();
    CAKE_CHECK_STATE(next_layer_ == cfg_.layers, "cake.decode.state",
                     "decode needs every layer prefilled first; ", next_layer_, " of ", cfg_.layers,
                     " layers are");
    CAKE_CHECK(layer >= 0 && layer < cfg_.layers, "cake.decode.layer", "layer must be in [0, ",
               cfg_.layers, "), got ", layer);
    const bool is_paged = layers_[static_cast<std::size_t>(layer)].paged();
    CAKE_CHECK(
        is_paged == with_table, "cake.decode.table", "layer ", layer, " was prefilled ",
        is_paged ? "on an engine's pools: pass its block table" : "dense: it takes no block table");
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
    // Queries and keys also bounded so that attention scores fit in float
    // (detail::score_bound); values only finite.
    const float bound = detail::score_bound(cfg_.head_dim);
    if (cfg_.check_finite)
      return Store::check_finite(exec_, detail::named(q, "cake.decode.q", "q", bound),
                                 detail::named(k, "cake.decode.k", "k", bound),
                                 detail::named(v, "cake.decode.v", "v"));
    return status::success();
  }

  // ---- paged storage ---------------------------------------------------------

  const Layer& dense(index_t layer, const char* what) const {
    const Layer& ly = layers_.at(checked(layer));
    if (ly.paged())
      throw logic_error(
          "cake.paged.layer",
          detail::concat("layer ", layer, " is paged: its ", what,
                         " are in the engine's pools, where table(", layer, ") says"));
    return ly;
  }
  // The layer with its K/V in token order. The layers live in the vector's heap
  // memory, never a const object, so reordering them from a const call is defined.
  const Layer& settled(const Layer& ly) const {
    if constexpr (requires { Store::slot_map; }) detail::settle(const_cast<Layer&>(ly));
    return ly;
  }
  const Layer& paged_layer(index_t layer) const {
    const Layer& ly = layers_.at(checked(layer));
    if (!ly.paged())
      throw logic_error("cake.paged.layer", detail::concat("layer ", layer, " is not paged"));
    return ly;
  }

  static detail::paged_rows<T> pool_rows(const paged_kv<T, Space>& kv) {
    const auto& k = kv.k_pool;
    const auto& v = kv.v_pool;
    detail::paged_rows<T> p;
    p.k = k.data_handle();
    p.v = v.data_handle();
    p.k_block = static_cast<index_t>(k.stride(0));
    p.k_head = static_cast<index_t>(k.stride(1));
    p.k_slot = static_cast<index_t>(k.stride(2));
    p.v_block = static_cast<index_t>(v.stride(0));
    p.v_head = static_cast<index_t>(v.stride(1));
    p.v_slot = static_cast<index_t>(v.stride(2));
    p.set_block_size(k.extent(2));
    p.kv_heads = k.extent(1);
    p.num_blocks = k.extent(0);
    return p;
  }
  static detail::paged_table copy_table(const block_table<host_space>& t) {
    detail::paged_table c;
    copy_table(t, c);
    return c;
  }
  // Into c's vectors: no allocation where they have the capacity.
  static void copy_table(const block_table<host_space>& t, detail::paged_table& c) {
    const index_t n = t.num_seqs();
    c.indptr.resize(static_cast<std::size_t>(n + 1));
    c.seq_lens.resize(static_cast<std::size_t>(n));
    c.freed.assign(static_cast<std::size_t>(n), 0);
    for (index_t s = 0; s <= n; ++s) c.indptr[static_cast<std::size_t>(s)] = t.indptr(s);
    for (index_t s = 0; s < n; ++s) c.seq_lens[static_cast<std::size_t>(s)] = t.seq_lens(s);
    c.ids.resize(static_cast<std::size_t>(t.indptr(n)));
    for (index_t e = 0; e < t.indptr(n); ++e) c.ids[static_cast<std::size_t>(e)] = t.ids(e);
  }
  // The device copy of a paged layer's block table (CUDA), for its kernels: indptr
  // (batch + 1) then ids, uploaded from ly.table; ly.pool.indptr / ids point into it,
  // and cache_layer::at hands them to the kernels. The host's kernels read ly.table
  // itself (pool.indptr stays null). Grows dst when the table outgrew it (a decode's
  // lent table); tables only shrink otherwise, so a prefill's refresh allocates
  // nothing.
  using table_buffer = typename Store::template buffer<std::int32_t>;
  static constexpr bool device_tables = !std::is_same_v<Exec, host_policy>;
  static void upload_table([[maybe_unused]] const Exec& ex, [[maybe_unused]] Layer& ly,
                           [[maybe_unused]] table_buffer& dst) {
    if constexpr (device_tables) {
      const detail::paged_table& t = ly.table;
      const auto ni = static_cast<index_t>(t.indptr.size());
      const auto ne = static_cast<index_t>(t.ids.size());
      if (Store::size(dst) < ni + ne) dst = Store::template make<std::int32_t>(ex, ni + ne);
      Store::upload(ex, t.indptr.data(), Store::ptr(dst), ni);
      Store::upload(ex, t.ids.data(), Store::ptr(dst) + ni, ne);
      ly.pool.indptr = Store::ptr(dst);
      ly.pool.ids = Store::ptr(dst) + ni;
    }
  }
  // The new layer takes the pools and table lent to its prefill.
  static void attach(Layer& ly, Layer&& lent) {
    ly.pool = lent.pool;
    ly.table = std::move(lent.table);
  }
  // After a commit, every paged layer of the first n releases the blocks it no longer
  // needs (freed); the others' freed become 0.
  void release_blocks(std::size_t n) noexcept {
    for (std::size_t l = 0; l < n && l < layers_.size(); ++l)
      if (layers_[l].paged()) detail::release_blocks(layers_[l], cfg_.kv_heads);
  }

  // The pools and table of a paged prefill, before anything is read from them.
  template <class QV>
  status check_prefill_paged(index_t layer, const QV& q, const paged_kv<T, Space>& kv) const {
    static_assert(QV::rank() == 4,
                  "cake::KvCache::prefill: q_window is rank 4: "
                  "(batch, q_heads, window, head_dim)");
    require_space<Exec, QV, decltype(kv.k_pool), decltype(kv.v_pool)>();
    CAKE_TRY(check_prefill_layer(layer, q));
    const index_t B = cfg_.batch, Hkv = cfg_.kv_heads, d = cfg_.head_dim, w = cfg_.window;
    CAKE_CHECK(inner_contiguous(q), "cake.prefill.q_window",
               "q_window must have unit stride along head_dim, got ", q.stride(3));
    const auto& kp = kv.k_pool;
    CAKE_CHECK(kp.extent(1) == Hkv && kp.extent(2) >= 1 && kp.extent(3) == d, "cake.prefill.k_pool",
               "k_pool must be (num_blocks, kv_heads = ", Hkv, ", block_size >= 1, head_dim = ", d,
               "), got ", detail::shape_string(kp));
    CAKE_CHECK(inner_contiguous(kp), "cake.prefill.k_pool",
               "k_pool must have unit stride along head_dim, got ", kp.stride(3));
    CAKE_TRY(detail::check_kv_pools(kp, kv.v_pool));
    const index_t n = kv.table.num_seqs();
    CAKE_CHECK(n == B, "cake.prefill.table",
               "the block table must have one sequence per batch entry, batch = ", B, ", got ", n);
    CAKE_TRY(validate_block_table(kv.table, kp.extent(0), kp.extent(2)));
    const index_t S = kv.table.seq_lens(0);
    for (index_t s = 0; s < n; ++s)
      CAKE_CHECK(kv.table.seq_lens(s) == S, "cake.prefill.table",
                 "every sequence holds the prompt: seq_lens(", s, ") must be seq_lens(0) = ", S,
                 ", got ", kv.table.seq_lens(s));
    CAKE_CHECK(prompt_ < 0 || S == prompt_, "cake.prefill.table",
               "every layer must have the prompt length of layer 0, S = ", prompt_,
               ", got seq_lens = ", S);
    CAKE_CHECK(S >= w, "cake.prefill.table", "the prompt must hold at least window = ", w,
               " tokens, got seq_lens = ", S);
    return status::success();
  }
  // The prompt's keys (within key_bound) and values in the pools are finite: block by
  // block, each a (kv_heads, tokens, head_dim) view (CUDA: one flag read per block).
  status check_pool_finite(const Exec& ex, const paged_kv<T, Space>& kv, float key_bound) const {
    const auto block = [&](const auto& pool, index_t s, index_t t) {
      const index_t bs = pool.extent(2), id = kv.table.ids(kv.table.indptr(s) + t / bs);
      return make_view<Space>(
          static_cast<const T*>(pool.data_handle() + id * static_cast<index_t>(pool.stride(0))),
          std::array<index_t, 3>{pool.extent(1), std::min(bs, kv.table.seq_lens(s) - t),
                                 pool.extent(3)},
          std::array<index_t, 3>{static_cast<index_t>(pool.stride(1)),
                                 static_cast<index_t>(pool.stride(2)), 1});
    };
    const index_t bs = kv.k_pool.extent(2);
    for (index_t s = 0; s < kv.table.num_seqs(); ++s)
      for (index_t t = 0; t < kv.table.seq_lens(s); t += bs) {
        CAKE_TRY(
            Store::check_finite(ex, detail::named(block(kv.k_pool, s, t), "cake.prefill.k_pool",
                                                  "k_pool (head, slot, x of a block)", key_bound)));
        CAKE_TRY(
            Store::check_finite(ex, detail::named(block(kv.v_pool, s, t), "cake.prefill.v_pool",
                                                  "v_pool (head, slot, x of a block)")));
      }
    return status::success();
  }
  // A paged decode's table: the blocks the layer holds first, its lengths, and room
  // for the new token.
  status check_decode_table(const Layer& ly, const block_table<host_space>& t,
                            std::vector<std::pair<std::int32_t, index_t>>& id_scratch) const {
    const index_t B = cfg_.batch, bs = ly.pool.block_size;
    CAKE_CHECK(t.num_seqs() == B, "cake.decode.table",
               "the block table must have one sequence per batch entry, batch = ", B, ", got ",
               t.num_seqs());
    CAKE_TRY(validate_block_table(t, ly.pool.num_blocks, bs, id_scratch));
    const detail::paged_table& held = ly.table;
    for (index_t s = 0; s < B; ++s) {
      const auto su = static_cast<std::size_t>(s);
      const index_t len = held.seq_lens[su], have = t.indptr(s + 1) - t.indptr(s);
      CAKE_CHECK(t.seq_lens(s) == len, "cake.decode.table", "seq_lens(", s,
                 ") must be the tokens the cache holds for sequence ", s, ", ", len, ", got ",
                 t.seq_lens(s));
      const index_t need = (len + 1 + bs - 1) / bs;
      CAKE_CHECK(have >= need, "cake.decode.table", "the block table of sequence ", s,
                 " is too short for the new token: ", len + 1, " tokens need ", need, " blocks of ",
                 bs, ", got ", have);
      for (std::int32_t e = 0; e < held.indptr[su + 1] - held.indptr[su]; ++e) {
        const std::int32_t want = held.ids[static_cast<std::size_t>(held.indptr[su] + e)];
        CAKE_CHECK(t.ids(t.indptr(s) + e) == want, "cake.decode.table", "ids(", t.indptr(s) + e,
                   ") must be block ", want, ", which holds tokens of sequence ", s,
                   " (table(layer) lists them first), got ", t.ids(t.indptr(s) + e));
      }
    }
    return status::success();
  }

  // The prefix tokens every row keeps in a layer's plan: rows are the general case.
  std::vector<index_t> prefixes(const detail::layer_plan& lp) const {
    if (!lp.row_prefix.empty()) return lp.row_prefix;
    return std::vector<index_t>(static_cast<std::size_t>(cfg_.batch * cfg_.kv_heads), lp.prefix);
  }
  detail::LayerShape shape() const {
    return {cfg_.batch, cfg_.kv_heads, cfg_.head_dim, cfg_.window};
  }

  CacheConfig cfg_;
  Pref pref_;
  Budget budget_;
  Ind ind_;
  // Before exec_ (which may name its memory pool) and before the layers (allocated
  // from it, so freed first).
  typename Store::resources res_;
  Exec exec_;
  std::vector<Layer> layers_;
  detail::decode_workspace<T, Exec> ws_;  // a decoding step's scratch, shared by the layers
  detail::paged_table spare_table_;       // a paged decode's lent table, reused
  std::vector<std::pair<std::int32_t, index_t>> id_scratch_;  // its duplicate check
  std::vector<float> prefs_;
  std::vector<LayerStats> stats_;
  std::vector<index_t> budgets_;
  std::vector<std::vector<index_t>> stages_;
  std::vector<index_t> steps_;        // tokens decoded per layer
  std::vector<table_buffer> tables_;  // (layers) CUDA: each paged layer's table on the device
  index_t next_layer_ = 0;
  index_t prompt_ = -1;
  index_t peak_ = 0;
};

}  // namespace cake
