// KvCache on an engine's paged pools (kv_cache.hpp, paged_kv): equal to the dense
// cache on every method, token by token and bit for bit (positions, K and V of every
// row, padding), the blocks it frees accounted for after every call, and bad tables
// rejected before anything changes.
#include "kv_workload.hpp"
#include "support/kv_snapshot.hpp"
#include "support/paged_engine.hpp"

#include <cake/methods.hpp>

#include <bit>
#include <cstdint>
#include <cstring>
#include <functional>
#include <limits>
#include <numeric>
#include <random>
#include <set>
#include <string>

namespace paged_cache_test {

using kv_test::Workload;
using paged_engine::Engine;
using paged_engine::give_room;
using paged_engine::take_back;

inline Engine make_engine(const Workload& wl, index_t bs, bool nhd, index_t spare, unsigned seed) {
  return paged_engine::make_engine(wl.cfg, wl.S, wl.k, wl.v, bs, nhd, spare, seed);
}

// Each row of a slot_order::any layer holds its first n slots, one token each.
template <class Paged>
void check_compact(const Paged& paged, index_t l) {
  if (paged.config().paged_slots != cake::slot_order::any) return;
  const auto ts = paged.token_slots(l);
  const auto len = paged.row_lengths(l);
  for (index_t s = 0; s < ts.extent(0); ++s)
    for (index_t h = 0; h < ts.extent(1); ++h) {
      const index_t n = len[static_cast<std::size_t>(s * ts.extent(1) + h)];
      std::vector<char> seen(static_cast<std::size_t>(n), 0);
      for (index_t j = 0; j < n; ++j) {
        CAPTURE(j);
        const index_t slot = ts(s, h, j);
        REQUIRE(slot >= 0);
        REQUIRE(slot < n);
        REQUIRE(!seen[static_cast<std::size_t>(slot)]);
        seen[static_cast<std::size_t>(slot)] = 1;
      }
    }
}

// The paged cache holds what the dense one holds, layer by layer: lengths, budgets,
// positions, and the exact K and V of every row's tokens in the pools (token j in slot
// j, or where token_slots says), padding (slots past a row's length up to its
// sequence's length) zero as the dense padding.
template <class Dense, class Paged>
void check_equal(const Dense& dense, const Paged& paged, const Engine& e) {
  REQUIRE(dense.layers_prefilled() == paged.layers_prefilled());
  for (index_t l = 0; l < dense.layers_prefilled(); ++l) {
    CAPTURE(l);
    REQUIRE(dense.budget(l) == paged.budget(l));
    REQUIRE(dense.tokens_held(l) == paged.tokens_held(l));
    REQUIRE(dense.bytes_held(l) == paged.bytes_held(l));
    const auto len = dense.row_lengths(l);
    REQUIRE(len == paged.row_lengths(l));
    const auto pd = dense.positions(l), pp = paged.positions(l);
    const auto kd = dense.keys(l), vd = dense.values(l);
    const auto t = paged.table(l);
    check_compact(paged, l);
    const bool any = paged.config().paged_slots == cake::slot_order::any;
    for (index_t s = 0; s < e.B; ++s) {
      index_t longest = 0;
      for (index_t h = 0; h < e.Hkv; ++h)
        longest = std::max(longest, len[static_cast<std::size_t>(s * e.Hkv + h)]);
      REQUIRE(t.seq_lens(s) == longest);
      for (index_t h = 0; h < e.Hkv; ++h) {
        CAPTURE(s);
        CAPTURE(h);
        const index_t n = len[static_cast<std::size_t>(s * e.Hkv + h)];
        for (index_t j = 0; j < longest; ++j) {
          CAPTURE(j);
          if (j < n) REQUIRE(pd(s, h, j) == pp(s, h, j));
          // token j's slot (padding: the row's slot j)
          const index_t at = any && j < n ? paged.token_slots(l)(s, h, j) : j;
          const float* k = e.key(l, s, h, at);
          const float* v = e.value(l, s, h, at);
          for (index_t x = 0; x < e.d; ++x) {
            // Bits: a NaN (a slot never written) fails, and -0 vs 0 would show.
            REQUIRE(std::bit_cast<std::uint32_t>(k[x]) ==
                    std::bit_cast<std::uint32_t>(kd(s, h, j, x)));
            REQUIRE(std::bit_cast<std::uint32_t>(v[x]) ==
                    std::bit_cast<std::uint32_t>(vd(s, h, j, x)));
          }
        }
      }
    }
  }
}

struct Run {
  cake::token_order order;
  bool cascade;
  bool nhd;
  index_t bs;
  cake::slot_order slots = cake::slot_order::token;
};

inline cake::CacheConfig config(const Run& r) {
  cake::CacheConfig c = kv_test::small_config(r.cascade);
  c.order = r.order;
  c.paged_slots = r.slots;
  return c;
}

// Slots [0, n) of each row of layer l whose K or V differ between two copies of the
// pools, n the row's length after: a slot_order::any step of uniform rows changes at
// most one (the one the new token fills) in each row.
template <class Paged>
index_t most_changed(const Paged& paged, const Engine& e, index_t l, const std::vector<float>& k0,
                     const std::vector<float>& v0) {
  const auto L_ = static_cast<std::size_t>(l);
  const auto len = paged.row_lengths(l);
  index_t most = 0;
  for (index_t s = 0; s < e.B; ++s)
    for (index_t h = 0; h < e.Hkv; ++h) {
      index_t changed = 0;
      for (index_t j = 0; j < len[static_cast<std::size_t>(s * e.Hkv + h)]; ++j) {
        const auto o = static_cast<std::size_t>(e.offset(l, s, h, j));
        changed += std::memcmp(e.kpool[L_].data() + o, k0.data() + o,
                               static_cast<std::size_t>(e.d) * sizeof(float)) != 0 ||
                   std::memcmp(e.vpool[L_].data() + o, v0.data() + o,
                               static_cast<std::size_t>(e.d) * sizeof(float)) != 0;
      }
      most = std::max(most, changed);
    }
  return most;
}

// Prefill then `steps` decoding steps, dense and paged side by side, compared after
// every call.
// S = 40 is cut (C = 16, w = 4); S = 18 fits, and the first decoding step cuts it;
// S = 10 fits, so rows grow while decoding and the engine lends new blocks.
template <class Cache>
void run_both(const Run& r, unsigned seed, index_t S, int steps = 6) {
  const cake::CacheConfig cfg = config(r);
  const Workload wl = kv_test::make_workload(cfg, S, seed, steps);
  Engine e = make_engine(wl, r.bs, r.nhd, 2, seed);
  Cache dense(cfg), paged(cfg);
  for (index_t l = 0; l < cfg.layers; ++l) {
    dense.prefill(l, wl.qv(l), wl.kv(l), wl.vv(l));
    paged.prefill(l, wl.qv(l), e.kv(l));
    take_back(e, paged);
    check_equal(dense, paged, e);
  }
  for (int t = 0; t < steps; ++t)
    for (index_t l = 0; l < cfg.layers; ++l) {
      CAPTURE(t);
      dense.decode(l, wl.dqv(static_cast<std::size_t>(t), l),
                   wl.dkv(static_cast<std::size_t>(t), l), wl.dvv(static_cast<std::size_t>(t), l));
      give_room(e, l);
      const auto lens = paged.row_lengths(l);
      const bool uniform =
          std::adjacent_find(lens.begin(), lens.end(), std::not_equal_to<>()) == lens.end();
      const std::vector<float> k0 = e.kpool[static_cast<std::size_t>(l)],
                               v0 = e.vpool[static_cast<std::size_t>(l)];
      paged.decode(l, wl.dqv(static_cast<std::size_t>(t), l),
                   wl.dkv(static_cast<std::size_t>(t), l), wl.dvv(static_cast<std::size_t>(t), l),
                   e.table(l));
      take_back(e, paged);
      // one K/V row per row and step; a step that cuts a row (the first after a prompt
      // that fit) one per token it evicts
      const index_t evicted = lens[0] + 1 - paged.row_lengths(l)[0];
      if (r.slots == cake::slot_order::any && uniform)
        CHECK(most_changed(paged, e, l, k0, v0) <= std::max<index_t>(1, evicted));
      check_equal(dense, paged, e);
    }
}

template <class Cache>
void every_run(const char* name) {
  unsigned seed = 11;
  for (auto slots : {cake::slot_order::token, cake::slot_order::any})
    for (auto order : {cake::token_order::position, cake::token_order::reference})
      for (bool cascade : {true, false})
        for (bool nhd : {false, true})
          for (index_t bs : {1, 16, 3}) {  // 3 does not divide the window (4)
            // any order: the layouts that differ most (NHD, blocks not dividing w)
            if (slots == cake::slot_order::any && (!nhd || bs == 1)) continue;
            const Run r{order, cascade, nhd, bs, slots};
            const std::string what =
                std::string(name) +
                (order == cake::token_order::position ? " position" : " reference") +
                (cascade ? " cascade" : " one-shot") + (nhd ? " NHD" : " HND") + " block_size " +
                std::to_string(bs) + (slots == cake::slot_order::any ? " any order" : "");
            INFO(what);
            run_both<Cache>(r, ++seed, 40);
            run_both<Cache>(r, ++seed, 18);
            run_both<Cache>(r, ++seed, 10);
          }
}

// Everything an engine or a caller can observe of a paged cache and its pools.
struct State {
  cake_test::Snapshot cache;
  std::vector<std::uint32_t> k, v;  // every pool, as bits
  bool operator==(const State&) const = default;
};
inline std::vector<std::uint32_t> bits(const std::vector<std::vector<float>>& pools) {
  std::vector<std::uint32_t> out;
  for (const auto& p : pools)
    for (float f : p) out.push_back(std::bit_cast<std::uint32_t>(f));
  return out;
}
template <class Cache>
State state(const Cache& c, const Engine& e) {
  return {cake_test::snapshot(c), bits(e.kpool), bits(e.vpool)};
}

// The call throws cake::error whose message names `what`, and nothing changes.
template <class Cache, class F>
void rejects(const Cache& c, const Engine& e, F&& call, const std::string& what) {
  const State before = state(c, e);
  std::string msg;
  try {
    call();
  } catch (const cake::error& err) {
    msg = err.what();
  }
  CAPTURE(msg);
  REQUIRE(!msg.empty());
  CHECK(msg.find(what) != std::string::npos);
  CHECK(state(c, e) == before);
}

}  // namespace paged_cache_test

