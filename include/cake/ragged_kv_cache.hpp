// cake::RaggedKvCache: many sequences of different lengths in one call, as engines
// with continuous batching serve them, each managed as if it were alone.
//
//   add(id, seq) / remove(id)            sequences join and leave at any time
//   prefill(layer, ids, q_window, keys, values, cu_seqlens)
//                                        a layer's whole prompt for each sequence
//                                        named, keys and values packed as
//                                        FlashAttention's varlen API takes them
//   prefill_chunk(layer, ids, q, keys, values, cu_seqlens)
//                                        a chunk of each named prompt (chunked prefill)
//   decode(layer, ids, q, k, v)          one token for each sequence named
//   sequence(id)                         the sequence's KvCache: budgets, stages,
//                                        tokens held, positions, keys, values
//
// Paged (host): the K/V stay in the engine's block pools, one K and one V pool per
// layer shared by every sequence, each sequence's blocks named by its entries of a
// block table in FlashInfer's form (core/paged.hpp), one table per call:
//   prefill(layer, ids, q_window, paged_kv)          the prompts, already in the pools
//   prefill_chunk(layer, ids, q, paged_kv, cu_seqlens)
//                                        a chunk of each prompt, written by the engine
//   decode(layer, ids, q, k, v, table)   the tables with room for the new tokens
//   table(id, l) / freed(id, l)          what the sequence holds, and the tail released
//
// Each sequence is a KvCache of batch 1 with its own cache size, preference,
// budgets, cascade stages and decode state, so a ragged batch equals running every
// sequence alone, token for token. KvCache itself keeps the reference's batch
// semantics (one prompt length and one budget for a dense batch) for the golden cases.
//
// Inputs are read where they are: each sequence's part of a packed tensor is a
// strided view into it, and on paged storage its part of the pools. Dense chunked
// prefill is the exception: a layer's chunks are staged until its prompt is complete
// (exact), or gathered with what the layer holds (bounded); see prefill_chunk.
//
// Every call validates all of its input and every sequence it names before any
// sequence changes: bad input throws cake::error (naming the argument, the expected
// and the actual value) and leaves every sequence, and the pools, as they were. What
// can fail after validation is only what can fail inside KvCache::prefill/decode once
// its input is valid (out of memory, a preference policy returning a non-finite
// value): that sequence is unchanged, and the error of the first such sequence in
// `ids` is thrown once every sequence of the call has run; run one after another, the
// sequences after it have not taken the call.
//
// Sequences run in parallel on the host (OpenMP, detail/parallel.hpp) when a call
// names more than one, the policy lends no workspace (host_policy::workspace, which
// serves one call at a time) and the call's work (about q_heads * head_dim * window
// multiply-adds per prompt token, q_heads * head_dim per held token when decoding)
// reaches host_policy::min_parallel_work; else one after another, in the order of
// `ids`. The sequences share nothing but the pools, where each writes only its own
// blocks (checked), so the results are the same bit for bit either way.
#pragma once

#include <algorithm>
#include <cstdint>
#include <exception>
#include <map>
#include <memory>
#include <span>
#include <type_traits>
#include <vector>

#include "detail/parallel.hpp"
#include "kv_cache.hpp"
#include "policy/budget/uniform.hpp"
#include "policy/preference/uniform.hpp"

namespace cake {

using sequence_id = std::int64_t;

// When a prompt given in chunks is evicted (RaggedKvCache::prefill_chunk).
enum class chunk_eviction {
  exact,    // after the last chunk only: equal to prefill of the whole prompt
  bounded,  // also between chunks, each layer alone, to cache_size tokens (host only)
};

// What a sequence may set differently from the batch it joins.
struct SequenceConfig {
  index_t cache_size = 0;     // C of this sequence; 0: the batch's CacheConfig::cache_size
  index_t prompt_length = 0;  // S: needed by prefill_chunk (it tells the last chunk); 0: unknown
  chunk_eviction chunking = chunk_eviction::exact;
};

namespace detail {

// Rows [begin, begin + n) of a packed (tokens, heads, head_dim) tensor, seen as
// (1, heads, n, head_dim): no copy, the strides of the packed tensor.
template <class V>
auto packed_rows(const V& x, index_t begin, index_t n) {
  const index_t st = x.stride(0), sh = x.stride(1), sd = x.stride(2);
  const index_t h = x.extent(1), d = x.extent(2);
  // Extent 1 along the new leading dimension: any stride past the slice will do.
  const index_t outer = std::max({index_t{1}, st * std::max<index_t>(n, 1),
                                  sh * std::max<index_t>(h, 1), sd * std::max<index_t>(d, 1)});
  return make_view<memory_space_of<V>>(x.data_handle() + begin * st,
                                       std::array<index_t, 4>{1, h, n, d},
                                       std::array<index_t, 4>{outer, sh, st, sd});
}

// Entry i of a (num_seqs, ...) tensor as a batch of one, (1, ...).
template <class V>
auto batch_entry(const V& x, index_t i) {
  constexpr std::size_t R = V::rank();
  std::array<index_t, R> ext{}, str{};
  for (std::size_t r = 0; r < R; ++r) {
    ext[r] = static_cast<index_t>(x.extent(r));
    str[r] = static_cast<index_t>(x.stride(r));
  }
  ext[0] = 1;
  return make_view<memory_space_of<V>>(x.data_handle() + i * str[0], ext, str);
}

}  // namespace detail

template <PreferencePolicy Pref = CakePreference, BudgetPolicy Budget = ProportionalBudget,
          IndicatorPolicy Ind = MeanVarianceIndicator, class T = float, class Exec = host_policy>
class RaggedKvCache {
  using Store = detail::layer_store<T, Exec>;
  using Space = typename Exec::memory_space;
  static constexpr bool on_host = std::is_same_v<Space, host_space>;
  // Bounded chunking's eviction between chunks: each layer alone, to cache_size.
  using chunk_cache = KvCache<UniformPreference, UniformBudget, Ind, T, Exec>;
  template <class U>
  using buffer = decltype(Store::template make<U>(std::declval<const Exec&>(), index_t{0}));

 public:
  using cache_type = KvCache<Pref, Budget, Ind, T, Exec>;
  using value_type = T;

  // config: the model (layers, q_heads, kv_heads, head_dim, window) and what every
  // sequence takes unless it says otherwise (cache_size, cascade, order,
  // check_finite); its batch must be 1, each sequence being a batch of one.
  explicit RaggedKvCache(CacheConfig config, Pref preference = {}, Budget budget = {},
                         Ind indicator = {}, Exec exec = {})
      : cfg_(config), pref_(preference), budget_(budget), ind_(indicator), exec_(exec) {
    CAKE_EXPECTS(cfg_.batch == 1, "cake.ragged.config.batch",
                 "a ragged batch takes batch = 1 (each sequence is a batch of one), got ",
                 cfg_.batch);
    cfg_.validate().throw_if_error();
    detail::expect_paged_slots<T, Exec>(cfg_);  // here, not at the first add()
    pref_.validate().throw_if_error();
    budget_.validate().throw_if_error();
    ind_.validate().throw_if_error();
    pools_.resize(static_cast<std::size_t>(cfg_.layers));
  }

  // ---- sequences -----------------------------------------------------------

  // A new sequence, before its layer 0; with the batch's policies or its own.
  void add(sequence_id id, SequenceConfig seq = {}) { add(id, seq, pref_, budget_, ind_); }
  void add(sequence_id id, SequenceConfig seq, Pref preference, Budget budget, Ind indicator) {
    CAKE_EXPECTS(!seqs_.count(id), "cake.ragged.id", "sequence ", id, " is already in the batch");
    CAKE_EXPECTS(seq.cache_size >= 0, "cake.ragged.cache_size",
                 "cache_size must be >= 0 (0: the batch's), got ", seq.cache_size);
    CAKE_EXPECTS(seq.prompt_length == 0 || seq.prompt_length >= cfg_.window,
                 "cake.ragged.prompt_length",
                 "prompt_length must be 0 (unknown) or >= window = ", cfg_.window, ", got ",
                 seq.prompt_length);
    CAKE_EXPECTS(on_host || seq.chunking == chunk_eviction::exact, "cake.ragged.chunking",
                 "bounded chunking runs on the host; with this execution policy chunking must be "
                 "exact");
    CacheConfig c = cfg_;
    if (seq.cache_size > 0) c.cache_size = seq.cache_size;
    c.check_finite = false;  // the batch checks a call's packed tensors once, in one pass
    auto cache = std::make_unique<cache_type>(c, preference, budget, indicator, exec_);
    Sequence s{std::move(cache), seq.prompt_length, seq.chunking, indicator, {}, {}};
    seqs_.emplace(id, std::move(s));
  }
  void remove(sequence_id id) { seqs_.erase(find(id)); }
  bool contains(sequence_id id) const { return seqs_.count(id) > 0; }
  index_t size() const noexcept { return static_cast<index_t>(seqs_.size()); }
  // The sequences in the batch, ascending.
  std::vector<sequence_id> ids() const {
    std::vector<sequence_id> out;
    for (const auto& [id, s] : seqs_) out.push_back(id);
    return out;
  }

  // ---- prefill -------------------------------------------------------------

