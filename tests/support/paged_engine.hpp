// Toy engines' paged KV memory for the paged tests: pools per layer, scattered block
// lists, free lists, and the bookkeeping an engine does after each call (take_back),
// checked as it goes.
//   Engine        a batch of sequences for KvCache (tests/host/test_paged_cache.cpp,
//                 tests/reliability/test_fault_injection.cpp, tests/cuda)
//   RaggedEngine  sequences by id for RaggedKvCache, joining and leaving, prompts
//                 written whole or by chunks (tests/host/test_ragged.cpp,
//                 tests/reliability/test_fault_injection.cpp)
#pragma once

#include <doctest/doctest.h>

#include <cake/cake.hpp>

#include <algorithm>
#include <array>
#include <cstdint>
#include <limits>
#include <map>
#include <numeric>
#include <random>
#include <span>
#include <vector>

namespace paged_engine {

using cake::index_t;
using cake::sequence_id;

// Per layer a K and a V pool of N blocks of bs token slots, each holding every
// kv-head, in HND or NHD layout. Every slot holds NaN until written, so a stray read
// shows.
struct Pools {
  index_t L = 0, Hkv = 0, d = 0, bs = 0, N = 0;
  bool nhd = false;
  std::vector<std::vector<float>> kpool, vpool;  // [layer] N * Hkv * bs * d

  void allocate() {
    const auto size = static_cast<std::size_t>(N * Hkv * bs * d);
    kpool.assign(static_cast<std::size_t>(L),
                 std::vector<float>(size, std::numeric_limits<float>::quiet_NaN()));
    vpool = kpool;
  }
  std::array<index_t, 4> strides() const {
    return nhd ? std::array<index_t, 4>{bs * Hkv * d, d, Hkv * d, 1}
               : std::array<index_t, 4>{Hkv * bs * d, bs * d, d, 1};
  }
  // Where head h of token t is in a pool, t held in `block` (slot t % bs).
  index_t offset(std::int32_t block, index_t h, index_t t) const {
    const auto st = strides();
    return block * st[0] + h * st[1] + (t % bs) * st[2];
  }
  // Token t of the sequence whose blocks are b.
  const float* at(const std::vector<float>& pool, const std::vector<std::int32_t>& b, index_t h,
                  index_t t) const {
    return pool.data() + offset(b[static_cast<std::size_t>(t / bs)], h, t);
  }
  // A pool as the cache takes it: (N, kv_heads, block_size, head_dim).
  cake::host_view<float, 4> pool(std::vector<float>& p) const {
    return cake::make_view(p.data(), std::array<index_t, 4>{N, Hkv, bs, d}, strides());
  }
};

// A batch of B sequences: the block list and length of each per layer, and one free
// list. Blocks are handed out in a shuffled order so that a sequence's blocks are
// scattered.
struct Engine : Pools {
  index_t B = 0;
  std::vector<std::vector<std::vector<std::int32_t>>> blocks;  // [layer][seq] ids
  std::vector<std::vector<std::int32_t>> lens;                 // [layer][seq] tokens held
  std::vector<std::int32_t> free_list;
  // The arrays of the last table lent (the cache copies what it keeps).
  std::vector<std::int32_t> t_indptr, t_ids, t_lens;