using namespace paged_cache_test;
namespace m = cake::methods;

TEST_CASE("paged KvCache equals the dense one on every method, token by token") {
  SUBCASE("cake") { every_run<m::Cake<>>("cake"); }
  SUBCASE("snapkv") { every_run<m::SnapKv<>>("snapkv"); }
  SUBCASE("pyramidkv") { every_run<m::PyramidKv<>>("pyramidkv"); }
  SUBCASE("streamingllm") { every_run<m::StreamingLlm<>>("streamingllm"); }
  SUBCASE("h2o") { every_run<m::H2o<>>("h2o"); }
  SUBCASE("tova") { every_run<m::Tova<>>("tova"); }
  SUBCASE("ada_snapkv") { every_run<m::AdaSnapKv<>>("ada_snapkv"); }
  SUBCASE("cake_adakv") { every_run<m::CakeAdaKv<>>("cake_adakv"); }
}

TEST_CASE("paged KvCache: head-wise rows are ragged, padded with zero K/V in the pools") {
  // The equality above covers it only if some rows differ: make sure they do.
  const Run r{cake::token_order::position, true, false, 3};
  const cake::CacheConfig cfg = config(r);
  const Workload wl = kv_test::make_workload(cfg, 40, 5, 0);
  Engine e = make_engine(wl, r.bs, r.nhd, 1, 5);
  m::AdaSnapKv<> c(cfg);
  for (index_t l = 0; l < cfg.layers; ++l) {
    c.prefill(l, wl.qv(l), e.kv(l));
    take_back(e, c);
  }
  bool ragged = false;
  for (index_t l = 0; l < cfg.layers; ++l) {
    const auto len = c.row_lengths(l);
    ragged = ragged ||
             *std::min_element(len.begin(), len.end()) != *std::max_element(len.begin(), len.end());
  }
  CHECK(ragged);
}

