// A toy engine's paged KV memory for the paged KvCache tests (tests/host/
// test_paged_cache.cpp, tests/reliability/test_fault_injection.cpp): pools per layer,
// scattered block lists, a free list, and the bookkeeping an engine does after each
// call (take_back), checked as it goes.
#pragma once

#include <doctest/doctest.h>

#include <cake/cake.hpp>

#include <algorithm>
#include <cstdint>
#include <limits>
#include <numeric>
#include <random>
#include <vector>

namespace paged_engine {

using cake::index_t;

// A toy engine's paged memory: per layer a K and a V pool of N blocks in HND or NHD
// layout, the block list and length of each sequence, and one free list. Blocks are
// handed out in a shuffled order so that a sequence's blocks are scattered.
struct Engine {
  index_t L = 0, B = 0, Hkv = 0, d = 0, bs = 0, N = 0;
  bool nhd = false;
  std::vector<std::vector<float>> kpool, vpool;                // [layer] N * Hkv * bs * d
  std::vector<std::vector<std::vector<std::int32_t>>> blocks;  // [layer][seq] ids
  std::vector<std::vector<std::int32_t>> lens;                 // [layer][seq] tokens held
  std::vector<std::int32_t> free_list;
  // The arrays of the last table lent (the cache copies what it keeps).
  std::vector<std::int32_t> t_indptr, t_ids, t_lens;

  std::array<index_t, 4> strides() const {
    return nhd ? std::array<index_t, 4>{bs * Hkv * d, d, Hkv * d, 1}
               : std::array<index_t, 4>{Hkv * bs * d, bs * d, d, 1};
  }
  index_t offset(index_t l, index_t s, index_t h, index_t t) const {
    const auto st = strides();
    const auto& b = blocks[static_cast<std::size_t>(l)][static_cast<std::size_t>(s)];
    return b[static_cast<std::size_t>(t / bs)] * st[0] + h * st[1] + (t % bs) * st[2];
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
    const std::array<index_t, 4> ext{N, Hkv, bs, d};
    return {cake::make_view(kpool[static_cast<std::size_t>(l)].data(), ext, strides()),
            cake::make_view(vpool[static_cast<std::size_t>(l)].data(), ext, strides()), table(l)};
  }
};

// Pools for the workload's layers, each layer's prompt written into the blocks of
// its sequences, with `spare` + s extra blocks lent to sequence s (to be freed).
// Every slot not written holds NaN, so a stray read shows.
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
  const auto size = static_cast<std::size_t>(e.N * e.Hkv * bs * e.d);
  const float nan = std::numeric_limits<float>::quiet_NaN();
  e.kpool.assign(static_cast<std::size_t>(e.L), std::vector<float>(size, nan));
  e.vpool = e.kpool;
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

}  // namespace paged_engine
