// The paged KvCache on cake::cuda (an engine's pools in device memory, its block
// table on the host) against the paged KvCache on the host and against the dense
// KvCache on cake::cuda: every method, both token orders, cascading and one-shot,
// block sizes 1, 3 and 16, HND and NHD pools, a prefill then 6 decoding steps in
// every layer. After every call: the same budgets, row lengths, positions, tables
// and freed blocks as the host (the toy engine's bookkeeping checked as it goes:
// no block both freed and held, none leaked), and in the pools the tokens, K/V bit
// for bit, that the host's pools and the dense CUDA cache hold (slot by slot in
// position order; as a set per row in reference order, where the last bits of the
// scores may order near-equal tokens differently). Bad input is rejected before
// anything changes, as on the host. (main() and the no-GPU skip live in
// test_cuda.cu.)
#include <doctest/doctest.h>

#include <cake/cake.cuh>
#include <cake/methods.hpp>

#include <algorithm>
#include <array>
#include <bit>
#include <cstdint>
#include <memory>
#include <string>
#include <tuple>
#include <vector>

#include "../host/kv_workload.hpp"
#include "../support/paged_engine.hpp"
#include "device_buffer.cuh"

namespace {

using namespace cake_cuda_test;
using paged_engine::Engine;

// The toy engine with its pools in device memory: the host Engine keeps the
// bookkeeping (block lists, free list, the tables it lends) and, after sync(), a
// host copy of every pool.
struct DeviceEngine {
  Engine e;
  std::vector<std::unique_ptr<DeviceBuffer<float>>> k, v;  // [layer] N * Hkv * bs * d
  explicit DeviceEngine(const Engine& host) : e(host) {
    for (index_t l = 0; l < e.L; ++l) {
      k.push_back(std::make_unique<DeviceBuffer<float>>(e.kpool[static_cast<std::size_t>(l)]));
      v.push_back(std::make_unique<DeviceBuffer<float>>(e.vpool[static_cast<std::size_t>(l)]));
    }
  }
  cake::paged_kv<float, cake::device_space> kv(index_t l) {
    const std::array<index_t, 4> ext{e.N, e.Hkv, e.bs, e.d};
    return {cake::make_view<cake::device_space>(k[static_cast<std::size_t>(l)]->get(), ext,
                                                e.strides()),
            cake::make_view<cake::device_space>(v[static_cast<std::size_t>(l)]->get(), ext,
                                                e.strides()),
            e.table(l)};
  }
  void sync() {
    for (index_t l = 0; l < e.L; ++l) {
      e.kpool[static_cast<std::size_t>(l)] = k[static_cast<std::size_t>(l)]->download();
      e.vpool[static_cast<std::size_t>(l)] = v[static_cast<std::size_t>(l)]->download();
    }
  }
};

using Token = std::tuple<index_t, std::vector<std::uint32_t>, std::vector<std::uint32_t>>;
std::vector<std::uint32_t> bits(const float* p, index_t d) {
  std::vector<std::uint32_t> out(static_cast<std::size_t>(d));
  for (index_t x = 0; x < d; ++x)
    out[static_cast<std::size_t>(x)] = std::bit_cast<std::uint32_t>(p[x]);
  return out;
}

// Row (s, h) of a paged layer: (position, K bits, V bits) of its first `n` slots,
// then the padding up to the sequence's length; pos: (B, Hkv, extent) dense.
std::vector<Token> paged_row(const Engine& e, index_t l, index_t s, index_t h, index_t n,
                             index_t longest, const std::vector<index_t>& pos, index_t extent) {
  std::vector<Token> out;
  for (index_t j = 0; j < longest; ++j)
    out.emplace_back(j < n ? pos[static_cast<std::size_t>((s * e.Hkv + h) * extent + j)] : -1,
                     bits(e.key(l, s, h, j), e.d), bits(e.value(l, s, h, j), e.d));
  return out;
}

// The paged CUDA cache against the paged host cache (their engines' pools as
// synced) and the dense CUDA cache.
template <class Host, class Dev, class Dense>
void check_same(const Host& host, const Engine& eh, const Dev& dev, const Engine& ed,
                const Dense& dense) {
  const auto& cfg = host.config();
  REQUIRE(host.layers_prefilled() == dev.layers_prefilled());
  REQUIRE(std::vector<index_t>(host.budgets().begin(), host.budgets().end()) ==
          std::vector<index_t>(dev.budgets().begin(), dev.budgets().end()));
  REQUIRE(host.stage_budgets() == dev.stage_budgets());
  for (index_t l = 0; l < host.layers_prefilled(); ++l) {
    CAPTURE(l);
    REQUIRE(dev.paged(l));
    REQUIRE(host.row_lengths(l) == dev.row_lengths(l));
    REQUIRE(dense.row_lengths(l) == dev.row_lengths(l));
    REQUIRE(host.tokens_held(l) == dev.tokens_held(l));
    const auto th = host.table(l), td = dev.table(l);
    for (index_t s = 0; s < cfg.batch; ++s) {
      CAPTURE(s);
      REQUIRE(th.seq_lens(s) == td.seq_lens(s));
      REQUIRE(th.indptr(s + 1) - th.indptr(s) == td.indptr(s + 1) - td.indptr(s));
      for (index_t i = 0; i < th.indptr(s + 1) - th.indptr(s); ++i)
        REQUIRE(th.ids(th.indptr(s) + i) == td.ids(td.indptr(s) + i));
      REQUIRE(host.freed(l)[static_cast<std::size_t>(s)] ==
              dev.freed(l)[static_cast<std::size_t>(s)]);
    }
    const auto len = dev.row_lengths(l);
    const std::vector<index_t> ph = flatten(host.positions(l)), pd = download(dev.positions(l));
    const index_t n_host = host.positions(l).extent(2), n_dev = dev.positions(l).extent(2);
    const index_t n_dense = dense.positions(l).extent(2);
    const std::vector<index_t> p_dense = download(dense.positions(l));
    const std::vector<float> k_dense = download(dense.keys(l)), v_dense = download(dense.values(l));
    for (index_t s = 0; s < cfg.batch; ++s)
      for (index_t h = 0; h < cfg.kv_heads; ++h) {
        CAPTURE(s);
        CAPTURE(h);
        const index_t n = len[static_cast<std::size_t>(s * cfg.kv_heads + h)];
        const index_t longest = td.seq_lens(s);
        auto a = paged_row(eh, l, s, h, n, longest, ph, n_host);
        auto b = paged_row(ed, l, s, h, n, longest, pd, n_dev);
        // The dense CUDA cache's row: the same backend, the same tokens.
        std::vector<Token> c;
        for (index_t j = 0; j < longest; ++j) {
          const auto at =
              static_cast<std::size_t>(((s * cfg.kv_heads + h) * n_dense + j) * cfg.head_dim);
          c.emplace_back(
              j < n ? p_dense[static_cast<std::size_t>((s * cfg.kv_heads + h) * n_dense + j)] : -1,
              bits(k_dense.data() + at, cfg.head_dim), bits(v_dense.data() + at, cfg.head_dim));
        }
        // In reference order the kept prefix is ordered by score: scores that differ in
        // the last bits (the host's; the dense cache scores keys at another row
        // stride) may order near-equal tokens differently, never hold different ones.
        // Position order is exact.
        if (cfg.order == cake::token_order::reference) {
          std::sort(a.begin(), a.end());
          std::sort(b.begin(), b.end());
          std::sort(c.begin(), c.end());
        }
        CHECK(b == c);
        CHECK(a == b);
      }
  }
}

struct Run {
  cake::token_order order;
  bool cascade;
  bool nhd;
  index_t bs;
};

// Prefill, then `steps` decoding steps in every layer: host paged, CUDA paged and
// CUDA dense side by side, compared after every call.
template <template <class, class> class M>
void run_all(const Run& r, unsigned seed, index_t S, int steps = 6) {
  cake::CacheConfig cfg = kv_test::small_config(r.cascade);
  cfg.order = r.order;
  const kv_test::Workload wl = kv_test::make_workload(cfg, S, seed, steps);
  Engine eh = paged_engine::make_engine(cfg, wl.S, wl.k, wl.v, r.bs, r.nhd, 2, seed);
  DeviceEngine ed(eh);
  M<float, cake::host_policy> host(cfg);
  M<float, cake::cuda_policy> dev(cfg), dense(cfg);
  const index_t B = cfg.batch, H = cfg.q_heads, Hkv = cfg.kv_heads, d = cfg.head_dim,
                w = cfg.window;
  for (index_t l = 0; l < cfg.layers; ++l) {
    DeviceBuffer<float> q(wl.q[static_cast<std::size_t>(l)]), k(wl.k[static_cast<std::size_t>(l)]),
        v(wl.v[static_cast<std::size_t>(l)]);
    host.prefill(l, wl.qv(l), eh.kv(l));
    dev.prefill(l, q.const_view(std::array<index_t, 4>{B, H, w, d}), ed.kv(l));
    dense.prefill(l, q.const_view(std::array<index_t, 4>{B, H, w, d}),
                  k.const_view(std::array<index_t, 4>{B, Hkv, S, d}),
                  v.const_view(std::array<index_t, 4>{B, Hkv, S, d}));
    ed.sync();
    paged_engine::take_back(eh, host);
    paged_engine::take_back(ed.e, dev);
    check_same(host, eh, dev, ed.e, dense);
  }
  for (int t = 0; t < steps; ++t)
    for (index_t l = 0; l < cfg.layers; ++l) {
      CAPTURE(t);
      const auto st = static_cast<std::size_t>(t);
      const auto lu = static_cast<std::size_t>(l);
      DeviceBuffer<float> q(wl.dq[st][lu]), k(wl.dk[st][lu]), v(wl.dv[st][lu]);
      const auto qv = q.const_view(std::array<index_t, 3>{B, H, d});
      const auto kv = k.const_view(std::array<index_t, 3>{B, Hkv, d});
      const auto vv = v.const_view(std::array<index_t, 3>{B, Hkv, d});
      paged_engine::give_room(eh, l);
      paged_engine::give_room(ed.e, l);
      host.decode(l, wl.dqv(st, l), wl.dkv(st, l), wl.dvv(st, l), eh.table(l));
      dev.decode(l, qv, kv, vv, ed.e.table(l));
      dense.decode(l, qv, kv, vv);
      ed.sync();
      paged_engine::take_back(eh, host);
      paged_engine::take_back(ed.e, dev);
      check_same(host, eh, dev, ed.e, dense);
    }
}

template <template <class, class> class M>
void every_run(const char* name) {
  unsigned seed = 11;
  for (auto order : {cake::token_order::position, cake::token_order::reference})
    for (bool cascade : {true, false})
      for (bool nhd : {false, true})
        for (index_t bs : {1, 16, 3}) {  // 3 does not divide the window (4)
          INFO(name << (order == cake::token_order::position ? " position" : " reference")
                    << (cascade ? " cascade" : " one-shot") << (nhd ? " NHD" : " HND")
                    << " block_size " << bs);
          const Run r{order, cascade, nhd, bs};
          run_all<M>(r, ++seed, 40);  // cut at prefill
          run_all<M>(r, ++seed, 10);  // fits: rows grow while decoding, new blocks lent
        }
}

namespace m = cake::methods;

}  // namespace