TEST_CASE("paged KvCache: blocks past the kept tokens are freed, the rest held") {
  // A prompt of 40 in blocks of 16 with 2 spare blocks each: 5 blocks (6 for
  // sequence 1); a layer keeping 16 tokens holds one block and frees the others.
  const Run r{cake::token_order::position, true, false, 16};
  const cake::CacheConfig cfg = config(r);
  const Workload wl = kv_test::make_workload(cfg, 40, 9, 0);
  Engine e = make_engine(wl, r.bs, r.nhd, 2, 9);
  m::SnapKv<> c(cfg);
  for (index_t l = 0; l < cfg.layers; ++l) {
    c.prefill(l, wl.qv(l), e.kv(l));
    for (index_t s = 0; s < cfg.batch; ++s)  // lent 3 + 2 + s; kept what seq_lens needs
      CHECK(c.freed(l)[static_cast<std::size_t>(s)] == 5 + s - (c.table(l).seq_lens(s) + 15) / 16);
    take_back(e, c);
  }
  for (index_t l = 0; l < cfg.layers; ++l)
    for (index_t s = 0; s < cfg.batch; ++s) {
      CHECK(c.table(l).seq_lens(s) == cfg.cache_size);  // uniform budget: C tokens
      CHECK(c.table(l).indptr(s + 1) - c.table(l).indptr(s) == 1);
    }
  CHECK(c.freed(cfg.layers - 1)[0] == 4);  // the last layer: 5 lent, 1 kept
  CHECK(c.freed(cfg.layers - 1)[1] == 5);
}