  // ids: the sequences of this call, num_seqs of them, in the order of the tensors.
  // q_window:     (num_seqs, q_heads, window, head_dim)  each sequence's last w queries
  // keys, values: (total_tokens, kv_heads, head_dim)     every prompt, packed
  // cu_seqlens:   (num_seqs + 1) int32 on the host: sequence i is tokens
  //               [cu_seqlens[i], cu_seqlens[i + 1]) (FlashAttention's varlen offsets)
  template <tensor_like Q, tensor_like K, tensor_like V>
  status validate_prefill(index_t layer, std::span<const sequence_id> ids, Q&& q_window, K&& keys,
                          V&& values, std::span<const std::int32_t> cu_seqlens) const {
    return check_prefill(layer, ids, as_view(q_window), as_view(keys), as_view(values), cu_seqlens);
  }

  template <tensor_like Q, tensor_like K, tensor_like V>
  void prefill(index_t layer, std::span<const sequence_id> ids, Q&& q_window, K&& keys, V&& values,
               std::span<const std::int32_t> cu_seqlens) {
    const auto q = as_view(q_window);
    const auto k = as_view(keys);
    const auto v = as_view(values);
    check_prefill(layer, ids, q, k, v, cu_seqlens).throw_if_error();
    const std::vector<Sequence*> seq = sequences(ids);
    each_sequence(ids.size(), prefill_work(cu_seqlens.back()), [&](std::size_t i) {
      const index_t b = cu_seqlens[i], S = cu_seqlens[i + 1] - b, ii = static_cast<index_t>(i);
      seq[i]->cache->prefill(layer, detail::batch_entry(q, ii), detail::packed_rows(k, b, S),
                             detail::packed_rows(v, b, S));
    });
  }

  // Paged (host): every named sequence's prompt is in the layer's pools already.
  // q_window: (num_seqs, q_heads, window, head_dim)  each sequence's last w queries
  // kv.k_pool, kv.v_pool: (num_blocks, kv_heads, block_size, head_dim) the layer's
  //               pools, shared by every sequence (core/paged.hpp); the layer's first
  //               paged call fixes them: later calls of the layer pass the same
  // kv.table:     num_seqs sequences in the order of ids: sequence i's prompt is
  //               seq_lens(i) tokens in the blocks its entries name
  // No block may be named twice in the table, nor be one that another sequence of
  // the batch holds (or fills by chunks) in the same pools. After the call table(id,
  // layer) says what each sequence keeps and freed(id, layer) how many trailing entries
  // of its part of kv.table it released (its earlier layers too, when a cascade cut
  // them); the pools must stay valid and unmoved while a sequence holds a paged layer.
  template <tensor_like Q>
  status validate_prefill(index_t layer, std::span<const sequence_id> ids, Q&& q_window,
                          const paged_kv<T>& kv) const {
    std::vector<TablePart> parts;
    std::vector<std::pair<std::int32_t, index_t>> by_id;
    return check_prefill_paged(layer, ids, as_view(q_window), kv, parts, by_id);
  }

  template <tensor_like Q>
  void prefill(index_t layer, std::span<const sequence_id> ids, Q&& q_window,
               const paged_kv<T>& kv) {
    static_assert(std::is_same_v<Exec, host_policy>,
                  "cake::RaggedKvCache: paged storage is implemented on the host backend only");
    const auto q = as_view(q_window);
    check_prefill_paged(layer, ids, q, kv, parts_, by_id_).throw_if_error();
    const std::vector<Sequence*> seq = sequences(ids);
    index_t tokens = 0;
    for (const TablePart& p : parts_) tokens += p.len;
    on_pools(layer, seq, kv, [&] {
      each_sequence(ids.size(), prefill_work(tokens), [&](std::size_t i) {
        seq[i]->cache->prefill(layer, detail::batch_entry(q, static_cast<index_t>(i)),
                               paged_kv<T>{kv.k_pool, kv.v_pool, parts_[i].view()});
      });
    });
  }

  // ---- chunked prefill -----------------------------------------------------

  // A chunk of each named sequence's prompt for one layer; the engine gives chunk c
  // to layers 0..L-1 before chunk c + 1, the same tokens to every layer. Each
  // sequence needs SequenceConfig::prompt_length, which tells its last chunk.
  // q:            (total_tokens, q_heads, head_dim)  the chunks' queries, packed
  // keys, values: (total_tokens, kv_heads, head_dim) the chunks' tokens, packed
  // cu_seqlens:   (num_seqs + 1) int32 on the host, as prefill's; chunks may differ
  //               in length between sequences, each holds at least one token.
  // Equal to prefill of the whole prompt: the layer is evicted when its last chunk
  // comes (so the last w queries may come from several chunks). Until then the
  // layer's chunks are staged in the cache's memory space: per sequence and layer,
  // keys and values of the whole prompt, 2 * kv_heads * S * head_dim values of T,
  // and the last w queries, q_heads * w * head_dim values of T; a layer's staging is
  // freed when its last chunk has been prefilled. Over the whole model that is the
  // prompt's full K/V (all layers) at the last chunk of layer 0: chunking bounds
  // the engine's activations, not the cache.
  //
  // SequenceConfig::chunking = chunk_eviction::bounded bounds it instead (host
  // only). After each chunk but the last, every layer on its own takes what it
  // holds plus the chunk (the candidates, in position order) as a prompt and, when
  // they are more than cache_size + w (KvCache keeps a prompt of up to C + w whole),
  // keeps cache_size of them: the last w, and the rest by the sequence's indicator
  // from the last w queries (the chunk's, and earlier chunks' when it is shorter
  // than w) with the uniform budget cache_size - w (no preference, no cascade). The
  // last chunk then goes through the sequence's own policies (preference, budgets,
  // cascade) over what each layer holds plus that chunk. Between chunks a layer
  // holds at most cache_size + w tokens of K and V, during a call at most
  // cache_size + w + chunk, instead of the whole prompt.
  // What changes versus the paper (and exact): a token evicted after an earlier
  // chunk is never reconsidered, and it was scored by that chunk's last w queries,
  // not the prompt's; the preferences and budgets of the last chunk see only the
  // survivors plus the last chunk, so a layer's budget is at most what it holds
  // then; an accumulating indicator (H2O) restarts its sums at every chunk.
  // positions(id, l) gives original prompt positions (the sequence's own cache
  // numbers the compressed prompt it was given, held tokens first).
  template <tensor_like Q, tensor_like K, tensor_like V>
  status validate_prefill_chunk(index_t layer, std::span<const sequence_id> ids, Q&& q, K&& keys,
                                V&& values, std::span<const std::int32_t> cu_seqlens) const {
    return check_chunk(layer, ids, as_view(q), as_view(keys), as_view(values), cu_seqlens);
  }

  template <tensor_like Q, tensor_like K, tensor_like V>
  void prefill_chunk(index_t layer, std::span<const sequence_id> ids, Q&& q_chunk, K&& keys,
                     V&& values, std::span<const std::int32_t> cu_seqlens) {
    const auto q = as_view(q_chunk);
    const auto k = as_view(keys);
    const auto v = as_view(values);
    check_chunk(layer, ids, q, k, v, cu_seqlens).throw_if_error();
    check_value_type<decltype(k), decltype(v)>();
    check_value_type<decltype(q), decltype(q)>();  // staged with them
    const auto l = static_cast<std::size_t>(layer);
    const index_t H = cfg_.q_heads, Hkv = cfg_.kv_heads, d = cfg_.head_dim, w = cfg_.window;
    const std::vector<Sequence*> seq = sequences(ids);
    first_chunk_undone(seq, [&] {
      // Allocate every staging buffer the call needs before the first write.
      for (Sequence* sp : seq) {
        Sequence& s = *sp;
        if (s.staged.empty()) s.staged.resize(static_cast<std::size_t>(cfg_.layers));
        if (s.mode == chunk_eviction::bounded && s.bounded.empty())
          s.bounded.resize(static_cast<std::size_t>(cfg_.layers));
        Staged& st = s.staged[l];
        if (s.mode == chunk_eviction::exact && st.received == 0 && Store::size(st.k) == 0) {
          Staged fresh;
          fresh.k = Store::template make<T>(exec_, Hkv * s.prompt * d);
          fresh.v = Store::template make<T>(exec_, Hkv * s.prompt * d);
          fresh.q = Store::template make<T>(exec_, H * w * d);
          st = std::move(fresh);
        }
      }
      each_sequence(ids.size(), chunk_work(ids, layer, cu_seqlens), [&](std::size_t i) {
        Sequence& s = *seq[i];
        Staged& st = s.staged[l];
        const index_t b = cu_seqlens[i], n = cu_seqlens[i + 1] - b, S = s.prompt, at = st.received;
        if constexpr (on_host) {
          if (s.mode == chunk_eviction::bounded) {
            bounded_chunk(s, layer, q, k, v, b, n);
            return;
          }
        }
        // keys, values: (kv_heads, S, head_dim) staged; q: (q_heads, w, head_dim), the
        // prompt's last w positions [S - w, S).
        for (index_t g = 0; g < Hkv; ++g) {
          Store::copy_2d(exec_, &k(b, g, 0), static_cast<index_t>(k.stride(0)),
                         Store::ptr(st.k) + (g * S + at) * d, d, n, d);
          Store::copy_2d(exec_, &v(b, g, 0), static_cast<index_t>(v.stride(0)),
                         Store::ptr(st.v) + (g * S + at) * d, d, n, d);
        }
        const index_t from = std::max(at, S - w), to = at + n;  // positions of window queries
        if (from < to)
          for (index_t h = 0; h < H; ++h)
            Store::copy_2d(exec_, &q(b + from - at, h, 0), static_cast<index_t>(q.stride(0)),
                           Store::ptr(st.q) + (h * w + from - (S - w)) * d, d, to - from, d);
        if (to < S) {
          st.received = to;
          return;
        }
        // The last chunk: the whole prompt of the layer is here.
        s.cache->prefill(layer, staged_queries(st), staged_prompt(st.k, S), staged_prompt(st.v, S));
        st = Staged{};
        st.received = S;  // done; its memory is freed
      });
    });
  }

