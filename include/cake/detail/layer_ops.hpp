// The cache's data movement, written once for every backend: a prefill's copy,
// select, reorder and truncation, and a decoding step (append, score, select,
// compact). Each backend supplies only primitives, in layer_store<T, Exec>
// (backend/host/layer_store.hpp, backend/cuda/layer_store.cuh):
//
//   make<U>(exec, n) / ptr(b) / size(b)   buffers in the backend's memory
//   fill, upload, download, copy_2d        plain memory moves (download syncs)
//   copy_prompt(exec, k, v, slots, sc)     a prompt into slots [0, S), positions 0..S-1
//   gather_meta(exec, slots, sel, n, ...)  positions and scores by an index list
//   move_slots(exec, dst, src, ...)        keys, values, positions, scores by an index
//                                          list or as they are, padding past each row's
//                                          length; in place when ascending (one launch)
//   window_slots, sort_prefixes            index lists: the window after each row's
//                                          selection; a row's prefix sorted by a key
//   append, pad, accumulate,               the new token; padding; sums; a position
//   position_scores, candidates            indicator's scores; a decoding step's scores
//   stage_moves / move_windows             a prefill's truncations, staged then run
//   check_finite, attention_sums           input checks; H2O's prefill sums
//
// plus the functional core's select_k and compact. Rows have their own lengths
// (`len`): uniform rows are rows of equal length, and head-wise (ragged) rows take
// the same paths. A prefill's selection is one batched top-k of the longest keep in
// descending order, of which each row takes its prefix; a decoding step scores and
// selects ragged rows one by one, each among its own candidates only.
//
// The storage seam: every primitive that touches a layer's tokens takes `slots<T>`,
// which addresses row r's slot t of K and V either in a dense (rows, cap) block or,
// for a paged layer, in an engine's block pool through the cache's copy of its
// block table (paged_rows, core/paged.hpp); positions and scores stay dense in the
// cache's memory. The primitives reach K/V only through slots<T>::key / value, so
// the control flow below is the same for both; a paged layer differs only where a
// dense view of its keys is needed (the prefill's window statistics read them through
// the table, paged_keys; other scorings read a gathered copy of the keys) and in that
// its prefill moves run at the commit, in place in the pool.
#pragma once

#include <algorithm>
#include <bit>
#include <cfloat>
#include <cmath>
#include <cstdint>
#include <span>
#include <string>
#include <utility>
#include <vector>

#include "../algorithm/allocate_heads.hpp"
#include "../algorithm/compact.hpp"
#include "../algorithm/decode_scores.hpp"
#include "../algorithm/select_k.hpp"
#include "../algorithm/window_stats.hpp"
#include "../policy/indicator/window_mean.hpp"
#include "prefill_plan.hpp"

namespace cake::detail {

// Dimensions every layer operation needs.
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

// The primitives of a backend (see the list above); specialised per execution policy.
template <class T, class Exec>
struct layer_store {
  static_assert(sizeof(Exec) == 0,
                "cake::KvCache: no storage for this execution policy (include <cake/cake.cuh> "
                "for cake::cuda)");
};

// K and V of a layer's rows in an engine's block pools (core/paged.hpp): row r is
// (sequence r / kv_heads, kv-head r % kv_heads), and its slot t lies in block
// ids[indptr[s] + t / block_size] at slot t % block_size. The strides are the pools'
// own (HND or NHD), in elements; a row may address the slots of its sequence's blocks.
template <class T>
struct paged_rows {
  T* k = nullptr;  // (num_blocks, kv_heads, block_size, head_dim)
  T* v = nullptr;  // (num_blocks, kv_heads, block_size, head_dim)
  index_t k_block = 0, k_head = 0, k_slot = 0, v_block = 0, v_head = 0, v_slot = 0;
  const std::int32_t* indptr = nullptr;  // (batch + 1) into ids
  const std::int32_t* ids = nullptr;     // (indptr[batch]) block ids
  index_t block_size = 1, kv_heads = 1;
  index_t num_blocks = 0;  // the pools' extent(0), for checking the tables lent later
  // log2(block_size) where set_block_size found a power of two, else -1 (divide): a
  // slot's block and place in it by a shift and a mask, not two integer divisions (a
  // third of a paged decoding step's overhead over a dense one on the host, where every
  // held key's address is listed per step). Last, so that an aggregate initialisation
  // of the fields above leaves it -1.
  int block_shift = -1;

  void set_block_size(index_t bs) {
    block_size = bs;
    block_shift = std::has_single_bit(static_cast<std::uint64_t>(bs))
                      ? std::countr_zero(static_cast<std::uint64_t>(bs))
                      : -1;
  }
  CAKE_HOST_DEVICE index_t room(index_t r) const {
    const index_t s = r / kv_heads;
    return static_cast<index_t>(indptr[s + 1] - indptr[s]) * block_size;
  }
  CAKE_HOST_DEVICE T* key(index_t r, index_t t) const {
    return k + block(r, t) * k_block + (r % kv_heads) * k_head + in_block(t) * k_slot;
  }
  CAKE_HOST_DEVICE T* value(index_t r, index_t t) const {
    return v + block(r, t) * v_block + (r % kv_heads) * v_head + in_block(t) * v_slot;
  }
  CAKE_HOST_DEVICE index_t block(index_t r, index_t t) const {
    const index_t e = block_shift >= 0 ? t >> block_shift : t / block_size;
    return static_cast<index_t>(ids[indptr[r / kv_heads] + e]);
  }
  CAKE_HOST_DEVICE index_t in_block(index_t t) const {
    return block_shift >= 0 ? t & (block_size - 1) : t % block_size;
  }
};

// The prompt's keys in an engine's block pool as window_stats' key source
// (host_stats::dense_keys has the contract): key j of KV head g of sequence b is slot j
// of row b * kv_heads + g, read in place. A run is a block's slots from j on, extended
// over the following blocks while each continues the last at the same pitch.
template <class T>
struct paged_keys {
  using element_type = std::remove_cv_t<T>;
  paged_rows<T> p;
  index_t S = 0;  // the prompt's tokens
  index_t heads() const { return p.kv_heads; }
  index_t tokens() const { return S; }
  const T* row(index_t b, index_t g, index_t j) const { return p.key(b * p.kv_heads + g, j); }
  host_stats::key_run run(index_t b, index_t g, index_t j, index_t most) const {
    const index_t r = b * p.kv_heads + g, bs = p.block_size, pitch = p.k_slot;
    const T* first = p.key(r, j);
    index_t n = std::min(most, bs - j % bs);
    while (n < most && p.key(r, j + n) == first + n * pitch) n = std::min(most, n + bs);
    return {n, pitch};
  }
};

// One layer's storage as raw pointers in the backend's memory: (rows, cap) slots of
// keys and values (head_dim each), positions and, when the layer keeps them, scores.
// A paged layer's K/V are in paged (k and v null). A null pos leaves the metadata
// alone (a move of K/V only); null k and v and no pool, the K/V (metadata only).
template <class T>
struct slots {
  T* k = nullptr;          // (rows, cap, head_dim)
  T* v = nullptr;          // (rows, cap, head_dim)
  index_t* pos = nullptr;  // (rows, cap)
  float* ind = nullptr;    // (rows, cap) or null
  index_t rows = 0, cap = 0, d = 0;
  paged_rows<T> paged{};  // paged.k set: K/V live in an engine's pool
  // (rows, cap) or null: a layer's slot map (host), token t of row r in K/V row (a paged
  // row's slot) map[r * cap + t]; positions and scores stay in token order (see
  // cache_layer::map).
  const index_t* map = nullptr;