  using Pools::offset;
  index_t offset(index_t l, index_t s, index_t h, index_t t) const {
    const auto& b = blocks[static_cast<std::size_t>(l)][static_cast<std::size_t>(s)];
    return offset(b[static_cast<std::size_t>(t / bs)], h, t);
  }
  const float* key(index_t l, index_t s, index_t h, index_t t) const {
    return kpool[static_cast<std::size_t>(l)].data() + offset(l, s, h, t);
  }
  const float* value(index_t l, index_t s, index_t h, index_t t) const {
    return vpool[static_cast<std::size_t>(l)].data() + offset(l, s, h, t);
  }
  std::int32_t take() {
    REQUIRE(!free_list.empty());
    const std::int32_t id = free_list.back();
    free_list.pop_back();
    return id;
  }
  cake::block_table<> table(index_t l) {
    t_indptr.assign(1, 0);
    t_ids.clear();
    t_lens.clear();
    for (index_t s = 0; s < B; ++s) {
      const auto& b = blocks[static_cast<std::size_t>(l)][static_cast<std::size_t>(s)];
      t_ids.insert(t_ids.end(), b.begin(), b.end());
      t_indptr.push_back(static_cast<std::int32_t>(t_ids.size()));
      t_lens.push_back(lens[static_cast<std::size_t>(l)][static_cast<std::size_t>(s)]);
    }
    return cake::make_block_table(t_indptr.data(), t_ids.data(), t_lens.data(), B);
  }
  cake::paged_kv<float> kv(index_t l) {
    const auto L_ = static_cast<std::size_t>(l);
    return {pool(kpool[L_]), pool(vpool[L_]), table(l)};
  }
};

// An Engine for the workload's layers, each layer's prompt written into the blocks of
// its sequences, with `spare` + s extra blocks lent to sequence s (to be freed).
// k, v: per layer (batch, kv_heads, S, head_dim).
inline Engine make_engine(const cake::CacheConfig& cfg, index_t S,
                          const std::vector<std::vector<float>>& k,
                          const std::vector<std::vector<float>>& v, index_t bs, bool nhd,
                          index_t spare, unsigned seed) {
  Engine e;
  e.L = cfg.layers;
  e.B = cfg.batch;
  e.Hkv = cfg.kv_heads;
  e.d = cfg.head_dim;
  e.bs = bs;
  e.nhd = nhd;
  const index_t per_seq = (S + 16 + bs - 1) / bs + spare + cfg.batch;
  e.N = cfg.layers * cfg.batch * per_seq + 5;  // a few never used
  e.free_list.resize(static_cast<std::size_t>(e.N));
  std::iota(e.free_list.begin(), e.free_list.end(), 0);
  std::mt19937 gen(seed);
  std::shuffle(e.free_list.begin(), e.free_list.end(), gen);
  e.allocate();
  e.blocks.assign(static_cast<std::size_t>(e.L),
                  std::vector<std::vector<std::int32_t>>(static_cast<std::size_t>(e.B)));
  e.lens.assign(static_cast<std::size_t>(e.L),
                std::vector<std::int32_t>(static_cast<std::size_t>(e.B), 0));
  for (index_t l = 0; l < e.L; ++l)
    for (index_t s = 0; s < e.B; ++s) {
      auto& b = e.blocks[static_cast<std::size_t>(l)][static_cast<std::size_t>(s)];
      for (index_t i = 0; i < (S + bs - 1) / bs + spare + s; ++i) b.push_back(e.take());
      e.lens[static_cast<std::size_t>(l)][static_cast<std::size_t>(s)] =
          static_cast<std::int32_t>(S);
      for (index_t h = 0; h < e.Hkv; ++h)
        for (index_t t = 0; t < S; ++t) {
          const std::size_t src = static_cast<std::size_t>(((s * e.Hkv + h) * S + t) * e.d);
          const auto o = static_cast<std::size_t>(e.offset(l, s, h, t));
          std::copy_n(k[static_cast<std::size_t>(l)].data() + src, e.d,
                      e.kpool[static_cast<std::size_t>(l)].data() + o);
          std::copy_n(v[static_cast<std::size_t>(l)].data() + src, e.d,
                      e.vpool[static_cast<std::size_t>(l)].data() + o);
        }
    }
  return e;
}

// After a call: each paged layer's freed tail goes back to the free list. Checks that
// the freed blocks and the held ones split the table the engine had (none both, none
// lost), that the engine's table then is the cache's, and that no block is leaked.
template <class Cache>
void take_back(Engine& e, const Cache& c) {
  for (index_t l = 0; l < c.layers_prefilled(); ++l) {
    REQUIRE(c.paged(l));
    const auto fr = c.freed(l);
    const auto t = c.table(l);
    REQUIRE(fr.size() == static_cast<std::size_t>(e.B));
    REQUIRE(t.num_seqs() == e.B);
    for (index_t s = 0; s < e.B; ++s) {
      CAPTURE(l);
      CAPTURE(s);
      auto& b = e.blocks[static_cast<std::size_t>(l)][static_cast<std::size_t>(s)];
      const std::int32_t f = fr[static_cast<std::size_t>(s)];
      REQUIRE(f >= 0);
      REQUIRE(f <= static_cast<std::int32_t>(b.size()));
      const std::vector<std::int32_t> kept(b.begin(), b.end() - f), gone(b.end() - f, b.end());
      const std::vector<std::int32_t> held(&t.ids(t.indptr(s)),
                                           &t.ids(t.indptr(s)) + (t.indptr(s + 1) - t.indptr(s)));
      REQUIRE(kept == held);  // held + freed == the table before, in order
      for (std::int32_t id : gone) REQUIRE(std::find(held.begin(), held.end(), id) == held.end());
      REQUIRE(static_cast<index_t>(held.size()) == (t.seq_lens(s) + e.bs - 1) / e.bs);
      e.free_list.insert(e.free_list.end(), gone.begin(), gone.end());
      b = kept;
      e.lens[static_cast<std::size_t>(l)][static_cast<std::size_t>(s)] = t.seq_lens(s);
    }
  }
  // No block leaked or handed out twice: the free list and every table cover the pool once.
  std::vector<int> seen(static_cast<std::size_t>(e.N), 0);
  for (std::int32_t id : e.free_list) ++seen[static_cast<std::size_t>(id)];
  for (const auto& layer : e.blocks)
    for (const auto& b : layer)
      for (std::int32_t id : b) ++seen[static_cast<std::size_t>(id)];
  for (index_t id = 0; id < e.N; ++id) REQUIRE(seen[static_cast<std::size_t>(id)] == 1);
}

// Room for one more token in every sequence of layer l.
inline void give_room(Engine& e, index_t l) {
  for (index_t s = 0; s < e.B; ++s) {
    auto& b = e.blocks[static_cast<std::size_t>(l)][static_cast<std::size_t>(s)];
    const index_t len = e.lens[static_cast<std::size_t>(l)][static_cast<std::size_t>(s)];
    if (static_cast<index_t>(b.size()) * e.bs < len + 1) b.push_back(e.take());
  }
}

// A sequence's prompt as the engine computes it: per layer its keys and values,
// (kv_heads, S, head_dim) each.
struct Prompt {
  sequence_id id = 0;
  index_t S = 0;
  const std::vector<std::vector<float>>* k = nullptr;  // [layer]
  const std::vector<std::vector<float>>* v = nullptr;  // [layer]
};

// Sequences by id for RaggedKvCache: one free list per layer, handed out in a
// shuffled order (so a sequence's blocks are scattered), each sequence's block list
// and length per layer.
struct RaggedEngine : Pools {
  std::vector<std::vector<std::int32_t>> free_ids;                       // [layer]
  std::map<sequence_id, std::vector<std::vector<std::int32_t>>> blocks;  // [id][layer]
  std::map<sequence_id, std::vector<std::int32_t>> lens;                 // [id][layer]
  std::vector<std::int32_t> t_indptr, t_ids, t_lens;                     // the last table lent
  std::int64_t freed_total = 0;  // blocks the cache gave back