  // Paged (host): the engine writes each chunk's K/V into the layer's pools itself;
  // nothing is staged but the last w queries. Exact: the layer is evicted in place at
  // its last chunk, equal to the paged prefill of the whole prompt. Bounded: after
  // each chunk but the last the layer evicts in place as dense bounded chunking does
  // (same choice, same positions), its kept tokens packed into the leading slots of
  // its blocks, and freed(id, layer) says how many trailing entries of the chunk's
  // table it released.
  // q:          (total_tokens, q_heads, head_dim) the chunks' queries, packed
  // cu_seqlens: (num_seqs + 1) int32 on the host: sequence i's chunk is q's tokens
  //             [cu_seqlens[i], cu_seqlens[i + 1])
  // kv:         the layer's pools (as prefill's) and a table of num_seqs sequences:
  //             seq_lens(i) = the tokens the layer holds (chunk_tokens_held; exact:
  //             the prompt so far) + the chunk's, which the engine wrote right after
  //             them, in blocks beginning with those that hold them (in order)
  // Between chunks the blocks are the engine's (exact) and table(id, layer) exists
  // from the layer's last chunk on; the blocks holding earlier chunks count as the
  // sequence's for the check that no block is named twice.
  template <tensor_like Q>
  status validate_prefill_chunk(index_t layer, std::span<const sequence_id> ids, Q&& q,
                                const paged_kv<T>& kv,
                                std::span<const std::int32_t> cu_seqlens) const {
    std::vector<TablePart> parts;
    std::vector<std::pair<std::int32_t, index_t>> by_id;
    return check_chunk_paged(layer, ids, as_view(q), kv, cu_seqlens, parts, by_id);
  }

  template <tensor_like Q>
  void prefill_chunk(index_t layer, std::span<const sequence_id> ids, Q&& q_chunk,
                     const paged_kv<T>& kv, std::span<const std::int32_t> cu_seqlens) {
    static_assert(std::is_same_v<Exec, host_policy>,
                  "cake::RaggedKvCache: paged storage is implemented on the host backend only");
    const auto q = as_view(q_chunk);
    check_chunk_paged(layer, ids, q, kv, cu_seqlens, parts_, by_id_).throw_if_error();
    check_value_type<decltype(q), decltype(q)>();  // its window is staged
    const auto l = static_cast<std::size_t>(layer);
    const index_t H = cfg_.q_heads, d = cfg_.head_dim, w = cfg_.window, bs = kv.k_pool.extent(2);
    const std::vector<Sequence*> seq = sequences(ids);
    first_chunk_undone(seq, [&] {
      // Allocate every buffer the call needs before the first write.
      for (std::size_t i = 0; i < ids.size(); ++i) {
        Sequence& s = *seq[i];
        if (s.staged.empty()) s.staged.resize(static_cast<std::size_t>(cfg_.layers));
        Staged& st = s.staged[l];
        if (st.received == 0 && Store::size(st.q) == 0) {
          Staged fresh;
          fresh.q = Store::template make<T>(exec_, H * w * d);
          fresh.paged = true;
          st = std::move(fresh);
        }
        st.lent.reserve(parts_[i].ids.size());
        if (s.mode == chunk_eviction::bounded && s.bounded.empty())
          s.bounded.resize(static_cast<std::size_t>(cfg_.layers));
      }
      on_pools(layer, seq, kv, [&] {
        each_sequence(ids.size(), chunk_work(ids, layer, cu_seqlens), [&](std::size_t i) {
          Sequence& s = *seq[i];
          Staged& st = s.staged[l];
          const index_t b = cu_seqlens[i], n = cu_seqlens[i + 1] - b, S = s.prompt,
                        at = st.received;
          if (s.mode == chunk_eviction::bounded) {
            bounded_chunk_paged(s, layer, q, kv, parts_[i], b, n);
            return;
          }
          const index_t from = std::max(at, S - w), to = at + n;  // positions of window queries
          if (from < to)
            for (index_t h = 0; h < H; ++h)
              Store::copy_2d(exec_, &q(b + from - at, h, 0), static_cast<index_t>(q.stride(0)),
                             Store::ptr(st.q) + (h * w + from - (S - w)) * d, d, to - from, d);
          if (to < S) {  // the blocks holding tokens so far (reserved: no allocation)
            const std::vector<std::int32_t>& ids_i = parts_[i].ids;
            st.lent.assign(ids_i.begin(), ids_i.begin() + (to + bs - 1) / bs);
            st.received = to;
            return;
          }
          s.cache->prefill(layer, staged_queries(st),
                           paged_kv<T>{kv.k_pool, kv.v_pool, parts_[i].view()});
          st = Staged{};
          st.received = S;
        });
      });
    });
  }

  // Tokens of the layer's prompt received so far by chunks (S once complete).
  index_t chunk_tokens_received(sequence_id id, index_t layer) const {
    const Sequence& s = find(id)->second;
    checked(layer);
    return s.staged.empty() ? 0 : s.staged[static_cast<std::size_t>(layer)].received;
  }
  // Tokens of the layer's prompt held per kv-head row between chunks: with bounded
  // chunking at most cache_size, with exact all received; 0 once the last chunk came.
  index_t chunk_tokens_held(sequence_id id, index_t layer) const {
    const Sequence& s = find(id)->second;
    checked(layer);
    const index_t got = chunk_tokens_received(id, layer);
    if (got == s.prompt) return 0;
    if (s.mode != chunk_eviction::bounded) return got;
    return s.bounded.empty() ? 0 : s.bounded[static_cast<std::size_t>(layer)].n;  // none yet
  }

  // ---- decode --------------------------------------------------------------

  // q: (num_seqs, q_heads, head_dim); k, v: (num_seqs, kv_heads, head_dim), the new
  // token of each sequence named, in the order of ids.
  template <tensor_like Q, tensor_like K, tensor_like V>
  status validate_decode(index_t layer, std::span<const sequence_id> ids, Q&& q, K&& k,
                         V&& v) const {
    return check_decode(layer, ids, as_view(q), as_view(k), as_view(v), nullptr, nullptr, nullptr);
  }

  template <tensor_like Q, tensor_like K, tensor_like V>
  void decode(index_t layer, std::span<const sequence_id> ids, Q&& q_new, K&& k_new, V&& v_new) {
    const auto q = as_view(q_new);
    const auto k = as_view(k_new);
    const auto v = as_view(v_new);
    check_decode(layer, ids, q, k, v, nullptr, nullptr, nullptr).throw_if_error();
    const std::vector<Sequence*> seq = sequences(ids);
    each_sequence(ids.size(), decode_work(seq, layer), [&](std::size_t i) {
      const auto ii = static_cast<index_t>(i);
      Sequence& s = *seq[i];
      [[maybe_unused]] const bool bounded =
          !s.bounded.empty() && s.bounded[static_cast<std::size_t>(layer)].prompt > 0;
      if constexpr (on_host)
        if (bounded) reserve_positions(s, layer, 1);  // no allocation once the cache changed
      s.cache->decode(layer, detail::batch_entry(q, ii), detail::batch_entry(k, ii),
                      detail::batch_entry(v, ii));
      if constexpr (on_host)
        if (bounded) original_positions(s, layer);
    });
  }

  // Paged (host): the layer was prefilled paged for every named sequence; table has
  // num_seqs sequences in the order of ids, sequence i's entries the blocks
  // table(ids[i], layer) names, in order, then room for its new token (a new block
  // where its last is full; a block no other sequence holds), seq_lens(i) what it
  // holds now. The new tokens are written into the pools through it; freed(id, layer)
  // then says how many trailing entries of the sequence's part of table it released.
  template <tensor_like Q, tensor_like K, tensor_like V>
  status validate_decode(index_t layer, std::span<const sequence_id> ids, Q&& q, K&& k, V&& v,
                         const block_table<host_space>& table) const {
    std::vector<TablePart> parts;
    std::vector<std::pair<std::int32_t, index_t>> by_id;
    return check_decode(layer, ids, as_view(q), as_view(k), as_view(v), &table, &parts, &by_id);
  }

  template <tensor_like Q, tensor_like K, tensor_like V>
  void decode(index_t layer, std::span<const sequence_id> ids, Q&& q_new, K&& k_new, V&& v_new,
              const block_table<host_space>& table) {
    static_assert(std::is_same_v<Exec, host_policy>,
                  "cake::RaggedKvCache: paged storage is implemented on the host backend only");
    const auto q = as_view(q_new);
    const auto k = as_view(k_new);
    const auto v = as_view(v_new);
    check_decode(layer, ids, q, k, v, &table, &parts_, &by_id_).throw_if_error();
    const std::vector<Sequence*> seq = sequences(ids);
    each_sequence(ids.size(), decode_work(seq, layer), [&](std::size_t i) {
      const auto ii = static_cast<index_t>(i);
      Sequence& s = *seq[i];
      [[maybe_unused]] const bool bounded =
          !s.bounded.empty() && s.bounded[static_cast<std::size_t>(layer)].prompt > 0;
      if (bounded) reserve_positions(s, layer, 1);  // no allocation once the cache changed
      s.cache->decode(layer, detail::batch_entry(q, ii), detail::batch_entry(k, ii),
                      detail::batch_entry(v, ii), parts_[i].view());
      if (bounded) original_positions(s, layer);
    });
  }