  CAKE_HOST_DEVICE bool is_paged() const { return paged.k != nullptr; }
  // Row r's slot t of K (V), or null where it has none: no K/V here, or a paged row's
  // slot past its sequence's blocks (padding there is not stored).
  CAKE_HOST_DEVICE T* key(index_t r, index_t t) const {
    if (map) t = map[r * cap + t];
    if (paged.k) return t < paged.room(r) ? paged.key(r, t) : nullptr;
    return k ? k + (r * cap + t) * d : nullptr;
  }
  CAKE_HOST_DEVICE T* value(index_t r, index_t t) const {
    if (map) t = map[r * cap + t];
    if (paged.k) return t < paged.room(r) ? paged.value(r, t) : nullptr;
    return v ? v + (r * cap + t) * d : nullptr;
  }
  slots kv_only() const {
    slots s = *this;
    s.pos = nullptr;
    s.ind = nullptr;
    return s;
  }
  slots meta_only() const {
    slots s = *this;
    s.k = s.v = nullptr;
    s.paged = {};
    return s;
  }
};

// One row's prefill truncation: its w window tokens move from slot `from` down to
// slot `to`, then slots [to + w, pad_end) become padding.
template <class T>
struct window_move {
  T* k;
  T* v;
  index_t* pos;
  float* ind;  // or null
  index_t from, to, pad_end;
  paged_rows<T> paged{};  // a paged row (k and v null): its K/V, row `row` of the pool
  index_t row = 0;
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

// One layer of a KvCache: its slots in the backend's memory, and on the host the
// tokens of each row. Each (batch, kv-head) row has room for `cap` tokens; row r's
// first len[r] are live and `held` is the longest. Rows differ only with head-wise
// budgets: a row's slots [len[r], held) are then padding (position -1, zero keys and
// values, score 0). During prefill a cut layer keeps its prefix in
// descending-indicator order (a later, smaller budget is then a truncation), then
// the window in position order. `ind`, when the layer has one, holds each slot's
// score and travels with its token: the prefix indicator during prefill, and an
// accumulating indicator's sums for good.
// What a paged layer keeps of the engine's memory: the pools (rows.k, rows.v and their
// strides; rows.indptr and rows.ids are set by cache_layer::at from the vectors here)
// and its own copy of the block table of the blocks it holds, on the host.
struct paged_table {
  std::vector<std::int32_t> indptr;    // (batch + 1)
  std::vector<std::int32_t> ids;       // (indptr[batch])
  std::vector<std::int32_t> seq_lens;  // (batch) tokens each sequence holds
  std::vector<std::int32_t> freed;     // (batch) entries the latest call released
  block_table<host_space> view() const {
    return make_block_table<host_space>(indptr.data(), ids.data(), seq_lens.data(),
                                        static_cast<index_t>(seq_lens.size()),
                                        static_cast<index_t>(ids.size()));
  }
};

template <class T, class Exec>
struct cache_layer {
  using store = layer_store<T, Exec>;
  template <class U>
  using buffer = typename store::template buffer<U>;

  index_t rows = 0, d = 0, cap = 0, held = 0;
  buffer<T> k, v;             // (rows, cap, head_dim); empty for a paged layer
  buffer<index_t> pos;        // (rows, cap)
  buffer<float> ind;          // (rows, cap) or empty
  std::vector<index_t> len;   // (rows)
  bool by_indicator = false;  // prefix in descending-indicator order
  bool cut = false;           // made by a selection (else it holds the whole prompt)
  paged_rows<T> pool{};       // pool.k set: K/V in an engine's pools, addressed by table
  paged_table table;
  // A host layer's slot map while decoding: (rows, cap), a permutation of each row's
  // K/V rows, token t of row r in K/V row map[r * cap + t] (the tokens past len[r] name
  // the free rows). A decoding step then moves no K/V row: the new token goes into a
  // free row and an evicted token's row becomes free, while positions and scores stay
  // in token order. A paged layer has one only with slot_order::any: its rows keep
  // their tokens in their first len[r] slots (the engine reads those), so a step moves
  // the new token's K/V into the evicted one's slot (decode_mapped). `permuted` says
  // the map is not the identity; settle() puts K/V back in token order (before anything
  // reads them in token order).
  buffer<index_t> map;
  bool permuted = false;

  bool paged() const { return pool.k != nullptr; }