TEST_CASE("paged KvCache: bad pools and tables are rejected before anything changes") {
  const Run r{cake::token_order::position, true, true, 3};
  const cake::CacheConfig cfg = config(r);
  const Workload wl = kv_test::make_workload(cfg, 40, 21, 1);
  Engine e = make_engine(wl, r.bs, r.nhd, 1, 21);
  m::Cake<> c(cfg);
  c.prefill(0, wl.qv(0), e.kv(0));
  take_back(e, c);
  const auto q1 = wl.qv(1);

  SUBCASE("prefill: id out of range") {
    auto kv = e.kv(1);
    e.t_ids[2] = static_cast<std::int32_t>(e.N);
    rejects(
        c, e, [&] { c.prefill(1, q1, kv); }, "must be a block of the pool");
  }
  SUBCASE("prefill: negative id") {
    auto kv = e.kv(1);
    e.t_ids[0] = -1;
    rejects(
        c, e, [&] { c.prefill(1, q1, kv); }, "ids(0)");
  }
  SUBCASE("prefill: duplicated id") {
    auto kv = e.kv(1);
    e.t_ids.back() = e.t_ids.front();
    rejects(
        c, e, [&] { c.prefill(1, q1, kv); }, "appears twice");
  }
  SUBCASE("prefill: table too short") {
    auto kv = e.kv(1);
    // Sequence 0 keeps ceil(40 / 3) = 14 blocks less one.
    const std::int32_t need = (40 + 2) / 3;
    std::vector<std::int32_t> indptr{0, need - 1, e.t_indptr[2] - (e.t_indptr[1] - need + 1)};
    std::vector<std::int32_t> ids(e.t_ids.begin(), e.t_ids.begin() + need - 1);
    ids.insert(ids.end(), e.t_ids.begin() + e.t_indptr[1], e.t_ids.end());
    kv.table = cake::make_block_table(indptr.data(), ids.data(), e.t_lens.data(), 2);
    rejects(
        c, e, [&] { c.prefill(1, q1, kv); }, "too short");
  }
  SUBCASE("prefill: one table per batch entry") {
    auto kv = e.kv(1);
    kv.table = cake::make_block_table(e.t_indptr.data(), e.t_ids.data(), e.t_lens.data(), 1);
    rejects(
        c, e, [&] { c.prefill(1, q1, kv); }, "one sequence per batch entry");
  }
  SUBCASE("prefill: sequences of another prompt length") {
    auto kv = e.kv(1);
    e.t_lens[1] = 39;
    rejects(
        c, e, [&] { c.prefill(1, q1, kv); }, "seq_lens(1) must be seq_lens(0) = 40");
  }
  SUBCASE("prefill: pools of the wrong shape") {
    auto kv = e.kv(1);
    const auto st = e.strides();
    kv.k_pool = cake::make_view(e.kpool[1].data(), std::array<index_t, 4>{e.N, 1, e.bs, e.d}, st);
    rejects(
        c, e, [&] { c.prefill(1, q1, kv); }, "k_pool must be (num_blocks, kv_heads = 2");
    kv = e.kv(1);
    kv.v_pool =
        cake::make_view(e.vpool[1].data(), std::array<index_t, 4>{e.N - 1, e.Hkv, e.bs, e.d}, st);
    rejects(
        c, e, [&] { c.prefill(1, q1, kv); }, "k_pool and v_pool must have the same");
    kv = e.kv(1);
    kv.v_pool = kv.k_pool;
    rejects(
        c, e, [&] { c.prefill(1, q1, kv); }, "must not overlap");
  }
  SUBCASE("prefill: an infinite key in the pool (read in place, never copied)") {
    auto kv = e.kv(1);
    float& x = e.kpool[1][static_cast<std::size_t>(e.offset(1, 0, 1, 17) + 2)];
    const float was = x;
    x = -std::numeric_limits<float>::infinity();
    rejects(
        c, e, [&] { c.prefill(1, q1, kv); }, "k_pool");
    x = was;
  }
  SUBCASE("prefill: a NaN in the values in the pool") {
    auto kv = e.kv(1);
    float& x = e.vpool[1][static_cast<std::size_t>(e.offset(1, 1, 1, 39) + 3)];
    const float was = x;
    x = std::numeric_limits<float>::infinity();
    rejects(
        c, e, [&] { c.prefill(1, q1, kv); }, "v_pool");
    x = was;
  }

  // Decoding: layer 0 is prefilled; finish the prefill first.
  for (index_t l = 1; l < cfg.layers; ++l) {
    c.prefill(l, wl.qv(l), e.kv(l));
    take_back(e, c);
  }
  const auto dq = wl.dqv(0, 2);
  const auto dk = wl.dkv(0, 2);
  const auto dv = wl.dvv(0, 2);
  give_room(e, 2);

  SUBCASE("decode: no room for the new token") {
    // Sequence 0 lends one block fewer than its held tokens plus the new one need.
    const index_t len = c.table(2).seq_lens(0), need = (len + 1 + 2) / 3;
    auto t = e.table(2);
    std::vector<std::int32_t> indptr{0, static_cast<std::int32_t>(need - 1)};
    std::vector<std::int32_t> ids(e.t_ids.begin(), e.t_ids.begin() + need - 1);
    ids.insert(ids.end(), e.t_ids.begin() + e.t_indptr[1], e.t_ids.end());
    indptr.push_back(static_cast<std::int32_t>(ids.size()));
    t = cake::make_block_table(indptr.data(), ids.data(), e.t_lens.data(), 2);
    rejects(
        c, e, [&] { c.decode(2, dq, dk, dv, t); }, "too short");
  }
  SUBCASE("decode: a held block replaced") {
    auto t = e.table(2);
    std::swap(e.t_ids[0], e.t_ids[1]);
    const cake::status st = c.validate_decode(2, dq, dk, dv, t);  // reports, changes nothing
    CHECK(st.id == "cake.decode.table");
    CHECK(st.message.find("which holds tokens of sequence 0") != std::string::npos);
    rejects(
        c, e, [&] { c.decode(2, dq, dk, dv, t); }, "which holds tokens of sequence 0");
  }
  SUBCASE("decode: id out of range") {
    auto t = e.table(2);
    e.t_ids.back() = static_cast<std::int32_t>(e.N + 7);
    rejects(
        c, e, [&] { c.decode(2, dq, dk, dv, t); }, "must be a block of the pool");
  }
  SUBCASE("decode: duplicated id") {
    auto t = e.table(2);
    e.t_ids.back() = e.t_ids[0];
    rejects(
        c, e, [&] { c.decode(2, dq, dk, dv, t); }, "appears twice");
  }
  SUBCASE("decode: lengths other than the cache's") {
    auto t = e.table(2);
    e.t_lens[1] += 1;
    rejects(
        c, e, [&] { c.decode(2, dq, dk, dv, t); }, "must be the tokens the cache holds");
  }
  SUBCASE("decode: a paged layer needs its table, and has no dense views") {
    rejects(
        c, e, [&] { c.decode(2, dq, dk, dv); }, "pass its block table");
    CHECK_THROWS_AS((void)c.keys(2), cake::logic_error);
    CHECK_THROWS_AS((void)c.values(2), cake::logic_error);
    // in token order (the default) a token's slot is its index: no token_slots
    rejects(
        c, e, [&] { (void)c.token_slots(2); }, "slot_order::token");
  }
  SUBCASE("decode: a good table after the rejected ones") {
    CHECK(c.validate_decode(2, dq, dk, dv, e.table(2)).ok());
    CHECK(c.validate_decode(2, dq, dk, dv).id == "cake.decode.table");  // paged: needs the table
    c.decode(2, dq, dk, dv, e.table(2));
    take_back(e, c);
  }
}