  // ---- queries -------------------------------------------------------------

  const CacheConfig& config() const noexcept { return cfg_; }
  // The sequence's own cache: budgets(), stage_budgets(), tokens_held(l),
  // row_lengths(l), keys(l), values(l), positions(l), preference(l), ...
  const cache_type& sequence(sequence_id id) const { return *find(id)->second.cache; }
  std::span<const index_t> budgets(sequence_id id) const { return sequence(id).budgets(); }
  index_t tokens_held(sequence_id id, index_t layer) const {
    return sequence(id).tokens_held(layer);
  }
  // KvCache::keys and values: the first of them after a decode of the layer writes its
  // K/V (back in token order): not concurrently for the same sequence and layer.
  auto keys(sequence_id id, index_t layer) const { return sequence(id).keys(layer); }
  auto values(sequence_id id, index_t layer) const { return sequence(id).values(layer); }
  // (1, kv_heads, held): prompt or decode positions; original ones with bounded chunking.
  view<const index_t, 3, Space> positions(sequence_id id, index_t layer) const {
    const Sequence& s = find(id)->second;
    if constexpr (on_host) {
      checked(layer);
      if (!s.bounded.empty() && s.bounded[static_cast<std::size_t>(layer)].prompt > 0) {
        const auto& p = s.bounded[static_cast<std::size_t>(layer)].positions;
        return make_view(p.data(),
                         std::array<index_t, 3>{1, cfg_.kv_heads,
                                                static_cast<index_t>(p.size()) / cfg_.kv_heads});
      }
    }
    return s.cache->positions(layer);
  }
  // Paged layers (host): whether the sequence's layer was prefilled on the pools; its
  // blocks, sequence 0 of the table (ids, seq_lens: the longest of its rows, shorter
  // heads padded with zero K/V), valid until the sequence's next call; and how many
  // trailing entries of the table the engine lent (or table(id, layer) showed before)
  // the sequence's latest call released: the engine frees those blocks.
  bool paged(sequence_id id, index_t layer) const { return sequence(id).paged(layer); }
  block_table<host_space> table(sequence_id id, index_t layer) const {
    return sequence(id).table(layer);
  }
  // With CacheConfig::paged_slots = slot_order::any: (1, kv_heads, held) the slot of each
  // held token in the sequence's blocks (KvCache::token_slots).
  view<const index_t, 3, Space> token_slots(sequence_id id, index_t layer) const {
    return sequence(id).token_slots(layer);
  }
  // Between bounded chunks on the pools, freed(id, layer) is the tail of the chunk's
  // table the eviction released (table(id, layer) exists from the last chunk on).
  std::int32_t freed(sequence_id id, index_t layer) const {
    const Sequence& s = find(id)->second;
    checked(layer);
    if (!s.staged.empty() && s.staged[static_cast<std::size_t>(layer)].paged)
      return s.staged[static_cast<std::size_t>(layer)].freed;
    return s.cache->freed(layer)[0];
  }

  // Tokens held by every sequence, every layer (per kv-head row).
  index_t tokens_held() const noexcept {
    index_t n = 0;
    for (const auto& [id, s] : seqs_) n += s.cache->tokens_held();
    return n;
  }
  std::size_t bytes_held() const {
    std::size_t n = 0;
    for (const auto& [id, s] : seqs_) n += s.cache->bytes_held();
    return n;
  }

 private:
  struct Staged {
    buffer<T> k, v;  // (kv_heads, S, head_dim) each; empty when paged
    buffer<T> q;     // (q_heads, w, head_dim): queries of positions [S - w, S)
    index_t received = 0;
    bool paged = false;              // the chunks are in the engine's pools
    std::vector<std::int32_t> lent;  // paged: the blocks holding the tokens kept so far
    std::int32_t freed = 0;          // paged, bounded: the latest chunk's released tail
  };
  // One sequence's entries of a call's block table, as a table of its own (batch 1).
  struct TablePart {
    std::int32_t indptr[2] = {0, 0};
    std::int32_t len = 0;
    std::vector<std::int32_t> ids;
    block_table<host_space> view() const { return make_block_table(indptr, ids.data(), &len, 1); }
  };
  // A layer's pools, fixed by its first paged call.
  struct Pools {
    host_view<T, 4> k, v;
    bool bound = false;
  };
  // Bounded chunking, per layer, on the host.
  struct Bounded {
    std::vector<T> k, v;             // (kv_heads, n, head_dim): held between chunks
    std::vector<index_t> pos;        // (kv_heads, n), then (kv_heads, prompt): original positions
    std::vector<T> q;                // (q_heads, w, head_dim): queries of [received - w, received)
    index_t n = 0;                   // tokens held per row between chunks
    index_t prompt = 0;              // after the last chunk: the prompt the cache took
    std::vector<index_t> positions;  // (kv_heads, held): the cache's positions(l), original
  };
  struct Sequence {
    std::unique_ptr<cache_type> cache;  // never moves: it may lend its workspace by address
    index_t prompt = 0;                 // SequenceConfig::prompt_length
    chunk_eviction mode = chunk_eviction::exact;
    Ind ind;                       // the sequence's indicator, for bounded chunking
    std::vector<Staged> staged;    // per layer, while chunks come
    std::vector<Bounded> bounded;  // per layer, bounded chunking
  };

  // ---- calls ---------------------------------------------------------------

  // The sequences of a call, in its order (ids checked).
  std::vector<Sequence*> sequences(std::span<const sequence_id> ids) {
    std::vector<Sequence*> out(ids.size());
    for (std::size_t i = 0; i < ids.size(); ++i) out[i] = &seqs_.at(ids[i]);
    return out;
  }

  // f(i) for the call's n sequences: in parallel on the host when it pays (see the
  // file's comment), else in order. Each f(i) touches sequence i alone (and its own
  // blocks of the pools). The first failure in the order of ids is rethrown.
  template <class F>
  void each_sequence(std::size_t n, std::int64_t work, F&& f) {
    if constexpr (std::is_same_v<Exec, host_policy>) {
      const auto count = static_cast<index_t>(n);
      if (n > 1 && exec_.workspace == nullptr && work >= exec_.min_parallel_work &&
          detail::worker_count(exec_, count) > 1) {
        std::vector<std::exception_ptr> failed(n);
        detail::parallel_for(exec_, count, [&](index_t i, int) {
          try {
            f(static_cast<std::size_t>(i));
          } catch (...) {
            failed[static_cast<std::size_t>(i)] = std::current_exception();
          }
        });
        for (const auto& e : failed)
          if (e) std::rethrow_exception(e);
        return;
      }
    }
    for (std::size_t i = 0; i < n; ++i) f(i);
  }
  // About the multiply-adds of a call: scoring a prompt reads every token with the
  // last w queries; a decoding step reads every held token with one.
  std::int64_t prefill_work(index_t tokens) const {
    return static_cast<std::int64_t>(tokens) * cfg_.q_heads * cfg_.head_dim * cfg_.window;
  }
  std::int64_t chunk_work(std::span<const sequence_id> ids, index_t layer,
                          std::span<const std::int32_t> cu) const {
    index_t tokens = cu.empty() ? 0 : cu.back();
    for (sequence_id id : ids) {  // a last chunk scores all that came before it
      const Sequence& s = seqs_.at(id);
      tokens += s.staged.empty() ? 0 : s.staged[static_cast<std::size_t>(layer)].received;
    }
    return prefill_work(tokens);
  }
  std::int64_t decode_work(const std::vector<Sequence*>& seq, index_t layer) const {
    std::int64_t held = 0;
    for (const Sequence* s : seq) held += s->cache->tokens_held(layer);
    return held * cfg_.q_heads * cfg_.head_dim;
  }

  // run(), a chunk call of the sequences seq. A sequence whose first chunk call fails is
  // left as it was, with no chunk state (a whole-prompt prefill is accepted again):
  // its first chunk is layer 0's (check_turn), so layer 0 received nothing.
  template <class F>
  static void first_chunk_undone(const std::vector<Sequence*>& seq, F&& run) {
    try {
      run();
    } catch (...) {
      for (Sequence* s : seq)
        if (!s->staged.empty() && s->staged[0].received == 0) {
          std::vector<Staged>().swap(s->staged);
          std::vector<Bounded>().swap(s->bounded);
        }
      throw;
    }
  }

  // ---- paged storage ---------------------------------------------------------

