// cake: views of an engine's paged KV memory (vLLM, SGLang, FlashInfer).
//
// The pool of one layer's K (or V) is any 4-D view
//   pool: (num_blocks, kv_heads, block_size, head_dim)
// so both common layouts are taken as they are:
//   FlashInfer "HND" memory [num_blocks, kv_heads, block_size, head_dim]: contiguous,
//     make_view(p, {N, Hkv, bs, d})
//   vLLM / FlashInfer "NHD" memory [num_blocks, block_size, kv_heads, head_dim]:
//     make_view(p, {N, Hkv, bs, d}, {bs * Hkv * d, d, Hkv * d, 1})
// A block holds every kv-head of `block_size` consecutive tokens of one sequence.
//
// Which blocks hold which sequence is the block table, in the compressed form of
// FlashInfer's paged_kv_t (indptr + indices), so that ragged is the general case:
// sequence s owns ids(indptr(s)) .. ids(indptr(s + 1) - 1) in token order, and its
// token t lives in block ids(indptr(s) + t / block_size), slot t % block_size. A
// padded (num_seqs, max_blocks) table (vLLM) is this with indptr(s) = s * max_blocks
// when every row is full, or after dropping each row's unused tail.
#pragma once

#include <algorithm>
#include <array>
#include <cstdint>
#include <string>
#include <utility>
#include <vector>

#include "../error.hpp"
#include "view.hpp"