TEST_CASE("paged KvCache: a decode needs a new block when the last one is full") {
  // SnapKV keeps C = 16 tokens per layer: four full blocks of 4.
  const Run r{cake::token_order::reference, true, false, 4};
  const cake::CacheConfig cfg = config(r);
  const Workload wl = kv_test::make_workload(cfg, 40, 33, 2);
  Engine e = make_engine(wl, r.bs, r.nhd, 0, 33);
  m::SnapKv<> c(cfg);
  for (index_t l = 0; l < cfg.layers; ++l) {
    c.prefill(l, wl.qv(l), e.kv(l));
    take_back(e, c);
  }
  REQUIRE(c.table(1).seq_lens(0) == 16);
  REQUIRE(c.table(1).indptr(1) == 4);
  const auto t = e.table(1);  // no room given
  rejects(
      c, e, [&] { c.decode(1, wl.dqv(0, 1), wl.dkv(0, 1), wl.dvv(0, 1), t); },
      "too short for the new token: 17 tokens need 5 blocks of 4, got 4");
  // With a fifth block the token goes in, one token is evicted, and the fifth block
  // comes back: the sequence holds 16 tokens again.
  give_room(e, 1);
  const std::int32_t fifth = e.blocks[1][0].back();
  c.decode(1, wl.dqv(0, 1), wl.dkv(0, 1), wl.dvv(0, 1), e.table(1));
  CHECK(c.freed(1)[0] == 1);
  CHECK(c.freed(0)[0] == 0);  // a layer the call left alone
  take_back(e, c);
  CHECK(std::find(e.free_list.begin(), e.free_list.end(), fifth) != e.free_list.end());
}