  // run(): the call's sequences take a paged call of the layer, whose pools it fixes
  // if it is the layer's first. Should none of them take it (run throws: the first
  // failed, or all did), the layer is left unbound, as it was (strong guarantee).
  template <class F>
  void on_pools(index_t layer, const std::vector<Sequence*>& seq, const paged_kv<T>& kv, F&& run) {
    Pools& p = pools_[static_cast<std::size_t>(layer)];
    if (p.bound) {
      run();
      return;
    }
    p.k = kv.k_pool;
    p.v = kv.v_pool;
    p.bound = true;
    try {
      run();
    } catch (...) {
      if (std::none_of(seq.begin(), seq.end(),
                       [&](const Sequence* s) { return holds_pools(*s, layer); }))
        p = Pools{};
      throw;
    }
  }
  // Whether sequence s keeps tokens at layer u in the layer's pools: its paged layer,
  // or the chunks it received so far on them.
  static bool holds_pools(const Sequence& s, index_t u) {
    const auto uu = static_cast<std::size_t>(u);
    if (!s.staged.empty() && s.staged[uu].paged && s.staged[uu].received > 0) return true;
    return s.cache->layers_prefilled() > u && s.cache->paged(u);
  }
  static bool same_view(const host_view<T, 4>& a, const host_view<T, 4>& b) {
    for (std::size_t r = 0; r < 4; ++r)
      if (a.extent(r) != b.extent(r) || a.stride(r) != b.stride(r)) return false;
    return a.data_handle() == b.data_handle();
  }
  // The pools of a paged call: their shapes, and the layer's own when it has some.
  status check_pools(index_t layer, const paged_kv<T>& kv) const {
    const auto& kp = kv.k_pool;
    CAKE_CHECK(kp.extent(1) == cfg_.kv_heads && kp.extent(2) >= 1 && kp.extent(3) == cfg_.head_dim,
               "cake.ragged.k_pool", "k_pool must be (num_blocks, kv_heads = ", cfg_.kv_heads,
               ", block_size >= 1, head_dim = ", cfg_.head_dim, "), got ",
               detail::shape_string(kp));
    CAKE_CHECK(inner_contiguous(kp), "cake.ragged.k_pool",
               "k_pool must have unit stride along head_dim, got ", kp.stride(3));
    CAKE_TRY(detail::check_kv_pools(kp, kv.v_pool));
    const Pools& p = pools_[static_cast<std::size_t>(layer)];
    CAKE_CHECK(!p.bound || (same_view(p.k, kp) && same_view(p.v, kv.v_pool)), "cake.ragged.k_pool",
               "layer ", layer,
               " keeps every sequence's K/V in the pools its first paged call gave; got other "
               "k_pool or v_pool (data, extents or strides)");
    return status::success();
  }
  // The blocks of the pools sequence s holds at layer u: those of its paged layer, or
  // those of the chunks it received so far.
  std::span<const std::int32_t> held_blocks(const Sequence& s, index_t u) const {
    const auto uu = static_cast<std::size_t>(u);
    if (!s.staged.empty() && s.staged[uu].paged) return s.staged[uu].lent;
    if (s.cache->layers_prefilled() > u && s.cache->paged(u)) {
      const auto t = s.cache->table(u);
      const index_t n = t.indptr(1);
      return n == 0 ? std::span<const std::int32_t>{}
                    : std::span<const std::int32_t>(&t.ids(0), static_cast<std::size_t>(n));
    }
    return {};
  }
  // The call's table (valid, by_id its sorted (id, entry) pairs from
  // validate_block_table) names no block that another sequence holds in the same pools,
  // nor one that a sequence of the call holds at another layer of them: an in-place
  // write would overwrite that sequence's tokens. The call's own sequences at this layer
  // hold only the entries their parts of the table begin with (checked per sequence).
  status check_shared(index_t layer, std::span<const sequence_id> ids,
                      const block_table<host_space>& t, const T* k_pool,
                      const std::vector<std::pair<std::int32_t, index_t>>& by_id) const {
    if (by_id.empty()) return status::success();
    for (const auto& [sid, s] : seqs_) {
      const bool in_call = std::find(ids.begin(), ids.end(), sid) != ids.end();
      for (index_t u = 0; u < cfg_.layers; ++u) {
        const Pools& p = pools_[static_cast<std::size_t>(u)];
        if ((in_call && u == layer) || !p.bound || p.k.data_handle() != k_pool) continue;
        for (std::int32_t b : held_blocks(s, u)) {
          const auto it = std::lower_bound(by_id.begin(), by_id.end(),
                                           std::pair<std::int32_t, index_t>{b, index_t{-1}});
          if (it == by_id.end() || it->first != b) continue;
          const index_t e = it->second;
          index_t i = 0;  // the call's sequence whose entry it is
          while (t.indptr(i + 1) <= e) ++i;
          CAKE_CHECK(false, "cake.ragged.table", "ids(", e, ") = ", b, " (sequence ",
                     ids[static_cast<std::size_t>(i)], ") is a block sequence ", sid,
                     " holds at layer ", u, " in the same pools");
        }
      }
    }
    return status::success();
  }
  // The call's table into one table per sequence (table valid).
  static void split(const block_table<host_space>& t, std::size_t n,
                    std::vector<TablePart>& parts) {
    parts.resize(n);
    for (std::size_t i = 0; i < n; ++i) {
      const auto ii = static_cast<index_t>(i);
      const index_t b = t.indptr(ii), e = t.indptr(ii + 1);
      TablePart& p = parts[i];
      p.ids.resize(static_cast<std::size_t>(e - b));
      for (index_t j = b; j < e; ++j) p.ids[static_cast<std::size_t>(j - b)] = t.ids(j);
      p.indptr[1] = static_cast<std::int32_t>(e - b);
      p.len = t.seq_lens(ii);
    }
  }
  // The pools, the table (valid, one sequence per id, no block shared with another
  // sequence) and its parts.
  status check_paged_table(index_t layer, std::span<const sequence_id> ids, const paged_kv<T>& kv,
                           std::vector<TablePart>& parts,
                           std::vector<std::pair<std::int32_t, index_t>>& by_id) const {
    const std::size_t n = ids.size();
    CAKE_TRY(check_pools(layer, kv));
    CAKE_CHECK(kv.table.num_seqs() == static_cast<index_t>(n), "cake.ragged.table",
               "the block table must have one sequence per entry of ids, ", n, ", got ",
               kv.table.num_seqs());
    CAKE_TRY(validate_block_table(kv.table, kv.k_pool.extent(0), kv.k_pool.extent(2), by_id));
    CAKE_TRY(check_shared(layer, ids, kv.table, kv.k_pool.data_handle(), by_id));
    split(kv.table, n, parts);
    return status::success();
  }
  // Tokens [from, to) of sequence part p in the pools are finite (keys bounded).
  status check_pool_finite(const paged_kv<T>& kv, const TablePart& p, index_t from,
                           index_t to) const {
    const auto& kp = kv.k_pool;
    const auto& vp = kv.v_pool;
    const index_t bs = kp.extent(2), Hkv = kp.extent(1), d = kp.extent(3);
    const float bound = detail::score_bound(cfg_.head_dim);
    for (index_t t = from; t < to;) {
      const index_t id = p.ids[static_cast<std::size_t>(t / bs)], slot = t % bs;
      const index_t m = std::min(bs - slot, to - t);
      const auto blk = [&](const host_view<T, 4>& pool) {
        return make_view<Space>(
            static_cast<const T*>(pool.data_handle() + id * static_cast<index_t>(pool.stride(0)) +
                                  slot * static_cast<index_t>(pool.stride(2))),
            std::array<index_t, 3>{Hkv, m, d},
            std::array<index_t, 3>{static_cast<index_t>(pool.stride(1)),
                                   static_cast<index_t>(pool.stride(2)), 1});
      };
      CAKE_TRY(Store::check_finite(
          exec_,
          detail::named(blk(kp), "cake.ragged.k_pool", "k_pool (head, slot, x of a block)", bound),
          detail::named(blk(vp), "cake.ragged.v_pool", "v_pool (head, slot, x of a block)")));
      t += m;
    }
    return status::success();
  }

  template <class QV>
  status check_prefill_paged(index_t layer, std::span<const sequence_id> ids, const QV& q,
                             const paged_kv<T>& kv, std::vector<TablePart>& parts,
                             std::vector<std::pair<std::int32_t, index_t>>& by_id) const {
    static_assert(QV::rank() == 4,
                  "cake::RaggedKvCache::prefill: q_window is (num_seqs, q_heads, window, "
                  "head_dim)");
    const std::size_t n = ids.size();
    CAKE_TRY(check_call_head(layer, "cake.prefill.layer", ids, q));
    CAKE_TRY(check_paged_table(layer, ids, kv, parts, by_id));
    for (std::size_t i = 0; i < n; ++i) {
      const Sequence& s = seqs_.at(ids[i]);
      const index_t S = parts[i].len;
      CAKE_CHECK_STATE(s.staged.empty(), "cake.ragged.chunked", "sequence ", ids[i],
                       " is prefilled by chunks (prefill_chunk), not whole");
      CAKE_CHECK(s.prompt == 0 || S == s.prompt, "cake.ragged.table", "sequence ", ids[i],
                 " has prompt_length ", s.prompt, ", got seq_lens(", i, ") = ", S);
      if (auto st =
              s.cache->validate_prefill(layer, detail::batch_entry(q, static_cast<index_t>(i)),
                                        paged_kv<T>{kv.k_pool, kv.v_pool, parts[i].view()});
          !st.ok())
        return named(st, ids[i]);
    }
    if (cfg_.check_finite && n > 0) {
      CAKE_TRY(Store::check_finite(exec_, detail::named(q, "cake.prefill.q_window", "q_window",
                                                        detail::score_bound(cfg_.head_dim))));
      for (std::size_t i = 0; i < n; ++i)
        if (auto st = check_pool_finite(kv, parts[i], 0, parts[i].len); !st.ok())
          return named(st, ids[i]);
    }
    return status::success();
  }