  RaggedEngine(const cake::CacheConfig& c, index_t block_size, bool hnd_or_nhd,
               index_t blocks_per_layer, unsigned seed) {
    L = c.layers;
    Hkv = c.kv_heads;
    d = c.head_dim;
    bs = block_size;
    N = blocks_per_layer;
    nhd = hnd_or_nhd;
    allocate();
    std::mt19937 gen(seed);
    for (index_t l = 0; l < L; ++l) {
      std::vector<std::int32_t> f(static_cast<std::size_t>(N));
      std::iota(f.begin(), f.end(), 0);
      std::shuffle(f.begin(), f.end(), gen);
      free_ids.push_back(std::move(f));
    }
  }
  std::vector<std::int32_t>& list(sequence_id id, index_t l) {
    auto& b = blocks[id];
    if (b.empty()) {
      b.resize(static_cast<std::size_t>(L));
      lens[id].assign(static_cast<std::size_t>(L), 0);
    }
    return b[static_cast<std::size_t>(l)];
  }
  std::int32_t& len(sequence_id id, index_t l) {
    list(id, l);
    return lens[id][static_cast<std::size_t>(l)];
  }
  std::int32_t take(index_t l) {
    auto& f = free_ids[static_cast<std::size_t>(l)];
    REQUIRE(!f.empty());
    const std::int32_t id = f.back();
    f.pop_back();
    return id;
  }
  // The engine computes tokens [from, to) of s's layer l: writes their K/V into its
  // blocks, taking blocks as needed (and `spare` more).
  void write(const Prompt& s, index_t l, index_t from, index_t to, index_t spare = 0) {
    auto& b = list(s.id, l);
    while (static_cast<index_t>(b.size()) * bs < to + spare * bs) b.push_back(take(l));
    copy(s, l, from, to, b, 0);
    len(s.id, l) = static_cast<std::int32_t>(to);
  }
  // Bounded chunking: tokens [from, to) of s's layer l go right after the `held` it
  // keeps, slots [held, held + to - from).
  void write_after(const Prompt& s, index_t l, index_t from, index_t to, index_t held) {
    auto& b = list(s.id, l);
    const index_t end = held + to - from;
    while (static_cast<index_t>(b.size()) * bs < end) b.push_back(take(l));
    copy(s, l, from, to, b, held - from);
    len(s.id, l) = static_cast<std::int32_t>(end);
  }
  // After a bounded chunk that was not the last: the tail the eviction released goes
  // back; the layer holds chunk_tokens_held in the blocks left.
  template <class Ragged>
  void take_chunk_back(const Ragged& r, std::span<const sequence_id> ids, index_t l) {
    for (sequence_id id : ids) {
      if (r.paged(id, l)) continue;
      auto& b = list(id, l);
      const std::int32_t f = r.freed(id, l);
      REQUIRE(f >= 0);
      REQUIRE(f <= static_cast<std::int32_t>(b.size()));
      auto& fl = free_ids[static_cast<std::size_t>(l)];
      fl.insert(fl.end(), b.end() - f, b.end());
      freed_total += f;
      b.resize(b.size() - static_cast<std::size_t>(f));
      len(id, l) = static_cast<std::int32_t>(r.chunk_tokens_held(id, l));
      REQUIRE(static_cast<index_t>(b.size()) * bs >= len(id, l));
    }
    covered();
  }
  // Room for one more token of each sequence at layer l.
  void room(std::span<const sequence_id> ids, index_t l) {
    for (sequence_id id : ids) {
      auto& b = list(id, l);
      if (static_cast<index_t>(b.size()) * bs < len(id, l) + 1) b.push_back(take(l));
    }
  }
  cake::block_table<> table(std::span<const sequence_id> ids, index_t l) {
    t_indptr.assign(1, 0);
    t_ids.clear();
    t_lens.clear();
    for (sequence_id id : ids) {
      const auto& b = list(id, l);
      t_ids.insert(t_ids.end(), b.begin(), b.end());
      t_indptr.push_back(static_cast<std::int32_t>(t_ids.size()));
      t_lens.push_back(len(id, l));
    }
    return cake::make_block_table(t_indptr.data(), t_ids.data(), t_lens.data(),
                                  static_cast<index_t>(ids.size()));
  }
  cake::paged_kv<float> kv(std::span<const sequence_id> ids, index_t l) {
    const auto L_ = static_cast<std::size_t>(l);
    return {pool(kpool[L_]), pool(vpool[L_]), table(ids, l)};
  }
  // After a call: each paged layer of each named sequence gives its freed tail back;
  // the freed and the held blocks split the list the engine had (none both, none
  // lost) and the engine's list then is the cache's table; then no block is leaked.
  template <class Ragged>
  void take_back(const Ragged& r, std::span<const sequence_id> ids) {
    for (sequence_id id : ids)
      for (index_t l = 0; l < L; ++l) {
        if (!r.paged(id, l)) continue;
        CAPTURE(id);
        CAPTURE(l);
        auto& b = list(id, l);
        const std::int32_t f = r.freed(id, l);
        const auto t = r.table(id, l);
        REQUIRE(f >= 0);
        REQUIRE(f <= static_cast<std::int32_t>(b.size()));
        const std::vector<std::int32_t> kept(b.begin(), b.end() - f), gone(b.end() - f, b.end());
        const std::vector<std::int32_t> held(&t.ids(0), &t.ids(0) + t.indptr(1));
        REQUIRE(kept == held);
        REQUIRE(static_cast<index_t>(held.size()) == (t.seq_lens(0) + bs - 1) / bs);
        auto& fl = free_ids[static_cast<std::size_t>(l)];
        fl.insert(fl.end(), gone.begin(), gone.end());
        freed_total += f;
        b = kept;
        len(id, l) = t.seq_lens(0);
      }
    covered();
  }
  // A sequence leaves: all its blocks go back.
  void drop(sequence_id id) {
    for (index_t l = 0; l < L; ++l) {
      auto& b = list(id, l);
      auto& fl = free_ids[static_cast<std::size_t>(l)];
      fl.insert(fl.end(), b.begin(), b.end());
    }
    blocks.erase(id);
    lens.erase(id);
    covered();
  }
  // Every block of every layer's pool is in exactly one place: the free list or one
  // sequence's list.
  void covered() const {
    for (index_t l = 0; l < L; ++l) {
      std::vector<int> seen(static_cast<std::size_t>(N), 0);
      for (std::int32_t id : free_ids[static_cast<std::size_t>(l)])
        ++seen[static_cast<std::size_t>(id)];
      for (const auto& [sid, b] : blocks)
        for (std::int32_t id : b[static_cast<std::size_t>(l)]) ++seen[static_cast<std::size_t>(id)];
      for (index_t id = 0; id < N; ++id) REQUIRE(seen[static_cast<std::size_t>(id)] == 1);
    }
  }

 private:
  // Tokens [from, to) of s's layer l into slots [from + shift, to + shift) of blocks b.
  void copy(const Prompt& s, index_t l, index_t from, index_t to,
            const std::vector<std::int32_t>& b, index_t shift) {
    const auto L_ = static_cast<std::size_t>(l);
    for (index_t h = 0; h < Hkv; ++h)
      for (index_t t = from; t < to; ++t) {
        const auto src = static_cast<std::size_t>((h * s.S + t) * d);
        const index_t slot = t + shift;
        const auto o =
            static_cast<std::size_t>(offset(b[static_cast<std::size_t>(slot / bs)], h, slot));
        std::copy_n((*s.k)[L_].data() + src, d, kpool[L_].data() + o);
        std::copy_n((*s.v)[L_].data() + src, d, vpool[L_].data() + o);
      }
  }
};

}  // namespace paged_engine