TEST_SUITE("gpu") {
  TEST_CASE("paged KvCache on CUDA equals the host's and the dense CUDA cache, every method") {
    SUBCASE("cake") { every_run<m::Cake>("cake"); }
    SUBCASE("snapkv") { every_run<m::SnapKv>("snapkv"); }
    SUBCASE("pyramidkv") { every_run<m::PyramidKv>("pyramidkv"); }
    SUBCASE("streamingllm") { every_run<m::StreamingLlm>("streamingllm"); }
    SUBCASE("h2o") { every_run<m::H2o>("h2o"); }
    SUBCASE("tova") { every_run<m::Tova>("tova"); }
    SUBCASE("ada_snapkv") { every_run<m::AdaSnapKv>("ada_snapkv"); }
    SUBCASE("cake_adakv") { every_run<m::CakeAdaKv>("cake_adakv"); }
  }

  TEST_CASE("paged KvCache on CUDA keeps paged tokens in token order: slot_order::any refused") {
    cake::CacheConfig cfg = kv_test::small_config(true);
    cfg.paged_slots = cake::slot_order::any;
    using Device = m::Cake<float, cake::cuda_policy>;
    CHECK_THROWS_WITH_AS(Device{cfg}, doctest::Contains("needs a backend with slot maps"),
                         cake::invalid_argument);
  }

  TEST_CASE("paged KvCache on CUDA: bad tables are rejected before anything changes") {
    cake::CacheConfig cfg = kv_test::small_config(true);
    const kv_test::Workload wl = kv_test::make_workload(cfg, 40, 3, 1);
    Engine eh = paged_engine::make_engine(cfg, wl.S, wl.k, wl.v, 1, false, 2, 3);
    DeviceEngine ed(eh);
    m::Cake<float, cake::cuda_policy> dev(cfg);
    const index_t B = cfg.batch, H = cfg.q_heads, Hkv = cfg.kv_heads, d = cfg.head_dim,
                  w = cfg.window;
    DeviceBuffer<float> q(wl.q[0]);
    const auto qv = q.const_view(std::array<index_t, 4>{B, H, w, d});
    // A block id past the pool, then a block named twice: the host's messages.
    auto kv = ed.kv(0);
    std::vector<std::int32_t> ids = ed.e.t_ids, indptr = ed.e.t_indptr, lens = ed.e.t_lens;
    ids[1] = static_cast<std::int32_t>(ed.e.N);
    kv.table = cake::make_block_table(indptr.data(), ids.data(), lens.data(), B);
    const auto pool_bits = [&] {  // the pool holds NaN where nothing was written
      const std::vector<float> p = ed.k[0]->download();
      return bits(p.data(), static_cast<index_t>(p.size()));
    };
    const auto before = pool_bits();
    CHECK_THROWS_WITH_AS(dev.prefill(0, qv, kv), doctest::Contains("must be a block of the pool"),
                         cake::invalid_argument);
    ids[1] = ids[0];
    CHECK_THROWS_WITH_AS(dev.prefill(0, qv, kv), doctest::Contains("appears twice"),
                         cake::invalid_argument);
    CHECK(dev.layers_prefilled() == 0);
    CHECK(pool_bits() == before);
    // A valid table then; a decode's table too short for the new token is refused.
    for (index_t l = 0; l < cfg.layers; ++l) {
      DeviceBuffer<float> ql(wl.q[static_cast<std::size_t>(l)]);
      dev.prefill(l, ql.const_view(std::array<index_t, 4>{B, H, w, d}), ed.kv(l));
      ed.sync();
      paged_engine::take_back(ed.e, dev);
    }
    // Blocks of one token: the held table has no room for a new one.
    DeviceBuffer<float> dq(wl.dq[0][0]), dk(wl.dk[0][0]), dv(wl.dv[0][0]);
    const std::vector<index_t> pos = download(dev.positions(0));
    const std::vector<index_t> lens_before = dev.row_lengths(0);
    CHECK_THROWS_WITH_AS(
        dev.decode(0, dq.const_view(std::array<index_t, 3>{B, H, d}),
                   dk.const_view(std::array<index_t, 3>{B, Hkv, d}),
                   dv.const_view(std::array<index_t, 3>{B, Hkv, d}), ed.e.table(0)),
        doctest::Contains("too short for the new token"), cake::invalid_argument);
    CHECK(download(dev.positions(0)) == pos);
    CHECK(dev.row_lengths(0) == lens_before);
  }
}  // TEST_SUITE