  template <class QV>
  status check_chunk_paged(index_t layer, std::span<const sequence_id> ids, const QV& q,
                           const paged_kv<T>& kv, std::span<const std::int32_t> cu,
                           std::vector<TablePart>& parts,
                           std::vector<std::pair<std::int32_t, index_t>>& by_id) const {
    static_assert(QV::rank() == 3,
                  "cake::RaggedKvCache::prefill_chunk: q is packed, (total_tokens, q_heads, "
                  "head_dim)");
    const std::size_t n = ids.size();
    CAKE_TRY(check_call_head(layer, "cake.prefill.layer", ids, q));
    CAKE_TRY(check_offsets(cu, n, q, q, true, "q"));
    CAKE_CHECK(inner_contiguous(q), "cake.ragged.layout", "q must have unit stride along head_dim");
    CAKE_TRY(check_turn(layer, ids, cu, true));
    CAKE_TRY(check_paged_table(layer, ids, kv, parts, by_id));
    const auto l = static_cast<std::size_t>(layer);
    const index_t bs = kv.k_pool.extent(2);
    for (std::size_t i = 0; i < n; ++i) {
      const Sequence& s = seqs_.at(ids[i]);
      const index_t at = s.staged.empty() ? 0 : s.staged[l].received, len = cu[i + 1] - cu[i];
      // Bounded: the tokens the layer holds, then the chunk's.
      const index_t held =
          s.mode == chunk_eviction::bounded && !s.bounded.empty() ? s.bounded[l].n : at;
      CAKE_CHECK(parts[i].len == held + len, "cake.ragged.table", "seq_lens(", i,
                 ") must be the tokens sequence ", ids[i], " holds, then its chunk's, ", held,
                 " + ", len, ", got ", parts[i].len);
      if (at == 0) continue;
      const std::vector<std::int32_t>& was = s.staged[l].lent;
      for (std::size_t e = 0; e < was.size(); ++e)
        CAKE_CHECK(parts[i].ids[e] == was[e], "cake.ragged.table", "ids(",
                   kv.table.indptr(static_cast<index_t>(i)) + static_cast<index_t>(e),
                   ") must be block ", was[e], ", which holds tokens [",
                   static_cast<index_t>(e) * bs, ", ",
                   std::min(held, static_cast<index_t>(e + 1) * bs), ") of sequence ", ids[i],
                   "'s earlier chunks, got ", parts[i].ids[e]);
    }
    if (cfg_.check_finite && n > 0) {
      CAKE_TRY(Store::check_finite(
          exec_, detail::named(q, "cake.ragged.q", "q", detail::score_bound(cfg_.head_dim))));
      for (std::size_t i = 0; i < n; ++i)
        if (auto st =
                check_pool_finite(kv, parts[i], parts[i].len - (cu[i + 1] - cu[i]), parts[i].len);
            !st.ok())
          return named(st, ids[i]);
    }
    return status::success();
  }

  // One chunk of one sequence with bounded chunking (see prefill_chunk). Everything
  // is built aside and moved in after the last call that can throw.
  template <class QV, class KV, class VV>
  void bounded_chunk(Sequence& s, index_t layer, const QV& q, const KV& k, const VV& v, index_t b,
                     index_t n) {
    const auto l = static_cast<std::size_t>(layer);
    const index_t H = cfg_.q_heads, Hkv = cfg_.kv_heads, d = cfg_.head_dim, w = cfg_.window;
    Bounded& h = s.bounded[l];
    Staged& st = s.staged[l];
    const index_t at = st.received, to = at + n, m = h.n + n, S = s.prompt;
    const auto z = [](index_t x) { return static_cast<std::size_t>(x); };
    // The last w queries, positions [to - w, to): from this chunk, then the held ones.
    std::vector<T> qw(z(H * w * d));
    for (index_t hh = 0; hh < H; ++hh)
      for (index_t j = 0; j < w; ++j) {
        const index_t p = to - w + j;
        if (p < 0) continue;  // fewer than w tokens so far: no eviction reads them
        T* dst = qw.data() + (hh * w + j) * d;
        if (p >= at)
          for (index_t x = 0; x < d; ++x) dst[x] = q(b + p - at, hh, x);
        else
          std::copy_n(h.q.data() + (hh * w + j + n) * d, d, dst);
      }
    // Candidates: what each kv-head row holds, then the chunk.
    std::vector<T> ck(z(Hkv * m * d)), cv(ck.size());
    std::vector<index_t> cp(z(Hkv * m));
    for (index_t g = 0; g < Hkv; ++g) {
      std::copy_n(h.k.data() + g * h.n * d, h.n * d, ck.data() + g * m * d);
      std::copy_n(h.v.data() + g * h.n * d, h.n * d, cv.data() + g * m * d);
      std::copy_n(h.pos.data() + g * h.n, h.n, cp.data() + g * m);
      for (index_t t = 0; t < n; ++t) {
        for (index_t x = 0; x < d; ++x) {
          ck[z((g * m + h.n + t) * d + x)] = k(b + t, g, x);
          cv[z((g * m + h.n + t) * d + x)] = v(b + t, g, x);
        }
        cp[z(g * m + h.n + t)] = at + t;
      }
    }
    const auto qv = make_view(static_cast<const T*>(qw.data()), std::array<index_t, 4>{1, H, w, d});
    const auto kv =
        make_view(static_cast<const T*>(ck.data()), std::array<index_t, 4>{1, Hkv, m, d});
    const auto vv =
        make_view(static_cast<const T*>(cv.data()), std::array<index_t, 4>{1, Hkv, m, d});
    const index_t C = s.cache->config().cache_size;
    if (to == S) {  // the last chunk: the sequence's own policies
      Bounded done;
      // original_positions below allocates nothing once the cache has the layer (the
      // layer holds at most m per row; a cascade only cuts the layers before it)
      done.positions.reserve(z(Hkv * m));
      s.cache->prefill(layer, qv, kv, vv);
      done.pos = std::move(cp);
      done.prompt = m;
      h = std::move(done);
      st.received = to;
      for (index_t u = 0; u <= layer; ++u)  // a cascade cut the layers before it
        if (s.bounded[z(u)].prompt > 0) original_positions(s, u);
      return;
    }
    Bounded next;
    if (m > C + w) {  // evict this layer alone to C tokens (m > w: the w queries are here)
      CacheConfig c = s.cache->config();
      c.layers = 1;
      c.cascade = false;
      c.order = token_order::position;  // candidates stay in position order
      c.check_finite = false;           // checked by prefill_chunk
      chunk_cache cut(c, UniformPreference{}, UniformBudget{}, s.ind, exec_);
      cut.prefill(0, qv, kv, vv);
      const index_t kept = cut.tokens_held(0);  // C in every row
      const auto K = cut.keys(0), V = cut.values(0);
      const auto P = cut.positions(0);
      next.k.resize(z(Hkv * kept * d));
      next.v.resize(next.k.size());
      next.pos.resize(z(Hkv * kept));
      for (index_t g = 0; g < Hkv; ++g)
        for (index_t t = 0; t < kept; ++t) {
          next.pos[z(g * kept + t)] = cp[z(g * m + P(0, g, t))];
          for (index_t x = 0; x < d; ++x) {
            next.k[z((g * kept + t) * d + x)] = K(0, g, t, x);
            next.v[z((g * kept + t) * d + x)] = V(0, g, t, x);
          }
        }
      next.n = kept;
    } else {
      next.k = std::move(ck);
      next.v = std::move(cv);
      next.pos = std::move(cp);
      next.n = m;
    }
    next.q = std::move(qw);
    h = std::move(next);
    st.received = to;
  }

  // One chunk of one sequence with bounded chunking on the pools (see prefill_chunk):
  // the layer's held tokens are the leading h.n slots of its blocks (every row in
  // position order) and the engine wrote the chunk after them, part.len = h.n + n. An
  // eviction between chunks compacts them in place (a one-layer KvCache on the pools).
  template <class QV>
  void bounded_chunk_paged(Sequence& s, index_t layer, const QV& q, const paged_kv<T>& kv,
                           const TablePart& part, index_t b, index_t n) {
    const auto l = static_cast<std::size_t>(layer);
    const index_t H = cfg_.q_heads, Hkv = cfg_.kv_heads, d = cfg_.head_dim, w = cfg_.window;
    Bounded& h = s.bounded[l];
    Staged& st = s.staged[l];
    const index_t at = st.received, to = at + n, m = h.n + n, S = s.prompt;
    const index_t bs = kv.k_pool.extent(2);
    const auto z = [](index_t x) { return static_cast<std::size_t>(x); };
    std::vector<T> qw(z(H * w * d));  // the last w queries, as bounded_chunk's
    for (index_t hh = 0; hh < H; ++hh)
      for (index_t j = 0; j < w; ++j) {
        const index_t p = to - w + j;
        if (p < 0) continue;
        T* dst = qw.data() + (hh * w + j) * d;
        if (p >= at)
          for (index_t x = 0; x < d; ++x) dst[x] = q(b + p - at, hh, x);
        else
          std::copy_n(h.q.data() + (hh * w + j + n) * d, d, dst);
      }
    std::vector<index_t> cp(z(Hkv * m));  // candidates' original positions, per row
    for (index_t g = 0; g < Hkv; ++g) {
      std::copy_n(h.pos.data() + g * h.n, h.n, cp.data() + g * m);
      for (index_t t = 0; t < n; ++t) cp[z(g * m + h.n + t)] = at + t;
    }
    const auto qv = make_view(static_cast<const T*>(qw.data()), std::array<index_t, 4>{1, H, w, d});
    const paged_kv<T> lent{kv.k_pool, kv.v_pool, part.view()};
    const index_t C = s.cache->config().cache_size;
    if (to == S) {  // the last chunk: the sequence's own policies, in place
      Bounded done;
      done.positions.reserve(z(Hkv * m));  // as bounded_chunk's: nothing allocated after
      s.cache->prefill(layer, qv, lent);
      done.pos = std::move(cp);
      done.prompt = m;
      h = std::move(done);
      st = Staged{};
      st.received = to;
      for (index_t u = 0; u <= layer; ++u)
        if (s.bounded[z(u)].prompt > 0) original_positions(s, u);
      return;
    }
    Bounded next;
    std::int32_t freed = 0;
    if (m > C + w) {
      CacheConfig c = s.cache->config();
      c.layers = 1;
      c.cascade = false;
      c.order = token_order::position;
      c.check_finite = false;
      chunk_cache cut(c, UniformPreference{}, UniformBudget{}, s.ind, exec_);
      next.pos.reserve(z(Hkv * m));  // the eviction moves tokens in the pools: no allocation after
      cut.prefill(0, qv, lent);
      const index_t kept = cut.tokens_held(0);
      const auto P = cut.positions(0);
      next.pos.resize(z(Hkv * kept));
      for (index_t g = 0; g < Hkv; ++g)
        for (index_t t = 0; t < kept; ++t) next.pos[z(g * kept + t)] = cp[z(g * m + P(0, g, t))];
      next.n = kept;
      freed = cut.freed(0)[0];
    } else {
      next.pos = std::move(cp);
      next.n = m;
    }
    next.q = std::move(qw);
    h = std::move(next);
    const auto keep = static_cast<std::ptrdiff_t>((h.n + bs - 1) / bs);
    st.lent.assign(part.ids.begin(), part.ids.begin() + keep);  // reserved
    st.freed = freed;
    st.received = to;
  }