  // A layer not prefilled yet has no rows: it holds nothing.
  index_t row_len(index_t r) const { return len.empty() ? 0 : len[static_cast<std::size_t>(r)]; }
  index_t total() const {
    index_t s = 0;
    for (index_t x : len) s += x;
    return s;
  }
  bool uniform() const {
    return std::all_of(len.begin(), len.end(), [&](index_t x) { return x == held; });
  }
  void set_length(index_t n) {
    held = n;
    std::fill(len.begin(), len.end(), n);
  }
  bool has_scores() const { return store::size(ind) > 0; }
  slots<T> at() const {
    slots<T> s{store::size(k) > 0 ? store::ptr(k) : nullptr,
               store::size(v) > 0 ? store::ptr(v) : nullptr,
               store::ptr(pos),
               has_scores() ? store::ptr(ind) : nullptr,
               rows,
               cap,
               d};
    if (paged()) {
      s.paged = pool;
      if (!pool.ids) {  // the host's kernels read the table itself; CUDA's its device copy
        s.paged.indptr = table.indptr.data();
        s.paged.ids = table.ids.data();
      }
    }
    if (permuted) s.map = store::ptr(map);
    return s;
  }
};

// K/V of a mapped layer back in token order (the map becomes the identity): in place,
// row by row, one swap per misplaced K/V row; allocates nothing.
template <class T, class Exec>
void settle(cache_layer<T, Exec>& ly) noexcept {
  if (!ly.permuted) return;
  using S = layer_store<T, Exec>;
  slots<T> s = ly.at();
  s.map = nullptr;  // K/V rows (a paged row's slots) as they lie
  S::settle(s, S::ptr(ly.map));
  ly.permuted = false;
}

// A decoding step's scratch, owned by the cache and grown to the largest layer, so a
// step allocates nothing once the cache has decoded every layer once (or once the
// prefill sized it, see reserve_decode).
template <class T, class Exec>
struct decode_workspace {
  template <class U>
  using buffer = typename layer_store<T, Exec>::template buffer<U>;
  buffer<float> scores, sums;      // (rows, held + 1)
  buffer<index_t> sel;             // (rows, kept)
  buffer<index_t> ints;            // (2, rows): row lengths and keeps (ragged rows)
  buffer<char> bytes;              // the backend's scoring scratch
  buffer<T> keys;                  // (rows, held + 1, head_dim): a paged layer's keys, scored
  std::vector<index_t> host_ints;  // the same on the host
  cache_layer<T, Exec> spare;      // reference order: the kept tokens before they go back
};

// ---- helpers ------------------------------------------------------------------

template <class T, class Exec, class Buf>
void reserve(const Exec& exec, Buf& b, index_t n) {
  using S = layer_store<T, Exec>;
  using U = std::remove_pointer_t<decltype(S::ptr(b))>;
  if (S::size(b) < n) b = S::template make<U>(exec, n);
}

// with_kv false: the metadata only (a paged layer, its K/V in the engine's pools).
// with_map: a layer of the cache that may decode over a slot map (a backend with one;
// a paged layer with slot_order::any) gets its identity map now, so that decoding
// allocates nothing while it has room.
template <class T, class Exec>
cache_layer<T, Exec> make_layer(const Exec& exec, index_t rows, index_t d, index_t cap,
                                bool with_scores, bool with_kv = true, bool with_map = false) {
  using S = layer_store<T, Exec>;
  cache_layer<T, Exec> ly;
  ly.rows = rows;
  ly.d = d;
  ly.cap = cap;
  if (with_kv) {
    ly.k = S::template make<T>(exec, rows * cap * d);
    ly.v = S::template make<T>(exec, rows * cap * d);
  }
  ly.pos = S::template make<index_t>(exec, rows * cap);
  if (with_scores) {
    ly.ind = S::template make<float>(exec, rows * cap);
    S::fill(exec, S::ptr(ly.ind), rows * cap, 0.0f);  // slots without a score read 0
  }
  if constexpr (requires { S::slot_map; }) {
    if (with_map) {
      ly.map = S::template make<index_t>(exec, rows * cap);
      index_t* m = S::ptr(ly.map);
      for (index_t r = 0; r < rows; ++r)
        for (index_t t = 0; t < cap; ++t) m[r * cap + t] = t;
    }
  }
  ly.len.assign(static_cast<std::size_t>(rows), 0);
  return ly;
}

// Per-row integers in the backend's memory (ragged rows: lengths, keeps).
template <class T, class Exec>
auto upload_ints(const Exec& exec, std::span<const index_t> x) {
  using S = layer_store<T, Exec>;
  auto b = S::template make<index_t>(exec, static_cast<index_t>(x.size()));
  S::upload(exec, x.data(), S::ptr(b), static_cast<index_t>(x.size()));
  return b;
}

// (batch, kv_heads, n, head_dim) over keys or values laid out like slots s.
template <class Space, class U>
view<U, 4, Space> token_view(U* base, const slots<std::remove_const_t<U>>& s, const LayerShape& sh,
                             index_t n) {
  // An empty layer (cap = 0, d = 0) still needs the positive strides layout_stride requires.
  const index_t c = std::max<index_t>(s.cap, 1), dd = std::max<index_t>(s.d, 1);
  return make_view<Space>(base, std::array<index_t, 4>{sh.batch, sh.kv_heads, n, s.d},
                          std::array<index_t, 4>{sh.kv_heads * c * dd, c * dd, dd, 1});
}

// ---- what a layer holds ---------------------------------------------------------

template <class T, class Exec>
auto keys(const cache_layer<T, Exec>& ly, const LayerShape& sh) {
  const slots<T> s = ly.at();
  return token_view<typename Exec::memory_space>(static_cast<const T*>(s.k), s, sh, ly.held);
}
template <class T, class Exec>
auto values(const cache_layer<T, Exec>& ly, const LayerShape& sh) {
  const slots<T> s = ly.at();
  return token_view<typename Exec::memory_space>(static_cast<const T*>(s.v), s, sh, ly.held);
}
// (batch, kv_heads, held)
template <class T, class Exec>
auto positions(const cache_layer<T, Exec>& ly, const LayerShape& sh) {
  const slots<T> s = ly.at();
  const index_t c = std::max<index_t>(s.cap, 1);
  return make_view<typename Exec::memory_space>(
      static_cast<const index_t*>(s.pos), std::array<index_t, 3>{sh.batch, sh.kv_heads, ly.held},
      std::array<index_t, 3>{sh.kv_heads * c, c, 1});
}
// Bytes a layer's buffers hold: K and V at its capacity (none for a paged layer),
// positions, kept scores and a host layer's slot map.
template <class T, class Exec>
std::size_t layer_bytes(const cache_layer<T, Exec>& ly) {
  using S = layer_store<T, Exec>;
  const auto z = [](index_t n) { return static_cast<std::size_t>(n); };
  return z(S::size(ly.k) + S::size(ly.v)) * sizeof(T) +
         z(S::size(ly.pos) + S::size(ly.map)) * sizeof(index_t) +
         z(S::size(ly.ind)) * sizeof(float);
}
// The scores a stored layer keeps for its held tokens.
template <class T, class Exec>
token_scores scores(const cache_layer<T, Exec>& ly) {
  return {ly.at().ind, ly.cap, ly.held};
}

// ---- prefill --------------------------------------------------------------------

// An accumulating indicator's prefill sums: out[r, t] (row stride ld) = the attention
// token t receives from the window rows (row i sees tokens [0, S - w + i]), summed
// over the rows, each row's share the mean over the GQA group's query heads. The
// default: each window row is a decoding step's scoring against the keys it sees,
// added to the sums; a backend may supply a fused `attention_sums` (the host's reads
// window_stats' score tiles).
template <class T, class Exec, class QV, class KV>
void attention_sums(const Exec& exec, const QV& q, const KV& k, float* out, index_t ld) {
  using S = layer_store<T, Exec>;
  if constexpr (requires { S::attention_sums(exec, q, k, out, ld); }) {
    S::attention_sums(exec, q, k, out, ld);
  } else {
    using Space = typename Exec::memory_space;
    const index_t B = q.extent(0), H = q.extent(1), w = q.extent(2), d = q.extent(3);
    const index_t Hkv = k.extent(1), n = k.extent(2), P = n - w, rows = B * Hkv;
    auto row = S::template make<float>(exec, rows * n);  // (rows, n): one window row's scores
    typename S::template buffer<char> scratch;
    S::reserve_scoring(exec, scratch, B, H, Hkv, n);
    S::fill(exec, S::ptr(row), rows * n, 0.0f);
    S::copy_2d(exec, static_cast<const float*>(S::ptr(row)), n, out, ld, rows, n);  // zeros
    for (index_t i = 0; i < w; ++i) {
      const index_t seen = P + i + 1;
      const auto qi = make_view<Space>(
          q.data_handle() + i * static_cast<index_t>(q.stride(2)), std::array<index_t, 3>{B, H, d},
          std::array<index_t, 3>{static_cast<index_t>(q.stride(0)),
                                 static_cast<index_t>(q.stride(1)), 1});
      const auto ki =
          make_view<Space>(k.data_handle(), std::array<index_t, 4>{B, Hkv, seen, d},
                           std::array<index_t, 4>{static_cast<index_t>(k.stride(0)),
                                                  static_cast<index_t>(k.stride(1)),
                                                  static_cast<index_t>(k.stride(2)), 1});
      S::candidates(exec, qi, ki, WindowMeanIndicator{1},
                    make_view<Space>(S::ptr(row), std::array<index_t, 3>{B, Hkv, seen},
                                     std::array<index_t, 3>{Hkv * n, n, 1}),
                    scratch);
      S::accumulate(exec, out, ld, S::ptr(row), n, rows, seen);
    }
  }
}

// A layer's prefill scoring: its statistics (for the preference) and its tokens'
// scores into out: (batch, kv_heads, cols), cols = S for an accumulating indicator
// (every token, the window included), else S - w. The window statistics are the
// indicator itself for a window indicator; for any other, they are computed only
// when the preference reads them (then the cheapest indicator fills a scratch).
// paged (host): the prompt's keys are in an engine's pool (k gives their shape only),
// read through the block table in place: window statistics, and a position indicator
// (which reads no keys) with them; the other sources score a dense copy.
template <class T, class Pref, class Exec, class Ind, class QV, class KV>
LayerStats score_prefill(const Exec& exec, const Ind& ind, const QV& q, const KV& k, float* out,
                         index_t cols, const paged_keys<T>* paged = nullptr) {
  using S = layer_store<T, Exec>;
  using Space = typename Exec::memory_space;
  constexpr indicator_source source = indicator_source_of<Ind>;
  const index_t B = q.extent(0), H = q.extent(1), w = q.extent(2), d = q.extent(3);
  const index_t Hkv = k.extent(1), n = k.extent(2), P = n - w;
  // Strides >= 1 even when cols = 0 (S == w): layout_stride requires them.
  const index_t ld = std::max<index_t>(cols, 1);
  const auto out_view = [&](index_t c) {  // (batch, kv_heads, c) inside out
    return make_view<Space>(out, std::array<index_t, 3>{B, Hkv, c},
                            std::array<index_t, 3>{Hkv * ld, ld, 1});
  };
  CAKE_EXPECTS(paged == nullptr || source == indicator_source::window ||
                   source == indicator_source::position,
               "cake.prefill.paged",
               "keys in a pool are read in place for window and position indicators only");
  LayerStats stats{};
  if (source == indicator_source::window || Pref::needs_entropy || Pref::needs_variance) {
    auto st = S::template make<float>(exec, 2);
    const auto st_view = make_view<Space>(S::ptr(st), std::array<index_t, 1>{2});
    const auto stats_into = [&](const auto& indicator, const auto& io) {
      const StatsRequest req = StatsRequest::for_preference<Pref>();
      if constexpr (std::is_same_v<Exec, host_policy>) {
        if (paged) {
          check_window_stats_args<Exec>(indicator, q, k, io, st_view);
          window_stats_backend<host_policy>::run_keys(exec, as_view(q), *paged, indicator, io,
                                                      st_view, req);
          return;
        }
      }
      window_stats(exec, q, k, indicator, io, st_view, req);
    };
    if constexpr (source == indicator_source::window) {
      stats_into(ind, out_view(P));
    } else {
      auto scratch = S::template make<float>(exec, B * Hkv * P);
      stats_into(WindowMeanIndicator{1},
                 make_view<Space>(S::ptr(scratch), std::array<index_t, 3>{B, Hkv, P}));
    }
    std::array<float, 2> h{};
    S::download(exec, static_cast<const float*>(S::ptr(st)), 2, h.data(), 1,
                2);  // all the host needs
    stats = {h[0], h[1]};
  }
  if constexpr (source == indicator_source::position) {
    S::position_scores(exec, ind, nullptr, 0, out, cols, B * Hkv, P);
  } else if constexpr (source == indicator_source::last_query) {
    // The last window row sees every key: the decode-time scoring, unmasked.
    // (batch, q_heads, head_dim): window row w - 1 of every head.
    const auto last =
        make_view<Space>(q.data_handle() + (w - 1) * static_cast<index_t>(q.stride(2)),
                         std::array<index_t, 3>{B, H, d},
                         std::array<index_t, 3>{static_cast<index_t>(q.stride(0)),
                                                static_cast<index_t>(q.stride(1)), 1});
    decode_scores(exec, last, k, ind, out_view(P));
  } else if constexpr (source == indicator_source::accumulated) {
    attention_sums<T>(exec, q, k, out, cols);
  } else if constexpr (source == indicator_source::custom) {
    ind.prefill_scores(exec, q, k, out_view(P));
  }
  return stats;
}

// Head-wise allocation of a layer budget over its rows: how many of its scored
// tokens each row keeps. sc: (rows, cols) scores in the backend's memory, decided on
// the host (they come to it); avail: tokens scored per row (empty: cols).
template <class Exec>
std::vector<index_t> head_lengths(const Exec& exec, const LayerShape& sh, token_scores sc,
                                  std::span<const index_t> avail, index_t cols, index_t budget,
                                  index_t floor) {
  using S = layer_store<float, Exec>;
  const index_t B = sh.batch, Hkv = sh.kv_heads;
  std::vector<float> h(static_cast<std::size_t>(B * Hkv * cols));
  S::download(exec, sc.p, sc.ld, h.data(), B * Hkv, cols);
  std::vector<index_t> out(static_cast<std::size_t>(B * Hkv));
  auto lv = make_view(out.data(), std::array<index_t, 2>{B, Hkv});
  allocate_heads_rows(make_view(h.data(), std::array<index_t, 3>{B, Hkv, cols}), avail, budget,
                      floor, lv);
  return out;
}

// A layer holding all S tokens in position order (an uncut prompt, or one-shot mode
// before the last layer), with room for one decoded token; scores, when given,
// travel with the tokens (the first sc.cols slots of each row).
// with_kv false: a paged layer, whose prompt is in the engine's pools already: only
// its positions and scores are written (and it has a slot map when paged_map).
template <class T, class Exec, class KV, class VV>
cache_layer<T, Exec> copy_all(const Exec& exec, const LayerShape& sh, const KV& k, const VV& v,
                              token_scores sc, bool with_kv = true, bool paged_map = false) {
  const index_t S = k.extent(2);
  auto out = make_layer<T>(exec, sh.rows(), sh.head_dim, S + 1, sc.p != nullptr, with_kv,
                           with_kv || paged_map);
  layer_store<T, Exec>::copy_prompt(exec, k, v, out.at(), sc, sh.kv_heads);
  out.set_length(S);
  return out;
}

// Slots [0, n) of out take source tokens sel[r, t] (rows, n): keys and values from
// k and v, positions from src_pos (null: the index itself), scores from sc; slots at
// or past lens[r] + lens_base (lens null: lens_base) become padding.
template <class T, class Exec, class KV, class VV>
void gather_into(const Exec& exec, const LayerShape& sh, const KV& k, const VV& v,
                 const index_t* src_pos, index_t src_cap, token_scores sc, const index_t* sel,
                 index_t n, const slots<T>& out, const index_t* lens, index_t lens_base) {
  using Space = typename Exec::memory_space;
  using S = layer_store<T, Exec>;
  const auto keep_v = make_view<Space>(sel, std::array<index_t, 3>{sh.batch, sh.kv_heads, n});
  compact(exec, k, keep_v, token_view<Space>(out.k, out, sh, n));
  compact(exec, v, keep_v, token_view<Space>(out.v, out, sh, n));
  S::gather_meta(exec, out, sel, n, src_pos, src_cap, sc);
  if (lens) S::pad(exec, out, lens, lens_base, n);
}

// The same from stored slots src (the n_src first of each row, src.pos non-null): a
// paged source moves its K/V slot by slot (out is a dense scratch, or src itself
// when every row of sel ascends), then the metadata; a dense one is gathered above.
template <class T, class Exec>
void gather_slots(const Exec& exec, const LayerShape& sh, const slots<T>& src, index_t n_src,
                  token_scores sc, const index_t* sel, index_t n, const slots<T>& out,
                  const index_t* lens, index_t lens_base) {
  using Space = typename Exec::memory_space;
  using S = layer_store<T, Exec>;
  if (!src.is_paged()) {
    gather_into(exec, sh, token_view<Space>(static_cast<const T*>(src.k), src, sh, n_src),
                token_view<Space>(static_cast<const T*>(src.v), src, sh, n_src), src.pos, src.cap,
                sc, sel, n, out, lens, lens_base);
    return;
  }
  S::move_slots(exec, out.kv_only(), src.kv_only(), nullptr, 0, sel, n, lens, lens ? lens_base : n);
  S::gather_meta(exec, out, sel, n, src.pos, src.cap, sc);
  if (lens) S::pad(exec, out.meta_only(), lens, lens_base, n);
}

// A paged layer's K/V moves of a prefill, planned before the commit and run by it
// (commit_move), in place in the pools: slot t < n of row r takes slot sel[r, t];
// slots at or past lens[r] + base (lens null: base) become zero K/V. A selection
// that permutes (descending order) goes through a dense scratch.
template <class T, class Exec>
struct kv_move {
  typename layer_store<T, Exec>::template buffer<index_t> sel, lens;  // (rows, n), (rows)
  const index_t* order = nullptr;                                     // sel, or a sorted copy
  typename layer_store<T, Exec>::template buffer<index_t> sorted;
  index_t n = 0, base = 0;
  bool ascending = true;
};
template <class T, class Exec>
void commit_move(const Exec& exec, const slots<T>& kv, const kv_move<T, Exec>& mv,
                 const cache_layer<T, Exec>& scratch) {
  using S = layer_store<T, Exec>;
  const index_t* lens = S::size(mv.lens) > 0 ? S::ptr(mv.lens) : nullptr;
  if (mv.ascending) {
    S::move_slots(exec, kv.kv_only(), kv.kv_only(), nullptr, 0, mv.order, mv.n, lens, mv.base);
  } else {
    const slots<T> tmp = scratch.at().kv_only();
    S::move_slots(exec, tmp, kv.kv_only(), nullptr, 0, mv.order, mv.n, lens, mv.base);
    S::move_slots(exec, kv.kv_only(), tmp, nullptr, 0, nullptr, mv.n, lens, mv.base);
  }
}

// A layer holding, per row r, the keep[r] prefix tokens of highest score and the
// window (the last w of the P + w source tokens); rows shorter than the longest are
// padded. The source is the caller's tensors (src_pos null: positions 0..S-1) or a
// stored layer; sc scores its first sc.cols >= P tokens. The new layer keeps the
// scores of its tokens (those that have one) when keep_scores. One top-k for all
// rows: of the longest keep in descending order when rows differ (the first keep[r]
// of it are row r's top keep[r], sorted by index for position order), then one gather.
// A paged source (paged non-null: its slots, k and v unused) is not moved here: its
// new layer has the metadata only (and a slot map when paged_map), and `move` the K/V
// moves for the commit.
template <class T, class Exec, class KV, class VV>
cache_layer<T, Exec> select(const Exec& exec, const LayerShape& sh, const KV& k, const VV& v,
                            const index_t* src_pos, index_t src_cap, token_scores sc, index_t P,
                            std::span<const index_t> keep, bool position_order, bool keep_scores,
                            const slots<T>* paged = nullptr, kv_move<T, Exec>* move = nullptr,
                            bool paged_map = false) {
  using S = layer_store<T, Exec>;
  using Space = typename Exec::memory_space;
  const index_t rows = sh.rows(), w = sh.window;
  const index_t most = *std::max_element(keep.begin(), keep.end()), n = most + w;
  const bool ragged = *std::min_element(keep.begin(), keep.end()) != most;
  auto sel = S::template make<index_t>(exec, rows * n);  // (rows, n)
  auto sorted = S::template make<index_t>(exec, position_order && ragged ? rows * n : 0);
  auto kd = upload_ints<T>(exec, ragged ? keep : std::span<const index_t>{});
  auto out = make_layer<T>(exec, rows, sh.head_dim, n + 1, keep_scores, paged == nullptr,
                           paged == nullptr ? !ragged : paged_map);
  index_t* s = S::ptr(sel);
  const index_t* kp = ragged ? S::ptr(kd) : nullptr;
  select_k(
      exec,
      make_view<Space>(sc.p, std::array<index_t, 2>{rows, P}, std::array<index_t, 2>{sc.ld, 1}),
      make_view<Space>(s, std::array<index_t, 2>{rows, most}, std::array<index_t, 2>{n, 1}),
      position_order && !ragged ? select_order::position : select_order::descending);
  if (position_order && ragged) {
    S::sort_prefixes(exec, s, S::ptr(sorted), n, rows, kp, nullptr, 0);
    s = S::ptr(sorted);
  }
  S::window_slots(exec, s, rows, n, kp, ragged ? 0 : most, w, nullptr, P);
  if (!paged) {
    gather_into(exec, sh, k, v, src_pos, src_cap, keep_scores ? sc : token_scores{}, s, n, out.at(),
                kp, w);
  } else {
    const slots<T> meta = out.at().meta_only();
    S::gather_meta(exec, meta, s, n, src_pos, src_cap, keep_scores ? sc : token_scores{});
    if (kp) S::pad(exec, meta, kp, w, n);
    move->n = n;
    move->base = kp ? w : n;
    move->ascending = position_order;
    move->order = s;
    move->sel = std::move(sel);  // buffers move with their memory: `order` stays valid
    move->sorted = std::move(sorted);
    move->lens = std::move(kd);
  }
  for (index_t r = 0; r < rows; ++r)
    out.len[static_cast<std::size_t>(r)] = keep[static_cast<std::size_t>(r)] + w;
  out.held = n;
  out.by_indicator = !position_order;
  out.cut = true;
  return out;
}

// A stored layer truncated to prefix[r] prefix tokens per row and reordered to
// position order: each row's first prefix[r] slots sorted by position, then its
// window. In place, so that a cascade holds at most one layer in flight (spec
// section 5): plan_reorder builds the index lists while planning (it allocates);
// commit_reorder gathers the layer into a scratch layer shared by every reorder of
// the call and moves it back (no allocation).
template <class T, class Exec>
struct reorder_plan {
  typename layer_store<T, Exec>::template buffer<index_t> ints, sorted;  // (2, rows), (rows, n)
  std::vector<index_t> len;                                              // (rows) new lengths
  index_t n = 0;                                                         // the longest new row
};
template <class T, class Exec>
reorder_plan<T, Exec> plan_reorder(const Exec& exec, const cache_layer<T, Exec>& ly,
                                   const LayerShape& sh, std::span<const index_t> prefix) {
  using S = layer_store<T, Exec>;
  const index_t rows = ly.rows, w = sh.window;
  reorder_plan<T, Exec> rp;
  std::vector<index_t> ints(static_cast<std::size_t>(2 * rows));  // prefix, then window start
  rp.len.resize(static_cast<std::size_t>(rows));
  for (index_t r = 0; r < rows; ++r) {
    const index_t p = prefix[static_cast<std::size_t>(r)];
    rp.n = std::max(rp.n, p + w);
    ints[static_cast<std::size_t>(r)] = p;
    ints[static_cast<std::size_t>(rows + r)] = ly.row_len(r) - w;
    rp.len[static_cast<std::size_t>(r)] = p + w;
  }
  const index_t n = rp.n;
  rp.ints = upload_ints<T>(exec, ints);
  auto sel = S::template make<index_t>(exec, rows * n);
  rp.sorted = S::template make<index_t>(exec, rows * n);
  const index_t* pd = S::ptr(rp.ints);
  const slots<T> src = ly.at();
  S::window_slots(exec, S::ptr(sel), rows, n, nullptr, 0, n, nullptr, 0);  // 0, 1, ..., n - 1
  S::sort_prefixes(exec, S::ptr(sel), S::ptr(rp.sorted), n, rows, pd, src.pos, src.cap);
  S::window_slots(exec, S::ptr(rp.sorted), rows, n, pd, 0, w, pd + rows, 0);
  return rp;
}
// scratch: rows like ly, room for rp.n tokens, scores when ly has them.
template <class T, class Exec>
void commit_reorder(const Exec& exec, cache_layer<T, Exec>& ly, const LayerShape& sh,
                    reorder_plan<T, Exec>& rp, const cache_layer<T, Exec>& scratch) {
  using S = layer_store<T, Exec>;
  const slots<T> src = ly.at(), tmp = scratch.at();
  const index_t* pd = S::ptr(rp.ints);
  gather_slots(exec, sh, src, ly.held, scores(ly), S::ptr(rp.sorted), rp.n, tmp, pd, sh.window);
  S::move_slots(exec, src, tmp, tmp.ind, tmp.cap, nullptr, rp.n, pd, sh.window);
  ly.held = rp.n;
  ly.len.swap(rp.len);
  ly.by_indicator = false;
  ly.cut = true;
}

// The truncations of a prefill's commit (row r of each layer keeps its first
// prefix[r] prefix tokens, the highest-indicator ones, and its window), staged in the
// backend before the commit, so that running them is the commit's one step that
// may fail (CUDA: a single launch, which changes nothing when it fails).
template <class T, class Exec>
struct truncation {
  typename layer_store<T, Exec>::staged_moves moves;
  std::vector<std::size_t> layers;        // which layers change
  std::vector<index_t> held;              // their new longest row
  std::vector<std::vector<index_t>> len;  // their new row lengths
};

// skip[l]: a layer replaced by a reorder (its new layer is truncated already).
template <class T, class Exec>
truncation<T, Exec> prepare_truncate(const Exec& exec, std::span<const cache_layer<T, Exec>> layers,
                                     const LayerShape& sh, std::span<const layer_plan> plan,
                                     std::span<const char> skip) {
  const index_t w = sh.window;
  truncation<T, Exec> tr;
  std::vector<window_move<T>> jobs;
  for (std::size_t l = 0; l < plan.size() && l < layers.size(); ++l) {
    if (plan[l].action != layer_action::truncate || skip[l]) continue;
    const cache_layer<T, Exec>& ly = layers[l];
    const slots<T> s = ly.at();
    index_t longest = 0;
    for (index_t r = 0; r < ly.rows; ++r) longest = std::max(longest, row_prefix(plan[l], r) + w);
    std::vector<index_t> len(static_cast<std::size_t>(ly.rows));
    for (index_t r = 0; r < ly.rows; ++r) {
      const index_t p = row_prefix(plan[l], r), old = ly.row_len(r), off = r * s.cap;
      // Only the window moves; freed slots below the new longest row become padding.
      if (p + w != old)
        jobs.push_back({s.k ? s.k + off * s.d : nullptr, s.v ? s.v + off * s.d : nullptr,
                        s.pos + off, s.ind ? s.ind + off : nullptr, old - w, p,
                        std::max(p + w, std::min(old, longest)), s.paged, r});
      len[static_cast<std::size_t>(r)] = p + w;
    }
    tr.layers.push_back(l);
    tr.held.push_back(longest);
    tr.len.push_back(std::move(len));
  }
  tr.moves = layer_store<T, Exec>::stage_moves(exec, std::move(jobs));
  return tr;
}
template <class T, class Exec>
void truncate(const Exec& exec, std::span<cache_layer<T, Exec>> layers, const LayerShape& sh,
              truncation<T, Exec>& tr) {
  layer_store<T, Exec>::move_windows(exec, tr.moves, sh.head_dim, sh.window);
  for (std::size_t i = 0; i < tr.layers.size(); ++i) {  // nothing below throws
    cache_layer<T, Exec>& ly = layers[tr.layers[i]];
    ly.held = tr.held[i];
    ly.len.swap(tr.len[i]);
  }
}

// A paged layer after a call: sequence s holds the longest of its rows, in its first
// ceil(len / block_size) blocks; its table's other entries (the tail, freed[s]) are
// released and the table closes up (paged_plan's new_lens and freed). In place and
// without allocation: it runs after a commit.
template <class T, class Exec>
void release_blocks(cache_layer<T, Exec>& ly, index_t kv_heads) noexcept {
  paged_table& t = ly.table;
  const auto n = static_cast<index_t>(t.seq_lens.size());
  const index_t bs = ly.pool.block_size;
  std::int32_t next = 0;  // the new first entry of sequence s
  for (index_t s = 0; s < n; ++s) {
    const auto su = static_cast<std::size_t>(s);
    const std::int32_t first = t.indptr[su], have = t.indptr[su + 1] - first;
    index_t len = 0;
    for (index_t g = 0; g < kv_heads; ++g) len = std::max(len, ly.row_len(s * kv_heads + g));
    const auto keep = static_cast<std::int32_t>((len + bs - 1) / bs);
    for (std::int32_t e = 0; e < keep; ++e)
      t.ids[static_cast<std::size_t>(next + e)] = t.ids[static_cast<std::size_t>(first + e)];
    t.indptr[su] = next;
    t.seq_lens[su] = static_cast<std::int32_t>(len);
    t.freed[su] = have - keep;
    next += keep;
  }
  t.indptr[static_cast<std::size_t>(n)] = next;
  t.ids.resize(static_cast<std::size_t>(next));  // shrinks: no allocation
}

// Prefill is over: the prefix indicator is no longer needed, unless the scores
// accumulate while decoding.
template <class T, class Exec>
void finish_prefill(cache_layer<T, Exec>& ly, bool keep_scores) noexcept {
  if (!keep_scores) ly.ind = typename cache_layer<T, Exec>::template buffer<float>();
}

// ---- decode ---------------------------------------------------------------------

// Sizes a decoding step's scratch for layers holding up to `most` tokens (the
// window included) before a step: called once the prompt is in, so that decoding
// allocates nothing while every layer has room.
template <class T, class Exec>
void reserve_decode(const Exec& exec, decode_workspace<T, Exec>& ws, const LayerShape& sh,
                    index_t q_heads, index_t most, bool ragged, bool reference, bool sums) {
  using S = layer_store<T, Exec>;
  const index_t rows = sh.rows(), n = most + 1;
  reserve<T>(exec, ws.scores, rows * n);
  if (sums) reserve<T>(exec, ws.sums, rows * n);
  reserve<T>(exec, ws.sel, rows * n);
  if (ragged) {
    reserve<T>(exec, ws.ints, 2 * rows);
    ws.host_ints.reserve(static_cast<std::size_t>(2 * rows));
  }
  S::reserve_scoring(exec, ws.bytes, sh.batch, q_heads, sh.kv_heads, n);
  if constexpr (requires { S::reserve_scores(exec, sh.batch, q_heads, sh.kv_heads, n, n); })
    S::reserve_scores(exec, sh.batch, q_heads, sh.kv_heads, n, sh.head_dim);
  if (reference && ws.spare.cap < n) ws.spare = make_layer<T>(exec, rows, sh.head_dim, n, sums);
}

// The same once the last layer is planned (before its commit), for the layers as
// they will be: a row holds at most what it holds now (fresh[l], when the plan
// replaces layer l, else layers[l]) or its budget + w before a step.
template <class T, class Exec>
void reserve_decode(const Exec& exec, decode_workspace<T, Exec>& ws, const LayerShape& sh,
                    index_t q_heads, std::span<const cache_layer<T, Exec>> layers,
                    std::span<const cache_layer<T, Exec>> fresh, std::span<const index_t> budgets,
                    bool ragged, bool reference, bool sums) {
  index_t most = 0;
  for (std::size_t l = 0; l < fresh.size(); ++l)
    most =
        std::max({most, (fresh[l].rows > 0 ? fresh[l] : layers[l]).held, budgets[l] + sh.window});
  reserve_decode(exec, ws, sh, q_heads, most, ragged, reference, sums);
}

// A copy of ly with room for cap tokens per row.
template <class T, class Exec>
cache_layer<T, Exec> regrow(const Exec& exec, const cache_layer<T, Exec>& ly, index_t cap) {
  // K/V in token order (same tokens). Before the allocation below, which could throw
  // with a paged layer's pools reordered; a layer whose map is permuted never regrows
  // (a step that evicts leaves N tokens, and the next step needs no more), so settle
  // moves nothing here today.
  if constexpr (requires { layer_store<T, Exec>::slot_map; })
    settle(const_cast<cache_layer<T, Exec>&>(ly));
  // A paged layer's K/V stay where they are: only its metadata grows.
  auto out = make_layer<T>(exec, ly.rows, ly.d, cap, ly.has_scores(), !ly.paged(),
                           layer_store<T, Exec>::size(ly.map) > 0);
  out.pool = ly.pool;
  out.table = ly.table;
  const slots<T> s = ly.at();
  layer_store<T, Exec>::move_slots(exec, ly.paged() ? out.at().meta_only() : out.at(),
                                   ly.paged() ? s.meta_only() : s, s.ind, s.cap, nullptr, ly.held,
                                   nullptr, ly.held);
  out.held = ly.held;
  out.len = ly.len;
  out.by_indicator = ly.by_indicator;
  out.cut = ly.cut;
  return out;
}

// What a decoding step does with a layer holding `held` tokens (its longest row): N
// after the append, of which the first cand = N - w are candidates and `keep` stay
// (rows keeping their lengths evict one; others keep up to the budget), n = keep + w
// held after; evict: keep < cand.
struct step_plan {
  index_t N, cand, keep, n;
  bool evict;
};
inline step_plan plan_step(index_t held, index_t w, index_t budget, bool keep_lengths) {
  const index_t N = held + 1, cand = N - w;
  const index_t keep = keep_lengths ? cand - 1 : std::min(budget, cand);
  return {N, cand, keep, keep + w, keep < cand};
}
// Room for the step's N tokens: a layer regrows to N (rows keeping their lengths) or
// to twice its room, within budget + w + 1 (at least N).
template <class T, class Exec>
void make_room(const Exec& exec, cache_layer<T, Exec>& ly, const step_plan& p, index_t budget,
               index_t w, bool keep_lengths) {
  if (p.N > ly.cap)
    ly = regrow(exec, ly, keep_lengths ? p.N : std::max(p.N, std::min(2 * ly.cap, budget + w + 1)));
}

// A decoding step of a host layer of uniform rows over its slot map (cache_layer::map),
// the same tokens and order as the step below: the new token goes into a free K/V row,
// the scores read the held keys through the map, and the commit permutes the map,
// positions and scores (O(tokens) integers per row, no K/V row); one eviction in
// position order selects by argmin, reference order by a counting sort. A paged row
// then fills the slots its evicted tokens leave below n with the kept tokens above
// (the new token's, where one token goes), so that it holds its first n slots.
template <class T, class Exec, class Ind, class QV, class KV, class VV>
void decode_mapped(const Exec& exec, cache_layer<T, Exec>& ly, decode_workspace<T, Exec>& ws,
                   const LayerShape& sh, const QV& q, const KV& k, const VV& v, index_t position,
                   index_t budget, const Ind& indicator, bool reference, bool keep_lengths) {
  using S = layer_store<T, Exec>;
  using Space = typename Exec::memory_space;
  constexpr indicator_source source = indicator_source_of<Ind>;
  constexpr bool accumulates = source == indicator_source::accumulated;
  const index_t B = sh.batch, Hkv = sh.kv_heads, d = sh.head_dim, w = sh.window, rows = sh.rows();
  const step_plan p = plan_step(ly.held, w, budget, keep_lengths);
  const index_t N = p.N, cand = p.cand, keep = p.keep, n = p.n;

  // 1. Room and scratch (nothing visible changes; regrow settles the map).
  make_room(exec, ly, p, budget, w, keep_lengths);
  reserve_decode(exec, ws, sh, q.extent(1), ly.held, false, false, accumulates);
  slots<T> s = ly.at();  // the layer has its map (make_layer, regrow)
  s.map = S::ptr(ly.map);
  slots<T> raw = s;  // a paged row's slots as they lie, for compact_row
  raw.map = nullptr;
  const bool paged = s.is_paged();

  // 2. The new token into each row's first free K/V row (token slot held).
  S::append(exec, s, k, v, position, nullptr, ly.held, Hkv);
  ly.permuted = true;  // the map may be any permutation from here on (it is one)

  // 3. Scores (rows, N) with row stride N.
  float* sc = S::ptr(ws.scores);
  float* sums = accumulates ? S::ptr(ws.sums) : nullptr;
  const auto out = [&](index_t cols) {
    return make_view<Space>(sc, std::array<index_t, 3>{B, Hkv, cols},
                            std::array<index_t, 3>{Hkv * N, N, 1});
  };
  if constexpr (accumulates) {  // the held sums, 0 for the new token
    S::fill(exec, sums, rows * N, 0.0f);
    S::copy_2d(exec, static_cast<const float*>(s.ind), s.cap, sums, N, rows, ly.held);
  }
  if constexpr (source == indicator_source::position) {
    S::position_scores(exec, indicator, s.pos, s.cap, sc, N, rows, cand);
  } else {
    const auto qv = make_view<Space>(q.data_handle(), std::array<index_t, 3>{B, q.extent(1), d},
                                     std::array<index_t, 3>{static_cast<index_t>(q.stride(0)),
                                                            static_cast<index_t>(q.stride(1)), 1});
    if constexpr (!accumulates) {
      // Steps 4 and 5 below on the worker that scored the row, as soon as its scores are
      // out: no serial pass over the rows after. One eviction in position order, or a
      // reference-order sort (each worker its own scratch).
      index_t* map = S::ptr(ly.map);
      if (p.evict && !reference && keep == cand - 1) {
        S::candidates_listed(exec, qv, s, 0, Hkv, N, indicator, out(cand), ws.bytes,
                             [&s, &raw, paged, map, sc, cand, n, N](index_t r, int) noexcept {
                               S::evict_one_row(s, map, r, sc + r * N, cand, N, nullptr);
                               if (paged) S::compact_row(raw, map, r, n, N);
                             });
        ly.set_length(n);
        return;
      }
      if (p.evict && reference && S::sort_commit_fits(exec, rows, N, ws.bytes)) {
        char* scratch = S::ptr(ws.bytes);
        const index_t per = S::sort_commit_bytes(N);
        S::candidates_listed(exec, qv, s, 0, Hkv, N, indicator, out(cand), ws.bytes,
                             [&s, &raw, paged, map, sc, cand, keep, w, n, N, scratch, per](
                                 index_t r, int worker) noexcept {
                               S::sort_commit_row(s, map, r, sc + r * N, cand, keep, w, N,
                                                  scratch + worker * per);
                               if (paged) S::compact_row(raw, map, r, n, N);
                             });
        ly.set_length(n);
        return;
      }
    }
    S::candidates_listed(exec, qv, s, 0, Hkv, N, indicator, out(accumulates ? N : cand), ws.bytes);
    if constexpr (accumulates) S::accumulate(exec, sums, N, sc, N, rows, N);
  }
  if (!p.evict) {  // below budget + w: the rows grow
    if constexpr (accumulates)
      S::copy_2d(exec, static_cast<const float*>(sums), N, s.ind, s.cap, rows, N);
    ly.set_length(N);
    return;
  }

  // 4. Selection: (rows, n) tokens to keep, the window last, and 5. the commit of the
  // map, positions and scores (cannot fail); one eviction in position order does both
  // in one pass per row.
  if (!reference && keep == cand - 1) {
    S::evict_one_mapped(s, S::ptr(ly.map), accumulates ? sums : sc, N, cand, N, sums);
  } else {
    index_t* sel = S::ptr(ws.sel);
    S::select_decode(exec, accumulates ? sums : sc, N, rows, cand, keep, sel, n,
                     reference ? select_order::descending : select_order::position, ws.bytes);
    S::window_slots(exec, sel, rows, n, nullptr, keep, w, nullptr, cand);
    S::commit_mapped(s, S::ptr(ly.map), sel, n, N, sums, ws.bytes);
  }
  if (paged)
    for (index_t r = 0; r < rows; ++r) S::compact_row(raw, S::ptr(ly.map), r, n, N);
  ly.set_length(n);
}

// One decoding step of one layer (spec section 7): append the token at `position`;
// then, when a row holds more than budget + w (keep_lengths, or rows of different
// lengths: always, every row keeping its length), score its candidates (all but its
// last w) and keep the top ones. Attention indicators score with the new query
// alone; an accumulating one adds the new query's attention to every held token's
// sum first and ranks by the sums; a position indicator ranks by position.
// Reference order writes the kept prefix by descending score (gathered into the
// workspace, then copied back); position order compacts in place. Everything that
// can throw runs before the first visible write: the new token waits past `held`
// (ragged rows: in a row's first padding slot, cleared again on failure), new sums
// in the workspace, and the commit is one primitive call.
template <class T, class Exec, class Ind, class QV, class KV, class VV>
void decode(const Exec& exec, cache_layer<T, Exec>& ly, decode_workspace<T, Exec>& ws,
            const LayerShape& sh, const QV& q, const KV& k, const VV& v, index_t position,
            index_t budget, const Ind& indicator, bool reference, bool keep_lengths) {
  using S = layer_store<T, Exec>;
  using Space = typename Exec::memory_space;
  constexpr indicator_source source = indicator_source_of<Ind>;
  constexpr bool accumulates = source == indicator_source::accumulated;
  constexpr bool mappable = requires { S::slot_map; };
  const index_t B = sh.batch, Hkv = sh.kv_heads, d = sh.head_dim, w = sh.window, rows = sh.rows();
  const index_t grp = q.extent(1) / Hkv;
  const bool ragged = !ly.uniform();
  if constexpr (mappable && source != indicator_source::custom) {
    // (a paged layer has a map only with slot_order::any)
    if (!ragged && S::size(ly.map) > 0) {
      decode_mapped(exec, ly, ws, sh, q, k, v, position, budget, indicator, reference,
                    keep_lengths);
      return;
    }
  }
  if constexpr (mappable) settle(ly);  // the row-by-row path reads K/V in token order
  keep_lengths = keep_lengths || ragged;
  const step_plan p = plan_step(ly.held, w, budget, keep_lengths);  // N: the longest row after
  const index_t N = p.N, cand = p.cand, keep = p.keep, n = p.n;
  const bool evict = p.evict;

  // 1. Room and scratch (nothing visible changes).
  make_room(exec, ly, p, budget, w, keep_lengths);
  reserve_decode(exec, ws, sh, q.extent(1), ly.held, ragged, reference && evict, accumulates);
  const index_t* lens = nullptr;  // ragged: (rows) lengths, then (rows) keeps
  if (ragged) {
    ws.host_ints.resize(static_cast<std::size_t>(2 * rows));
    for (index_t r = 0; r < rows; ++r) {
      ws.host_ints[static_cast<std::size_t>(r)] = ly.row_len(r);
      ws.host_ints[static_cast<std::size_t>(rows + r)] = ly.row_len(r) - w;
    }
    S::upload(exec, ws.host_ints.data(), S::ptr(ws.ints), 2 * rows);
    lens = S::ptr(ws.ints);
  }
  const index_t* keeps = lens ? lens + rows : nullptr;
  const slots<T> s = ly.at();
  // Keys scored: the layer's own, or a paged layer's gathered into the workspace
  // (a position indicator reads none).
  // (the host scores a paged layer's keys where they lie, through its block table)
  constexpr bool listed = mappable && source != indicator_source::custom;
  const bool gather = s.is_paged() && source != indicator_source::position && !listed;
  if (gather) reserve<T>(exec, ws.keys, rows * N * d);
  const T* score_k = gather ? S::ptr(ws.keys) : s.k;
  const index_t score_cap = gather ? N : s.cap;

  // 2. The new token into each row's next slot.
  S::append(exec, s, k, v, position, lens, ragged ? 0 : ly.held, Hkv);
  try {
    if (gather)  // keys only (rows, N): a row's slots past its blocks are never read
      S::move_slots(exec, slots<T>{S::ptr(ws.keys), nullptr, nullptr, nullptr, rows, N, d},
                    s.kv_only(), nullptr, 0, nullptr, N, nullptr, N);
    // 3. Scores: (rows, N) with row stride N; rows [r0, r0 + nr) holding `held` tokens.
    float* sc = S::ptr(ws.scores);
    float* sums = accumulates ? S::ptr(ws.sums) : nullptr;
    const auto score = [&](index_t r0, index_t nr, index_t bn, index_t held, index_t c) {
      const index_t b0 = r0 / Hkv, g0 = r0 % Hkv, hk = nr == rows ? Hkv : 1;
      const auto qv =
          make_view<Space>(q.data_handle() + b0 * q.stride(0) + g0 * grp * q.stride(1),
                           std::array<index_t, 3>{bn, hk * grp, d},
                           std::array<index_t, 3>{static_cast<index_t>(q.stride(0)),
                                                  static_cast<index_t>(q.stride(1)), 1});
      const auto kv =
          // score_k is null where nothing reads keys (a position indicator on a paged
          // layer): no offset from null.
          make_view<Space>(score_k ? score_k + r0 * score_cap * d : score_k,
                           std::array<index_t, 4>{bn, hk, held, d},
                           std::array<index_t, 4>{Hkv * score_cap * d, score_cap * d, d, 1});
      const auto out = [&](index_t cols) {
        return make_view<Space>(sc + r0 * N, std::array<index_t, 3>{bn, hk, cols},
                                std::array<index_t, 3>{Hkv * N, N, 1});
      };
      const auto candidates = [&](auto cols) {  // generic: instantiated where called
        if constexpr (listed) {
          if (s.is_paged()) {
            S::candidates_listed(exec, qv, s, r0, hk, held, indicator, out(cols), ws.bytes);
            return;
          }
        }
        S::candidates(exec, qv, kv, indicator, out(cols), ws.bytes);
      };
      if constexpr (accumulates) {
        candidates(held);
        S::accumulate(exec, sums + r0 * N, N, sc + r0 * N, N, nr, held);
      } else if constexpr (source == indicator_source::position) {
        S::position_scores(exec, indicator, s.pos + r0 * s.cap, s.cap, sc + r0 * N, N, nr, c);
      } else {
        candidates(c);
      }
    };
    if constexpr (accumulates) {  // the held sums, 0 for the new token
      S::fill(exec, sums, rows * N, 0.0f);
      S::copy_2d(exec, static_cast<const float*>(s.ind), s.cap, sums, N, rows, ly.held);
    }
    const float* ranked = accumulates ? sums : sc;  // (rows, N) with row stride N
    if (!ragged) {
      score(0, rows, B, N, cand);
    } else {  // row by row: the functional core scores rows of one length
      for (index_t r = 0; r < rows; ++r) {
        const index_t nr = ly.row_len(r) + 1;
        score(r, 1, 1, nr, nr - w);
      }
    }
    if (!evict) {  // uniform rows below budget + w: they grow
      if constexpr (accumulates)
        S::copy_2d(exec, static_cast<const float*>(sums), N, s.ind, s.cap, rows, N);
      ly.set_length(N);
      return;
    }

    // 4. Selection: (rows, n) slots to keep, the window last. Ragged rows select
    //    one by one, each among its own candidates only, so no slot past a row's
    //    candidates can outrank one of them, whatever the scores (-inf, NaN).
    index_t* sel = S::ptr(ws.sel);
    const select_order order = reference ? select_order::descending : select_order::position;
    if (!ragged) {
      select_k(
          exec,
          make_view<Space>(ranked, std::array<index_t, 2>{rows, cand},
                           std::array<index_t, 2>{N, 1}),
          make_view<Space>(sel, std::array<index_t, 2>{rows, keep}, std::array<index_t, 2>{n, 1}),
          order);
    } else if constexpr (requires {
                           S::select_ragged(exec, ranked, N, sel, n, keeps, rows, order);
                         }) {
      S::select_ragged(exec, ranked, N, sel, n, keeps, rows, order);  // CUDA: one launch
    } else {
      for (index_t r = 0; r < rows; ++r) {
        const index_t kr = ly.row_len(r) - w;  // one fewer than the row's candidates
        if (kr > 0)
          select_k(exec, make_view<Space>(ranked + r * N, std::array<index_t, 2>{1, kr + 1}),
                   make_view<Space>(sel + r * n, std::array<index_t, 2>{1, kr},
                                    std::array<index_t, 2>{n, 1}),
                   order);
      }
    }
    S::window_slots(exec, sel, rows, n, keeps, ragged ? 0 : keep, w, keeps, ragged ? 1 : cand);

    // 5. Commit: one primitive call; rows keep their lengths (ragged) or hold n.
    const token_scores kept{sums, N, N};
    if (!reference) {  // ascending: in place
      S::move_slots(exec, s, s, sums, N, sel, n, lens, ragged ? 0 : n);
    } else {
      const slots<T> sp = ws.spare.at();
      gather_slots(exec, sh, s, N, accumulates ? kept : token_scores{}, sel, n, sp, nullptr, 0);
      S::move_slots(exec, s, sp, sp.ind, sp.cap, nullptr, n, lens, ragged ? 0 : n);
    }
  } catch (...) {
    if (ragged) {
      try {
        S::pad(exec, s, lens, 0, N);  // the new token leaves the rows' padding
      } catch (...) {                 // the first failure is the one to report
      }
    }
    throw;
  }
  if (!ragged) ly.set_length(n);
}

}  // namespace cake::detail