namespace cake {

template <class Space = host_space>
struct block_table {
  view<const std::int32_t, 1, Space> indptr;    // (num_seqs + 1), indptr(0) = 0, non-decreasing
  view<const std::int32_t, 1, Space> ids;       // (>= indptr(num_seqs)) block ids into the pool
  view<const std::int32_t, 1, Space> seq_lens;  // (num_seqs) tokens each sequence holds now
  index_t num_seqs() const noexcept { return static_cast<index_t>(seq_lens.extent(0)); }
};

// A block table over contiguous int32 arrays: indptr has num_seqs + 1 entries, ids
// indptr[num_seqs] (read only when the table lives on the host; give `num_ids` for a
// device table), seq_lens num_seqs.
template <class Space = host_space>
block_table<Space> make_block_table(const std::int32_t* indptr, const std::int32_t* ids,
                                    const std::int32_t* seq_lens, index_t num_seqs,
                                    index_t num_ids) {
  return {make_view<Space>(indptr, std::array<index_t, 1>{num_seqs + 1}),
          make_view<Space>(ids, std::array<index_t, 1>{num_ids}),
          make_view<Space>(seq_lens, std::array<index_t, 1>{num_seqs})};
}
inline block_table<host_space> make_block_table(const std::int32_t* indptr, const std::int32_t* ids,
                                                const std::int32_t* seq_lens, index_t num_seqs) {
  return make_block_table<host_space>(indptr, ids, seq_lens, num_seqs, indptr[num_seqs]);
}

// A pool's strides give each (block, kv_head, slot, x) element memory of its own:
// taken from the smallest stride up (dimensions of extent 1 aside), each stride is at
// least the span of the dimensions before it, as in the HND and NHD layouts. A slot
// stride of 0, say, would make a block's tokens one token: an in-place compaction
// would overwrite the tokens it keeps. `id` and `name` name the pool in the error.
template <class P>
status validate_pool_strides(const P& pool, const char* id, const char* name) {
  std::array<std::size_t, 4> order{0, 1, 2, 3};  // by stride, ties in dimension order
  for (std::size_t i = 1; i < 4; ++i)            // insertion sort: std::stable_sort may allocate
    for (std::size_t j = i; j > 0 && pool.stride(order[j]) < pool.stride(order[j - 1]); --j)
      std::swap(order[j], order[j - 1]);
  index_t span = 1;  // elements the dimensions so far reach: their largest offset + 1
  for (std::size_t r : order) {
    const auto n = static_cast<index_t>(pool.extent(r)), st = static_cast<index_t>(pool.stride(r));
    if (n <= 1) continue;
    CAKE_CHECK(st >= span, id, name,
               " must give every (block, kv_head, slot, x) element its own memory: stride(", r,
               ") must be >= ", span, ", the span of the dimensions with smaller strides, got ", st,
               " (strides (", pool.stride(0), ", ", pool.stride(1), ", ", pool.stride(2), ", ",
               pool.stride(3), "))");
    span += st * (n - 1);
  }
  return status::success();
}

// Checks a host-resident block table against a pool of `num_blocks` blocks of
// `block_size` tokens: indptr starts at 0, never decreases and fits ids; every id is
// in [0, num_blocks) and appears once in the whole table (a block shared by two
// places would be written twice by an in-place compaction); every sequence owns
// at least ceil(seq_lens(s) / block_size) blocks. Engines keep their tables on the
// host (the block manager) and upload them: validate the host copy.
// `by_id` is the duplicate check's scratch, (id, entry) pairs: a caller checking a
// table at every step lends its own, which then stops allocating once it has grown.
inline status validate_block_table(const block_table<host_space>& t, index_t num_blocks,
                                   index_t block_size,
                                   std::vector<std::pair<std::int32_t, index_t>>& by_id) {
  const index_t n = t.num_seqs();
  CAKE_CHECK(block_size >= 1, "cake.compact.block_size", "block_size must be >= 1, got ",
             block_size);
  CAKE_CHECK(num_blocks >= 0, "cake.compact.num_blocks", "num_blocks must be >= 0, got ",
             num_blocks);
  CAKE_CHECK(t.indptr.extent(0) == n + 1, "cake.compact.indptr",
             "indptr must have num_seqs + 1 = ", n + 1, " entries, got ", t.indptr.extent(0));
  CAKE_CHECK(t.indptr(0) == 0, "cake.compact.indptr", "indptr(0) must be 0, got ", t.indptr(0));
  for (index_t s = 0; s < n; ++s)
    CAKE_CHECK(t.indptr(s + 1) >= t.indptr(s), "cake.compact.indptr",
               "indptr must not decrease: indptr(", s + 1, ") = ", t.indptr(s + 1),
               " follows indptr(", s, ") = ", t.indptr(s));
  CAKE_CHECK(t.indptr(n) <= t.ids.extent(0), "cake.compact.indptr", "indptr(", n,
             ") = ", t.indptr(n), " exceeds the ", t.ids.extent(0), " entries of ids");
  for (index_t s = 0; s < n; ++s) {
    const index_t len = t.seq_lens(s), have = t.indptr(s + 1) - t.indptr(s);
    CAKE_CHECK(len >= 0, "cake.compact.seq_lens", "seq_lens(", s, ") must be >= 0, got ", len);
    const index_t need = (len + block_size - 1) / block_size;
    CAKE_CHECK(have >= need, "cake.compact.ids", "the block table of sequence ", s,
               " is too short: seq_lens(", s, ") = ", len, " tokens need ", need, " blocks of ",
               block_size, ", got ", have);
    for (index_t e = t.indptr(s); e < t.indptr(s + 1); ++e) {
      const index_t id = t.ids(e);
      CAKE_CHECK(id >= 0 && id < num_blocks, "cake.compact.ids", "ids(", e, ") (sequence ", s,
                 ") must be a block of the pool, in [0, ", num_blocks, "), got ", id);
    }
  }
  // Duplicates by sorting the table's (id, entry) pairs: memory in the table's size, not
  // the pool's (a pool has far more blocks than one batch's table names).
  const index_t used = t.indptr(n);
  by_id.resize(static_cast<std::size_t>(used));
  for (index_t e = 0; e < used; ++e) by_id[static_cast<std::size_t>(e)] = {t.ids(e), e};
  std::sort(by_id.begin(), by_id.end());
  for (std::size_t i = 1; i < by_id.size(); ++i)
    if (by_id[i].first == by_id[i - 1].first) {
      const index_t e = by_id[i].second;
      index_t s = 0;  // the sequence of the later entry
      while (t.indptr(s + 1) <= e) ++s;
      CAKE_CHECK(false, "cake.compact.ids", "block ", by_id[i].first,
                 " appears twice in the table: ids(", by_id[i - 1].second, ") and ids(", e,
                 ") (sequence ", s, ")");
    }
  return status::success();
}
inline status validate_block_table(const block_table<host_space>& t, index_t num_blocks,
                                   index_t block_size) {
  std::vector<std::pair<std::int32_t, index_t>> by_id;
  return validate_block_table(t, num_blocks, block_size, by_id);
}

// What an in-place paged compaction leaves, decided on the host before any data
// moves: each (sequence, kv-head) row keeps keep_lens(s, h) tokens; a block holds
// every kv-head of its tokens, so sequence s keeps
//   new_lens(s) = max over h of keep_lens(s, h)
// token slots in its first ceil(new_lens(s) / block_size) blocks, and its last
//   freed(s) = (indptr(s + 1) - indptr(s)) - ceil(new_lens(s) / block_size)
// table entries name blocks it no longer needs (the engine returns them to its free
// list and shortens the table). A head with fewer tokens than new_lens(s) has its
// slots [keep_lens(s, h), new_lens(s)) set to zero K/V by the compaction: paged
// attention reads new_lens(s) slots of every head, and zero K/V is the dense cache's
// (and the reference's) head-wise padding.
inline status validate_paged_plan(const block_table<host_space>& t,
                                  host_view<const std::int32_t, 2> keep_lens, index_t block_size,
                                  host_view<std::int32_t, 1> new_lens,
                                  host_view<std::int32_t, 1> freed) {
  const index_t n = t.num_seqs();
  CAKE_CHECK(block_size >= 1, "cake.compact.block_size", "block_size must be >= 1, got ",
             block_size);
  CAKE_CHECK(t.indptr.extent(0) == n + 1, "cake.compact.indptr",
             "indptr must have num_seqs + 1 = ", n + 1, " entries, got ", t.indptr.extent(0));
  CAKE_CHECK(keep_lens.extent(0) == n, "cake.compact.keep_lens",
             "keep_lens must be (num_seqs = ", n, ", kv_heads), got (", keep_lens.extent(0), ", ",
             keep_lens.extent(1), ")");
  CAKE_CHECK(new_lens.extent(0) == n && freed.extent(0) == n, "cake.compact.new_lens",
             "new_lens and freed must have num_seqs = ", n, " entries, got ", new_lens.extent(0),
             " and ", freed.extent(0));
  for (index_t s = 0; s < n; ++s)  // a decreasing indptr would give negative block counts
    CAKE_CHECK(t.indptr(s + 1) >= t.indptr(s), "cake.compact.indptr",
               "indptr must not decrease: indptr(", s + 1, ") = ", t.indptr(s + 1),
               " follows indptr(", s, ") = ", t.indptr(s));
  for (index_t s = 0; s < n; ++s)
    for (index_t h = 0; h < keep_lens.extent(1); ++h)
      CAKE_CHECK(keep_lens(s, h) >= 0 && keep_lens(s, h) <= t.seq_lens(s), "cake.compact.keep_lens",
                 "keep_lens(", s, ", ", h, ") must be in [0, seq_lens(", s, ") = ", t.seq_lens(s),
                 "], got ", keep_lens(s, h));
  for (index_t s = 0; s < n; ++s)
    CAKE_CHECK(static_cast<index_t>(t.indptr(s + 1) - t.indptr(s)) * block_size >= t.seq_lens(s),
               "cake.compact.ids", "the block table of sequence ", s,
               " is too short: ", t.indptr(s + 1) - t.indptr(s), " blocks of ", block_size,
               " cannot hold seq_lens(", s, ") = ", t.seq_lens(s), " tokens");
  return status::success();
}

// Fills new_lens and freed as described above. The table must be valid
// (validate_block_table); throws cake::invalid_argument on bad lengths, before writing.
inline void paged_plan(const block_table<host_space>& t, host_view<const std::int32_t, 2> keep_lens,
                       index_t block_size, host_view<std::int32_t, 1> new_lens,
                       host_view<std::int32_t, 1> freed) {
  validate_paged_plan(t, keep_lens, block_size, new_lens, freed).throw_if_error();
  for (index_t s = 0; s < t.num_seqs(); ++s) {
    std::int32_t longest = 0;
    for (index_t h = 0; h < keep_lens.extent(1); ++h)
      longest = keep_lens(s, h) > longest ? keep_lens(s, h) : longest;
    const index_t have = t.indptr(s + 1) - t.indptr(s);
    const index_t keep_blocks = (longest + block_size - 1) / block_size;
    new_lens(s) = longest;
    freed(s) = static_cast<std::int32_t>(have - keep_blocks);
  }
}

}  // namespace cake