  // The cache's positions of layer l as original prompt positions: index p of its
  // compressed prompt is pos[p], a decoded token S + (p - prompt).
  // Room in the layer's original positions for the cache's after a call that adds at
  // most `more` tokens to a row: original_positions then allocates nothing once the
  // cache has changed (strong guarantee).
  void reserve_positions(Sequence& s, index_t layer, index_t more) {
    Bounded& h = s.bounded[static_cast<std::size_t>(layer)];
    h.positions.reserve(
        static_cast<std::size_t>(cfg_.kv_heads * (s.cache->positions(layer).extent(2) + more)));
  }
  void original_positions(Sequence& s, index_t layer) {
    Bounded& h = s.bounded[static_cast<std::size_t>(layer)];
    const auto P = s.cache->positions(layer);
    const index_t Hkv = cfg_.kv_heads, n = P.extent(2);
    h.positions.resize(static_cast<std::size_t>(Hkv * n));
    for (index_t g = 0; g < Hkv; ++g)
      for (index_t t = 0; t < n; ++t) {
        const index_t p = P(0, g, t);
        h.positions[static_cast<std::size_t>(g * n + t)] =
            p < 0          ? -1
            : p < h.prompt ? h.pos[static_cast<std::size_t>(g * h.prompt + p)]
                           : s.prompt + (p - h.prompt);
      }
  }

  auto staged_prompt(const buffer<T>& b, index_t S) const {
    return make_view<typename Exec::memory_space>(
        static_cast<const T*>(Store::ptr(b)),
        std::array<index_t, 4>{1, cfg_.kv_heads, S, cfg_.head_dim});
  }
  auto staged_queries(const Staged& st) const {
    return make_view<typename Exec::memory_space>(
        static_cast<const T*>(Store::ptr(st.q)),
        std::array<index_t, 4>{1, cfg_.q_heads, cfg_.window, cfg_.head_dim});
  }

  template <class KV, class VV>
  static constexpr void check_value_type() {
    static_assert(std::is_same_v<std::remove_const_t<typename KV::element_type>, T> &&
                      std::is_same_v<std::remove_const_t<typename VV::element_type>, T>,
                  "cake::RaggedKvCache<..., T>: keys and values (and a chunk's queries) must "
                  "hold T, the cache's value type");
  }

  auto find(sequence_id id) const {
    auto it = seqs_.find(id);
    if (it == seqs_.end())
      throw invalid_argument("cake.ragged.id",
                             detail::concat("sequence ", id, " is not in the batch"));
    return it;
  }
  auto find(sequence_id id) {
    auto it = seqs_.find(id);
    if (it == seqs_.end())
      throw invalid_argument("cake.ragged.id",
                             detail::concat("sequence ", id, " is not in the batch"));
    return it;
  }
  void checked(index_t layer) const {
    CAKE_EXPECTS(layer >= 0 && layer < cfg_.layers, "cake.layer", "layer must be in [0, ",
                 cfg_.layers, "), got ", layer);
  }

  // Known and distinct ids.
  status check_ids(std::span<const sequence_id> ids) const {
    for (std::size_t i = 0; i < ids.size(); ++i) {
      CAKE_CHECK(seqs_.count(ids[i]) > 0, "cake.ragged.ids", "ids[", i, "] = ", ids[i],
                 " is not a sequence of the batch");
      for (std::size_t j = 0; j < i; ++j)
        CAKE_CHECK(ids[j] != ids[i], "cake.ragged.ids", "ids must be distinct, got ", ids[i],
                   " at ", j, " and ", i);
    }
    return status::success();
  }

  // cu_seqlens: num_seqs + 1 offsets from 0, non-decreasing (increasing when
  // `nonempty`), ending at the packed tensors' token count.
  template <class KV, class VV>
  static status check_offsets(std::span<const std::int32_t> cu, std::size_t n, const KV& k,
                              const VV& v, bool nonempty, const char* k_name = "keys") {
    CAKE_CHECK(cu.size() == n + 1, "cake.ragged.cu_seqlens",
               "cu_seqlens must hold num_seqs + 1 = ", n + 1, " offsets, got ", cu.size());
    CAKE_CHECK(cu[0] == 0, "cake.ragged.cu_seqlens", "cu_seqlens[0] must be 0, got ", cu[0]);
    for (std::size_t i = 0; i < n; ++i)
      CAKE_CHECK(nonempty ? cu[i + 1] > cu[i] : cu[i + 1] >= cu[i], "cake.ragged.cu_seqlens",
                 "cu_seqlens must be ", nonempty ? "increasing" : "non-decreasing",
                 ", got cu_seqlens[", i, "] = ", cu[i], " and cu_seqlens[", i + 1,
                 "] = ", cu[i + 1]);
    CAKE_CHECK(cu[n] == static_cast<index_t>(k.extent(0)), "cake.ragged.cu_seqlens",
               "cu_seqlens[num_seqs] must be the token count of ", k_name, ", ", k.extent(0),
               ", got ", cu[n]);
    CAKE_CHECK(v.extent(0) == k.extent(0), "cake.ragged.values",
               "values must hold as many tokens as keys, ", k.extent(0), ", got ",
               detail::shape_string(v));
    return status::success();
  }

  template <class KV>
  status check_packed(const KV& x, const char* id, const char* name, index_t heads,
                      const char* heads_name) const {
    CAKE_CHECK(x.extent(1) == heads && x.extent(2) == cfg_.head_dim, id, name,
               " must be (total_tokens, ", heads_name, ", head_dim) = (total_tokens, ", heads, ", ",
               cfg_.head_dim, "), got ", detail::shape_string(x));
    return status::success();
  }

  // What a prefill or chunk call checks first: the layer (layer_id: its error's id;
  // null: the sequences' caches check it), the ids, then the queries: q_window
  // (rank 4) has num_seqs entries, a chunk's q (rank 3) is packed.
  template <class QV>
  status check_call_head(index_t layer, const char* layer_id, std::span<const sequence_id> ids,
                         const QV& q) const {
    if (layer_id)
      CAKE_CHECK(layer >= 0 && layer < cfg_.layers, layer_id, "layer must be in [0, ", cfg_.layers,
                 "), got ", layer);
    CAKE_TRY(check_ids(ids));
    if constexpr (QV::rank() == 4)
      CAKE_CHECK(q.extent(0) == static_cast<index_t>(ids.size()), "cake.ragged.q_window",
                 "q_window must have num_seqs = ", ids.size(), " entries along extent 0, got ",
                 detail::shape_string(q));
    else
      CAKE_TRY(check_packed(q, "cake.ragged.q", "q", cfg_.q_heads, "q_heads"));
    return status::success();
  }

  template <class QV, class KV, class VV>
  status check_prefill(index_t layer, std::span<const sequence_id> ids, const QV& q, const KV& k,
                       const VV& v, std::span<const std::int32_t> cu) const {
    static_assert(QV::rank() == 4 && KV::rank() == 3 && VV::rank() == 3,
                  "cake::RaggedKvCache::prefill: q_window is (num_seqs, q_heads, window, "
                  "head_dim), keys and values (total_tokens, kv_heads, head_dim)");
    const std::size_t n = ids.size();
    CAKE_TRY(check_call_head(layer, nullptr, ids, q));  // each sequence's cache checks the layer
    CAKE_TRY(check_packed(k, "cake.ragged.keys", "keys", cfg_.kv_heads, "kv_heads"));
    CAKE_TRY(check_packed(v, "cake.ragged.values", "values", cfg_.kv_heads, "kv_heads"));
    CAKE_TRY(check_offsets(cu, n, k, v, false));
    for (std::size_t i = 0; i < n; ++i) {
      const Sequence& s = seqs_.at(ids[i]);
      const index_t b = cu[i], S = cu[i + 1] - b;
      CAKE_CHECK_STATE(s.staged.empty(), "cake.ragged.chunked", "sequence ", ids[i],
                       " is prefilled by chunks (prefill_chunk), not whole");
      CAKE_CHECK(s.prompt == 0 || S == s.prompt, "cake.ragged.cu_seqlens", "sequence ", ids[i],
                 " has prompt_length ", s.prompt, ", got ", S, " tokens");
      if (auto st =
              s.cache->validate_prefill(layer, detail::batch_entry(q, static_cast<index_t>(i)),
                                        detail::packed_rows(k, b, S), detail::packed_rows(v, b, S));
          !st.ok())
        return named(st, ids[i]);
    }
    // Coordinates in the packed tensors: (sequence, head, query, x) and (token, head, x).
    const float bound = detail::score_bound(cfg_.head_dim);
    if (cfg_.check_finite && n > 0)
      return Store::check_finite(exec_,
                                 detail::named(q, "cake.prefill.q_window", "q_window", bound),
                                 detail::named(k, "cake.prefill.keys", "keys", bound),
                                 detail::named(v, "cake.prefill.values", "values"));
    return status::success();
  }