namespace paged_cache_test {

// The window statistics of keys in a block pool, read through its table (as a paged
// prefill scores them) and of the same keys in a dense tensor.
template <class T>
void paged_stats_equal(cake::host_isa isa, index_t bs, bool nhd, bool shuffled, unsigned seed) {
  const index_t B = 2, H = 4, Hkv = 2, w = 8, d = 32, S = 300, P = S - w;
  std::mt19937 gen(seed);
  std::normal_distribution<float> dist(0.0f, 1.0f);
  std::vector<float> q(static_cast<std::size_t>(B * H * w * d));
  std::vector<T> k(static_cast<std::size_t>(B * Hkv * S * d));
  for (float& x : q) x = dist(gen);
  for (T& x : k) x = static_cast<T>(dist(gen));
  const index_t nb = (S + bs - 1) / bs, N = B * nb + 3;  // three blocks no one uses
  std::vector<std::int32_t> ids(static_cast<std::size_t>(N)), indptr;
  std::iota(ids.begin(), ids.end(), 0);
  if (shuffled) std::shuffle(ids.begin(), ids.end(), gen);
  for (index_t s = 0; s <= B; ++s) indptr.push_back(static_cast<std::int32_t>(s * nb));
  cake::detail::paged_rows<T> p;
  p.k_block = bs * Hkv * d;
  p.k_head = nhd ? d : bs * d;
  p.k_slot = nhd ? Hkv * d : d;
  p.indptr = indptr.data();
  p.ids = ids.data();
  p.set_block_size(bs);  // a shift where bs is a power of two (the list below: division)
  p.kv_heads = Hkv;
  p.num_blocks = N;
  std::vector<T> pool(static_cast<std::size_t>(N * bs * Hkv * d), static_cast<T>(7.0f));
  p.k = pool.data();
  for (index_t b = 0; b < B; ++b)
    for (index_t g = 0; g < Hkv; ++g)
      for (index_t j = 0; j < S; ++j)
        std::copy_n(&k[static_cast<std::size_t>(((b * Hkv + g) * S + j) * d)], d,
                    p.key(b * Hkv + g, j));
  const auto qv =
      cake::make_view(static_cast<const float*>(q.data()), std::array<index_t, 4>{B, H, w, d});
  const auto kv =
      cake::make_view(static_cast<const T*>(k.data()), std::array<index_t, 4>{B, Hkv, S, d});
  std::vector<float> od(static_cast<std::size_t>(B * Hkv * P)), op(od.size());
  std::array<float, 2> sd{}, sp{};
  const auto out = [&](std::vector<float>& o) {
    return cake::make_view(o.data(), std::array<index_t, 3>{B, Hkv, P});
  };
  const auto st = [](std::array<float, 2>& a) {
    return cake::make_view(a.data(), std::array<index_t, 1>{2});
  };
  const cake::MeanVarianceIndicator ind{};
  cake::force_host_isa(isa);
  cake::window_stats(cake::host, qv, kv, ind, out(od), st(sd));
  cake::window_stats_backend<cake::host_policy>::run_keys(
      cake::host, qv,
      cake::detail::paged_keys<const T>{
          {p.k, nullptr, p.k_block, p.k_head, p.k_slot, 0, 0, 0, p.indptr, p.ids, bs, Hkv, N}, S},
      ind, out(op), st(sp), cake::StatsRequest{});
  INFO(cake::host_isa_name(isa) << " block_size " << bs << (nhd ? " NHD" : " HND")
                                << (shuffled ? " shuffled" : " in order"));
  for (std::size_t i = 0; i < od.size(); ++i) {
    CAPTURE(i);
    REQUIRE(std::bit_cast<std::uint32_t>(od[i]) == std::bit_cast<std::uint32_t>(op[i]));
  }
  CHECK(std::bit_cast<std::uint32_t>(sd[0]) == std::bit_cast<std::uint32_t>(sp[0]));
  CHECK(std::bit_cast<std::uint32_t>(sd[1]) == std::bit_cast<std::uint32_t>(sp[1]));
  CHECK(sd[0] > 0.0f);  // the statistics were computed (entropy of 16 rows)
}

}  // namespace paged_cache_test

// Block sizes that split the kernels' key tiles (1, 7, 16) and that hold whole tiles
// (128, 256); NHD pools with blocks in order make runs that continue over blocks.
TEST_CASE("paged window statistics equal the dense ones bit for bit on every kernel path") {
  const cake::host_isa saved = cake::active_host_isa();
  unsigned seed = 40;
  for (cake::host_isa isa :
       {cake::host_isa::portable, cake::host_isa::avx2, cake::host_isa::avx512}) {
    if (!cake::host_isa_supported(isa)) continue;
    for (index_t bs : {1, 7, 16, 128, 256})
      for (bool nhd : {false, true})
        for (bool shuffled : {true, false}) {
          paged_stats_equal<float>(isa, bs, nhd, shuffled, ++seed);
          paged_stats_equal<cake::bfloat16>(isa, bs, nhd, shuffled, ++seed);
        }
  }
  cake::force_host_isa(saved);
}