  template <class QV, class KV, class VV>
  status check_chunk(index_t layer, std::span<const sequence_id> ids, const QV& q, const KV& k,
                     const VV& v, std::span<const std::int32_t> cu) const {
    static_assert(QV::rank() == 3 && KV::rank() == 3 && VV::rank() == 3,
                  "cake::RaggedKvCache::prefill_chunk: q, keys and values are packed, "
                  "(total_tokens, heads, head_dim)");
    require_space<Exec, QV, KV, VV>();
    const std::size_t n = ids.size();
    CAKE_TRY(check_call_head(layer, "cake.prefill.layer", ids, q));
    CAKE_TRY(check_packed(k, "cake.ragged.keys", "keys", cfg_.kv_heads, "kv_heads"));
    CAKE_TRY(check_packed(v, "cake.ragged.values", "values", cfg_.kv_heads, "kv_heads"));
    CAKE_TRY(check_offsets(cu, n, k, v, true));
    CAKE_CHECK(q.extent(0) == k.extent(0), "cake.ragged.q", "q must hold as many tokens as keys, ",
               k.extent(0), ", got ", detail::shape_string(q));
    CAKE_CHECK(inner_contiguous(q) && inner_contiguous(k) && inner_contiguous(v),
               "cake.ragged.layout", "q, keys and values must have unit stride along head_dim");
    CAKE_TRY(check_turn(layer, ids, cu, false));
    const float bound = detail::score_bound(cfg_.head_dim);
    if (cfg_.check_finite && n > 0)
      return Store::check_finite(exec_, detail::named(q, "cake.ragged.q", "q", bound),
                                 detail::named(k, "cake.ragged.keys", "keys", bound),
                                 detail::named(v, "cake.ragged.values", "values"));
    return status::success();
  }

  // Each sequence's chunk comes in turn (see prefill_chunk) and of the kind (dense or
  // paged) its layer's earlier chunks had.
  status check_turn(index_t layer, std::span<const sequence_id> ids,
                    std::span<const std::int32_t> cu, bool paged) const {
    const auto l = static_cast<std::size_t>(layer);
    for (std::size_t i = 0; i < ids.size(); ++i) {
      const Sequence& s = seqs_.at(ids[i]);
      const index_t len = cu[i + 1] - cu[i];
      CAKE_CHECK_STATE(s.staged.empty() || s.staged[l].received == 0 ||
                           s.staged[l].received == s.prompt || s.staged[l].paged == paged,
                       "cake.ragged.chunked", "layer ", layer, " of sequence ", ids[i],
                       " took its earlier chunks ", paged ? "dense (keys, values)" : "in the pools",
                       ": its next chunk must come the same way");
      CAKE_CHECK_STATE(s.prompt > 0, "cake.ragged.prompt_length", "sequence ", ids[i],
                       " has no prompt_length: chunked prefill needs it (SequenceConfig)");
      CAKE_CHECK_STATE(!s.staged.empty() || s.cache->layers_prefilled() == 0, "cake.ragged.chunked",
                       "sequence ", ids[i], " is prefilled whole (prefill), not by chunks");
      const auto got = [&](std::size_t m) { return s.staged.empty() ? 0 : s.staged[m].received; };
      const index_t at = got(l);
      CAKE_CHECK_STATE(at < s.prompt, "cake.ragged.chunk", "layer ", layer, " of sequence ", ids[i],
                       " already has its whole prompt of ", s.prompt, " tokens");
      // Chunk c goes through every layer before chunk c + 1, the same tokens to each.
      if (layer == 0)
        CAKE_CHECK_STATE(at == got(static_cast<std::size_t>(cfg_.layers - 1)), "cake.ragged.chunk",
                         "sequence ", ids[i],
                         ": the previous chunk must reach every layer before layer 0 takes the "
                         "next; layer ",
                         cfg_.layers - 1, " has ", got(static_cast<std::size_t>(cfg_.layers - 1)),
                         " tokens, layer 0 has ", at);
      else
        CAKE_CHECK_STATE(at + len == got(l - 1), "cake.ragged.chunk", "sequence ", ids[i],
                         ": layer ", layer, " must take the chunk layer ", layer - 1,
                         " took last, ending at token ", got(l - 1), ", got tokens [", at, ", ",
                         at + len, ")");
      CAKE_CHECK(at + len <= s.prompt, "cake.ragged.cu_seqlens", "sequence ", ids[i], " has ",
                 s.prompt - at, " tokens of its prompt left, got a chunk of ", len);
    }
    return status::success();
  }

  // table: the paged decode's (parts and by_id its scratch), or null.
  template <class QV, class KV, class VV>
  status check_decode(index_t layer, std::span<const sequence_id> ids, const QV& q, const KV& k,
                      const VV& v, const block_table<host_space>* table,
                      std::vector<TablePart>* parts,
                      std::vector<std::pair<std::int32_t, index_t>>* by_id) const {
    static_assert(QV::rank() == 3 && KV::rank() == 3 && VV::rank() == 3,
                  "cake::RaggedKvCache::decode: q, k and v are (num_seqs, heads, head_dim)");
    const std::size_t n = ids.size();
    CAKE_TRY(check_ids(ids));
    CAKE_CHECK(q.extent(0) == static_cast<index_t>(n) && k.extent(0) == static_cast<index_t>(n) &&
                   v.extent(0) == static_cast<index_t>(n),
               "cake.ragged.decode", "q, k and v must have num_seqs = ", n,
               " entries along extent 0, got ", detail::shape_string(q), ", ",
               detail::shape_string(k), " and ", detail::shape_string(v));
    constexpr bool can_page = std::is_same_v<Exec, host_policy>;  // paged: host only
    if constexpr (can_page) {
      if (table) {
        CAKE_CHECK(layer >= 0 && layer < cfg_.layers, "cake.decode.layer", "layer must be in [0, ",
                   cfg_.layers, "), got ", layer);
        const Pools& p = pools_[static_cast<std::size_t>(layer)];
        CAKE_CHECK(p.bound, "cake.decode.table", "layer ", layer,
                   " has no paged sequence: it was prefilled dense and takes no block table");
        CAKE_CHECK(table->num_seqs() == static_cast<index_t>(n), "cake.ragged.table",
                   "the block table must have one sequence per entry of ids, ", n, ", got ",
                   table->num_seqs());
        CAKE_TRY(validate_block_table(*table, p.k.extent(0), p.k.extent(2), *by_id));
        CAKE_TRY(check_shared(layer, ids, *table, p.k.data_handle(), *by_id));
        split(*table, n, *parts);
      }
    }
    for (std::size_t i = 0; i < n; ++i) {
      const auto ii = static_cast<index_t>(i);
      const cache_type& c = *seqs_.at(ids[i]).cache;
      const auto qi = detail::batch_entry(q, ii);
      const auto ki = detail::batch_entry(k, ii);
      const auto vi = detail::batch_entry(v, ii);
      status st;
      if constexpr (can_page)
        st = table ? c.validate_decode(layer, qi, ki, vi, (*parts)[i].view())
                   : c.validate_decode(layer, qi, ki, vi);
      else
        st = c.validate_decode(layer, qi, ki, vi);
      if (!st.ok()) return named(st, ids[i]);
    }
    const float bound = detail::score_bound(cfg_.head_dim);
    if (cfg_.check_finite && n > 0)
      return Store::check_finite(exec_, detail::named(q, "cake.decode.q", "q", bound),
                                 detail::named(k, "cake.decode.k", "k", bound),
                                 detail::named(v, "cake.decode.v", "v"));
    return status::success();
  }

  // A sequence's failure, with the sequence named.
  static status named(status st, sequence_id id) {
    st.message += detail::concat(" (sequence ", id, ")");
    return st;
  }

  CacheConfig cfg_;
  Pref pref_;
  Budget budget_;
  Ind ind_;
  Exec exec_;
  std::map<sequence_id, Sequence> seqs_;  // ordered: ids() and totals are deterministic
  std::vector<Pools> pools_;              // per layer: the engine's, once a paged call came
  std::vector<TablePart> parts_;          // a paged call's table, per sequence (reused)
  std::vector<std::pair<std::int32_t, index_t>> by_id_;  // its duplicate check's scratch
};

// The ragged batch of a KvCache composition: RaggedKvCacheOf<methods::SnapKv<>>.
template <class Cache>
struct ragged_kv_cache_of;
template <class P, class B, class I, class T, class E>
struct ragged_kv_cache_of<KvCache<P, B, I, T, E>> {
  using type = RaggedKvCache<P, B, I, T, E>;
};
template <class Cache>
using RaggedKvCacheOf = typename ragged_kv_cache_of<Cache>::type;

}  // namespace cake
